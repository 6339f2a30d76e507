//! Header map operations with Envoy's semantics: names are lower-cased on write and matched
//! case-insensitively; a get returns the first value; replace leaves exactly one entry.

/// The first value of `name`.
pub(crate) fn first<'a>(map: &'a [(String, String)], name: &str) -> Option<&'a str> {
    map.iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

pub(crate) fn add(map: &mut Vec<(String, String)>, name: &str, value: &str) {
    map.push((name.to_ascii_lowercase(), value.to_string()));
}

pub(crate) fn remove(map: &mut Vec<(String, String)>, name: &str) {
    map.retain(|(key, _)| !key.eq_ignore_ascii_case(name));
}

/// Sets `name` to exactly one `value`, in the position of its first occurrence if any.
pub(crate) fn replace(map: &mut Vec<(String, String)>, name: &str, value: &str) {
    match map
        .iter()
        .position(|(key, _)| key.eq_ignore_ascii_case(name))
    {
        Some(index) => {
            map[index].1 = value.to_string();
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
pub(crate) fn normalized(pairs: Vec<(String, String)>) -> Vec<(String, String)> {
    pairs
        .into_iter()
        .map(|(key, value)| (key.to_ascii_lowercase(), value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn replace_keeps_one_entry_in_place() {
        let mut headers = map(&[("a", "1"), ("x-e", "2"), ("b", "3"), ("X-E", "4")]);
        replace(&mut headers, "x-E", "9");
        assert_eq!(headers, map(&[("a", "1"), ("x-e", "9"), ("b", "3")]));
        assert_eq!(first(&headers, "X-e"), Some("9"));
    }
}
