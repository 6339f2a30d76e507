//! The load-balancing policy's configuration: one service's policy as JSON, exactly a
//! [`ServicePolicy`] as it appears under `services.<name>` of the policy document
//! (`docs/policy.md`), parsed and validated by the core's own code.
//!
//! Envoy hands the module the raw string of the cluster's `lb_policy_config`
//! (`google.protobuf.StringValue`). Empty means the default policy. A refusal names the
//! field: a JSON error its path (`serde_path_to_error`), a validation error the core's field
//! path, so the operator reading Envoy's log knows what to fix.

use fulcrum_core::{ServicePolicy, ValidationErrors};

/// Why a cluster's policy was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration is not UTF-8.
    #[error("fulcrum_native: lb_policy_config is not UTF-8: give the policy as JSON text")]
    NotUtf8,
    /// The JSON does not have the policy's shape (unknown field, wrong type, bad duration).
    #[error(
        "fulcrum_native: lb_policy_config is not a service policy at `{path}`: {source}; see docs/policy.md"
    )]
    Json {
        /// Where in the document the error is (`.` for the top level).
        path: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The policy parsed but some values are out of range.
    #[error("fulcrum_native: lb_policy_config is invalid: {0}")]
    Invalid(#[from] ValidationErrors),
}

/// Parses and validates one service's policy; empty (or only whitespace) is the default
/// policy.
pub fn parse_policy(bytes: &[u8]) -> Result<ServicePolicy, ConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ConfigError::NotUtf8)?;
    if text.trim().is_empty() {
        return Ok(ServicePolicy::default());
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let policy: ServicePolicy =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|error| ConfigError::Json {
            path: error.path().to_string(),
            source: error.into_inner(),
        })?;
    deserializer.end().map_err(|source| ConfigError::Json {
        path: ".".to_owned(),
        source,
    })?;
    policy.validate()?;
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use fulcrum_core::LoadBalancer;

    use super::*;

    #[test]
    fn an_empty_configuration_is_the_default_policy() {
        assert_eq!(
            parse_policy(b"").expect("empty is valid"),
            ServicePolicy::default()
        );
        assert_eq!(
            parse_policy(b"  \n").expect("blank is valid"),
            ServicePolicy::default()
        );
    }

    #[test]
    fn a_service_policy_parses_as_the_core_reads_it() {
        let policy = parse_policy(br#"{"load_balancer": {"type": "round_robin"}, "retry": 2}"#)
            .expect("a valid policy");
        assert!(matches!(policy.load_balancer, LoadBalancer::RoundRobin {}));
        assert_eq!(policy.retry, 2);
    }

    #[test]
    fn an_out_of_range_value_is_refused_naming_the_field() {
        let error = parse_policy(br#"{"retry": 9}"#).expect_err("retry is at most 5");
        let message = error.to_string();
        assert!(message.contains("retry"), "{message}");
        assert!(matches!(error, ConfigError::Invalid(_)));
    }

    #[test]
    fn an_unknown_nested_field_is_refused_naming_its_path() {
        let error = parse_policy(br#"{"outlier_detection": {"consecutive_fail": 3}}"#)
            .expect_err("unknown field");
        let ConfigError::Json { path, .. } = &error else {
            panic!("expected a JSON error, got {error}");
        };
        assert_eq!(path, "outlier_detection.consecutive_fail");
        assert!(error.to_string().contains("consecutive_fail"), "{error}");
    }

    #[test]
    fn text_that_is_not_json_is_refused() {
        assert!(matches!(
            parse_policy(b"{not json"),
            Err(ConfigError::Json { .. })
        ));
        assert!(matches!(
            parse_policy(&[0xff, 0xfe]),
            Err(ConfigError::NotUtf8)
        ));
    }
}
