use crate::{
    BreakerState, Rejection, ServicePicker,
    policy::{LoadBalancer, OnNoEndpoint},
    rng::Sequence,
    test_support::*,
};

#[test]
fn round_robin_visits_each_endpoint_in_address_order() {
    let mut picker = ServicePicker::new(&policy(LoadBalancer::RoundRobin {}), &endpoints(3));
    let mut rng = seeded();
    let picked: Vec<_> = (0..6)
        .map(|_| pick_and_complete(&mut picker, ok(ms(5)), ms(0), &mut rng))
        .collect();
    assert_eq!(
        picked,
        [addr(1), addr(2), addr(3), addr(1), addr(2), addr(3)]
    );
}

#[test]
fn ejects_after_five_consecutive_failures_and_skips_the_endpoint() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(5);
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    let transitions = fail_on(&mut picker, addr(2), status(503), 5, secs(1));
    assert_eq!(transitions.len(), 1);
    assert_eq!(transitions[0].endpoint, addr(2));
    assert_eq!(
        transitions[0].to,
        BreakerState::Open {
            until: secs(11),
            ejections: 1
        }
    );
    let mut rng = Sequence::default();
    for _ in 0..6 {
        let pick = picker.pick(&Default::default(), secs(2), &mut rng).unwrap();
        assert_ne!(pick.endpoint, addr(2));
        picker.complete(pick.endpoint, crate::Served::ByPick, ok(ms(1)), secs(2));
    }
}

#[test]
fn no_healthy_endpoint_is_rejected_with_the_policy_action() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.on_no_endpoint = OnNoEndpoint::FailFast;
    let mut picker = ServicePicker::new(&service, &[]);
    let rejection = picker
        .pick(&Default::default(), ms(0), &mut seeded())
        .unwrap_err();
    assert_eq!(
        rejection,
        Rejection::NoEndpoints {
            action: OnNoEndpoint::FailFast
        }
    );
    assert!(!rejection.fails_open());
}

#[test]
fn weighted_round_robin_serves_the_endpoint_due_first_half_a_period_in() {
    let mut picker = ServicePicker::new(
        &policy(LoadBalancer::WeightedRoundRobin {}),
        &weighted(&[5, 1, 1]),
    );
    let mut rng = seeded();
    let picked: Vec<_> = (0..7)
        .map(|_| pick_and_complete(&mut picker, ok(ms(5)), ms(0), &mut rng))
        .collect();
    // a is due at 0.1, 0.3, 0.5, 0.7 and 0.9; b and c at 0.5; ties go in address order.
    let (a, b, c) = (addr(1), addr(2), addr(3));
    assert_eq!(picked, [a, a, a, b, c, a, a]);
}

#[test]
fn ejects_after_five_consecutive_gateway_errors() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(0);
    service.outlier_detection.consecutive_gateway_errors = 5;
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    assert!(fail_on(&mut picker, addr(1), connect_failure(), 4, secs(1)).is_empty());
    // A plain 500 is not a gateway error: the run starts again.
    assert!(fail_on(&mut picker, addr(1), status(500), 1, secs(1)).is_empty());
    assert!(fail_on(&mut picker, addr(1), status(502), 4, secs(1)).is_empty());
    let transitions = fail_on(&mut picker, addr(1), status(504), 1, secs(1));
    assert_eq!(transitions.len(), 1);
    assert_eq!(transitions[0].to.name(), "open");
}

#[test]
fn keeps_traffic_in_the_local_zone_until_too_few_are_admissible_then_fails_over() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(1);
    service.locality.local_zone = Some("z1".into());
    service.locality.failover = vec!["z2".into()];
    let fleet = [
        in_zone(1, "z1"),
        in_zone(2, "z1"),
        in_zone(3, "z2"),
        in_zone(4, "z3"),
    ];
    let mut picker = ServicePicker::new(&service, &fleet);
    let mut rng = seeded();
    let picked: Vec<_> = (0..4)
        .map(|_| pick_and_complete(&mut picker, ok(ms(5)), ms(0), &mut rng))
        .collect();
    assert_eq!(picked, [addr(1), addr(2), addr(1), addr(2)]);
    // One of two local endpoints ejected: 50% < 70%, so z2 (the first failover) takes over.
    fail_on(&mut picker, addr(1), status(503), 1, ms(1));
    for _ in 0..3 {
        assert_eq!(
            pick_and_complete(&mut picker, ok(ms(5)), ms(2), &mut rng),
            addr(3)
        );
    }
}

#[test]
fn a_host_envoy_chose_instead_of_the_pick_charges_the_pick_nothing() {
    // The pick is not in the routed cluster: override_host falls back and another host
    // answers 503 every time. The pick never saw those requests and must stay closed.
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(2);
    let outsider: std::net::SocketAddr = "192.0.2.9:80".parse().unwrap();
    let mut picker = ServicePicker::new(&service, &endpoints(1));
    let mut rng = Sequence::default();
    for _ in 0..10 {
        let pick = picker.pick(&Default::default(), secs(1), &mut rng).unwrap();
        assert_eq!(pick.endpoint, addr(1));
        let transitions = picker.complete(
            pick.endpoint,
            crate::Served::ByFallback(outsider),
            status(503),
            secs(1),
        );
        assert!(transitions.is_empty());
    }
    let views: Vec<_> = picker
        .endpoints()
        .map(|view| (view.breaker.name(), view.inflight))
        .collect();
    assert_eq!(views, [("closed", 0)]);
}

#[test]
fn a_fallback_host_of_the_service_is_charged_its_own_outcome() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(2);
    let mut picker = ServicePicker::new(&service, &endpoints(2));
    let mut transitions = Vec::new();
    for _ in 0..2 {
        transitions.extend(
            picker
                .complete(
                    addr(1),
                    crate::Served::ByFallback(addr(2)),
                    status(503),
                    secs(1),
                )
                .iter()
                .copied(),
        );
    }
    assert_eq!(transitions.len(), 1);
    assert_eq!(transitions[0].endpoint, addr(2));
    let breakers: Vec<_> = picker.endpoints().map(|v| v.breaker.name()).collect();
    assert_eq!(breakers, ["closed", "open"]);
}

#[test]
fn the_upstream_is_classified_against_the_pick_and_its_retry_targets() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.retry = 1;
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    let pick = picker
        .pick(&Default::default(), secs(1), &mut Sequence::default())
        .unwrap();
    let retry = pick.retry_targets.as_slice()[0];
    let other = [addr(1), addr(2), addr(3)]
        .into_iter()
        .find(|a| *a != pick.endpoint && *a != retry)
        .unwrap();
    let classify = |upstream, attempts| {
        crate::Served::classify(pick.endpoint, &pick.retry_targets, upstream, attempts)
    };
    assert_eq!(classify(None, Some(1)), crate::Served::ByPick);
    assert_eq!(
        classify(Some(pick.endpoint), Some(1)),
        crate::Served::ByPick
    );
    assert_eq!(
        classify(Some(pick.endpoint), Some(2)),
        crate::Served::ByPick
    );
    assert_eq!(
        classify(Some(retry), Some(2)),
        crate::Served::ByRetryTarget(retry)
    );
    assert_eq!(
        classify(Some(retry), None),
        crate::Served::ByRetryTarget(retry)
    );
    // One attempt that reached a retry target: override_host ignored the pick.
    assert_eq!(
        classify(Some(retry), Some(1)),
        crate::Served::ByFallback(retry)
    );
    assert_eq!(
        classify(Some(other), Some(2)),
        crate::Served::ByFallback(other)
    );
}

#[test]
fn an_abandoned_pick_releases_its_inflight_count_and_charges_nothing() {
    let mut picker = ServicePicker::new(&policy(LoadBalancer::RoundRobin {}), &endpoints(2));
    let pick = picker
        .pick(&Default::default(), ms(0), &mut seeded())
        .unwrap();
    let inflight = |picker: &ServicePicker| {
        picker
            .endpoints()
            .find(|view| view.endpoint.address == pick.endpoint)
            .map(|view| view.inflight)
    };
    assert_eq!(inflight(&picker), Some(1));

    picker.abandon(pick.endpoint);
    picker.abandon(addr(9));

    assert_eq!(inflight(&picker), Some(0));
    assert!(!picker.knows_of_failures());
}
