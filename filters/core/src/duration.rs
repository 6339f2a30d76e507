//! Durations in policies: human strings such as `"250ms"`, `"10s"`, `"1m30s"`.
//!
//! The same spelling Istio's DestinationRule uses (protobuf `Duration` in its JSON form, e.g.
//! `baseEjectionTime: 30s`), extended with Go's unit sequence so `"1m30s"` reads naturally.
//! Units: `ms`, `s`, `m`, `h`; each component is a whole number; the resolution is one
//! millisecond. Serialization writes the shortest exact form (`"1500ms"`, `"30s"`).
//!
//! Time at run time is different: the picker takes `now: std::time::Duration` measured
//! from an arbitrary monotonic epoch chosen by the caller (see the crate docs). Its
//! arithmetic goes through [`nanos`] and [`nanos_f64`], not `Duration::as_nanos`, whose `u128`
//! has no WebAssembly instruction: the filter paid a software multiplication and conversion
//! for each of the several a request makes.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

/// `duration` in nanoseconds, saturating at `u64::MAX` (584 years): `as_nanos` without its
/// `u128`.
pub fn nanos(duration: Duration) -> u64 {
    duration
        .as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(duration.subsec_nanos()))
}

/// `duration` in nanoseconds as a float: `as_nanos() as f64` without its `u128`, and the
/// same value below 2^53 ns (104 days), where both are exact.
pub fn nanos_f64(duration: Duration) -> f64 {
    duration.as_secs() as f64 * 1e9 + f64::from(duration.subsec_nanos())
}

/// Parses a human duration (`"250ms"`, `"10s"`, `"1m30s"`, `"2h"`).
///
/// Returns a message saying what was wrong; never panics, rejects overflow.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration; write e.g. \"250ms\" or \"10s\"".into());
    }
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total_ms: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "invalid duration {text:?}: expected a whole number before the unit, e.g. \"250ms\" or \"10s\""
            ));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let per_unit_ms: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "" => {
                return Err(format!(
                    "invalid duration {text:?}: missing unit; use ms, s, m or h (e.g. \"{number}ms\")"
                ));
            }
            other => {
                return Err(format!(
                    "invalid duration {text:?}: unknown unit {other:?}; use ms, s, m or h"
                ));
            }
        };
        let value: u64 = number
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: number too large"))?;
        total_ms = value
            .checked_mul(per_unit_ms)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(|| format!("invalid duration {text:?}: too large"))?;
        rest = after;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Formats a duration in the shortest exact form [`parse`] reads back (millisecond resolution).
pub fn format(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms == 0 {
        "0s".to_owned()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

/// `#[serde(with = "crate::duration")]` for `Duration` fields.
pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format(*duration))
}

/// `#[serde(with = "crate::duration")]` for `Duration` fields.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(D::Error::custom)
}

/// `#[serde(with = "crate::duration::option")]` for `Option<Duration>` fields.
pub mod option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Writes `Some(d)` as its human string and `None` as null.
    pub fn serialize<S: Serializer>(
        duration: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match duration {
            Some(duration) => super::serialize(duration, serializer),
            None => serializer.serialize_none(),
        }
    }

    /// Reads a human string or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| super::parse(&text).map_err(D::Error::custom))
            .transpose()
    }
}

/// The JSON Schema of a duration string (feature `schema`), for fields serialized with this
/// module: `#[schemars(with = "crate::duration::HumanDuration")]`. Never constructed; the
/// fields stay [`Duration`]s.
#[cfg(feature = "schema")]
#[derive(Debug)]
pub enum HumanDuration {}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": PATTERN,
            "description": "A duration: whole numbers with units ms, s, m or h, in sequence (\"250ms\", \"10s\", \"1m30s\"), or \"0\".",
            "examples": ["250ms", "10s", "1m30s"]
        })
    }
}

/// What [`parse`] accepts, as a regular expression (surrounding whitespace aside).
#[cfg(feature = "schema")]
pub const PATTERN: &str = "^(0|([0-9]+(ms|s|m|h))+)$";

#[cfg(test)]
mod nanos_tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::{nanos, nanos_f64};

    proptest! {
        #[test]
        fn nanos_is_as_nanos_saturated_to_u64(secs: u64, subsec in 0u32..1_000_000_000) {
            let duration = Duration::new(secs, subsec);
            prop_assert_eq!(
                nanos(duration),
                u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
            );
        }

        #[test]
        fn nanos_f64_is_as_nanos_as_a_float_below_2_to_the_53_ns(
            total in 0u64..(1u64 << 53),
        ) {
            let duration = Duration::from_nanos(total);
            prop_assert_eq!(nanos_f64(duration), duration.as_nanos() as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sequences() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_missing_or_unknown_units_and_overflow() {
        assert!(parse("10").unwrap_err().contains("missing unit"));
        assert!(parse("10us").unwrap_err().contains("unknown unit"));
        assert!(parse("").is_err());
        assert!(parse("s").is_err());
        assert!(parse("1.5s").is_err());
        assert!(parse("99999999999999999999h").is_err());
        assert!(parse("9999999999999999h").is_err());
    }

    #[test]
    fn formats_in_the_shortest_exact_unit() {
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format(Duration::from_secs(30)), "30s");
        assert_eq!(format(Duration::from_secs(120)), "2m");
        assert_eq!(format(Duration::ZERO), "0s");
    }

    proptest::proptest! {
        #[test]
        fn format_then_parse_round_trips(ms in 0u64..10_000_000_000) {
            let d = Duration::from_millis(ms);
            proptest::prop_assert_eq!(parse(&format(d)), Ok(d));
        }

        #[test]
        fn parse_never_panics(text in ".{0,24}") {
            let _ = parse(&text);
        }
    }
}
