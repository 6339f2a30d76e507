use std::time::Duration;

use proptest::prelude::*;

use crate::{
    BreakerState, Rejection, ServicePicker,
    breaker::{Breaker, Context, Event, Verdict, ejection_time},
    policy::{FailureRate, LoadBalancer, OnNoEndpoint, OutlierDetection, SlowCalls},
    rng::{Sequence, SplitMix64},
    test_support::*,
};

const FAILURE: Event = Event::Complete(Verdict {
    failure: true,
    gateway_error: true,
    slow: false,
    slow_vs_peers: false,
    latency: Duration::from_millis(1),
});
const SUCCESS: Event = Event::Complete(Verdict {
    failure: false,
    gateway_error: false,
    slow: false,
    slow_vs_peers: false,
    latency: Duration::from_millis(1),
});

fn context(policy: &OutlierDetection, now: Duration) -> Context<'_> {
    Context {
        policy,
        now,
        may_eject: true,
        jitter_seed: 1,
    }
}

fn tripped(policy: &OutlierDetection, now: Duration) -> Breaker {
    let mut breaker = Breaker::new(Duration::ZERO);
    for _ in 0..policy.consecutive_failures {
        breaker.on(FAILURE, &context(policy, now));
    }
    breaker
}

#[test]
fn a_breaker_says_when_time_alone_makes_it_admit_again() {
    let policy = strict_outlier_detection(1);
    let mut breaker = Breaker::new(Duration::ZERO);
    assert_eq!(
        breaker.admits_from(&policy, secs(0)),
        None,
        "closed: admits"
    );
    breaker.on(FAILURE, &context(&policy, secs(0)));
    assert_eq!(breaker.admits_from(&policy, secs(3)), Some(secs(10)));
    assert_eq!(
        breaker.admits_from(&policy, secs(10)),
        None,
        "ejection over"
    );
    // The one probe is out: admitted again once the round has waited base_ejection_time.
    breaker.on(Event::Admit, &context(&policy, secs(12)));
    assert_eq!(breaker.admits_from(&policy, secs(13)), Some(secs(22)));
    assert_eq!(breaker.admits_from(&policy, secs(22)), None);
}

#[test]
fn an_expired_ejection_admits_bounded_probes_and_closes_when_they_succeed() {
    let mut policy = strict_outlier_detection(2);
    policy.half_open_max_probes = 2;
    let mut breaker = tripped(&policy, secs(0));
    assert_eq!(
        breaker.state(),
        BreakerState::Open {
            until: secs(10),
            ejections: 1
        }
    );
    assert!(!breaker.admits(&policy, secs(9)));
    assert!(breaker.admits(&policy, secs(10)));
    let change = breaker
        .on(Event::Admit, &context(&policy, secs(10)))
        .unwrap();
    assert_eq!(change.to.name(), "half_open");
    breaker.on(Event::Admit, &context(&policy, secs(10)));
    assert!(!breaker.admits(&policy, secs(11)), "both probes are out");
    assert_eq!(breaker.on(SUCCESS, &context(&policy, secs(11))), None);
    let change = breaker.on(SUCCESS, &context(&policy, secs(11))).unwrap();
    assert_eq!(
        change.to,
        BreakerState::Closed {
            ejections: 1,
            since: secs(11)
        }
    );
}

#[test]
fn a_failed_probe_reopens_for_twice_the_base_ejection_time() {
    let policy = strict_outlier_detection(1);
    let mut breaker = tripped(&policy, secs(0));
    breaker.on(Event::Admit, &context(&policy, secs(10)));
    let change = breaker.on(FAILURE, &context(&policy, secs(10))).unwrap();
    assert_eq!(
        change.to,
        BreakerState::Open {
            until: secs(30),
            ejections: 2
        }
    );
}

#[test]
fn probes_that_never_complete_are_replaced_after_the_base_ejection_time() {
    let policy = strict_outlier_detection(1);
    let mut breaker = tripped(&policy, secs(0));
    breaker.on(Event::Admit, &context(&policy, secs(10)));
    assert!(!breaker.admits(&policy, secs(19)));
    assert!(breaker.admits(&policy, secs(20)));
}

#[test]
fn ejection_time_grows_per_ejection_up_to_the_maximum() {
    let policy = OutlierDetection {
        base_ejection_time: secs(30),
        max_ejection_time: secs(100),
        ejection_jitter_percent: 0,
        ..OutlierDetection::default()
    };
    let times: Vec<_> = (1..=5)
        .map(|n| ejection_time(&policy, n, 7, secs(0)))
        .collect();
    assert_eq!(times, [secs(30), secs(60), secs(90), secs(100), secs(100)]);
}

#[test]
fn jitter_spreads_ejection_times_within_the_percent() {
    let policy = OutlierDetection {
        base_ejection_time: secs(100),
        max_ejection_time: secs(1000),
        ejection_jitter_percent: 10,
        ..OutlierDetection::default()
    };
    let times: Vec<_> = (0..64u64)
        .map(|seed| ejection_time(&policy, 1, seed, secs(0)))
        .collect();
    assert!(times.iter().all(|t| (secs(90)..=secs(110)).contains(t)));
    assert!(
        times.iter().any(|t| *t != times[0]),
        "jitter varies by endpoint"
    );
}

#[test]
fn remembered_ejections_are_forgotten_after_max_ejection_time_closed() {
    let policy = strict_outlier_detection(1);
    let mut breaker = tripped(&policy, secs(0));
    breaker.on(Event::Admit, &context(&policy, secs(10)));
    breaker.on(SUCCESS, &context(&policy, secs(10)));
    // Failing soon after closing: the second ejection lasts 2 × base.
    let mut soon = breaker.clone();
    let change = soon.on(FAILURE, &context(&policy, secs(20))).unwrap();
    assert_eq!(
        change.to,
        BreakerState::Open {
            until: secs(40),
            ejections: 2
        }
    );
    // Failing after max_ejection_time (300s) closed: back to 1 × base.
    let change = breaker.on(FAILURE, &context(&policy, secs(310))).unwrap();
    assert_eq!(
        change.to,
        BreakerState::Open {
            until: secs(320),
            ejections: 1
        }
    );
}

#[test]
fn ejects_when_the_failure_rate_crosses_the_threshold_with_enough_volume() {
    let policy = OutlierDetection {
        consecutive_failures: 0,
        failure_rate: Some(FailureRate {
            threshold_percent: 50,
            minimum_requests: 10,
        }),
        ..strict_outlier_detection(0)
    };
    let mut breaker = Breaker::new(Duration::ZERO);
    // Alternating: 50% failures, but only 9 requests: not judged yet.
    for i in 0..9 {
        let event = if i % 2 == 0 { FAILURE } else { SUCCESS };
        assert_eq!(breaker.on(event, &context(&policy, ms(i * 10))), None);
    }
    let change = breaker.on(SUCCESS, &context(&policy, ms(100))).unwrap();
    assert_eq!(change.to.name(), "open", "5 failures of 10 reach 50%");
}

#[test]
fn ejects_when_too_many_calls_are_slow() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = OutlierDetection {
        slow_calls: Some(SlowCalls {
            latency_threshold: ms(200),
            threshold_percent: 60,
            minimum_requests: 5,
        }),
        ..strict_outlier_detection(0)
    };
    let mut picker = ServicePicker::new(&service, &endpoints(2));
    assert!(fail_on(&mut picker, addr(1), ok(ms(300)), 2, secs(1)).is_empty());
    assert!(fail_on(&mut picker, addr(1), ok(ms(20)), 2, secs(1)).is_empty());
    let transitions = fail_on(&mut picker, addr(1), ok(ms(201)), 1, secs(1));
    assert_eq!(transitions.len(), 1, "3 slow of 5 is 60%");
}

#[test]
fn max_ejection_percent_keeps_most_of_the_fleet_in_service() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = OutlierDetection {
        max_ejection_percent: 20,
        ..strict_outlier_detection(1)
    };
    let mut picker = ServicePicker::new(&service, &endpoints(10));
    let ejected = (1..=10)
        .filter(|&i| !fail_on(&mut picker, addr(i), status(503), 1, secs(1)).is_empty())
        .count();
    assert_eq!(ejected, 2);
}

#[test]
fn any_nonzero_max_ejection_percent_allows_one_ejection() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = OutlierDetection {
        max_ejection_percent: 10,
        ..strict_outlier_detection(1)
    };
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    assert_eq!(
        fail_on(&mut picker, addr(1), status(503), 1, secs(1)).len(),
        1
    );
    assert!(fail_on(&mut picker, addr(2), status(503), 1, secs(1)).is_empty());
}

#[test]
fn below_the_panic_threshold_ejections_are_ignored() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = OutlierDetection {
        panic_threshold_percent: 50,
        ..strict_outlier_detection(1)
    };
    let mut picker = ServicePicker::new(&service, &endpoints(4));
    fail_on(&mut picker, addr(1), status(503), 1, secs(1));
    fail_on(&mut picker, addr(2), status(503), 1, secs(1));
    let mut rng = Sequence::default();
    // 2 of 4 admissible = 50%: not panicking, ejected endpoints are skipped.
    for _ in 0..4 {
        let pick = picker.pick(&Default::default(), secs(2), &mut rng).unwrap();
        assert!([addr(3), addr(4)].contains(&pick.endpoint));
        picker.complete(pick.endpoint, crate::Served::ByPick, ok(ms(1)), secs(2));
    }
    // 1 of 4 = 25% < 50%: panic, every selected endpoint takes traffic again.
    fail_on(&mut picker, addr(3), status(503), 1, secs(2));
    let picked: Vec<_> = (0..4)
        .map(|_| {
            let pick = picker.pick(&Default::default(), secs(3), &mut rng).unwrap();
            pick.endpoint
        })
        .collect();
    assert_eq!(picked.len(), 4);
    assert!(picked.contains(&addr(1)) && picked.contains(&addr(2)));
}

#[test]
fn with_no_panic_threshold_an_all_ejected_service_is_rejected_with_the_policy_action() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(1);
    service.on_no_endpoint = OnNoEndpoint::FailOpen;
    let mut picker = ServicePicker::new(&service, &endpoints(2));
    fail_on(&mut picker, addr(1), status(503), 1, secs(1));
    fail_on(&mut picker, addr(2), status(503), 1, secs(1));
    let rejection = picker
        .pick(&Default::default(), secs(2), &mut Sequence::default())
        .unwrap_err();
    assert_eq!(
        rejection,
        Rejection::AllEjected {
            action: OnNoEndpoint::FailOpen
        }
    );
    assert!(rejection.fails_open());
    assert_eq!(rejection.reason(), "all_ejected");
}

/// The service-level breaker of docs/policy.md ("Service-level protection"): every endpoint
/// may be ejected, no panic, fail fast. While the whole service is down requests get a local
/// 503 without reaching it; when the ejections end, probes go out and a service that
/// recovered serves again.
#[test]
fn a_whole_service_down_fails_fast_until_its_probes_succeed() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(3);
    service.on_no_endpoint = OnNoEndpoint::FailFast;
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    let mut rng = Sequence::default();
    let mut now = secs(1);
    // Every endpoint fails until all are ejected (10 s).
    while picker.endpoints().any(|view| !view.breaker.is_ejected()) {
        let pick = picker.pick(&Default::default(), now, &mut rng).unwrap();
        picker.complete(pick.endpoint, crate::Served::ByPick, status(503), now);
        now += ms(1);
    }
    for _ in 0..100 {
        let rejection = picker.pick(&Default::default(), now, &mut rng).unwrap_err();
        assert_eq!(rejection.reason(), "all_ejected");
        assert!(!rejection.fails_open(), "a local 503, not Envoy's fallback");
        now += ms(10);
    }
    // The ejections end: one probe per endpoint goes out; they succeed and close.
    now = secs(12);
    for _ in 0..3 {
        let pick = picker.pick(&Default::default(), now, &mut rng).unwrap();
        picker.complete(pick.endpoint, crate::Served::ByPick, ok(ms(1)), now);
    }
    assert!(picker.endpoints().all(|view| !view.breaker.is_ejected()));
    assert!(picker.pick(&Default::default(), now, &mut rng).is_ok());
}

#[test]
fn a_retry_elsewhere_counts_as_a_failure_of_the_picked_endpoint() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(2);
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    let mut rng = Sequence::default();
    let mut transitions = Vec::new();
    for _ in 0..2 {
        let pick = picker.pick(&Default::default(), secs(1), &mut rng).unwrap();
        assert_eq!(pick.endpoint, addr(1));
        let t = picker.complete(
            addr(1),
            crate::Served::ByRetryTarget(addr(3)),
            ok(ms(5)),
            secs(1),
        );
        transitions.extend(t.iter().copied());
        // Rotate back to addr(1).
        for _ in 0..2 {
            let other = picker.pick(&Default::default(), secs(1), &mut rng).unwrap();
            picker.complete(other.endpoint, crate::Served::ByPick, ok(ms(5)), secs(1));
        }
    }
    assert_eq!(transitions.len(), 1);
    assert_eq!(transitions[0].endpoint, addr(1));
    let views: Vec<_> = picker
        .endpoints()
        .map(|v| (v.breaker.name(), v.inflight))
        .collect();
    assert_eq!(views, [("open", 0), ("closed", 0), ("closed", 0)]);
}

proptest! {
    /// Random events under random policies keep the state machine's invariants.
    #[test]
    fn breaker_state_machine_keeps_its_invariants(
        threshold in 1u32..5,
        probes in 1u32..4,
        events in proptest::collection::vec((0u8..3, 0u64..5_000), 1..200),
    ) {
        let mut policy = strict_outlier_detection(threshold);
        policy.half_open_max_probes = probes;
        policy.ejection_jitter_percent = 20;
        let mut breaker = Breaker::new(Duration::ZERO);
        let mut now = Duration::ZERO;
        let mut last_ejections = 0;
        for (kind, advance_ms) in events {
            now += ms(advance_ms);
            let event = match kind {
                0 => Event::Admit,
                1 => FAILURE,
                _ => SUCCESS,
            };
            if event == Event::Admit && !breaker.admits(&policy, now) {
                continue;
            }
            let before = breaker.state();
            let change = breaker.on(event, &context(&policy, now));
            let after = breaker.state();
            match after {
                BreakerState::Open { until, ejections } => {
                    prop_assert!(until > now || before == after);
                    prop_assert!(until <= now + policy.max_ejection_time);
                    prop_assert!(ejections >= 1);
                    last_ejections = ejections;
                }
                BreakerState::HalfOpen { probes_admitted, successes, .. } => {
                    prop_assert!(probes_admitted >= 1 && probes_admitted <= probes);
                    prop_assert!(successes < probes);
                }
                BreakerState::Closed { ejections, .. } => {
                    prop_assert!(ejections <= last_ejections);
                }
            }
            // Only a completion can eject; only an admission can start probing.
            if let Some(change) = change {
                match (change.from, change.to) {
                    (BreakerState::Closed { .. }, BreakerState::Open { .. })
                    | (BreakerState::HalfOpen { .. }, BreakerState::Open { .. })
                    | (BreakerState::HalfOpen { .. }, BreakerState::Closed { .. }) => {
                        prop_assert!(event != Event::Admit);
                    }
                    (BreakerState::Open { .. }, BreakerState::HalfOpen { .. }) => {
                        prop_assert_eq!(event, Event::Admit);
                    }
                    (from, to) => prop_assert!(false, "impossible transition {:?} -> {:?}", from, to),
                }
            }
        }
    }

    /// With no panic threshold, an endpoint whose ejection has not expired is never picked,
    /// whatever the algorithm and the sequence of failures.
    #[test]
    fn ejected_endpoints_are_never_picked(
        algorithm in 0usize..6,
        seed in any::<u64>(),
        steps in proptest::collection::vec((0u32..6, any::<bool>(), 0u64..3_000), 1..150),
    ) {
        let load_balancer = [
            LoadBalancer::RoundRobin {},
            LoadBalancer::WeightedRoundRobin {},
            LoadBalancer::WeightedRandom {},
            LoadBalancer::LeastRequest(Default::default()),
            LoadBalancer::PeakEwma(Default::default()),
            LoadBalancer::Maglev(Default::default()),
        ][algorithm].clone();
        let mut service = policy(load_balancer);
        service.outlier_detection = strict_outlier_detection(2);
        service.outlier_detection.ejection_jitter_percent = 30;
        service.retry = 3;
        let mut picker = ServicePicker::new(&service, &weighted(&[1, 2, 3, 1, 2, 3]));
        let mut rng = SplitMix64::new(seed);
        let mut now = Duration::ZERO;
        for (fail_target, fail, advance_ms) in steps {
            now += ms(advance_ms);
            let open_until: Vec<_> = picker
                .endpoints()
                .map(|v| match v.breaker {
                    BreakerState::Open { until, .. } => Some(until),
                    _ => None,
                })
                .collect();
            match picker.pick(&Default::default(), now, &mut rng) {
                Ok(pick) => {
                    let index = picker
                        .endpoints()
                        .position(|v| v.endpoint.address == pick.endpoint)
                        .unwrap();
                    if let Some(until) = open_until[index] {
                        prop_assert!(now >= until, "picked an ejected endpoint");
                    }
                    for target in pick.retry_targets.as_slice() {
                        prop_assert_ne!(*target, pick.endpoint);
                        let view = picker.endpoints().find(|v| v.endpoint.address == *target).unwrap();
                        prop_assert_eq!(view.breaker.name(), "closed");
                    }
                    let outcome = if fail { status(503) } else { ok(ms(3)) };
                    picker.complete(pick.endpoint, crate::Served::ByPick, outcome, now);
                }
                Err(rejection) => prop_assert_eq!(rejection.reason(), "all_ejected"),
            }
            if fail {
                picker.complete(addr(fail_target + 1), crate::Served::ByPick, status(502), now);
            }
        }
    }
}
