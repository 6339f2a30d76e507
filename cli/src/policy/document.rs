//! The policies a file holds, read the way the control plane reads them.
//!
//! A file is either a policy itself, parsed as the control plane parses `--policy-file`
//! (JSON for `*.json`, YAML otherwise), or a Kubernetes manifest (one or more YAML documents,
//! e.g. `istio/control-plane/policy-configmap.yaml` or a rendered kustomization) whose
//! ConfigMaps hold the policy in a data key, read as `--policy-configmap NS/NAME:KEY` reads
//! it (JSON for a key ending in `.json`, YAML otherwise). A policy never has `apiVersion` and
//! `kind` (unknown fields are errors), so a document with both is a manifest.

use std::{fmt, path::Path};

use anyhow::{Context as _, Result, bail};
use fulcrum_policy::PolicyFormat;
use serde::Deserialize as _;
use serde_json::Value;

/// The ConfigMap key the control plane reads when `--policy-configmap` names none.
pub const DEFAULT_KEY: &str = "policy.yaml";

/// One policy text and where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyText {
    /// Where it was found.
    pub source: Source,
    /// The text, as the control plane would be offered it.
    pub text: String,
    /// How the control plane would parse it.
    pub format: PolicyFormat,
}

/// Where a policy text was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The whole file.
    File(String),
    /// A data key of a ConfigMap in a manifest file.
    ConfigMap {
        /// The file.
        file: String,
        /// `namespace/name`, or `name` without a namespace.
        configmap: String,
        /// The data key.
        key: String,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(file) => f.write_str(file),
            Self::ConfigMap {
                file,
                configmap,
                key,
            } => write!(f, "{file} (ConfigMap {configmap}, key {key})"),
        }
    }
}

/// The policies in the file at `path`: the file itself, or the `key` of every ConfigMap of a
/// manifest that has that key (at least one).
pub fn read(path: &Path, key: &str) -> Result<Vec<PolicyText>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    policies_in(&path.display().to_string(), &text, key)
}

/// The policies in `text`, the content of `file` (see [`read`]).
pub fn policies_in(file: &str, text: &str, key: &str) -> Result<Vec<PolicyText>> {
    let Some(objects) = manifest_objects(text) else {
        return Ok(vec![PolicyText {
            source: Source::File(file.to_owned()),
            text: text.to_owned(),
            format: PolicyFormat::from_name(file),
        }]);
    };
    let policies: Vec<PolicyText> = objects
        .iter()
        .filter(|object| object["kind"] == "ConfigMap")
        .filter_map(|configmap| {
            let text = configmap["data"][key].as_str()?;
            let name = configmap["metadata"]["name"]
                .as_str()
                .unwrap_or("<unnamed>");
            let configmap = match configmap["metadata"]["namespace"].as_str() {
                Some(namespace) => format!("{namespace}/{name}"),
                None => name.to_owned(),
            };
            Some(PolicyText {
                source: Source::ConfigMap {
                    file: file.to_owned(),
                    configmap,
                    key: key.to_owned(),
                },
                text: text.to_owned(),
                format: PolicyFormat::from_name(key),
            })
        })
        .collect();
    if policies.is_empty() {
        bail!(
            "{file} is a Kubernetes manifest, but none of its ConfigMaps has the data key \
             `{key}`; name the key the control plane reads with --key"
        );
    }
    Ok(policies)
}

/// The objects of `text` when it is a Kubernetes manifest: some YAML document has both
/// `apiVersion` and `kind`. `None` for a policy, or text that is not YAML at all (the policy
/// parser then says what is wrong with it).
fn manifest_objects(text: &str) -> Option<Vec<Value>> {
    // A text whose aliases expand it past the budget is left to the policy parser, which
    // refuses it with the same reason.
    fulcrum_core::yaml::check_expansion(text).ok()?;
    let mut objects = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        match Value::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(object) => objects.push(object),
            Err(_) => return None,
        }
    }
    objects
        .iter()
        .any(|object| object.get("apiVersion").is_some() && object.get("kind").is_some())
        .then_some(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_file_is_one_policy_in_the_format_of_its_name() {
        let policies =
            policies_in("p.json", r#"{"default": {"retry": 1}}"#, DEFAULT_KEY).expect("a policy");
        assert_eq!(policies.len(), 1);
        assert_eq!(policies[0].source, Source::File("p.json".into()));
        assert_eq!(policies[0].format, PolicyFormat::Json);
        let policies = policies_in("p.yaml", "default: {retry: 1}\n", DEFAULT_KEY).expect("yaml");
        assert_eq!(policies[0].format, PolicyFormat::Yaml);
    }

    #[test]
    fn a_manifest_yields_the_key_of_each_configmap_that_has_it() {
        let manifest = "\
apiVersion: v1
kind: Namespace
metadata: {name: fulcrum-system}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: fulcrum-policy, namespace: fulcrum-system}
data:
  policy.yaml: |
    default: {retry: 1}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: unrelated}
data: {other: x}
";
        let policies = policies_in("m.yaml", manifest, DEFAULT_KEY).expect("a policy");
        assert_eq!(
            policies,
            [PolicyText {
                source: Source::ConfigMap {
                    file: "m.yaml".into(),
                    configmap: "fulcrum-system/fulcrum-policy".into(),
                    key: "policy.yaml".into(),
                },
                text: "default: {retry: 1}\n".into(),
                format: PolicyFormat::Yaml,
            }]
        );
    }

    #[test]
    fn a_manifest_without_the_key_is_an_error_naming_the_key_flag() {
        let manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: p}\ndata: {a: b}\n";
        let error = policies_in("m.yaml", manifest, "policy.json").expect_err("no such key");
        let message = error.to_string();
        assert!(
            message.contains("`policy.json`") && message.contains("--key"),
            "{message}"
        );
    }

    #[test]
    fn text_that_is_not_yaml_is_left_to_the_policy_parser() {
        let policies = policies_in("p.yaml", "default: [unclosed", DEFAULT_KEY).expect("one");
        assert_eq!(policies[0].source, Source::File("p.yaml".into()));
    }
}
