use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use proptest::prelude::*;

use crate::{
    Endpoint, Health, RequestAttributes, ServicePicker,
    policy::{
        HashCookie, HashOn, HealthScore, LeastRequest, LoadBalancer, Maglev, PeakEwma, RateLimit,
        RingHash, Sticky,
    },
    rng::{Sequence, SplitMix64},
    select::{Slot, hash::HashTable, maglev, ring_hash},
    test_support::*,
};

fn counts(picker: &mut ServicePicker, picks: u32) -> BTreeMap<std::net::SocketAddr, u32> {
    let mut rng = seeded();
    let mut counts = BTreeMap::new();
    for _ in 0..picks {
        let endpoint = pick_and_complete(picker, ok(ms(5)), ms(0), &mut rng);
        *counts.entry(endpoint).or_default() += 1;
    }
    counts
}

#[test]
fn weighted_random_follows_weights_within_one_percent() {
    let mut picker = ServicePicker::new(
        &policy(LoadBalancer::WeightedRandom {}),
        &weighted(&[1, 2, 7]),
    );
    let counts = counts(&mut picker, 100_000);
    for (i, expected) in [(1, 0.1), (2, 0.2), (3, 0.7)] {
        let share = f64::from(counts[&addr(i)]) / 100_000.0;
        assert!((share - expected).abs() < 0.01, "{i}: {share}");
    }
}

#[test]
fn weighted_round_robin_is_exact_over_a_cycle() {
    let mut picker = ServicePicker::new(
        &policy(LoadBalancer::WeightedRoundRobin {}),
        &weighted(&[3, 2, 1]),
    );
    let counts = counts(&mut picker, 600);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [300, 200, 100]
    );
}

#[test]
fn weighted_round_robin_carries_its_rotation_across_an_endpoint_change() {
    let mut picker =
        ServicePicker::new(&policy(LoadBalancer::WeightedRoundRobin {}), &endpoints(2));
    let mut rng = seeded();
    assert_eq!(
        pick_and_complete(&mut picker, ok(ms(5)), ms(0), &mut rng),
        addr(1)
    );
    picker.update_endpoints(&endpoints(3));
    let picked: Vec<_> = (0..3)
        .map(|_| pick_and_complete(&mut picker, ok(ms(5)), ms(0), &mut rng))
        .collect();
    // addr(2) was owed the next turn and keeps it; the newcomer starts from zero. Had the
    // rotation restarted, addr(1) would come first.
    assert_eq!(picked, [addr(2), addr(3), addr(1)]);
}

#[test]
fn least_request_takes_the_sampled_candidate_with_fewer_active_requests() {
    let mut picker = ServicePicker::new(
        &policy(LoadBalancer::LeastRequest(LeastRequest::default())),
        &endpoints(3),
    );
    // Each pair of fractions scripts the two draws: the first picks a position among 3, the
    // second a different position among the remaining 2. Nothing completes in between.
    let mut pick = |fractions: [f64; 2]| {
        picker
            .pick(&Default::default(), ms(0), &mut Sequence::units(&fractions))
            .unwrap()
            .endpoint
    };
    assert_eq!(pick([0.0, 0.0]), addr(1)); // 1 vs 2, both idle: the first draw
    assert_eq!(pick([0.0, 0.0]), addr(2)); // 1 (1 active) vs 2 (idle)
    assert_eq!(pick([0.0, 0.0]), addr(1)); // 1 vs 2, one active each: the first draw
    assert_eq!(pick([0.0, 0.99]), addr(3)); // 1 (2 active) vs 3 (idle)
    assert_eq!(pick([0.5, 0.0]), addr(2)); // 2 (1 active) vs 1 (2 active)
}

#[test]
fn weighted_least_request_divides_weight_by_active_requests() {
    let mut picker = ServicePicker::new(
        &policy(LoadBalancer::LeastRequest(LeastRequest::default())),
        &weighted(&[2, 1]),
    );
    // addr(1): weight 2 with 3 active → 0.5; addr(2): weight 1, idle → 1. Total 1.5.
    let mut rng = Sequence::units(&[0.0]);
    for _ in 0..3 {
        picker.pick(&Default::default(), ms(0), &mut rng).unwrap();
    }
    let mut at = |fraction: f64| {
        let pick = picker
            .pick(
                &Default::default(),
                ms(0),
                &mut Sequence::units(&[fraction]),
            )
            .unwrap();
        picker.complete(pick.endpoint, crate::Served::ByPick, ok(ms(1)), ms(0));
        pick.endpoint
    };
    assert_eq!(at(0.33), addr(1)); // 0.33 × 1.5 = 0.495 < 0.5
    assert_eq!(at(0.34), addr(2)); // 0.51 ≥ 0.5
}

#[test]
fn peak_ewma_steers_away_from_a_slow_endpoint_and_penalises_fast_failures() {
    let mut picker = ServicePicker::new(
        &policy(LoadBalancer::PeakEwma(PeakEwma::default())),
        &endpoints(2),
    );
    picker.complete(addr(1), crate::Served::ByPick, ok(ms(100)), ms(0));
    picker.complete(addr(2), crate::Served::ByPick, ok(ms(10)), ms(0));
    let pick = |picker: &mut ServicePicker| {
        let pick = picker
            .pick(
                &Default::default(),
                ms(1),
                &mut Sequence::units(&[0.0, 0.0]),
            )
            .unwrap();
        picker.complete(pick.endpoint, crate::Served::ByPick, ok(ms(10)), ms(1));
        pick.endpoint
    };
    assert_eq!(pick(&mut picker), addr(2));
    // A 5ms 503 on addr(2) counts as 500ms (the failure penalty): addr(1) now looks better.
    picker.complete(addr(2), crate::Served::ByPick, status(503), ms(2));
    let pick = picker
        .pick(
            &Default::default(),
            ms(2),
            &mut Sequence::units(&[0.0, 0.0]),
        )
        .unwrap();
    assert_eq!(pick.endpoint, addr(1));
}

#[test]
fn health_score_prefers_the_endpoint_with_fewer_recent_failures() {
    let mut service = policy(LoadBalancer::HealthScore(HealthScore {
        latency: 0.0,
        inflight: 0.0,
        failures: 1.0,
    }));
    service.outlier_detection.consecutive_failures = 0;
    let mut picker = ServicePicker::new(&service, &endpoints(2));
    fail_on(&mut picker, addr(1), status(500), 1, ms(0));
    fail_on(&mut picker, addr(1), ok(ms(1)), 1, ms(0));
    fail_on(&mut picker, addr(2), ok(ms(1)), 2, ms(0));
    for fractions in [[0.0, 0.0], [0.9, 0.0]] {
        let pick = picker
            .pick(&Default::default(), ms(1), &mut Sequence::units(&fractions))
            .unwrap();
        assert_eq!(pick.endpoint, addr(2));
        picker.complete(pick.endpoint, crate::Served::ByPick, ok(ms(1)), ms(1));
    }
}

fn hashing(load_balancer: LoadBalancer, n: u32) -> ServicePicker {
    ServicePicker::new(&policy(load_balancer), &endpoints(n))
}

fn by_header(picker: &mut ServicePicker, key: &str) -> std::net::SocketAddr {
    let attributes = RequestAttributes {
        hash_header: Some(key),
        ..Default::default()
    };
    let pick = picker.pick(&attributes, ms(0), &mut seeded()).unwrap();
    picker.complete(pick.endpoint, crate::Served::ByPick, ok(ms(1)), ms(0));
    pick.endpoint
}

fn ring_on_header() -> LoadBalancer {
    LoadBalancer::RingHash(RingHash {
        hash_on: HashOn::Header("x-user".into()),
        ..RingHash::default()
    })
}

fn maglev_on_header() -> LoadBalancer {
    LoadBalancer::Maglev(Maglev {
        hash_on: HashOn::Header("x-user".into()),
        ..Maglev::default()
    })
}

#[test]
fn consistent_hashing_sends_a_key_to_the_same_endpoint_every_time() {
    for load_balancer in [ring_on_header(), maglev_on_header()] {
        let mut picker = hashing(load_balancer, 5);
        let first = by_header(&mut picker, "alice");
        for _ in 0..10 {
            assert_eq!(by_header(&mut picker, "alice"), first);
        }
    }
}

#[test]
fn consistent_hashing_moves_only_the_keys_of_an_ejected_endpoint() {
    for load_balancer in [ring_on_header(), maglev_on_header()] {
        let mut service = policy(load_balancer);
        service.outlier_detection = strict_outlier_detection(1);
        let mut picker = ServicePicker::new(&service, &endpoints(5));
        let keys: Vec<String> = (0..500).map(|i| format!("user-{i}")).collect();
        let before: Vec<_> = keys.iter().map(|k| by_header(&mut picker, k)).collect();
        fail_on(&mut picker, addr(3), status(503), 1, ms(0));
        for (key, was) in keys.iter().zip(&before) {
            let now = by_header(&mut picker, key);
            assert_ne!(now, addr(3));
            if *was != addr(3) {
                assert_eq!(now, *was, "{key} moved although its endpoint is fine");
            }
        }
    }
}

#[test]
fn bounded_load_spills_a_hot_key_to_the_next_endpoint() {
    let mut picker = hashing(
        LoadBalancer::RingHash(RingHash {
            hash_on: HashOn::Header("x-user".into()),
            bounded_load: Some(1.25),
            ..RingHash::default()
        }),
        4,
    );
    let attributes = RequestAttributes {
        hash_header: Some("hot"),
        ..Default::default()
    };
    let picks: Vec<_> = (0..8)
        .map(|_| {
            picker
                .pick(&attributes, ms(0), &mut seeded())
                .unwrap()
                .endpoint
        })
        .collect();
    let home = picks[0];
    let at_home = picks.iter().filter(|&&p| p == home).count();
    // With n in flight, home may hold at most 1.25 × (n + 1) / 4.
    assert!(at_home <= 3, "{picks:?}");
    assert!(picks.iter().any(|&p| p != home));
}

#[test]
fn a_missing_hash_cookie_is_generated_and_set() {
    let mut picker = hashing(
        LoadBalancer::RingHash(RingHash {
            hash_on: HashOn::Cookie(HashCookie {
                name: "affinity".into(),
                ttl: Some(secs(3600)),
            }),
            ..RingHash::default()
        }),
        3,
    );
    let pick = picker
        .pick(&Default::default(), ms(0), &mut SplitMix64::new(1))
        .unwrap();
    let set_cookie = pick.set_sticky_cookie.unwrap();
    assert!(set_cookie.starts_with("affinity="), "{set_cookie}");
    assert!(set_cookie.ends_with("; Path=/; HttpOnly; Max-Age=3600"));
    let value = &set_cookie["affinity=".len()..][..16];
    let again = RequestAttributes {
        hash_cookie: Some(value),
        ..Default::default()
    };
    for _ in 0..5 {
        let next = picker.pick(&again, ms(0), &mut seeded()).unwrap();
        assert_eq!(next.endpoint, pick.endpoint);
        assert_eq!(next.set_sticky_cookie, None);
    }
}

#[test]
fn source_ip_hashing_keeps_a_client_on_one_endpoint() {
    let mut picker = hashing(LoadBalancer::Maglev(Maglev::default()), 7);
    let attributes = RequestAttributes {
        source_ip: Some(IpAddr::from([192, 168, 1, 20])),
        ..Default::default()
    };
    let first = picker
        .pick(&attributes, ms(0), &mut seeded())
        .unwrap()
        .endpoint;
    for _ in 0..5 {
        assert_eq!(
            picker
                .pick(&attributes, ms(0), &mut seeded())
                .unwrap()
                .endpoint,
            first
        );
    }
}

fn sticky() -> LoadBalancer {
    LoadBalancer::Sticky(Sticky {
        cookie: "session".into(),
        ttl: None,
        fallback: Box::new(LoadBalancer::RoundRobin {}),
    })
}

/// The 16-hex-digit value of a `session=` Set-Cookie header.
fn cookie_value(set_cookie: &str) -> &str {
    let start = "session=".len();
    &set_cookie[start..start + 16]
}

#[test]
fn sticky_sessions_stay_while_the_endpoint_lives_and_move_when_it_leaves() {
    let mut picker = ServicePicker::new(&policy(sticky()), &endpoints(3));
    let mut rng = seeded();
    let first = picker.pick(&Default::default(), ms(0), &mut rng).unwrap();
    let set_cookie = first.set_sticky_cookie.clone().unwrap();
    assert_eq!(
        set_cookie,
        format!("session={}; Path=/; HttpOnly", cookie_value(&set_cookie))
    );
    let cookie = cookie_value(&set_cookie).to_owned();
    let with_cookie = RequestAttributes {
        sticky_cookie: Some(&cookie),
        ..Default::default()
    };
    for _ in 0..5 {
        let pick = picker.pick(&with_cookie, ms(0), &mut rng).unwrap();
        assert_eq!(pick.endpoint, first.endpoint);
        assert_eq!(pick.set_sticky_cookie, None);
    }
    // Draining: existing sessions stay, new ones go elsewhere.
    let mut fleet = endpoints(3);
    let index = fleet
        .iter()
        .position(|e| e.address == first.endpoint)
        .unwrap();
    fleet[index].health = Health::Draining;
    picker.update_endpoints(&fleet);
    assert_eq!(
        picker.pick(&with_cookie, ms(0), &mut rng).unwrap().endpoint,
        first.endpoint
    );
    for _ in 0..4 {
        assert_ne!(
            picker
                .pick(&Default::default(), ms(0), &mut rng)
                .unwrap()
                .endpoint,
            first.endpoint
        );
    }
    // Gone: the session moves and gets a new cookie.
    fleet.remove(index);
    picker.update_endpoints(&fleet);
    let moved = picker.pick(&with_cookie, ms(0), &mut rng).unwrap();
    assert_ne!(moved.endpoint, first.endpoint);
    assert!(moved.set_sticky_cookie.is_some());
}

/// A session cookie from `picker` for a new session, and the endpoint it names.
fn new_session(picker: &mut ServicePicker) -> (String, std::net::SocketAddr) {
    let pick = picker
        .pick(&Default::default(), ms(0), &mut seeded())
        .unwrap();
    let set_cookie = pick.set_sticky_cookie.unwrap();
    (cookie_value(&set_cookie).to_owned(), pick.endpoint)
}

/// Where a request with `cookie` goes, and whether it got a new cookie.
fn with_session(picker: &mut ServicePicker, cookie: &str) -> (std::net::SocketAddr, bool) {
    let attributes = RequestAttributes {
        sticky_cookie: Some(cookie),
        ..Default::default()
    };
    let pick = picker.pick(&attributes, ms(0), &mut seeded()).unwrap();
    (pick.endpoint, pick.set_sticky_cookie.is_some())
}

#[test]
fn sticky_tokens_depend_on_the_session_key_and_survive_a_rotation() {
    let old = crate::SessionKeys::new(vec![[1; 16]]);
    let new = [2; 16];
    let mut picker = ServicePicker::new(&policy(sticky()), &endpoints(3));
    picker.set_session_keys(&old);
    let (cookie, endpoint) = new_session(&mut picker);
    // Without the key, the same endpoint has another token: a cookie cannot be computed
    // from an address (nor an address recovered from a cookie) without the secret.
    let mut public = ServicePicker::new(&policy(sticky()), &endpoints(3));
    // Round robin hands out each endpoint within three new sessions.
    let (public_cookie, _) = (0..3)
        .map(|_| new_session(&mut public))
        .find(|(_, picked)| *picked == endpoint)
        .unwrap();
    assert_ne!(public_cookie, cookie);
    // Rotation: the new key signs, the old one still verifies.
    picker.set_session_keys(&crate::SessionKeys::new(vec![new, [1; 16]]));
    assert_eq!(with_session(&mut picker, &cookie), (endpoint, false));
    let (rotated, _) = new_session(&mut picker);
    assert_ne!(rotated, cookie);
    // Once the old key is dropped, its cookies start new sessions.
    picker.set_session_keys(&crate::SessionKeys::new(vec![new]));
    assert!(with_session(&mut picker, &cookie).1);
}

#[test]
fn a_forged_sticky_cookie_names_no_endpoint() {
    let mut picker = ServicePicker::new(&policy(sticky()), &endpoints(3));
    picker.set_session_keys(&crate::SessionKeys::new(vec![[7; 16]]));
    for forged in ["0000000000000000", "ffffffffffffffff", "0123456789abcdef"] {
        assert!(with_session(&mut picker, forged).1, "{forged}");
    }
}

#[test]
fn session_keys_are_32_hex_digits() {
    assert_eq!(
        crate::SessionKeys::parse_key("000102030405060708090a0b0c0d0e0f"),
        Some([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
    );
    for bad in [
        "",
        "00",
        "000102030405060708090a0b0c0d0e0g",
        "000102030405060708090a0b0c0d0e0f00",
    ] {
        assert_eq!(crate::SessionKeys::parse_key(bad), None, "{bad}");
    }
}

#[test]
fn the_selector_excludes_endpoints_without_the_required_tags_capabilities_and_metadata() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.endpoint_selector.tags.insert("gpu".into());
    service
        .endpoint_selector
        .capabilities
        .insert("llm.chat".into());
    service
        .endpoint_selector
        .metadata
        .insert("version".into(), "v2".into());
    let mut fleet = endpoints(4);
    for endpoint in &mut fleet[1..] {
        endpoint.attributes_mut().tags.insert("gpu".into());
        endpoint
            .attributes_mut()
            .capabilities
            .insert("llm.chat".into());
        endpoint
            .attributes_mut()
            .metadata
            .insert("version".into(), "v2".into());
    }
    fleet[2]
        .attributes_mut()
        .metadata
        .insert("version".into(), "v1".into());
    fleet[3].health = Health::Unhealthy;
    let mut picker = ServicePicker::new(&service, &fleet);
    let counts = counts(&mut picker, 10);
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), [addr(2)]);
}

#[test]
fn retry_targets_are_distinct_admissible_and_exclude_the_pick() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.retry = 2;
    service.outlier_detection = strict_outlier_detection(1);
    let mut picker = ServicePicker::new(&service, &endpoints(4));
    fail_on(&mut picker, addr(3), status(503), 1, ms(0));
    let pick = picker
        .pick(&Default::default(), ms(1), &mut seeded())
        .unwrap();
    assert_eq!(pick.endpoint, addr(1));
    assert_eq!(pick.retry_targets.as_slice(), [addr(2), addr(4)]);
    let mut hashed = ServicePicker::new(
        &crate::ServicePolicy {
            retry: 5,
            ..policy(ring_on_header())
        },
        &endpoints(3),
    );
    let attributes = RequestAttributes {
        hash_header: Some("k"),
        ..Default::default()
    };
    let pick = hashed.pick(&attributes, ms(0), &mut seeded()).unwrap();
    let mut all: Vec<_> = pick.retry_targets.as_slice().to_vec();
    all.push(pick.endpoint);
    all.sort();
    assert_eq!(all, [addr(1), addr(2), addr(3)]);
}

#[test]
fn updating_endpoints_keeps_the_stats_of_those_that_survive() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(1);
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    let mut rng = seeded();
    let in_flight = picker.pick(&Default::default(), ms(0), &mut rng).unwrap();
    assert_eq!(in_flight.endpoint, addr(1));
    fail_on(&mut picker, addr(2), status(503), 1, ms(0));
    let mut fleet = endpoints(4);
    fleet.remove(2); // addr(3) leaves, addr(4) joins.
    picker.update_endpoints(&fleet);
    let views: Vec<_> = picker
        .endpoints()
        .map(|v| (v.endpoint.address, v.breaker.name(), v.inflight))
        .collect();
    assert_eq!(
        views,
        [
            (addr(1), "closed", 1),
            (addr(2), "open", 0),
            (addr(4), "closed", 0)
        ]
    );
    picker.complete(in_flight.endpoint, crate::Served::ByPick, ok(ms(1)), ms(1));
    assert_eq!(picker.endpoints().next().unwrap().inflight, 0);
    // Completing for an endpoint that left is ignored.
    assert!(
        picker
            .complete(addr(3), crate::Served::ByPick, status(503), ms(1))
            .is_empty()
    );
}

#[test]
fn a_rate_limited_service_rejects_with_the_time_until_the_next_token() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.rate_limit = Some(RateLimit {
        requests_per_second: 2.0,
        burst: 1,
        ..RateLimit::default()
    });
    let mut picker = ServicePicker::new(&service, &endpoints(2));
    let mut rng = seeded();
    assert!(picker.pick(&Default::default(), ms(0), &mut rng).is_ok());
    assert_eq!(
        picker.pick(&Default::default(), ms(100), &mut rng),
        Err(crate::Rejection::RateLimited {
            retry_after: ms(400)
        })
    );
    assert!(picker.pick(&Default::default(), ms(500), &mut rng).is_ok());
}

#[test]
fn request_needs_name_what_the_filter_must_extract() {
    let mut service = policy(LoadBalancer::Sticky(Sticky {
        fallback: Box::new(ring_on_header()),
        ..Sticky::default()
    }));
    service.rate_limit = Some(RateLimit {
        client_key_header: Some("x-api-key".into()),
        ..RateLimit::default()
    });
    let picker = ServicePicker::new(&service, &[]);
    let needs = picker.request_needs();
    assert_eq!(needs.hash_header, Some("x-user"));
    assert_eq!(needs.sticky_cookie, Some("fulcrum-session"));
    assert_eq!(needs.client_key_header, Some("x-api-key"));
    assert!(!needs.source_ip);
}

fn slots(n: u32) -> Vec<Slot> {
    let picker = ServicePicker::new(&policy(LoadBalancer::RoundRobin {}), &endpoints(n));
    picker.slots_for_tests()
}

fn owners(table: &HashTable, slots: &[Slot], keys: u32) -> Vec<std::net::SocketAddr> {
    (0..keys)
        .map(|k| {
            let hash = crate::select::hash::hash_bytes(&k.to_le_bytes());
            slots[table.entries()[table.start(hash)] as usize]
                .endpoint
                .address
        })
        .collect()
}

/// Whether `count` of `picks` is within six standard deviations of `picks × ideal`
/// (binomial: σ = √(ideal (1 − ideal) / picks) of the share): a seeded check a correct
/// picker fails by chance with probability about 2e-9. An ideal of 0 allows no pick at all.
fn within_sampling_error(count: u32, picks: u32, ideal: f64) -> bool {
    let share = f64::from(count) / f64::from(picks);
    let sigma = (ideal * (1.0 - ideal) / f64::from(picks)).sqrt();
    (share - ideal).abs() <= 6.0 * sigma
}

/// Checks that every run of `W` consecutive picks (`W` the total expected weight) serves
/// each endpoint of `expected` exactly its weight, and nothing else.
fn check_windows(
    picked: &[std::net::SocketAddr],
    expected: &BTreeMap<std::net::SocketAddr, u32>,
) -> Result<(), TestCaseError> {
    let total: u32 = expected.values().sum();
    for (start, window) in picked.windows(total as usize).enumerate() {
        let mut counts: BTreeMap<_, u32> = BTreeMap::new();
        for &endpoint in window {
            *counts.entry(endpoint).or_default() += 1;
        }
        prop_assert_eq!(&counts, expected, "window from pick {}", start);
    }
    Ok(())
}

/// A picker under `load_balancer` over endpoints of the given weights, `10.0.0.1:8080`
/// upward, the flagged ones ejected at 0 for 10s (no panic threshold).
fn ejecting(load_balancer: LoadBalancer, fleet: &[(u32, bool)]) -> ServicePicker {
    let weights: Vec<u32> = fleet.iter().map(|&(weight, _)| weight).collect();
    let mut service = policy(load_balancer);
    service.outlier_detection = strict_outlier_detection(1);
    let mut picker = ServicePicker::new(&service, &weighted(&weights));
    for (i, _) in fleet
        .iter()
        .enumerate()
        .filter(|(_, (_, ejected))| *ejected)
    {
        fail_on(&mut picker, addr(i as u32 + 1), status(503), 1, ms(0));
    }
    picker
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Adding one endpoint to N moves about 1/(N+1) of the keys, all of them to the new
    /// endpoint for the ring (when its point count per weight is unchanged) and nearly all for
    /// Maglev.
    #[test]
    fn adding_one_endpoint_moves_about_one_nth_of_the_keys(n in 5u32..40, maglev_table in any::<bool>()) {
        if !maglev_table {
            prop_assume!(ring_hash::points_per_weight(1024, u64::from(n))
                == ring_hash::points_per_weight(1024, u64::from(n + 1)));
        }
        let before_slots = slots(n);
        let after_slots = slots(n + 1);
        let build = |slots: &[Slot]| {
            let members: Vec<u32> = (0..slots.len() as u32).collect();
            if maglev_table {
                maglev::build(&members, slots, 65537)
            } else {
                ring_hash::build(&members, slots, 1024)
            }
        };
        let keys = 20_000u32;
        let before = owners(&build(&before_slots), &before_slots, keys);
        let after = owners(&build(&after_slots), &after_slots, keys);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / f64::from(keys);
        let ideal = 1.0 / f64::from(n + 1);
        prop_assert!(moved < ideal * 1.5 + 0.01, "moved {moved}, ideal {ideal}");
        let to_new = before.iter().zip(&after).filter(|(b, a)| b != a && **a == addr(n + 1)).count() as f64 / f64::from(keys);
        if maglev_table {
            prop_assert!(to_new >= moved * 0.75, "moved {moved}, to new {to_new}");
        } else {
            prop_assert_eq!(to_new, moved);
        }
    }

    /// At a power-of-two boundary of the ring's point count, the ring moves more keys once,
    /// but never more than half.
    #[test]
    fn crossing_a_ring_size_boundary_moves_at_most_half_the_keys(n in 2u32..40) {
        let before_slots = slots(n);
        let after_slots = slots(n + 1);
        let members = |slots: &[Slot]| (0..slots.len() as u32).collect::<Vec<u32>>();
        let before = owners(&ring_hash::build(&members(&before_slots), &before_slots, 1024), &before_slots, 10_000);
        let after = owners(&ring_hash::build(&members(&after_slots), &after_slots, 1024), &after_slots, 10_000);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / 10_000.0;
        prop_assert!(moved <= 0.5 + 1.0 / f64::from(n + 1), "moved {moved}");
    }

    /// Every endpoint owns table_size / N Maglev entries within 10%, weighted ones in
    /// proportion to weight.
    #[test]
    fn maglev_tables_are_balanced(n in 2u32..60) {
        let slots = slots(n);
        let members: Vec<u32> = (0..n).collect();
        let HashTable::Maglev { table } = maglev::build(&members, &slots, 65537) else { unreachable!() };
        let mut owned = vec![0u32; n as usize];
        for slot in table { owned[slot as usize] += 1; }
        let ideal = 65537.0 / f64::from(n);
        for count in owned {
            prop_assert!((f64::from(count) - ideal).abs() <= ideal * 0.1 + 1.0, "{count} vs {ideal}");
        }
    }

    /// Ring hash shares follow weights at the default ring size, within what the ring's own
    /// randomness allows.
    ///
    /// The ring holds `M = points_per_weight × W` pseudo-random points and an endpoint of
    /// weight `w` owns `k = points_per_weight × w` of them; its share of the ring is the sum
    /// of the `k` gaps before its points, which for uniform points is Beta(k, M − k): mean
    /// `p = w / W`, variance `p (1 − p) / (M + 1)`. The share measured over `K` keys adds a
    /// binomial variance `p (1 − p) / K`. At 1024 points a weight-1 endpoint has 32 to 64
    /// points, so σ is about 12 % of its share (once a check's input was 4.8σ off). The bound
    /// is 7σ: the Beta's right tail is heavier than a normal's (a sum of k ≥ 32 exponential
    /// gaps, Wilson–Hilferty puts 7σ at about 5.3 normal σ), so a check fails by chance with
    /// probability below 1e-7, and a run (24 cases, at most 11 endpoints) below 3e-5.
    #[test]
    fn ring_shares_follow_weights(weights in proptest::collection::vec(1u32..5, 2..12)) {
        let picker = ServicePicker::new(&policy(LoadBalancer::RoundRobin {}), &weighted(&weights));
        let slots = picker.slots_for_tests();
        let members: Vec<u32> = (0..slots.len() as u32).collect();
        let table = ring_hash::build(&members, &slots, 1024);
        let keys = 40_000u32;
        let owners = owners(&table, &slots, keys);
        let total: u32 = weights.iter().sum();
        let points = table.entries().len() as f64;
        for (i, &weight) in weights.iter().enumerate() {
            let share = owners.iter().filter(|&&a| a == addr(i as u32 + 1)).count() as f64 / f64::from(keys);
            let ideal = f64::from(weight) / f64::from(total);
            let sigma = (ideal * (1.0 - ideal) * (1.0 / (points + 1.0) + 1.0 / f64::from(keys))).sqrt();
            prop_assert!((share - ideal).abs() <= 7.0 * sigma, "{i}: {share} vs {ideal} (σ {sigma})");
        }
    }

    /// Seeded weighted distributions follow the weights within sampling error for every
    /// picker that honours weights (weighted least request with every request completed
    /// before the next: no load).
    #[test]
    fn weighted_pickers_follow_weights(weights in proptest::collection::vec(1u32..6, 2..6), seed in any::<u64>()) {
        for load_balancer in [
            LoadBalancer::WeightedRandom {},
            LoadBalancer::WeightedRoundRobin {},
            LoadBalancer::LeastRequest(LeastRequest::default()),
        ] {
            let mut picker = ServicePicker::new(&policy(load_balancer), &weighted(&weights));
            let mut rng = SplitMix64::new(seed);
            let picks = 20_000u32;
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..picks {
                let endpoint = pick_and_complete(&mut picker, ok(ms(1)), ms(0), &mut rng);
                counts[picker.endpoints().position(|v| v.endpoint.address == endpoint).unwrap()] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (&count, weight) in counts.iter().zip(&weights) {
                let ideal = f64::from(*weight) / f64::from(total);
                prop_assert!(within_sampling_error(count, picks, ideal), "{count} of {picks} vs {ideal}");
            }
        }
    }

    /// Any `W` consecutive picks of weighted round robin (`W` the total weight) serve each
    /// endpoint exactly its weight: from the start, and after any number of picks and an
    /// endpoint-set change that carries the rotation over.
    #[test]
    fn weighted_round_robin_serves_each_endpoint_its_weight_in_any_total_weight_consecutive_picks(
        weights in proptest::collection::vec(1u32..8, 1..12),
        warm_up in 0usize..50,
    ) {
        let fleet = weighted(&weights);
        let mut picker = ServicePicker::new(&policy(LoadBalancer::WeightedRoundRobin {}), &fleet);
        let mut rng = seeded();
        let expected: BTreeMap<_, _> = fleet.iter().map(|e| (e.address, e.weight)).collect();
        let mut run = |picker: &mut ServicePicker, picks: u32| -> Vec<_> {
            (0..picks).map(|_| pick_and_complete(picker, ok(ms(1)), ms(0), &mut rng)).collect()
        };
        let total: u32 = weights.iter().sum();
        check_windows(&run(&mut picker, 3 * total), &expected)?;
        run(&mut picker, warm_up as u32);
        picker.update_endpoints(&fleet);
        check_windows(&run(&mut picker, 3 * total), &expected)?;
    }

    /// With endpoints ejected, weighted round robin serves the others exactly by weight in
    /// any run of their total weight, whether a pick skips few ejected turns or, past the
    /// redraw bound, finds the candidate by a scan.
    #[test]
    fn with_endpoints_ejected_weighted_round_robin_stays_exact_over_the_rest(
        fleet in proptest::collection::vec((1u32..8, any::<bool>()), 2..40),
    ) {
        prop_assume!(fleet.iter().any(|&(_, ejected)| !ejected));
        let mut picker = ejecting(LoadBalancer::WeightedRoundRobin {}, &fleet);
        let expected: BTreeMap<_, _> = fleet
            .iter()
            .enumerate()
            .filter(|(_, (_, ejected))| !ejected)
            .map(|(i, &(weight, _))| (addr(i as u32 + 1), weight))
            .collect();
        let total: u32 = expected.values().sum();
        let mut rng = seeded();
        let picked: Vec<_> = (0..3 * total)
            .map(|_| pick_and_complete(&mut picker, ok(ms(1)), ms(1), &mut rng))
            .collect();
        check_windows(&picked, &expected)?;
    }

    /// With endpoints ejected, weighted random and weighted least request (rejection sampling
    /// over the tier, then the exact walk) draw the others in proportion to their weights.
    #[test]
    fn with_endpoints_ejected_weighted_draws_follow_the_weights_of_the_rest(
        fleet in proptest::collection::vec((1u32..8, any::<bool>()), 2..24),
        seed in any::<u64>(),
    ) {
        prop_assume!(fleet.iter().any(|&(_, ejected)| !ejected));
        for load_balancer in [
            LoadBalancer::WeightedRandom {},
            LoadBalancer::LeastRequest(LeastRequest::default()),
        ] {
            let mut picker = ejecting(load_balancer, &fleet);
            let mut rng = SplitMix64::new(seed);
            let picks = 20_000u32;
            let mut counts = vec![0u32; fleet.len()];
            for _ in 0..picks {
                let endpoint = pick_and_complete(&mut picker, ok(ms(1)), ms(1), &mut rng);
                counts[picker.endpoints().position(|v| v.endpoint.address == endpoint).unwrap()] += 1;
            }
            let total: u32 = fleet.iter().filter(|(_, ejected)| !ejected).map(|(weight, _)| weight).sum();
            for (&count, &(weight, ejected)) in counts.iter().zip(&fleet) {
                let ideal = if ejected { 0.0 } else { f64::from(weight) / f64::from(total) };
                prop_assert!(within_sampling_error(count, picks, ideal), "{count} of {picks} vs {ideal}");
            }
        }
    }

    /// Weighted least request draws in proportion to `weight / (active + 1)` at the loads of
    /// the moment: requests held open change the draw (the sum tree follows every load).
    #[test]
    fn weighted_least_request_draws_in_proportion_to_weight_over_active_requests(
        weights in proptest::collection::vec(1u32..6, 2..8),
        held in 0usize..20,
        seed in any::<u64>(),
    ) {
        prop_assume!(weights.iter().any(|&weight| weight != weights[0]));
        let mut picker = ServicePicker::new(
            &policy(LoadBalancer::LeastRequest(LeastRequest::default())),
            &weighted(&weights),
        );
        let mut rng = SplitMix64::new(seed);
        for _ in 0..held {
            picker.pick(&Default::default(), ms(0), &mut rng).unwrap();
        }
        let effective: Vec<f64> = picker
            .endpoints()
            .map(|v| f64::from(v.endpoint.weight) / (f64::from(v.inflight) + 1.0))
            .collect();
        let total: f64 = effective.iter().sum();
        let picks = 20_000u32;
        let mut counts = vec![0u32; weights.len()];
        for _ in 0..picks {
            let endpoint = pick_and_complete(&mut picker, ok(ms(1)), ms(0), &mut rng);
            counts[picker.endpoints().position(|v| v.endpoint.address == endpoint).unwrap()] += 1;
        }
        for (&count, weight) in counts.iter().zip(&effective) {
            prop_assert!(within_sampling_error(count, picks, weight / total), "{count} of {picks} vs {}", weight / total);
        }
    }

    /// Any endpoint list (duplicates, zero weights, all health states) and any request never
    /// makes pick or complete panic, and inflight returns to zero.
    #[test]
    fn pick_and_complete_never_panic_and_balance_inflight(
        algorithm in 0usize..9,
        fleet in proptest::collection::vec((0u32..8, 0u32..4, 0u8..3), 0..12),
        requests in proptest::collection::vec((proptest::option::of("[a-z]{0,6}"), any::<bool>()), 1..40),
    ) {
        let load_balancer = [
            LoadBalancer::RoundRobin {},
            LoadBalancer::WeightedRoundRobin {},
            LoadBalancer::WeightedRandom {},
            LoadBalancer::LeastRequest(LeastRequest { choice_count: 3, active_request_bias: 0.5 }),
            LoadBalancer::PeakEwma(PeakEwma::default()),
            LoadBalancer::HealthScore(HealthScore::default()),
            ring_on_header(),
            maglev_on_header(),
            sticky(),
        ][algorithm].clone();
        let endpoints: Vec<Endpoint> = fleet
            .iter()
            .map(|&(i, weight, health)| Endpoint::new(addr(i))
                .with_weight(weight)
                .with_health([Health::Healthy, Health::Draining, Health::Unhealthy][health as usize]))
            .collect();
        let mut service = policy(load_balancer);
        service.retry = 5;
        let mut picker = ServicePicker::new(&service, &endpoints);
        let mut rng = SplitMix64::new(9);
        let mut picked = Vec::new();
        for (i, (key, fail)) in requests.iter().enumerate() {
            let attributes = RequestAttributes {
                hash_header: key.as_deref(),
                sticky_cookie: key.as_deref(),
                ..Default::default()
            };
            if let Ok(pick) = picker.pick(&attributes, ms(i as u64), &mut rng) {
                picked.push((pick.endpoint, *fail));
            }
        }
        for (i, (endpoint, fail)) in picked.into_iter().enumerate() {
            let outcome = if fail { status(503) } else { ok(ms(2)) };
            picker.complete(endpoint, crate::Served::ByPick, outcome, ms(100 + i as u64));
        }
        prop_assert!(picker.endpoints().all(|v| v.inflight == 0));
    }
}

#[test]
fn zero_weight_endpoints_count_as_weight_one() {
    let mut picker = ServicePicker::new(
        &policy(LoadBalancer::WeightedRoundRobin {}),
        &weighted(&[0, 1]),
    );
    let counts = counts(&mut picker, 10);
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), [5, 5]);
}

#[test]
fn latency_is_fed_to_the_endpoint_that_served() {
    let mut picker = ServicePicker::new(
        &policy(LoadBalancer::PeakEwma(PeakEwma::default())),
        &endpoints(2),
    );
    let pick = picker
        .pick(
            &Default::default(),
            ms(0),
            &mut Sequence::units(&[0.0, 0.0]),
        )
        .unwrap();
    assert_eq!(pick.endpoint, addr(1));
    // Envoy retried on addr(2), which answered slowly: addr(2) gets the latency.
    picker.complete(
        addr(1),
        crate::Served::ByRetryTarget(addr(2)),
        ok(ms(900)),
        ms(1),
    );
    let slots = picker.slots_for_tests();
    let estimate = |i: usize, level: f64| {
        slots[i]
            .stats
            .ewma
            .estimate_nanos(ms(1), &crate::policy::PeakEwma::default(), level)
            .expect("sampled or penalized")
    };
    // The only answer so far is the service's level, and addr(2) is at it.
    assert_eq!(picker.level_for_tests(), 900_000_000.0);
    assert_eq!(estimate(1, picker.level_for_tests()), 900_000_000.0);
    // addr(1) failed (retried elsewhere): its estimate is at least the failure penalty,
    // however fast its peers.
    assert_eq!(estimate(0, 0.0), 500_000_000.0);
    assert_eq!(Duration::from_nanos(estimate(0, 0.0) as u64), ms(500));
}

/// Picks `picks` times at 1ms with a fixed seed and counts the picks per endpoint.
fn draws(picker: &mut ServicePicker, picks: u32) -> BTreeMap<std::net::SocketAddr, u32> {
    let mut rng = seeded();
    let mut counts = BTreeMap::new();
    for _ in 0..picks {
        *counts
            .entry(pick_and_complete(picker, ok(ms(1)), ms(1), &mut rng))
            .or_default() += 1;
    }
    counts
}

/// Checks that the weighted algorithms split traffic between addr(1) (weight 1) and addr(2)
/// (weight 3) exactly: in every run of 4 for round robin, within sampling error otherwise.
fn assert_one_to_three(picker: impl Fn(LoadBalancer) -> ServicePicker) {
    let mut round_robin = picker(LoadBalancer::WeightedRoundRobin {});
    let mut rng = seeded();
    let picked: Vec<_> = (0..40)
        .map(|_| pick_and_complete(&mut round_robin, ok(ms(1)), ms(1), &mut rng))
        .collect();
    let expected = BTreeMap::from([(addr(1), 1), (addr(2), 3)]);
    check_windows(&picked, &expected).unwrap();
    for load_balancer in [
        LoadBalancer::WeightedRandom {},
        LoadBalancer::LeastRequest(LeastRequest::default()),
    ] {
        let counts = draws(&mut picker(load_balancer), 20_000);
        assert_eq!(
            counts.keys().copied().collect::<Vec<_>>(),
            [addr(1), addr(2)]
        );
        assert!(
            within_sampling_error(counts[&addr(1)], 20_000, 0.25),
            "{counts:?}"
        );
    }
}

#[test]
fn a_mostly_ejected_tier_is_still_picked_exactly_by_weight_past_the_redraw_bound() {
    // 58 heavy endpoints ejected, 2 light ones left: nearly every draw from the tier, and
    // every run of due turns, lands on an ejected endpoint, so the exact fallbacks pick.
    let mut fleet = vec![(1, false), (3, false)];
    fleet.extend(std::iter::repeat_n((7, true), 58));
    assert_one_to_three(|load_balancer| ejecting(load_balancer, &fleet));
}

#[test]
fn with_no_tier_healthy_enough_weighted_picks_span_the_tiers_by_weight() {
    // One of two endpoints ejected in each zone: neither tier has 70% admissible, so the
    // candidates are the admissible endpoints of both tiers.
    let picker = |load_balancer| {
        let mut service = policy(load_balancer);
        service.outlier_detection = strict_outlier_detection(1);
        service.locality.local_zone = Some("z1".into());
        service.locality.failover = vec!["z2".into()];
        let fleet = [
            in_zone(1, "z1").with_weight(1),
            in_zone(2, "z2").with_weight(3),
            in_zone(3, "z1").with_weight(2),
            in_zone(4, "z2").with_weight(2),
        ];
        let mut picker = ServicePicker::new(&service, &fleet);
        fail_on(&mut picker, addr(3), status(503), 1, ms(0));
        fail_on(&mut picker, addr(4), status(503), 1, ms(0));
        picker
    };
    assert_one_to_three(picker);
}
