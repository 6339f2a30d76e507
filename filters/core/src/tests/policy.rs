use std::time::Duration;

use proptest::prelude::*;

use crate::{
    Policy, PolicyError, Snapshot,
    policy::{
        FailureRate, HashCookie, HashOn, HealthCheck, LatencyTolerance, LeastRequest, LoadBalancer,
        Maglev, OnNoEndpoint, PeakEwma, Probe, RateLimit, RingHash, ServicePolicy, SlowCalls,
        Sticky,
    },
};

#[test]
fn an_empty_document_is_the_default_policy() {
    let policy = Policy::from_json("{}").unwrap();
    assert_eq!(policy, Policy::default());
    assert_eq!(
        policy.default.load_balancer,
        LoadBalancer::LeastRequest(LeastRequest {
            choice_count: 2,
            active_request_bias: 1.0
        })
    );
    assert_eq!(policy.default.outlier_detection.consecutive_failures, 5);
    assert_eq!(
        policy.default.outlier_detection.base_ejection_time,
        Duration::from_secs(30)
    );
}

#[test]
fn parses_a_full_service_policy_with_human_durations() {
    let policy = Policy::from_json(
        r#"{
          "services": {
            "checkout": {
              "load_balancer": {"type": "peak_ewma", "decay": "5s", "default_rtt": "20ms"},
              "endpoint_selector": {"tags": ["canary"], "metadata": {"version": "v2"}},
              "locality": {"local_zone": "eu-west-1a", "failover": ["eu-west-1b"]},
              "outlier_detection": {
                "consecutive_gateway_errors": 3,
                "failure_rate": {"threshold_percent": 40},
                "slow_calls": {"latency_threshold": "750ms"},
                "base_ejection_time": "10s"
              },
              "on_no_endpoint": "fail_fast",
              "rate_limit": {"requests_per_second": 50, "burst": 10, "client_key_header": "x-api-key"},
              "retry": 2
            }
          },
          "default": {"load_balancer": {"type": "round_robin"}}
        }"#,
    )
    .unwrap();
    let checkout = policy.for_service("checkout");
    assert_eq!(
        checkout.load_balancer,
        LoadBalancer::PeakEwma(PeakEwma {
            decay: Duration::from_secs(5),
            default_rtt: Duration::from_millis(20),
            failure_penalty: Duration::from_millis(500),
            ..PeakEwma::default()
        })
    );
    let od = &checkout.outlier_detection;
    assert_eq!(od.consecutive_gateway_errors, 3);
    assert_eq!(
        od.failure_rate,
        Some(FailureRate {
            threshold_percent: 40,
            minimum_requests: 20
        })
    );
    assert_eq!(
        od.slow_calls,
        Some(SlowCalls {
            latency_threshold: Duration::from_millis(750),
            threshold_percent: 50,
            minimum_requests: 20
        })
    );
    assert_eq!(checkout.on_no_endpoint, OnNoEndpoint::FailFast);
    assert_eq!(checkout.retry, 2);
    assert_eq!(
        policy.for_service("other").load_balancer,
        LoadBalancer::RoundRobin {}
    );
}

#[test]
fn rejects_unknown_fields_with_their_location() {
    let error = Policy::from_json("{\n  \"default\": {\"retries\": 2}\n}").unwrap_err();
    let PolicyError::Json { line, .. } = &error else {
        panic!("expected a JSON error, got {error}");
    };
    assert_eq!(*line, 2);
    assert!(
        error.to_string().contains("unknown field `retries`"),
        "{error}"
    );
}

#[test]
fn rejects_settings_next_to_an_algorithm_that_takes_none() {
    for algorithm in ["round_robin", "weighted_round_robin", "weighted_random"] {
        let text = format!(
            r#"{{"default": {{"load_balancer": {{"type": "{algorithm}", "choice_count": 2}}}}}}"#
        );
        let error = Policy::from_json(&text).unwrap_err();
        assert!(
            error.to_string().contains("unknown field `choice_count`"),
            "{algorithm}: {error}"
        );
        let bare = format!(r#"{{"default": {{"load_balancer": {{"type": "{algorithm}"}}}}}}"#);
        assert!(Policy::from_json(&bare).is_ok(), "{algorithm} alone parses");
    }
}

#[test]
fn rejects_a_duration_without_unit() {
    let error =
        Policy::from_json(r#"{"default": {"outlier_detection": {"window": "10"}}}"#).unwrap_err();
    assert!(error.to_string().contains("missing unit"), "{error}");
}

#[test]
fn validation_collects_every_error_with_its_path_and_range() {
    let error = Policy::from_json(
        r#"{
          "services": {
            "checkout": {
              "outlier_detection": {"max_ejection_percent": 150, "half_open_max_probes": 0},
              "load_balancer": {"type": "maglev", "table_size": 65536},
              "retry": 9
            }
          },
          "default": {
            "load_balancer": {"type": "sticky", "cookie": "", "fallback": {"type": "sticky"}},
            "rate_limit": {"requests_per_second": 0}
          }
        }"#,
    )
    .unwrap_err();
    let PolicyError::Invalid(errors) = error else {
        panic!("expected validation errors, got {error}");
    };
    assert_eq!(
        errors.to_string(),
        [
            "services.checkout.load_balancer.table_size: must be a prime up to 5000011 (e.g. 65537), got 65536",
            "services.checkout.outlier_detection.half_open_max_probes: must be 1..=100, got 0",
            "services.checkout.outlier_detection.max_ejection_percent: must be 0..=100, got 150",
            "services.checkout.retry: must be 0..=5, got 9",
            "default.load_balancer.cookie: must be a non-empty cookie name of RFC 6265 token characters, got \"\"",
            "default.load_balancer.fallback: must not be sticky; use e.g. least_request",
            "default.rate_limit.requests_per_second: must be above 0 and at most 1000000, got 0",
        ]
        .join("\n")
    );
}

#[test]
fn a_snapshot_without_policy_still_parses_and_one_with_policy_carries_it() {
    let bare: Snapshot = serde_json::from_str(r#"{"version": "7", "services": {}}"#).unwrap();
    assert_eq!(bare.policy, None);
    let with: Snapshot = serde_json::from_str(
        r#"{"version": "8", "services": {}, "policy": {"default": {"retry": 1}}}"#,
    )
    .unwrap();
    assert_eq!(with.policy.unwrap().default.retry, 1);
}

#[cfg(feature = "yaml")]
#[test]
fn parses_yaml_and_reports_its_location() {
    let policy = Policy::from_yaml(
        "services:\n  cart:\n    load_balancer:\n      type: ring_hash\n      hash_on:\n        header: x-user\n",
    )
    .unwrap();
    assert_eq!(
        policy.for_service("cart").load_balancer,
        LoadBalancer::RingHash(RingHash {
            hash_on: HashOn::Header("x-user".into()),
            ..RingHash::default()
        })
    );
    let error = Policy::from_yaml("default:\n  retry: many\n").unwrap_err();
    assert!(error.to_string().contains("line 2"), "{error}");
}

/// A 140 KB policy naming one 100 KB zone 10,000 times would build a gigabyte: it is refused
/// while it is walked, naming the field and the aliases.
#[cfg(feature = "yaml")]
#[test]
fn a_yaml_policy_whose_aliases_expand_it_past_the_budget_is_refused_before_it_is_built() {
    let mut text = format!(
        "default:\n  locality:\n    failover: [&z \"{}\"",
        "z".repeat(100_000)
    );
    for _ in 0..10_000 {
        text.push_str(", *z");
    }
    text.push_str("]\n");
    let error = Policy::from_yaml(&text).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, PolicyError::Yaml { .. }), "{message}");
    assert!(message.contains("default.locality.failover"), "{message}");
    assert!(message.contains("expands through its aliases"), "{message}");
    assert!(
        message.len() < 1_000,
        "the message does not repeat the value"
    );
}

/// A refused value is quoted by its start and its length, whatever its size, and a long
/// list of zones is checked for repeats without comparing each with every other.
#[test]
fn error_messages_quote_a_long_value_by_its_start_and_length() {
    let header = format!("x y{}", "z".repeat(100_000));
    let zone = "é".repeat(50_000);
    let json = serde_json::json!({"services": {header.clone(): {
        "load_balancer": {"type": "ring_hash", "hash_on": {"header": header}},
        "locality": {"failover": [zone, zone]},
    }}});
    let error = Policy::from_json(&json.to_string()).unwrap_err();
    let message = error.to_string();
    assert!(message.len() < 1_000, "{} bytes", message.len());
    assert!(message.contains("(100003 bytes)"), "{message}");
    assert!(message.contains("is listed twice"), "{message}");
    assert!(message.contains("… (100000 bytes)"), "{message}");

    let zones: Vec<String> = (0..50_000).map(|i| format!("zone-{i}")).collect();
    let json = serde_json::json!({"default": {"locality": {"failover": zones}}});
    Policy::from_json(&json.to_string()).expect("50,000 distinct zones");
}

#[test]
fn a_policy_with_thousands_of_invalid_fields_keeps_the_first_hundred_and_counts_the_rest() {
    let services: serde_json::Map<String, serde_json::Value> = (0..20_000)
        .map(|i| (format!("s{i}"), serde_json::json!({"retry": 9})))
        .collect();
    let text = serde_json::json!({ "services": services }).to_string();
    let Err(PolicyError::Invalid(invalid)) = Policy::from_json(&text) else {
        panic!("20,000 retries out of range must be refused");
    };
    assert_eq!(invalid.errors.len(), crate::validate::MAX_VALIDATION_ERRORS);
    assert_eq!(invalid.found(), 20_000);
    assert_eq!(invalid.errors[0].path, "services.s0.retry");
    let message = invalid.to_string();
    assert_eq!(
        message.lines().count(),
        crate::validate::MAX_VALIDATION_ERRORS + 1
    );
    assert!(
        message.ends_with("… and 19900 more invalid fields"),
        "{}",
        &message[message.len() - 80..]
    );
}

#[test]
fn a_health_check_gets_the_registrys_defaults() {
    let policy =
        Policy::from_json(r#"{"services": {"shop": {"health_check": {"http": {}}}}}"#).unwrap();
    let check = policy.for_service("shop").health_check.clone().unwrap();
    assert_eq!(
        check,
        HealthCheck {
            probe: Probe::Http {
                path: "/healthz".into(),
                expected_statuses: vec![],
                port: None,
            },
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            jitter: Duration::from_millis(500),
        }
    );
    assert_eq!(check, HealthCheck::new(check.probe.clone()));
    assert_eq!(policy.default.health_check, None);
}

#[test]
fn a_short_interval_shortens_the_default_timeout_and_jitter() {
    let policy = Policy::from_json(
        r#"{"default": {"health_check": {"tcp": {"port": 9000}, "interval": "200ms"}}}"#,
    )
    .unwrap();
    let check = policy.default.health_check.unwrap();
    assert_eq!(check.probe, Probe::Tcp { port: Some(9000) });
    assert_eq!(check.timeout, Duration::from_millis(200));
    assert_eq!(check.jitter, Duration::from_millis(20));
    assert_eq!(
        check.probe.target("10.0.0.1:8080".parse().unwrap()),
        "10.0.0.1:9000".parse().unwrap()
    );
    let grpc = Probe::Grpc {
        service: String::new(),
        port: None,
    };
    assert_eq!(
        grpc.target("10.0.0.1:8080".parse().unwrap()),
        "10.0.0.1:8080".parse().unwrap()
    );
}

#[test]
fn a_health_check_needs_exactly_one_probe_kind() {
    for text in [
        r#"{"default": {"health_check": {"interval": "1s"}}}"#,
        r#"{"default": {"health_check": {"tcp": {}, "grpc": {}}}}"#,
    ] {
        let error = Policy::from_json(text).unwrap_err();
        assert!(
            matches!(error, PolicyError::Json { .. })
                && error
                    .to_string()
                    .contains("exactly one of `http`, `tcp` or `grpc`"),
            "{error}"
        );
    }
    let error =
        Policy::from_json(r#"{"default": {"health_check": {"http": {"paht": "/"}}}}"#).unwrap_err();
    assert!(
        error.to_string().contains("unknown field `paht`"),
        "{error}"
    );
}

#[test]
fn health_check_validation_names_every_bad_field_with_a_fix() {
    let error = Policy::from_json(
        r#"{"services": {"shop": {"health_check": {
             "http": {"path": "healthz", "expected_statuses": [200, 700], "port": 0},
             "interval": "50ms", "timeout": "1s", "healthy_threshold": 0,
             "unhealthy_threshold": 11, "jitter": "2s"}}}}"#,
    )
    .unwrap_err();
    let PolicyError::Invalid(errors) = error else {
        panic!("expected validation errors, got {error}");
    };
    assert_eq!(
        errors.to_string(),
        [
            "services.shop.health_check.http.path: must start with '/' and contain no spaces, got \"healthz\"",
            "services.shop.health_check.http.expected_statuses[1]: must be an HTTP status 100..=599, got 700",
            "services.shop.health_check.http.port: must be 1..=65535; omit it to probe the endpoint's port",
            "services.shop.health_check.interval: must be 100ms..=1m, got 50ms",
            "services.shop.health_check.timeout: must be 10ms..=interval (50ms), got 1s; a probe must end before the next one starts",
            "services.shop.health_check.healthy_threshold: must be 1..=10, got 0",
            "services.shop.health_check.unhealthy_threshold: must be 1..=10, got 11",
            "services.shop.health_check.jitter: must be at most the interval (50ms), got 2s",
        ]
        .join("\n")
    );
}

fn duration_ms() -> impl Strategy<Value = Duration> {
    (1u64..3_600_000).prop_map(Duration::from_millis)
}

fn hash_on() -> impl Strategy<Value = HashOn> {
    prop_oneof![
        Just(HashOn::SourceIp),
        "[a-z-]{1,12}".prop_map(HashOn::Header),
        ("[a-z]{1,8}", proptest::option::of(duration_ms()))
            .prop_map(|(name, ttl)| HashOn::Cookie(HashCookie { name, ttl })),
    ]
}

fn load_balancer() -> impl Strategy<Value = LoadBalancer> {
    let leaf = prop_oneof![
        Just(LoadBalancer::RoundRobin {}),
        Just(LoadBalancer::WeightedRoundRobin {}),
        Just(LoadBalancer::WeightedRandom {}),
        (2u32..=16, 0u32..=10).prop_map(|(choice_count, bias)| {
            LoadBalancer::LeastRequest(LeastRequest {
                choice_count,
                active_request_bias: f64::from(bias) / 2.0,
            })
        }),
        (
            (duration_ms(), duration_ms(), duration_ms(), duration_ms()),
            (duration_ms(), duration_ms(), 0u32..=1000)
        )
            .prop_map(
                |((decay, rtt, penalty, penalty_decay), (peak_decay, difference, percent))| {
                    LoadBalancer::PeakEwma(PeakEwma {
                        decay,
                        default_rtt: rtt,
                        failure_penalty: penalty,
                        failure_penalty_decay: penalty_decay,
                        peak_decay,
                        tolerance: LatencyTolerance {
                            difference,
                            percent,
                        },
                    })
                }
            ),
        (hash_on(), 1u32..=262_144, proptest::option::of(1u32..8)).prop_map(
            |(hash_on, minimum_ring_size, bound)| {
                LoadBalancer::RingHash(RingHash {
                    hash_on,
                    minimum_ring_size,
                    bounded_load: bound.map(|b| 1.0 + f64::from(b) / 4.0),
                })
            }
        ),
        hash_on().prop_map(|hash_on| LoadBalancer::Maglev(Maglev {
            hash_on,
            ..Maglev::default()
        })),
    ];
    leaf.prop_flat_map(|fallback| {
        prop_oneof![
            Just(fallback.clone()),
            ("[a-z]{1,8}", proptest::option::of(duration_ms())).prop_map(move |(cookie, ttl)| {
                LoadBalancer::Sticky(Sticky {
                    cookie,
                    ttl,
                    fallback: Box::new(fallback.clone()),
                })
            }),
        ]
    })
}

fn probe() -> impl Strategy<Value = Probe> {
    let port = proptest::option::of(1u16..);
    prop_oneof![
        (
            "/[a-z/]{0,12}",
            proptest::collection::vec(100u16..=599, 0..3),
            port.clone()
        )
            .prop_map(|(path, expected_statuses, port)| Probe::Http {
                path,
                expected_statuses,
                port
            }),
        port.clone().prop_map(|port| Probe::Tcp { port }),
        ("[a-z.]{0,12}", port).prop_map(|(service, port)| Probe::Grpc { service, port }),
    ]
}

fn health_check() -> impl Strategy<Value = HealthCheck> {
    (probe(), 100u64..=60_000, 1u32..=10, 1u32..=10, 0u64..=1000).prop_flat_map(
        |(probe, interval_ms, healthy_threshold, unhealthy_threshold, per_mille)| {
            (10u64..=interval_ms).prop_map(move |timeout_ms| HealthCheck {
                probe: probe.clone(),
                interval: Duration::from_millis(interval_ms),
                timeout: Duration::from_millis(timeout_ms),
                healthy_threshold,
                unhealthy_threshold,
                jitter: Duration::from_millis(interval_ms * per_mille / 1000),
            })
        },
    )
}

fn service_policy() -> impl Strategy<Value = ServicePolicy> {
    (
        load_balancer(),
        0u32..=5,
        0u32..=100,
        proptest::option::of((1u32..1000, 1u32..1000)),
        any::<bool>(),
        proptest::option::of(health_check()),
    )
        .prop_map(
            |(load_balancer, retry, percent, rate, fail_fast, health_check)| {
                let mut policy = ServicePolicy {
                    load_balancer,
                    retry,
                    health_check,
                    rate_limit: rate.map(|(rps, burst)| RateLimit {
                        requests_per_second: f64::from(rps),
                        burst,
                        ..RateLimit::default()
                    }),
                    ..ServicePolicy::default()
                };
                policy.outlier_detection.max_ejection_percent = percent;
                policy.locality.min_healthy_percent = percent;
                if fail_fast {
                    policy.on_no_endpoint = OnNoEndpoint::FailFast;
                }
                policy
            },
        )
}

proptest! {
    #[test]
    fn an_algorithm_s_name_is_the_type_its_json_carries(
        load_balancer in prop_oneof![
            load_balancer(),
            Just(LoadBalancer::HealthScore(Default::default())),
        ],
    ) {
        let json = serde_json::to_value(&load_balancer).unwrap();
        prop_assert_eq!(json["type"].as_str(), Some(load_balancer.name()));
    }

    #[test]
    fn valid_policies_round_trip_through_json(
        services in proptest::collection::btree_map("[a-z]{1,8}", service_policy(), 0..4),
        default in service_policy(),
    ) {
        let policy = Policy { services, default };
        prop_assert_eq!(policy.validate(), Ok(()));
        let json = serde_json::to_string(&policy).unwrap();
        prop_assert_eq!(Policy::from_json(&json).unwrap(), policy);
    }

    #[test]
    fn valid_health_checks_round_trip_through_json(check in health_check()) {
        prop_assert_eq!(check.validate(), Ok(()));
        let json = serde_json::to_string(&check).unwrap();
        prop_assert_eq!(serde_json::from_str::<HealthCheck>(&json).unwrap(), check);
    }

    #[test]
    fn from_json_never_panics_on_health_check_shaped_documents(
        kind in "[a-z]{0,5}",
        interval in ".{0,8}",
        threshold in any::<i64>(),
        port in any::<i64>(),
    ) {
        let text = format!(
            r#"{{"default": {{"health_check": {{"{kind}": {{"port": {port}}},
               "interval": {interval:?}, "unhealthy_threshold": {threshold}}}}}}}"#
        );
        let _ = Policy::from_json(&text);
    }

    #[test]
    fn from_json_never_panics_on_arbitrary_text(text in ".{0,200}") {
        let _ = Policy::from_json(&text);
    }

    #[test]
    fn from_json_never_panics_on_policy_shaped_documents(
        retry in any::<i64>(),
        percent in any::<i64>(),
        window in ".{0,12}",
        kind in "[a-z_]{0,16}",
    ) {
        let text = format!(
            r#"{{"default": {{"retry": {retry}, "load_balancer": {{"type": "{kind}"}},
               "outlier_detection": {{"max_ejection_percent": {percent}, "window": {window:?}}}}}}}"#
        );
        let _ = Policy::from_json(&text);
    }

    #[test]
    fn validation_reports_one_error_per_out_of_range_field(
        retry in 6u32..1000,
        max_ejection in 101u32..1000,
        min_healthy in 101u32..1000,
        services in proptest::collection::btree_set("[a-z]{1,6}", 1..4),
    ) {
        let mut broken = ServicePolicy { retry, ..ServicePolicy::default() };
        broken.outlier_detection.max_ejection_percent = max_ejection;
        broken.locality.min_healthy_percent = min_healthy;
        let policy = Policy {
            services: services.iter().map(|name| (name.clone(), broken.clone())).collect(),
            default: broken,
        };
        let errors = policy.validate().unwrap_err().errors;
        prop_assert_eq!(errors.len(), 3 * (services.len() + 1));
        for name in &services {
            let retry_path = format!("services.{name}.retry");
            prop_assert!(errors.iter().any(|e| e.path == retry_path));
        }
        let expected = format!("must be 0..=100, got {min_healthy}");
        prop_assert!(errors.iter().any(|e| e.path == "default.locality.min_healthy_percent"
            && e.message == expected));
    }
}

/// The fenced block of `language` in docs/policy.md's section `heading`.
fn doc_example(heading: &str, language: &str) -> &'static str {
    let doc = include_str!("../../../../docs/policy.md");
    let section = &doc[doc.find(heading).expect("section exists")..];
    let fence = format!("```{language}\n");
    let start = section.find(&fence).expect("example exists") + fence.len();
    &section[start..start + section[start..].find("```").expect("fence closes")]
}

#[test]
fn the_json_example_in_the_docs_is_a_valid_policy() {
    let policy = Policy::from_json(doc_example("## Example (JSON)", "json")).unwrap();
    assert_eq!(policy.services.len(), 2);
    assert_eq!(policy.for_service("checkout").retry, 2);
}

#[cfg(feature = "yaml")]
#[test]
fn the_yaml_example_in_the_docs_is_a_valid_policy() {
    let policy = Policy::from_yaml(doc_example("## Example (YAML)", "yaml")).unwrap();
    assert_eq!(policy.default.load_balancer, LoadBalancer::RoundRobin {});
    let check = policy.for_service("checkout").health_check.clone().unwrap();
    assert_eq!(
        check.probe,
        Probe::Http {
            path: "/healthz".into(),
            expected_statuses: vec![200],
            port: None
        }
    );
    assert_eq!(check.jitter, Duration::from_millis(500));
}

#[test]
fn the_proxy_zone_fills_every_service_without_a_zone_of_its_own() {
    let mut policy = Policy::default();
    let mut pinned = ServicePolicy::default();
    pinned.locality.local_zone = Some("eu-west-1c".into());
    policy.services.insert("pinned".into(), pinned);
    policy
        .services
        .insert("open".into(), ServicePolicy::default());
    let placed = policy.in_zone("eu-west-1a");
    let zone = |service: &str| placed.for_service(service).locality.local_zone.clone();
    assert_eq!(zone("open").as_deref(), Some("eu-west-1a"));
    assert_eq!(
        zone("unlisted").as_deref(),
        Some("eu-west-1a"),
        "the default too"
    );
    assert_eq!(
        zone("pinned").as_deref(),
        Some("eu-west-1c"),
        "the policy's zone overrides the proxy's"
    );
}

#[test]
fn a_peak_ewma_tolerance_out_of_range_is_refused_naming_its_field() {
    let error = Policy::from_json(
        r#"{"default": {"load_balancer": {"type": "peak_ewma", "peak_decay": "0s",
            "tolerance": {"difference": "2h", "percent": 1001}}}}"#,
    )
    .unwrap_err();
    let PolicyError::Invalid(errors) = error else {
        panic!("expected validation errors, got {error}");
    };
    let text = errors.to_string();
    for field in [
        "default.load_balancer.peak_decay: must be",
        "default.load_balancer.tolerance.difference: must be",
        "default.load_balancer.tolerance.percent: must be 0..=1000, got 1001",
    ] {
        assert!(text.contains(field), "{field} in {text}");
    }
}

#[test]
fn a_default_peak_ewma_is_written_without_the_fields_older_filters_refuse() {
    // Older filters deny unknown fields: a control plane upgraded first must not send them
    // a field they do not know while it holds its default.
    let written =
        serde_json::to_string(&LoadBalancer::PeakEwma(PeakEwma::default())).expect("serializes");
    for field in ["failure_penalty_decay", "peak_decay", "tolerance"] {
        assert!(!written.contains(field), "{field} in {written}");
    }
    let tuned = LoadBalancer::PeakEwma(PeakEwma {
        tolerance: LatencyTolerance {
            difference: Duration::ZERO,
            percent: 0,
        },
        ..PeakEwma::default()
    });
    let written = serde_json::to_string(&tuned).expect("serializes");
    assert!(
        written.contains(r#""tolerance":{"difference":"0s","percent":0}"#),
        "{written}"
    );
}
