//! Unsigned integers as decimal text, appended to the caller's string: no `core::fmt` on a
//! request path, where it showed in profiles (the override header's addresses in the wasm
//! filter).

/// Appends `value` in decimal to `out`, one character at a time: no buffer to check as
/// UTF-8 and nothing to copy, for text built on a request path (the override header).
pub fn push_decimal(out: &mut String, value: u64) {
    let mut unit = 1;
    while value / unit >= 10 {
        unit *= 10;
    }
    loop {
        // One digit: the cast cannot truncate.
        out.push(char::from(b'0' + (value / unit % 10) as u8));
        if unit == 1 {
            break;
        }
        unit /= 10;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::push_decimal;

    proptest! {
        #[test]
        fn push_decimal_appends_what_display_writes(prefix in "[a-z]{0,3}", value: u64) {
            let mut out = prefix.clone();
            push_decimal(&mut out, value);
            prop_assert_eq!(out, format!("{prefix}{value}"));
        }
    }

    #[test]
    fn push_decimal_covers_the_extremes() {
        for value in [0, 9, 10, 99, 100, u64::MAX] {
            let mut out = String::new();
            push_decimal(&mut out, value);
            assert_eq!(out, value.to_string());
        }
    }
}
