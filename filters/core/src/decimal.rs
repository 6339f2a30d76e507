//! Unsigned integers as decimal text, written into the caller's buffer or string: no
//! allocation and no `core::fmt` on a request path, where both showed in profiles (the
//! override header's addresses in the wasm filter, the stream id the native module names in a
//! header).

/// `value` in decimal, without leading zeros, written at the end of `buffer` (20 bytes hold
/// `u64::MAX`).
pub fn decimal(value: u64, buffer: &mut [u8; 20]) -> &str {
    let mut start = buffer.len();
    let mut rest = value;
    loop {
        start -= 1;
        // `rest % 10` is one digit: the cast cannot truncate.
        buffer[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buffer[start..]).unwrap_or_default()
}

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

    use super::{decimal, push_decimal};

    proptest! {
        #[test]
        fn decimal_writes_what_display_writes(value: u64) {
            let mut buffer = [0; 20];
            prop_assert_eq!(decimal(value, &mut buffer), value.to_string());
        }

        #[test]
        fn push_decimal_appends_what_display_writes(prefix in "[a-z]{0,3}", value: u64) {
            let mut out = prefix.clone();
            push_decimal(&mut out, value);
            prop_assert_eq!(out, format!("{prefix}{value}"));
        }
    }

    #[test]
    fn decimal_covers_the_extremes() {
        assert_eq!(decimal(0, &mut [0; 20]), "0");
        assert_eq!(decimal(u64::MAX, &mut [0; 20]), "18446744073709551615");
        for value in [0, 9, 10, 99, 100, u64::MAX] {
            let mut out = String::new();
            push_decimal(&mut out, value);
            assert_eq!(out, value.to_string());
        }
    }
}
