//! Why this pick: the explanation's counts agree with the candidates the picker works out
//! (health, selector, breakers, locality tiers, panic threshold, `min_healthy_percent`), it
//! names what the algorithm compared, explaining never changes a pick, and the rendered line
//! stays within its cap.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    time::Duration,
};

use proptest::prelude::*;

use crate::{
    BreakerState, Endpoint, Health, Pick, PickExplanation, RequestAttributes, RetryTargets,
    ServicePicker,
    policy::{LeastRequest, LoadBalancer, PeakEwma, ServicePolicy, Sticky},
    ratelimit::LocalBuckets,
    rng::{Sequence, SplitMix64},
    service::{ChosenBy, Exclusions, ExplainedEndpoint, MAX_EXPLANATION_BYTES, TRUNCATED},
    test_support::*,
};

/// One explained pick with no request attributes at `now`.
fn explained(
    picker: &mut ServicePicker,
    now: Duration,
    rng: &mut SplitMix64,
) -> (Pick, PickExplanation) {
    explained_with(picker, &RequestAttributes::default(), now, rng)
}

fn explained_with(
    picker: &mut ServicePicker,
    attributes: &RequestAttributes<'_>,
    now: Duration,
    rng: &mut SplitMix64,
) -> (Pick, PickExplanation) {
    picker
        .pick_explained(attributes, now, rng, &mut LocalBuckets::default())
        .expect("an endpoint is admissible")
}

/// Round robin preferring zone `z1`, ejecting on the first failure, no panic threshold.
fn in_zone_z1(min_healthy_percent: u32) -> ServicePolicy {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(1);
    service.locality.local_zone = Some("z1".into());
    service.locality.min_healthy_percent = min_healthy_percent;
    service
}

fn with_health(mut endpoint: Endpoint, health: Health) -> Endpoint {
    endpoint.health = health;
    endpoint
}

fn tagged(mut endpoint: Endpoint) -> Endpoint {
    endpoint.attributes_mut().tags.insert("gpu".into());
    endpoint
}

#[test]
fn a_steady_pick_names_its_endpoint_and_algorithm_with_every_endpoint_a_candidate() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.retry = 2;
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    let (pick, explanation) = explained(&mut picker, ms(0), &mut seeded());
    assert_eq!(explanation.endpoint.address, pick.endpoint);
    assert_eq!(explanation.algorithm, "round_robin");
    assert_eq!(explanation.chosen_by, ChosenBy::Algorithm);
    assert_eq!(
        explanation.endpoints,
        Exclusions {
            candidates: 3,
            ..Exclusions::default()
        }
    );
    assert_eq!(explanation.rival, None, "round robin compares nothing");
    assert_eq!(explanation.retry_targets, pick.retry_targets);
    assert_eq!(
        explanation.to_string(),
        "endpoint=10.0.0.1:8080; algorithm=round_robin; via=algorithm; candidates=3 of 3; \
         excluded=none; panic=no; estimate_ms=-; inflight=0; breaker=closed; \
         retry=10.0.0.2:8080,10.0.0.3:8080"
    );
}

#[test]
fn each_endpoint_is_counted_once_by_why_it_was_not_a_candidate() {
    let mut service = in_zone_z1(50);
    service.endpoint_selector.tags.insert("gpu".into());
    let fleet = [
        tagged(in_zone(1, "z1")),
        tagged(in_zone(2, "z1")),
        with_health(tagged(in_zone(3, "z1")), Health::Unhealthy),
        with_health(tagged(in_zone(4, "z1")), Health::Draining),
        in_zone(5, "z1"),
        tagged(in_zone(6, "z2")),
    ];
    let mut picker = ServicePicker::new(&service, &fleet);
    fail_on(&mut picker, addr(2), status(503), 1, ms(1));
    let (pick, explanation) = explained(&mut picker, ms(2), &mut seeded());
    assert_eq!(pick.endpoint, addr(1));
    assert_eq!(
        explanation.endpoints,
        Exclusions {
            candidates: 1,
            unhealthy: 1,
            draining: 1,
            unselected: 1,
            ejected: 1,
            other_tier: 1,
            panic: false,
        },
        "half of z1 is admissible, enough at min_healthy_percent 50: z2 is not a candidate"
    );
    assert!(
        explanation.to_string().contains(
            "candidates=1 of 6; excluded=unhealthy:1,draining:1,unselected:1,ejected:1,other_tier:1; panic=no"
        ),
        "{explanation}"
    );
}

#[test]
fn a_local_zone_short_of_min_healthy_percent_fails_over_whole_to_the_next_tier() {
    let fleet = [in_zone(1, "z1"), in_zone(2, "z1"), in_zone(3, "z2")];
    let mut picker = ServicePicker::new(&in_zone_z1(70), &fleet);
    assert_eq!(
        explained(&mut picker, ms(0), &mut seeded()).1.endpoints,
        Exclusions {
            candidates: 2,
            other_tier: 1,
            ..Exclusions::default()
        },
        "every breaker closed: the local zone alone"
    );
    fail_on(&mut picker, addr(1), status(503), 1, ms(1));
    let (pick, explanation) = explained(&mut picker, ms(2), &mut seeded());
    assert_eq!(pick.endpoint, addr(3));
    assert_eq!(
        explanation.endpoints,
        Exclusions {
            candidates: 1,
            ejected: 1,
            other_tier: 1,
            ..Exclusions::default()
        },
        "50% of z1 < 70%: z2, whole, takes its traffic; z1's admissible endpoint is in \
         another tier than the candidates"
    );
}

#[test]
fn with_no_tier_healthy_enough_every_admissible_endpoint_is_a_candidate() {
    let fleet = [
        in_zone(1, "z1"),
        in_zone(2, "z1"),
        in_zone(3, "z2"),
        in_zone(4, "z2"),
    ];
    let mut picker = ServicePicker::new(&in_zone_z1(70), &fleet);
    fail_on(&mut picker, addr(1), status(503), 1, ms(1));
    fail_on(&mut picker, addr(3), status(503), 1, ms(1));
    let (_, explanation) = explained(&mut picker, ms(2), &mut seeded());
    assert_eq!(
        explanation.endpoints,
        Exclusions {
            candidates: 2,
            ejected: 2,
            ..Exclusions::default()
        },
        "both zones at 50% < 70%"
    );
}

#[test]
fn in_panic_ejected_endpoints_are_candidates_and_the_panic_is_said() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(1);
    service.outlier_detection.panic_threshold_percent = 50;
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    fail_on(&mut picker, addr(1), status(503), 1, ms(1));
    let (_, explanation) = explained(&mut picker, ms(2), &mut seeded());
    assert_eq!(
        explanation.endpoints,
        Exclusions {
            candidates: 2,
            ejected: 1,
            ..Exclusions::default()
        },
        "two of three admissible: above the threshold"
    );
    fail_on(&mut picker, addr(2), status(503), 1, ms(3));
    let (_, explanation) = explained(&mut picker, ms(4), &mut seeded());
    assert_eq!(
        explanation.endpoints,
        Exclusions {
            candidates: 3,
            panic: true,
            ..Exclusions::default()
        },
        "one of three admissible: below 50%, ejections ignored"
    );
    assert!(explanation.to_string().contains("excluded=none; panic=yes"));
}

#[test]
fn a_rejected_pick_s_exclusions_say_what_it_was_short_of() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(1);
    let mut fleet = endpoints(3);
    fleet[2].health = Health::Unhealthy;
    let mut picker = ServicePicker::new(&service, &fleet);
    for i in 1..=2 {
        fail_on(&mut picker, addr(i), status(503), 1, ms(1));
    }
    let rejection = picker.pick(&Default::default(), ms(2), &mut seeded());
    assert_eq!(rejection.map_err(|r| r.reason()), Err("all_ejected"));
    let exclusions = picker.exclusions(ms(2));
    assert_eq!(
        exclusions.to_string(),
        "candidates=0 of 3; excluded=unhealthy:1,ejected:2; panic=no"
    );
}

#[test]
fn peak_ewma_names_the_rival_it_won_against_with_both_estimates() {
    let mut picker = ServicePicker::new(
        &policy(LoadBalancer::PeakEwma(PeakEwma::default())),
        &endpoints(2),
    );
    picker.complete(addr(1), crate::Served::ByPick, ok(ms(2)), ms(10));
    picker.complete(addr(2), crate::Served::ByPick, ok(ms(50)), ms(10));
    let (pick, explanation) = explained(&mut picker, ms(11), &mut seeded());
    assert_eq!(pick.endpoint, addr(1), "the faster of the two");
    assert_eq!(explanation.algorithm, "peak_ewma");
    let rival = explanation.rival.expect("two candidates were compared");
    assert_eq!(rival.address, addr(2));
    let (fast, slow) = (
        explanation.endpoint.estimate.expect("sampled"),
        rival.estimate.expect("sampled"),
    );
    assert!(fast < slow, "{fast:?} vs {slow:?}");
    let text = explanation.to_string();
    assert!(
        text.contains("; compared_with=10.0.0.2:8080; estimate_ms="),
        "{text}"
    );
    assert!(
        text.contains("; inflight=0/0; breaker=closed/closed; retry="),
        "{text}"
    );
}

#[test]
fn least_request_names_the_busier_rival_and_the_loads_before_this_pick() {
    let mut picker = ServicePicker::new(
        &policy(LoadBalancer::LeastRequest(LeastRequest::default())),
        &endpoints(2),
    );
    let mut rng = seeded();
    let (first, _) = explained(&mut picker, ms(0), &mut rng);
    let (second, explanation) = explained(&mut picker, ms(0), &mut rng);
    assert_ne!(second.endpoint, first.endpoint, "the idle one");
    let rival = explanation.rival.expect("two candidates were compared");
    assert_eq!(rival.address, first.endpoint);
    assert_eq!((explanation.endpoint.inflight, rival.inflight), (0, 1));
}

#[test]
fn a_sticky_session_is_explained_as_the_session_and_a_new_one_as_such() {
    let sticky = LoadBalancer::Sticky(Sticky {
        cookie: "session".into(),
        ttl: None,
        fallback: Box::new(LoadBalancer::RoundRobin {}),
    });
    let mut picker = ServicePicker::new(&policy(sticky), &endpoints(3));
    let mut rng = seeded();
    let (first, explanation) = explained(&mut picker, ms(0), &mut rng);
    assert_eq!(explanation.chosen_by, ChosenBy::NewSession);
    assert_eq!(explanation.algorithm, "round_robin", "the fallback picks");
    let set_cookie = first.set_sticky_cookie.expect("a new session");
    let cookie = &set_cookie["session=".len()..][..16];
    let attributes = RequestAttributes {
        sticky_cookie: Some(cookie),
        ..RequestAttributes::default()
    };
    let (again, explanation) = explained_with(&mut picker, &attributes, ms(0), &mut rng);
    assert_eq!(again.endpoint, first.endpoint);
    assert_eq!(explanation.chosen_by, ChosenBy::Session);
    assert!(explanation.to_string().contains("; via=session; "));
}

#[test]
fn a_probe_is_explained_as_the_breaker_was_before_it_was_sent() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(1);
    let mut picker = ServicePicker::new(&service, &endpoints(1));
    fail_on(&mut picker, addr(1), status(503), 1, secs(1));
    let (pick, explanation) = explained(&mut picker, secs(12), &mut seeded());
    assert_eq!(pick.endpoint, addr(1));
    assert!(
        matches!(explanation.endpoint.breaker, BreakerState::Open { .. }),
        "{:?}",
        explanation.endpoint.breaker
    );
    assert_eq!(explanation.endpoint.inflight, 0);
    assert_eq!(
        explanation.endpoints,
        Exclusions {
            candidates: 1,
            ..Exclusions::default()
        },
        "its ejection is over: admitted as a probe"
    );
}

#[test]
fn explaining_a_pick_never_changes_it() {
    for load_balancer in [
        LoadBalancer::RoundRobin {},
        LoadBalancer::WeightedRandom {},
        LoadBalancer::LeastRequest(LeastRequest::default()),
        LoadBalancer::PeakEwma(PeakEwma::default()),
        LoadBalancer::HealthScore(Default::default()),
    ] {
        let mut service = policy(load_balancer);
        service.outlier_detection = strict_outlier_detection(2);
        let fleet = weighted(&[1, 2, 3, 1]);
        let (mut plain, mut explaining) = (
            ServicePicker::new(&service, &fleet),
            ServicePicker::new(&service, &fleet),
        );
        let (mut plain_rng, mut explaining_rng) = (seeded(), seeded());
        for i in 0..200u64 {
            let now = ms(i);
            let outcome = if i % 7 == 0 {
                status(503)
            } else {
                ok(ms(1 + i % 5))
            };
            let pick = plain
                .pick(&Default::default(), now, &mut plain_rng)
                .unwrap();
            let (same, _) = explained(&mut explaining, now, &mut explaining_rng);
            assert_eq!(pick, same, "{} at pick {i}", service.load_balancer.name());
            plain.complete(pick.endpoint, crate::Served::ByPick, outcome, now);
            explaining.complete(same.endpoint, crate::Served::ByPick, outcome, now);
        }
    }
}

#[test]
fn two_drawn_candidates_name_each_other_whichever_wins() {
    // Sequence draws: the first candidate, then the other of two.
    let mut picker = ServicePicker::new(
        &policy(LoadBalancer::LeastRequest(LeastRequest::default())),
        &endpoints(2),
    );
    let (pick, explanation) = picker
        .pick_explained(
            &Default::default(),
            ms(0),
            &mut Sequence::default(),
            &mut LocalBuckets::default(),
        )
        .unwrap();
    let rival = explanation.rival.expect("compared").address;
    assert_ne!(rival, pick.endpoint);
    assert!([addr(1), addr(2)].contains(&rival));
}

/// The longest address there is: eight full IPv6 groups, a 32-bit scope and port 65535.
fn longest_address() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from([0xffff; 8]),
        u16::MAX,
        0,
        u32::MAX,
    ))
}

fn endpoint_seen(
    address: SocketAddr,
    estimate: Option<Duration>,
    inflight: u32,
) -> ExplainedEndpoint {
    ExplainedEndpoint {
        address,
        estimate,
        inflight,
        breaker: BreakerState::Closed {
            ejections: 0,
            since: Duration::ZERO,
        },
    }
}

#[test]
fn renders_as_one_line_of_fields_in_a_fixed_order() {
    let explanation = PickExplanation {
        endpoint: endpoint_seen(addr(3), Some(Duration::from_micros(2_100)), 0),
        algorithm: "peak_ewma",
        chosen_by: ChosenBy::Algorithm,
        endpoints: Exclusions {
            candidates: 3,
            unhealthy: 1,
            ejected: 1,
            ..Exclusions::default()
        },
        rival: Some(endpoint_seen(addr(1), None, 2)),
        retry_targets: RetryTargets::of(&[addr(1), addr(2)]),
    };
    assert_eq!(
        explanation.to_string(),
        "endpoint=10.0.0.3:8080; algorithm=peak_ewma; via=algorithm; candidates=3 of 5; \
         excluded=unhealthy:1,ejected:1; panic=no; compared_with=10.0.0.1:8080; \
         estimate_ms=2.100/-; inflight=0/2; breaker=closed/closed; \
         retry=10.0.0.1:8080,10.0.0.2:8080"
    );
}

#[test]
fn the_longest_explanation_is_cut_at_the_cap_between_fields_and_says_so() {
    let longest = longest_address();
    let explanation = PickExplanation {
        endpoint: endpoint_seen(longest, Some(Duration::MAX), u32::MAX),
        algorithm: "weighted_round_robin",
        chosen_by: ChosenBy::NewSession,
        endpoints: Exclusions {
            candidates: usize::MAX,
            unhealthy: usize::MAX,
            draining: usize::MAX,
            unselected: usize::MAX,
            ejected: usize::MAX,
            other_tier: usize::MAX,
            panic: true,
        },
        rival: Some(endpoint_seen(longest, Some(Duration::MAX), u32::MAX)),
        retry_targets: RetryTargets::of(&[longest; 5]),
    };
    let text = explanation.to_string();
    assert!(
        text.len() <= MAX_EXPLANATION_BYTES,
        "{} bytes: {text}",
        text.len()
    );
    assert!(text.ends_with(TRUNCATED), "{text}");
    assert!(text.starts_with(&format!(
        "endpoint={longest}; algorithm=weighted_round_robin"
    )));
    assert!(
        !text.contains(&format!("{longest},")),
        "a retry list is never cut inside an address: {text}"
    );
}

fn any_address() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        any::<([u8; 4], u16)>().prop_map(SocketAddr::from),
        any::<([u16; 8], u16, u32)>().prop_map(|(groups, port, scope)| {
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(groups), port, 0, scope))
        }),
    ]
}

fn any_seen() -> impl Strategy<Value = ExplainedEndpoint> {
    (
        any_address(),
        proptest::option::of(any::<u64>()),
        any::<u32>(),
    )
        .prop_map(|(address, nanos, inflight)| {
            endpoint_seen(address, nanos.map(Duration::from_nanos), inflight)
        })
}

/// An endpoint of the property test's fleet: its health, zone and whether it carries the
/// selector's tag.
fn any_endpoint(i: u32) -> impl Strategy<Value = Endpoint> {
    (0..3u8, 0..3u8, any::<bool>()).prop_map(move |(health, zone, tag)| {
        let mut endpoint = in_zone(i, ["z1", "z2", "z3"][usize::from(zone)]);
        endpoint.health =
            [Health::Healthy, Health::Draining, Health::Unhealthy][usize::from(health)];
        if tag {
            endpoint.attributes_mut().tags.insert("gpu".into());
        }
        endpoint
    })
}

proptest! {
    #[test]
    fn a_rendered_explanation_never_passes_the_cap(
        endpoint in any_seen(),
        rival in proptest::option::of(any_seen()),
        counts in any::<[usize; 6]>(),
        panic in any::<bool>(),
        retry in proptest::collection::vec(any_address(), 0..=5),
    ) {
        let explanation = PickExplanation {
            endpoint,
            algorithm: "health_score",
            chosen_by: ChosenBy::Session,
            endpoints: Exclusions {
                candidates: counts[0],
                unhealthy: counts[1],
                draining: counts[2],
                unselected: counts[3],
                ejected: counts[4],
                other_tier: counts[5],
                panic,
            },
            rival,
            retry_targets: RetryTargets::of(&retry),
        };
        let text = explanation.to_string();
        prop_assert!(text.len() <= MAX_EXPLANATION_BYTES, "{} bytes: {}", text.len(), text);
        prop_assert!(text.is_ascii() && !text.contains(['\r', '\n']), "{}", text);
    }

    /// Whatever the fleet (health, zones, tags), the locality settings, the panic threshold
    /// and which endpoints failed, every endpoint is counted exactly once, the pick is one
    /// of the candidates it counts, and no endpoint counts as ejected in a panic.
    #[test]
    fn the_counts_always_add_up_to_every_endpoint(
        fleet in (1u32..12).prop_flat_map(|n| (1..=n).map(any_endpoint).collect::<Vec<_>>()),
        failed in proptest::collection::vec(1u32..12, 0..8),
        select_tag in any::<bool>(),
        prefer_zone in any::<bool>(),
        min_healthy_percent in 0u32..=100,
        panic_threshold_percent in prop_oneof![Just(0u32), 1u32..=100],
        seed in any::<u64>(),
    ) {
        let mut service = policy(LoadBalancer::RoundRobin {});
        service.outlier_detection = strict_outlier_detection(1);
        service.outlier_detection.panic_threshold_percent = panic_threshold_percent;
        if select_tag {
            service.endpoint_selector.tags.insert("gpu".into());
        }
        if prefer_zone {
            service.locality.local_zone = Some("z1".into());
            service.locality.failover = vec!["z3".into()];
        }
        service.locality.min_healthy_percent = min_healthy_percent;
        let mut picker = ServicePicker::new(&service, &fleet);
        for &i in &failed {
            fail_on(&mut picker, addr(i), status(503), 1, ms(1));
        }
        let picked = picker.pick_explained(
            &Default::default(),
            ms(2),
            &mut SplitMix64::new(seed),
            &mut LocalBuckets::default(),
        );
        if let Ok((pick, explanation)) = picked {
            let counts = explanation.endpoints;
            prop_assert_eq!(counts.total(), fleet.len(), "{:?}", counts);
            prop_assert!(counts.candidates >= 1, "{:?}", counts);
            prop_assert!(!counts.panic || counts.ejected == 0, "{:?}", counts);
            prop_assert_eq!(explanation.endpoint.address, pick.endpoint);
            let healthy_selected = fleet
                .iter()
                .filter(|e| e.health == Health::Healthy && service.endpoint_selector.matches(e))
                .count();
            prop_assert_eq!(
                counts.candidates + counts.ejected + counts.other_tier,
                healthy_selected,
                "{:?}",
                counts
            );
        }
    }
}
