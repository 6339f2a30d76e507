//! The relative-latency rule: an endpoint far slower than its peers is ejected with no
//! absolute threshold, a fast endpoint's occasional stall is not, and nobody is judged
//! without enough peers to say what typical is.

use std::{net::SocketAddr, time::Duration};

use proptest::prelude::*;

use crate::{
    BreakerState, ServicePicker,
    policy::{LoadBalancer, OutlierDetection, RelativeLatency},
    test_support::*,
};

/// Round robin over `n` endpoints, ejecting on the relative rule only (no consecutive-failure
/// rule, every share of the fleet may be ejected, no panic threshold).
fn picker(n: u32, relative: RelativeLatency) -> ServicePicker {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = OutlierDetection {
        relative_latency: Some(relative),
        ..strict_outlier_detection(0)
    };
    ServicePicker::new(&service, &endpoints(n))
}

/// Round-robin traffic for `rounds` rounds from `start`, one round every 10 ms, each endpoint
/// answering after `latency(endpoint)`. The typical latency is worked out once per tenth of
/// the 10 s window, so judging starts a second or so in.
fn serve(
    picker: &mut ServicePicker,
    rounds: u64,
    start: Duration,
    latency: impl Fn(SocketAddr) -> Duration,
) {
    let mut rng = seeded();
    let endpoints = picker.endpoints().len() as u64;
    for round in 0..rounds * endpoints {
        let now = start + ms(10 * (round / endpoints));
        if let Ok(pick) = picker.pick(&Default::default(), now, &mut rng) {
            picker.complete(
                pick.endpoint,
                crate::Served::ByPick,
                ok(latency(pick.endpoint)),
                now,
            );
        }
    }
}

fn state(picker: &ServicePicker, endpoint: SocketAddr) -> BreakerState {
    picker
        .endpoints()
        .find(|view| view.endpoint.address == endpoint)
        .expect("a known endpoint")
        .breaker
}

#[test]
fn an_endpoint_ten_times_slower_than_its_peers_is_ejected_without_any_threshold() {
    let mut picker = picker(5, RelativeLatency::default());
    serve(&mut picker, 300, secs(1), |endpoint| {
        if endpoint == addr(5) { ms(22) } else { ms(2) }
    });
    assert_eq!(state(&picker, addr(5)).name(), "open");
    for peer in 1..=4 {
        assert_eq!(state(&picker, addr(peer)).name(), "closed", "peer {peer}");
    }
}

#[test]
fn the_yardstick_scales_with_the_service_so_slow_services_keep_their_endpoints() {
    // Every endpoint takes 200-250 ms: slow in absolute terms, but nobody is an outlier.
    let mut picker = picker(5, RelativeLatency::default());
    serve(&mut picker, 300, secs(1), |endpoint| {
        if endpoint == addr(5) {
            ms(250)
        } else {
            ms(200)
        }
    });
    for endpoint in 1..=5 {
        assert_eq!(state(&picker, addr(endpoint)).name(), "closed");
    }
}

#[test]
fn one_stall_on_a_fast_endpoint_does_not_eject_it() {
    let mut picker = picker(5, RelativeLatency::default());
    serve(&mut picker, 200, secs(1), |_| ms(2));
    // One 500 ms stall among its 2 ms answers: its mean jumps, but one call is no majority.
    picker.complete(addr(3), crate::Served::ByPick, ok(ms(500)), secs(3));
    serve(&mut picker, 200, secs(3), |_| ms(2));
    assert_eq!(state(&picker, addr(3)).name(), "closed");
}

#[test]
fn nobody_is_judged_with_fewer_peers_than_minimum_hosts() {
    let mut picker = picker(2, RelativeLatency::default());
    serve(&mut picker, 300, secs(1), |endpoint| {
        if endpoint == addr(2) { ms(50) } else { ms(2) }
    });
    assert_eq!(state(&picker, addr(2)).name(), "closed");
}

#[test]
fn differences_below_the_minimum_difference_never_count() {
    // 0.1 ms against 0.6 ms is 6x, but half a millisecond is not worth an ejection.
    let mut picker = picker(5, RelativeLatency::default());
    serve(&mut picker, 300, secs(1), |endpoint| {
        if endpoint == addr(5) {
            Duration::from_micros(600)
        } else {
            Duration::from_micros(100)
        }
    });
    assert_eq!(state(&picker, addr(5)).name(), "closed");
}

#[test]
fn a_probe_slow_against_its_peers_ejects_the_endpoint_again_for_longer() {
    let mut picker = picker(5, RelativeLatency::default());
    let slow = |endpoint| if endpoint == addr(5) { ms(22) } else { ms(2) };
    serve(&mut picker, 300, secs(1), slow);
    let BreakerState::Open { until, ejections } = state(&picker, addr(5)) else {
        panic!("the slow endpoint is ejected");
    };
    assert_eq!(ejections, 1);
    // After the ejection the peers keep their typical latency; the one probe is slow again.
    serve(&mut picker, 20, until, slow);
    let BreakerState::Open {
        until: again,
        ejections,
    } = state(&picker, addr(5))
    else {
        panic!("the slow probe re-ejects it");
    };
    assert_eq!(ejections, 2);
    assert!(
        again - until >= secs(20),
        "the second ejection lasts 2 x 10 s"
    );
}

#[test]
fn a_probe_as_fast_as_its_peers_closes_the_endpoint() {
    let mut picker = picker(5, RelativeLatency::default());
    serve(&mut picker, 300, secs(1), |endpoint| {
        if endpoint == addr(5) { ms(22) } else { ms(2) }
    });
    let BreakerState::Open { until, .. } = state(&picker, addr(5)) else {
        panic!("the slow endpoint is ejected");
    };
    serve(&mut picker, 20, until, |_| ms(2));
    assert_eq!(state(&picker, addr(5)).name(), "closed");
}

#[test]
fn the_rule_ejects_no_more_than_max_ejection_percent() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = OutlierDetection {
        max_ejection_percent: 10,
        ..strict_outlier_detection(0)
    };
    let mut picker = ServicePicker::new(&service, &endpoints(10));
    // Two endpoints of ten are slow; 10 % allows one ejection.
    serve(&mut picker, 300, secs(1), |endpoint| {
        if endpoint == addr(9) || endpoint == addr(10) {
            ms(30)
        } else {
            ms(2)
        }
    });
    let ejected = picker
        .endpoints()
        .filter(|view| view.breaker.is_ejected())
        .count();
    assert_eq!(ejected, 1);
}

#[test]
fn null_disables_the_rule() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = OutlierDetection {
        relative_latency: None,
        ..strict_outlier_detection(0)
    };
    let mut picker = ServicePicker::new(&service, &endpoints(5));
    serve(&mut picker, 300, secs(1), |endpoint| {
        if endpoint == addr(5) { ms(200) } else { ms(2) }
    });
    assert_eq!(state(&picker, addr(5)).name(), "closed");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Endpoints whose latencies stay within a factor of the yardstick's are never ejected by
    /// it, whatever their spread in time.
    #[test]
    fn endpoints_within_the_factor_of_each_other_are_never_ejected(
        latencies in prop::collection::vec(1_000u64..2_900, 5 * 100),
        hosts in 3u32..8,
    ) {
        let mut picker = picker(hosts, RelativeLatency::default());
        let mut rng = seeded();
        for (i, micros) in latencies.iter().enumerate() {
            let now = secs(1) + ms(10 * i as u64);
            let pick = picker.pick(&Default::default(), now, &mut rng).expect("admissible");
            picker.complete(
                pick.endpoint,
                crate::Served::ByPick,
                ok(Duration::from_micros(*micros)),
                now,
            );
        }
        prop_assert!(picker.endpoints().all(|view| !view.breaker.is_ejected()));
    }
}

#[test]
fn the_rule_is_on_by_default_and_its_fields_are_validated_by_path() {
    let policy = crate::Policy::from_json("{}").expect("the default policy");
    assert_eq!(
        policy.default.outlier_detection.relative_latency,
        Some(RelativeLatency::default())
    );
    let off = crate::Policy::from_json(
        r#"{"default": {"outlier_detection": {"relative_latency": null}}}"#,
    )
    .expect("null is valid");
    assert_eq!(off.default.outlier_detection.relative_latency, None);
    let error = crate::Policy::from_json(
        r#"{"default": {"outlier_detection": {"relative_latency":
            {"factor": 1.2, "minimum_hosts": 2, "threshold_percent": 0, "minimum_difference": "2h"}}}}"#,
    )
    .unwrap_err();
    let crate::PolicyError::Invalid(errors) = error else {
        panic!("expected validation errors, got {error}");
    };
    let paths: Vec<&str> = errors
        .errors
        .iter()
        .map(|error| error.path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "default.outlier_detection.relative_latency.factor",
            "default.outlier_detection.relative_latency.minimum_difference",
            "default.outlier_detection.relative_latency.threshold_percent",
            "default.outlier_detection.relative_latency.minimum_hosts",
        ]
    );
}

#[test]
fn a_policy_leaving_the_rule_at_its_default_serializes_as_older_filters_read_it() {
    let policy = crate::Policy::from_json("{}").expect("the default policy");
    let json = serde_json::to_string(&policy).expect("serializes");
    assert!(!json.contains("relative_latency"), "{json}");
    assert_eq!(
        crate::Policy::from_json(&json).expect("parses back"),
        policy
    );
    let off = crate::Policy::from_json(
        r#"{"default": {"outlier_detection": {"relative_latency": null}}}"#,
    )
    .expect("null is valid");
    let json = serde_json::to_string(&off).expect("serializes");
    assert_eq!(crate::Policy::from_json(&json).expect("parses back"), off);
}
