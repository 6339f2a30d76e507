//! Fair re-admission and slow start: an endpoint that joins, turns healthy or comes back from
//! an ejection returns to its fair share along the policy's ramp, or at once without one, and
//! is neither starved nor flooded on the way.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use crate::{
    Endpoint, ServicePicker,
    endpoint::Health,
    policy::{LeastRequest, LoadBalancer, PeakEwma, RingHash, SlowStart},
    test_support::*,
};

fn slow_start(window: Duration) -> SlowStart {
    SlowStart {
        window,
        aggression: 1.0,
        min_weight_percent: 10,
    }
}

fn picker_with(load_balancer: LoadBalancer, ramp: Option<SlowStart>, n: u32) -> ServicePicker {
    let mut service = policy(load_balancer);
    service.slow_start = ramp;
    service.outlier_detection = strict_outlier_detection(5);
    ServicePicker::new(&service, &endpoints(n))
}

/// Each endpoint's share of the picks made one per millisecond over `[from, to)`, every
/// request answering after `latency(endpoint)`.
fn shares(
    picker: &mut ServicePicker,
    from: Duration,
    to: Duration,
    latency: impl Fn(SocketAddr) -> Duration,
) -> BTreeMap<SocketAddr, f64> {
    let mut rng = seeded();
    let mut counts: BTreeMap<SocketAddr, u32> = BTreeMap::new();
    let mut now = from;
    let mut total = 0;
    while now < to {
        let pick = picker
            .pick(&Default::default(), now, &mut rng)
            .expect("admissible");
        picker.complete(
            pick.endpoint,
            crate::Served::ByPick,
            ok(latency(pick.endpoint)),
            now,
        );
        *counts.entry(pick.endpoint).or_default() += 1;
        total += 1;
        now += ms(1);
    }
    counts
        .into_iter()
        .map(|(endpoint, count)| (endpoint, f64::from(count) / f64::from(total)))
        .collect()
}

fn share_of(shares: &BTreeMap<SocketAddr, f64>, endpoint: SocketAddr) -> f64 {
    shares.get(&endpoint).copied().unwrap_or(0.0)
}

#[test]
fn the_ramp_follows_envoys_formula_from_the_floor_to_full_share() {
    let linear = slow_start(secs(10));
    assert_eq!(
        linear.factor(Duration::ZERO),
        0.1,
        "min_weight_percent is the floor"
    );
    assert!((linear.factor(secs(5)) - 0.5).abs() < 1e-9);
    assert_eq!(linear.factor(secs(10)), 1.0);
    let aggressive = SlowStart {
        aggression: 2.0,
        ..linear
    };
    assert!((aggressive.factor(secs(5)) - 0.5f64.sqrt()).abs() < 1e-9);
}

#[test]
fn a_newcomer_ramps_up_to_its_fair_share_over_the_window() {
    let mut picker = picker_with(
        LoadBalancer::LeastRequest(LeastRequest::default()),
        Some(slow_start(secs(10))),
        4,
    );
    shares(&mut picker, secs(0), secs(1), |_| ms(1));
    picker.update_endpoints(&endpoints(5));
    let newcomer = addr(5);
    let first = shares(&mut picker, secs(1), secs(2), |_| ms(1));
    let middle = shares(&mut picker, secs(5), secs(7), |_| ms(1));
    let after = shares(&mut picker, secs(12), secs(16), |_| ms(1));
    // Fair share is 20 %; the ramp gives about 20 % × factor.
    assert!(share_of(&first, newcomer) < 0.06, "{first:?}");
    assert!(
        (0.06..0.16).contains(&share_of(&middle, newcomer)),
        "{middle:?}"
    );
    assert!(
        (0.18..0.22).contains(&share_of(&after, newcomer)),
        "{after:?}"
    );
    // What the newcomer did not take went to everyone, not to one neighbour.
    for peer in 1..=4 {
        assert!(
            (0.2..0.3).contains(&share_of(&first, addr(peer))),
            "{first:?}"
        );
    }
}

#[test]
fn the_endpoints_of_a_new_service_start_at_full_share() {
    let mut picker = picker_with(
        LoadBalancer::LeastRequest(LeastRequest::default()),
        Some(slow_start(secs(10))),
        4,
    );
    let first = shares(&mut picker, secs(0), secs(1), |_| ms(1));
    for endpoint in 1..=4 {
        assert!(
            (0.22..0.28).contains(&share_of(&first, addr(endpoint))),
            "{first:?}"
        );
    }
}

#[test]
fn an_endpoint_that_turns_healthy_warms_up() {
    let mut picker = picker_with(
        LoadBalancer::LeastRequest(LeastRequest::default()),
        Some(slow_start(secs(10))),
        4,
    );
    let mut set = endpoints(4);
    set[3].health = Health::Unhealthy;
    picker.update_endpoints(&set);
    shares(&mut picker, secs(0), secs(1), |_| ms(1));
    set[3].health = Health::Healthy;
    picker.update_endpoints(&set);
    let first = shares(&mut picker, secs(1), secs(2), |_| ms(1));
    assert!(share_of(&first, addr(4)) < 0.08, "{first:?}");
}

#[test]
fn consistent_hashing_ignores_slow_start_so_keys_keep_their_endpoint() {
    let mut picker = picker_with(
        LoadBalancer::RingHash(RingHash::default()),
        Some(slow_start(secs(10))),
        4,
    );
    picker.update_endpoints(&endpoints(5));
    let mut rng = seeded();
    let newcomer = Endpoint::new(addr(5)).address;
    let keyed = (0..2000u32)
        .filter(|key| {
            let attributes = crate::RequestAttributes {
                source_ip: Some(std::net::IpAddr::from(key.to_be_bytes())),
                ..Default::default()
            };
            let pick = picker.pick(&attributes, secs(1), &mut rng).expect("picks");
            picker.complete(pick.endpoint, crate::Served::ByPick, ok(ms(1)), secs(1));
            pick.endpoint == newcomer
        })
        .count();
    assert!(
        keyed > 200,
        "the ring's share, not a ramped one: {keyed} of 2000"
    );
}

#[test]
fn an_endpoint_back_from_an_ejection_returns_to_its_fair_share_at_once_without_a_ramp() {
    // Peak EWMA: the ejected endpoint's failures were recorded at the 500 ms failure penalty,
    // which decays for minutes; the ejection forgets it (so the probe is sent) and the
    // re-admission restarts the estimate at the peers' latency.
    let mut picker = picker_with(LoadBalancer::PeakEwma(PeakEwma::default()), None, 5);
    shares(&mut picker, secs(0), secs(3), |_| ms(2));
    let transitions = fail_on(&mut picker, addr(5), status(503), 5, secs(3));
    assert_eq!(transitions.len(), 1, "ejected");
    // The 10 s ejection ends at 13 s; the probe succeeds and the endpoint closes.
    shares(&mut picker, secs(3), secs(14), |_| ms(2));
    let after = shares(&mut picker, secs(14), secs(18), |_| ms(2));
    assert!(
        share_of(&after, addr(5)) >= 0.8 * 0.2,
        "at least 80 % of its fair share within 4 s: {after:?}"
    );
}

#[test]
fn an_endpoint_back_from_an_ejection_ramps_up_under_slow_start() {
    let mut picker = picker_with(
        LoadBalancer::LeastRequest(LeastRequest::default()),
        Some(slow_start(secs(10))),
        5,
    );
    fail_on(&mut picker, addr(5), status(503), 5, secs(1));
    // Ejected until 11 s; probed and closed right after.
    shares(&mut picker, secs(1), secs(12), |_| ms(1));
    let first = shares(&mut picker, secs(12), secs(13), |_| ms(1));
    let after = shares(&mut picker, secs(24), secs(28), |_| ms(1));
    assert!(share_of(&first, addr(5)) < 0.06, "{first:?}");
    assert!(
        (0.18..0.22).contains(&share_of(&after, addr(5))),
        "{after:?}"
    );
}

#[test]
fn slow_start_is_off_by_default_validated_by_path_and_left_out_of_snapshots_when_off() {
    let policy = crate::Policy::from_json("{}").expect("the default policy");
    assert_eq!(policy.default.slow_start, None);
    let json = serde_json::to_string(&policy).expect("serializes");
    assert!(!json.contains("slow_start"), "{json}");
    let on = crate::Policy::from_json(r#"{"default": {"slow_start": {"window": "20s"}}}"#)
        .expect("valid");
    assert_eq!(
        on.default.slow_start,
        Some(SlowStart {
            window: secs(20),
            ..SlowStart::default()
        })
    );
    let error = crate::Policy::from_json(
        r#"{"default": {"slow_start": {"window": "10ms", "aggression": 0, "min_weight_percent": 0}}}"#,
    )
    .unwrap_err();
    assert_eq!(
        error
            .to_string()
            .lines()
            .filter(|line| line.contains("default.slow_start."))
            .count(),
        3,
        "{error}"
    );
}

#[test]
fn an_endpoint_that_stopped_failing_before_any_ejection_is_back_to_its_share_in_seconds() {
    // Peak EWMA avoids an erroring endpoint through its failure penalty, often before any
    // breaker trips; the penalty wears off in seconds once the errors stop.
    let mut picker = picker_with(LoadBalancer::PeakEwma(PeakEwma::default()), None, 4);
    shares(&mut picker, secs(0), secs(2), |_| ms(2));
    // Fast errors, as 503s are: as quick as the peers' answers.
    let fast_error = crate::Outcome {
        latency: ms(2),
        ..status(503)
    };
    let transitions = fail_on(&mut picker, addr(4), fast_error, 3, secs(2));
    assert!(transitions.is_empty(), "three failures eject nothing");
    let after = shares(&mut picker, secs(8), secs(12), |_| ms(2));
    assert!(
        share_of(&after, addr(4)) >= 0.8 * 0.25,
        "at least 80 % of its fair share 6 s after its last error: {after:?}"
    );
}
