//! A per-field difference between two policies, for `fulcrum policy diff`.
//!
//! Both sides are compared in their canonical form, the JSON the control plane serves in the
//! snapshot (`Policy`'s own serialization, defaults filled in), so spelling does not count:
//! YAML or JSON, `"30s"` or `"30000ms"`, a default written out or left out are all the same.
//! Changes are listed by the dotted path validation errors use (`services.checkout.retry`),
//! sorted by path; a subtree present on one side only (a service added or removed, an
//! optional rule switched on or off) is one change.

use std::collections::BTreeSet;

use fulcrum_core::Policy;
use serde::Serialize;
use serde_json::{Map, Value};

/// One field that differs. `None` on a side: the field is absent there (a service not
/// listed, an optional rule off, or a field serialized only when not at its default).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// Dotted path of the field, as in validation errors.
    pub path: String,
    /// Its value in the served policy.
    pub served: Option<Value>,
    /// Its value in the local policy.
    pub local: Option<Value>,
}

/// Every field where `local` differs from `served`, sorted by path; empty when equal.
pub fn changes(served: &Policy, local: &Policy) -> Vec<Change> {
    let mut changes = Vec::new();
    compare(
        "",
        Some(&canonical(served)),
        Some(&canonical(local)),
        &mut changes,
    );
    changes
}

fn canonical(policy: &Policy) -> Value {
    // Serializing a policy to a JSON value cannot fail: string keys, no non-finite numbers
    // survive validation; `Null` would show as a difference rather than hide one.
    serde_json::to_value(policy).unwrap_or(Value::Null)
}

fn compare(path: &str, served: Option<&Value>, local: Option<&Value>, out: &mut Vec<Change>) {
    match (served, local) {
        (Some(Value::Object(served)), Some(Value::Object(local))) => {
            for key in keys(served, local) {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                compare(&path, served.get(&key), local.get(&key), out);
            }
        }
        (served, local) if served != local => out.push(Change {
            path: path.to_owned(),
            served: served.cloned(),
            local: local.cloned(),
        }),
        _ => {}
    }
}

/// The keys of either side, sorted (whatever order the maps keep).
fn keys(served: &Map<String, Value>, local: &Map<String, Value>) -> BTreeSet<String> {
    served.keys().chain(local.keys()).cloned().collect()
}

/// `change` as one line: `~ path: served -> local`, `- path: served`, `+ path: local`.
pub fn render(change: &Change) -> String {
    let compact = |value: &Value| value.to_string();
    match (&change.served, &change.local) {
        (Some(served), Some(local)) => format!(
            "~ {}: {} -> {}",
            change.path,
            compact(served),
            compact(local)
        ),
        (Some(served), None) => format!("- {}: {}", change.path, compact(served)),
        (None, Some(local)) => format!("+ {}: {}", change.path, compact(local)),
        (None, None) => format!("  {}", change.path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Policy {
        Policy::from_yaml(yaml).expect("a valid policy")
    }

    #[test]
    fn equal_policies_spelled_differently_have_no_changes() {
        let served = policy("default: {outlier_detection: {base_ejection_time: 30s}}\n");
        let local =
            policy(r#"{"default": {"outlier_detection": {"base_ejection_time": "30000ms"}}}"#);
        assert_eq!(changes(&served, &local), []);
    }

    #[test]
    fn a_changed_field_is_one_change_at_its_dotted_path() {
        let served = policy("default: {outlier_detection: {consecutive_failures: 3}}\n");
        let local = policy("default: {outlier_detection: {consecutive_failures: 4}}\n");
        let found = changes(&served, &local);
        assert_eq!(found.len(), 1);
        assert_eq!(
            render(&found[0]),
            "~ default.outlier_detection.consecutive_failures: 3 -> 4"
        );
    }

    #[test]
    fn a_service_on_one_side_only_is_one_change_with_its_whole_policy() {
        let served = policy("services: {cart: {retry: 2}}\n");
        let local = policy("services: {checkout: {retry: 1}}\n");
        let found = changes(&served, &local);
        let paths: Vec<&str> = found.iter().map(|change| change.path.as_str()).collect();
        assert_eq!(paths, ["services.cart", "services.checkout"]);
        assert!(render(&found[0]).starts_with("- services.cart: {"));
        assert_eq!(
            found[1].local.as_ref().map(|p| &p["retry"]),
            Some(&Value::from(1))
        );
        assert!(render(&found[1]).starts_with("+ services.checkout: {"));
    }

    #[test]
    fn a_changed_algorithm_shows_its_type_and_its_settings() {
        let served = policy("default: {load_balancer: {type: round_robin}}\n");
        let local = policy("default: {load_balancer: {type: least_request, choice_count: 3}}\n");
        let rendered: Vec<String> = changes(&served, &local).iter().map(render).collect();
        assert_eq!(
            rendered,
            [
                "+ default.load_balancer.active_request_bias: 1.0",
                "+ default.load_balancer.choice_count: 3",
                r#"~ default.load_balancer.type: "round_robin" -> "least_request""#,
            ]
        );
    }
}
