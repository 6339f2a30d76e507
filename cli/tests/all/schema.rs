//! The policy's JSON Schema: the checked-in `docs/policy.schema.json` is what the types
//! generate, every policy the repository ships or documents satisfies it, and what it rejects
//! the control plane rejects too.

use std::time::Duration;

use fulcrum_core::{
    Policy, ServicePolicy,
    policy::{
        FailureRate, HashCookie, HashOn, HealthCheck, HealthScore, LeastRequest, LoadBalancer,
        Maglev, PeakEwma, Probe, RateLimit, RingHash, SlowCalls, SlowStart, Sticky,
    },
};
use serde_json::{Value, json};

use crate::support::{fulcrum, repository};

const SCHEMA_FILE: &str = "docs/policy.schema.json";

fn validator() -> jsonschema::Validator {
    let schema: Value =
        serde_json::to_value(fulcrum_core::schema::policy_schema()).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema compiles")
}

/// Why `validator` refuses `policy`, one line per violation; empty when it accepts it.
fn violations(validator: &jsonschema::Validator, policy: &Value) -> Vec<String> {
    validator
        .iter_errors(policy)
        .map(|error| format!("at {}: {error}", error.instance_path()))
        .collect()
}

fn yaml(text: &str) -> Value {
    serde_norway::from_str(text).expect("YAML")
}

#[test]
fn checked_in_schema_is_what_the_policy_types_generate() {
    let run = fulcrum(&["policy", "schema"]);
    assert_eq!(run.code, 0, "{run:?}");
    let checked_in = std::fs::read_to_string(repository().join(SCHEMA_FILE)).unwrap_or_default();
    let first_difference = checked_in
        .lines()
        .zip(run.stdout.lines())
        .position(|(checked_in, generated)| checked_in != generated)
        .map_or("its length".to_owned(), |line| format!("line {}", line + 1));
    assert!(
        checked_in == run.stdout,
        "{SCHEMA_FILE} is out of date with the policy types (first difference at \
         {first_difference}); regenerate it with\n\n    \
         cargo run -p fulcrum-cli -- policy schema > {SCHEMA_FILE}\n\nand commit it"
    );
}

/// The policies the repository ships and documents: the Istio ConfigMap's, the whole policies
/// of docs/policy.md (its `## Example` sections; its other blocks are fragments), and the one
/// in docs/filter.md's filter configuration.
fn shipped_policies() -> Vec<(String, Value)> {
    let root = repository();
    let manifest = std::fs::read_to_string(root.join("istio/control-plane/policy-configmap.yaml"))
        .expect("the ConfigMap");
    let configmap = yaml(&manifest);
    let mut policies = vec![(
        "istio/control-plane/policy-configmap.yaml".to_owned(),
        yaml(
            configmap["data"]["policy.yaml"]
                .as_str()
                .expect("the policy key"),
        ),
    )];
    let docs = std::fs::read_to_string(root.join("docs/policy.md")).expect("docs/policy.md");
    let mut section = "";
    let mut block: Option<(usize, String)> = None;
    for (number, line) in docs.lines().enumerate() {
        if let Some(heading) = line.strip_prefix("## ") {
            section = heading;
        } else if let Some((start, text)) = &mut block {
            if line == "```" {
                policies.push((format!("docs/policy.md:{start}"), yaml(text)));
                block = None;
            } else {
                text.push_str(line);
                text.push('\n');
            }
        } else if section.starts_with("Example") && (line == "```json" || line == "```yaml") {
            block = Some((number + 1, String::new()));
        }
    }
    assert!(
        policies.len() >= 3,
        "the docs' examples were found: {policies:?}"
    );
    policies.push((
        "docs/filter.md".to_owned(),
        filter_configuration_policy(&root),
    ));
    policies
}

/// The `policy` of the filter configuration docs/filter.md shows (a JSON string in the
/// `http_filters` block of its section `### The filter`).
fn filter_configuration_policy(root: &std::path::Path) -> Value {
    let docs = std::fs::read_to_string(root.join("docs/filter.md")).expect("docs/filter.md");
    let section = docs
        .split("### The filter\n")
        .nth(1)
        .expect("docs/filter.md has a section `### The filter`");
    let block = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a yaml block in it");
    let filters = yaml(block);
    let configuration =
        filters["http_filters"][0]["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .expect("the filter's configuration string");
    let configuration: Value = serde_json::from_str(configuration).expect("JSON");
    configuration["policy"].clone()
}

#[test]
fn every_shipped_and_documented_policy_satisfies_the_schema_and_the_control_plane() {
    let validator = validator();
    for (origin, policy) in shipped_policies() {
        assert_eq!(
            violations(&validator, &policy),
            Vec::<String>::new(),
            "{origin}"
        );
        let accepted = Policy::from_json(&policy.to_string());
        assert!(accepted.is_ok(), "{origin}: {accepted:?}");
    }
}

/// A policy using every algorithm, hash key, probe kind and optional rule.
fn every_feature() -> Policy {
    let service = |load_balancer| ServicePolicy {
        load_balancer,
        ..ServicePolicy::default()
    };
    let mut policy = Policy::default();
    let algorithms = [
        LoadBalancer::RoundRobin {},
        LoadBalancer::WeightedRoundRobin {},
        LoadBalancer::WeightedRandom {},
        LoadBalancer::LeastRequest(LeastRequest::default()),
        LoadBalancer::PeakEwma(PeakEwma {
            failure_penalty_decay: Duration::from_millis(1500),
            ..PeakEwma::default()
        }),
        LoadBalancer::HealthScore(HealthScore::default()),
        LoadBalancer::RingHash(RingHash {
            hash_on: HashOn::Header("x-user".into()),
            bounded_load: Some(1.25),
            ..RingHash::default()
        }),
        LoadBalancer::Maglev(Maglev {
            hash_on: HashOn::Cookie(HashCookie {
                name: "k".into(),
                ttl: Some(Duration::from_secs(60)),
            }),
            ..Maglev::default()
        }),
        LoadBalancer::Sticky(Sticky {
            ttl: Some(Duration::from_secs(3600)),
            ..Sticky::default()
        }),
    ];
    for (i, algorithm) in algorithms.into_iter().enumerate() {
        policy
            .services
            .insert(format!("service-{i}"), service(algorithm));
    }
    let probes = [
        Probe::Http {
            path: "/ready".into(),
            expected_statuses: vec![200, 204],
            port: Some(8081),
        },
        Probe::Tcp { port: None },
        Probe::Grpc {
            service: "shop".into(),
            port: Some(9090),
        },
    ];
    for (i, probe) in probes.into_iter().enumerate() {
        let mut limited = service(LoadBalancer::default());
        limited.health_check = Some(HealthCheck::new(probe));
        limited.rate_limit = Some(RateLimit {
            client_key_header: Some("x-api-key".into()),
            ..RateLimit::default()
        });
        limited.slow_start = Some(SlowStart::default());
        limited.outlier_detection.failure_rate = Some(FailureRate::default());
        limited.outlier_detection.slow_calls = Some(SlowCalls::default());
        limited.outlier_detection.relative_latency = None;
        limited.locality.local_region = Some("eu-west-1".into());
        limited.endpoint_selector.tags.insert("stable".into());
        policy.services.insert(format!("checked-{i}"), limited);
    }
    policy
}

#[test]
fn policies_as_the_control_plane_serves_them_satisfy_the_schema() {
    let validator = validator();
    for policy in [Policy::default(), every_feature()] {
        policy.validate().expect("a valid policy");
        let served = serde_json::to_value(&policy).expect("JSON");
        assert_eq!(
            violations(&validator, &served),
            Vec::<String>::new(),
            "{served}"
        );
    }
    assert!(validator.is_valid(&json!({})));
}

#[test]
fn the_schema_rejects_what_the_control_plane_cannot_parse() {
    let validator = validator();
    let refused = [
        json!({"default": {"retri": 1}}),
        json!({"servics": {}}),
        json!({"default": {"load_balancer": {"type": "fastest"}}}),
        json!({"default": {"load_balancer": {"choice_count": 2}}}),
        json!({"default": {"load_balancer": {"type": "ring_hash", "hash_on": "header"}}}),
        json!({"default": {"outlier_detection": {"base_ejection_time": "30"}}}),
        json!({"default": {"outlier_detection": {"base_ejection_time": 30}}}),
        json!({"default": {"outlier_detection": {"window": "1.5s"}}}),
        json!({"default": {"health_check": {"http": {}, "tcp": {}}}}),
        json!({"default": {"health_check": {"interval": "5s"}}}),
        json!({"default": {"health_check": {"http": {"paht": "/"}}}}),
        json!({"default": {"retry": -1}}),
        json!({"default": {"on_no_endpoint": "fail_slow"}}),
        json!({"services": {"checkout": {"endpoint_selector": {"tags": "stable"}}}}),
    ];
    for policy in refused {
        assert!(
            Policy::from_json(&policy.to_string()).is_err(),
            "the control plane refuses {policy}"
        );
        assert!(
            !validator.is_valid(&policy),
            "the schema should refuse {policy}"
        );
    }
}

#[test]
fn the_schema_and_the_parser_refuse_settings_given_to_an_algorithm_that_has_none() {
    let validator = validator();
    for algorithm in ["round_robin", "weighted_round_robin", "weighted_random"] {
        let policy = json!({"default": {"load_balancer": {"type": algorithm, "choice_count": 2}}});
        assert!(!validator.is_valid(&policy), "{policy}");
        assert!(
            fulcrum_core::Policy::from_json(&policy.to_string()).is_err(),
            "the parser refuses {policy}"
        );
    }
}

proptest::proptest! {
    /// The schema's duration pattern accepts exactly what the control plane's parser does
    /// (strings short enough not to overflow, which a pattern cannot see).
    #[test]
    fn the_duration_pattern_agrees_with_the_parser(text in "[0-9msh.]{0,8}") {
        let accepted = schema_accepts_duration(&text);
        let parsed = fulcrum_core::duration::parse(&text).is_ok();
        proptest::prop_assert_eq!(accepted, parsed, "{:?}", text);
    }
}

/// Whether the schema accepts `text` as a duration, asked of the schema itself.
fn schema_accepts_duration(text: &str) -> bool {
    thread_local! {
        static VALIDATOR: jsonschema::Validator = validator();
    }
    VALIDATOR.with(|validator| {
        validator.is_valid(&json!({"default": {"outlier_detection": {"window": text}}}))
    })
}
