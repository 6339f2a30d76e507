//! Header maps with Envoy's semantics: names and values are bytes (a client can send any, and
//! the guest must survive them); names are lower-cased on write and matched ASCII
//! case-insensitively; a get returns the first value; replace leaves exactly one entry.

/// A header map: `(name, value)` pairs in order, repeated names allowed.
pub(crate) type HeaderMap = Vec<(Vec<u8>, Vec<u8>)>;

/// The first value of `name`.
pub(crate) fn first<'a>(map: &'a [(Vec<u8>, Vec<u8>)], name: &[u8]) -> Option<&'a [u8]> {
    map.iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_slice())
}

pub(crate) fn add(map: &mut HeaderMap, name: &[u8], value: &[u8]) {
    map.push((name.to_ascii_lowercase(), value.to_vec()));
}

pub(crate) fn remove(map: &mut HeaderMap, name: &[u8]) {
    map.retain(|(key, _)| !key.eq_ignore_ascii_case(name));
}

/// Sets `name` to exactly one `value`, in the position of its first occurrence if any.
pub(crate) fn replace(map: &mut HeaderMap, name: &[u8], value: &[u8]) {
    match map
        .iter()
        .position(|(key, _)| key.eq_ignore_ascii_case(name))
    {
        Some(index) => {
            map[index].1 = value.to_vec();
            let mut seen = 0usize;
            map.retain(|(key, _)| {
                if key.eq_ignore_ascii_case(name) {
                    seen += 1;
                    seen == 1
                } else {
                    true
                }
            });
        }
        None => add(map, name, value),
    }
}

/// Lower-cases every name, as Envoy's header maps store them.
pub(crate) fn normalized(pairs: HeaderMap) -> HeaderMap {
    pairs
        .into_iter()
        .map(|(key, value)| (key.to_ascii_lowercase(), value))
        .collect()
}

/// Bytes as text for the string-typed accessors: invalid UTF-8 becomes U+FFFD.
pub(crate) fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn replace_keeps_one_entry_in_place() {
        let mut headers = map(&[("a", "1"), ("x-e", "2"), ("b", "3"), ("X-E", "4")]);
        replace(&mut headers, b"x-E", b"9");
        assert_eq!(headers, map(&[("a", "1"), ("x-e", "9"), ("b", "3")]));
        assert_eq!(first(&headers, b"X-e"), Some(&b"9"[..]));
    }

    #[test]
    fn names_and_values_that_are_not_utf8_are_kept_byte_for_byte() {
        let mut headers = HeaderMap::new();
        add(&mut headers, b"X-\xffName", b"\x80\xfe\x00v");
        assert_eq!(
            headers,
            vec![(b"x-\xffname".to_vec(), b"\x80\xfe\x00v".to_vec())]
        );
        assert_eq!(first(&headers, b"x-\xFFNAME"), Some(&b"\x80\xfe\x00v"[..]));
        remove(&mut headers, b"X-\xffNAME");
        assert!(headers.is_empty());
    }
}
