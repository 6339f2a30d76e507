//! YAML from outside, deserialized only once what its aliases expand to is known to be
//! bounded.
//!
//! YAML's anchors and aliases let a short text stand for a long one: a 140 KB policy that
//! names one 100 KB string 10,000 times (`failover: [&z "…", *z, *z, …]`) deserializes to a
//! gigabyte. `serde_norway` bounds how often aliases are followed (100 times the document's
//! events), not the bytes they bring, so that document passes its check. Every YAML text
//! fulcrum reads from outside (the policy, the static endpoints file, the CLI's manifests)
//! goes through [`from_str`] or [`check_expansion`]: the document is first walked as
//! deserialization would see it, aliases followed, counting bytes without keeping any, and
//! refused past [`expansion_budget`] before anything is built.

use serde::{
    Deserializer,
    de::{
        self, DeserializeOwned, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess,
    },
};

/// What every value costs the walk on top of its bytes, about what a deserialized string or
/// collection costs in memory besides its contents.
const COST_PER_VALUE: usize = 8;

/// The most a document of `text_len` bytes may expand to through its aliases, in bytes as
/// [`check_expansion`] counts them (a value's bytes plus 8): 1 MiB, plus 16
/// times the text. A document without aliases never reaches it (each value takes at least
/// one byte of text); a document whose aliases repeat it more than about sixteen times over
/// is refused.
pub fn expansion_budget(text_len: usize) -> usize {
    (1_usize << 20).saturating_add(text_len.saturating_mul(16))
}

/// Deserializes the one YAML document of `text`, refusing it first when its aliases expand it
/// past [`expansion_budget`] (see [`check_expansion`]).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, serde_norway::Error> {
    check_expansion(text)?;
    serde_norway::from_str(text)
}

/// Walks every document of `text` with its aliases expanded, keeping nothing, and fails when
/// together they exceed [`expansion_budget`] of the text. A text that is not YAML passes: the
/// deserialization that follows says what is wrong with it.
pub fn check_expansion(text: &str) -> Result<(), serde_norway::Error> {
    let budget = expansion_budget(text.len());
    let mut count = Count {
        left: budget,
        budget,
        over: false,
    };
    for document in serde_norway::Deserializer::from_str(text) {
        match (Walk { count: &mut count }).deserialize(document) {
            Ok(()) => {}
            Err(error) if count.over => return Err(error),
            // Malformed YAML: left to the deserialization that follows.
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// The start of the error [`check_expansion`] fails with.
const OVER_BUDGET: &str = "the YAML expands through its aliases";

/// What a walk has left to spend.
struct Count {
    left: usize,
    budget: usize,
    /// Whether the walk went over: the error is [`OVER_BUDGET`], not the YAML's own.
    over: bool,
}

/// A walk over one value, charging the count.
struct Walk<'a> {
    count: &'a mut Count,
}

impl Walk<'_> {
    fn charge<E: de::Error>(&mut self, bytes: usize) -> Result<(), E> {
        let count = &mut *self.count;
        match count.left.checked_sub(bytes.saturating_add(COST_PER_VALUE)) {
            Some(left) => {
                count.left = left;
                Ok(())
            }
            None => {
                count.over = true;
                Err(E::custom(format!(
                    "{OVER_BUDGET} (`*name`) to more than {} bytes (1 MiB plus 16 times the \
                     text); write the repeated parts out, or repeat them less",
                    count.budget
                )))
            }
        }
    }

    fn reborrow(&mut self) -> Walk<'_> {
        Walk { count: self.count }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> de::Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(mut self, _: bool) -> Result<(), E> {
        self.charge(1)
    }

    fn visit_i64<E: de::Error>(mut self, _: i64) -> Result<(), E> {
        self.charge(8)
    }

    fn visit_i128<E: de::Error>(mut self, _: i128) -> Result<(), E> {
        self.charge(16)
    }

    fn visit_u64<E: de::Error>(mut self, _: u64) -> Result<(), E> {
        self.charge(8)
    }

    fn visit_u128<E: de::Error>(mut self, _: u128) -> Result<(), E> {
        self.charge(16)
    }

    fn visit_f64<E: de::Error>(mut self, _: f64) -> Result<(), E> {
        self.charge(8)
    }

    fn visit_str<E: de::Error>(mut self, value: &str) -> Result<(), E> {
        self.charge(value.len())
    }

    fn visit_bytes<E: de::Error>(mut self, value: &[u8]) -> Result<(), E> {
        self.charge(value.len())
    }

    fn visit_none<E: de::Error>(mut self) -> Result<(), E> {
        self.charge(0)
    }

    fn visit_unit<E: de::Error>(mut self) -> Result<(), E> {
        self.charge(0)
    }

    fn visit_some<D: Deserializer<'de>>(mut self, deserializer: D) -> Result<(), D::Error> {
        self.charge::<D::Error>(0)?;
        deserializer.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.visit_some(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.charge::<A::Error>(0)?;
        while seq.next_element_seed(self.reborrow())?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.charge::<A::Error>(0)?;
        while map.next_key_seed(self.reborrow())?.is_some() {
            map.next_value_seed(self.reborrow())?;
        }
        Ok(())
    }

    fn visit_enum<A: EnumAccess<'de>>(mut self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!Tag value`): the tag, then the value.
        let ((), variant) = data.variant_seed(self.reborrow())?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` aliases of one anchored string of `len` bytes, in a list under `key`.
    fn aliased(key: &str, len: usize, count: usize) -> String {
        let mut text = format!("{key}: [&z \"{}\"", "x".repeat(len));
        for _ in 0..count {
            text.push_str(", *z");
        }
        text.push_str("]\n");
        text
    }

    #[test]
    fn a_long_string_repeated_through_aliases_is_refused_before_it_is_built() {
        let text = aliased("zones", 100_000, 10_000);
        let error = from_str::<std::collections::BTreeMap<String, Vec<String>>>(&text)
            .expect_err("1 GB from 140 KB");
        assert!(error.to_string().contains(OVER_BUDGET), "{error}");
        assert!(error.to_string().contains("`*name`"), "{error}");
    }

    #[test]
    fn nested_aliases_are_counted_as_expanded() {
        // Each level names the previous one ten times: 10 MB at the third, from 10 KB.
        let mut text = format!("a0: &a0 [\"{}\"]\n", "x".repeat(10_000));
        for level in 1..=3 {
            let previous = format!("*a{}", level - 1);
            let items = [previous.as_str(); 10].join(", ");
            text.push_str(&format!("a{level}: &a{level} [{items}]\n"));
        }
        let error = check_expansion(&text).expect_err("10 MB from 10 KB");
        assert!(error.to_string().contains(OVER_BUDGET), "{error}");
    }

    #[test]
    fn sharing_a_block_a_few_times_and_text_without_aliases_pass() {
        let shared = "default: &d {retry: 1, tags: [a, b, c]}\nservices: {a: *d, b: *d, c: *d}\n";
        check_expansion(shared).expect("a shared block");
        let plain: String = (0..50_000)
            .map(|i| format!("k{i}: [1, 2, \"v\"]\n"))
            .collect();
        check_expansion(&plain).expect("no aliases");
    }

    #[test]
    fn text_that_is_not_yaml_is_left_to_the_deserializer() {
        check_expansion("a: [unclosed").expect("left to from_str");
        assert!(from_str::<serde_norway::Value>("a: [unclosed").is_err());
    }

    #[test]
    fn every_document_of_a_stream_counts_against_one_budget() {
        let one = aliased("zones", 10_000, 100);
        let stream = [one.as_str(); 40].join("---\n");
        assert!(check_expansion(&one).is_ok(), "one document is within");
        assert!(check_expansion(&stream).is_err(), "forty are not");
    }
}
