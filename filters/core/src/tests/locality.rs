//! Locality tiers with regions: the local zone, the `failover` zones, the other zones of the
//! local region, then the rest; and, without a region anywhere, the zone tiers alone.

use std::net::SocketAddr;

use proptest::prelude::*;

use crate::{
    Endpoint, ServicePicker,
    endpoint::REGION_KEY,
    policy::{LoadBalancer, Policy, ServicePolicy},
    test_support::*,
};

/// An endpoint in `zone` of `region`.
fn located(i: u32, zone: &str, region: &str) -> Endpoint {
    let mut endpoint = in_zone(i, zone);
    endpoint
        .attributes_mut()
        .metadata
        .insert(REGION_KEY.into(), region.into());
    endpoint
}

/// Round robin that ejects on the first failure, preferring zone `z1` and region `r1`.
fn in_z1_of_r1() -> ServicePolicy {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(1);
    service.locality.local_zone = Some("z1".into());
    service.locality.local_region = Some("r1".into());
    service
}

/// The endpoints of `picks` picks, each answered 200.
fn picks(picker: &mut ServicePicker, picks: usize) -> Vec<SocketAddr> {
    let mut rng = seeded();
    (0..picks)
        .map(|_| pick_and_complete(picker, ok(ms(5)), ms(10), &mut rng))
        .collect()
}

#[test]
fn tiers_run_local_zone_then_failover_zones_then_the_local_region_then_the_rest() {
    let mut service = in_z1_of_r1();
    service.locality.failover = vec!["z4".into()];
    let fleet = [
        located(1, "z1", "r1"),
        located(2, "z4", "r2"),
        located(3, "z2", "r1"),
        located(4, "z3", "r2"),
        in_zone(5, "z5"),
    ];
    let mut picker = ServicePicker::new(&service, &fleet);
    assert_eq!(picks(&mut picker, 2), [addr(1), addr(1)]);
    fail_on(&mut picker, addr(1), status(503), 1, ms(1));
    assert_eq!(
        picks(&mut picker, 2),
        [addr(2), addr(2)],
        "a failover zone comes before the region, even in another region"
    );
    fail_on(&mut picker, addr(2), status(503), 1, ms(1));
    assert_eq!(picks(&mut picker, 2), [addr(3), addr(3)], "then the region");
    fail_on(&mut picker, addr(3), status(503), 1, ms(1));
    let mut rest = picks(&mut picker, 4);
    rest.sort_unstable();
    assert_eq!(
        rest,
        [addr(4), addr(4), addr(5), addr(5)],
        "then other regions and endpoints of no region alike"
    );
}

#[test]
fn a_zone_short_of_min_healthy_percent_spills_to_its_region_before_other_regions() {
    let fleet = [
        located(1, "z1", "r1"),
        located(2, "z1", "r1"),
        located(3, "z2", "r1"),
        located(4, "z2", "r1"),
        located(5, "z3", "r2"),
    ];
    let mut picker = ServicePicker::new(&in_z1_of_r1(), &fleet);
    // One of two local endpoints ejected: 50% < 70%, so the rest of r1 takes over.
    fail_on(&mut picker, addr(1), status(503), 1, ms(1));
    let mut spilled = picks(&mut picker, 4);
    spilled.sort_unstable();
    assert_eq!(spilled, [addr(3), addr(3), addr(4), addr(4)]);
    // One of two in z2 ejected too: r1 is short as well, so z3 of r2, whole, takes over.
    fail_on(&mut picker, addr(3), status(503), 1, ms(1));
    assert_eq!(picks(&mut picker, 3), [addr(5); 3]);
}

#[test]
fn a_known_region_without_a_known_zone_prefers_the_region() {
    let mut service = in_z1_of_r1();
    service.locality.local_zone = None;
    service.locality.failover = vec!["z3".into()];
    let fleet = [
        located(1, "z3", "r2"),
        located(2, "z2", "r1"),
        in_zone(3, "z1"),
    ];
    let mut picker = ServicePicker::new(&service, &fleet);
    assert_eq!(
        picks(&mut picker, 3),
        [addr(2); 3],
        "failover zones rank only after a local zone"
    );
}

#[test]
fn prefer_local_false_ignores_regions_as_it_ignores_zones() {
    let mut service = in_z1_of_r1();
    service.locality.prefer_local = false;
    let fleet = [located(1, "z3", "r2"), located(2, "z2", "r1")];
    let mut picker = ServicePicker::new(&service, &fleet);
    let mut spread = picks(&mut picker, 4);
    spread.sort_unstable();
    assert_eq!(spread, [addr(1), addr(1), addr(2), addr(2)]);
}

#[test]
fn an_empty_region_in_metadata_is_no_region() {
    let mut service = in_z1_of_r1();
    service.locality.local_zone = None;
    service.locality.local_region = Some("r1".into());
    let fleet = [located(1, "z2", ""), located(2, "z2", "r1")];
    assert_eq!(fleet[0].region(), None);
    let mut picker = ServicePicker::new(&service, &fleet);
    assert_eq!(picks(&mut picker, 2), [addr(2); 2]);
}

#[test]
fn the_proxy_region_fills_every_service_without_a_region_of_its_own() {
    let mut policy = Policy::default();
    let mut pinned = ServicePolicy::default();
    pinned.locality.local_region = Some("eu-central-1".into());
    policy.services.insert("pinned".into(), pinned);
    policy
        .services
        .insert("open".into(), ServicePolicy::default());
    let placed = policy.in_region("eu-west-1").in_zone("eu-west-1a");
    let region = |service: &str| placed.for_service(service).locality.local_region.clone();
    assert_eq!(region("open").as_deref(), Some("eu-west-1"));
    assert_eq!(
        region("unlisted").as_deref(),
        Some("eu-west-1"),
        "the default too"
    );
    assert_eq!(
        region("pinned").as_deref(),
        Some("eu-central-1"),
        "the policy's region overrides the proxy's"
    );
}

#[test]
fn a_policy_without_a_local_region_serializes_as_before_regions() {
    let json = serde_json::to_value(ServicePolicy::default().locality).unwrap();
    assert!(json.get("local_region").is_none(), "{json}");
    let mut pinned = ServicePolicy::default().locality;
    pinned.local_region = Some("r1".into());
    let json = serde_json::to_value(&pinned).unwrap();
    assert_eq!(json["local_region"], "r1");
}

#[test]
fn an_empty_local_region_is_refused_naming_its_field() {
    let error = Policy::from_json(r#"{"default": {"locality": {"local_region": ""}}}"#)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("default.locality.local_region: must not be empty"),
        "{error}"
    );
}

/// An endpoint of the generated fleet: its zone and region indices (0 for none).
type Place = (usize, usize);

const ZONES: [&str; 4] = ["", "z1", "z2", "z3"];
const REGIONS: [&str; 3] = ["", "r1", "r2"];

/// The fleet at `places`, with regions in metadata or without.
fn fleet(places: &[Place], with_regions: bool) -> Vec<Endpoint> {
    places
        .iter()
        .enumerate()
        .map(|(i, &(zone, region))| {
            let mut endpoint = Endpoint::new(addr(i as u32 + 1));
            endpoint.attributes_mut().zone = (zone > 0).then(|| ZONES[zone].to_owned());
            if with_regions && region > 0 {
                endpoint
                    .attributes_mut()
                    .metadata
                    .insert(REGION_KEY.into(), REGIONS[region].into());
            }
            endpoint
        })
        .collect()
}

/// 40 picks from `fleet` under `service` after ejecting `ejected`, answered 200.
fn picks_after_ejecting(
    service: &ServicePolicy,
    fleet: &[Endpoint],
    ejected: &[bool],
) -> Vec<SocketAddr> {
    let mut picker = ServicePicker::new(service, fleet);
    for (i, _) in ejected.iter().enumerate().filter(|(_, ejected)| **ejected) {
        fail_on(&mut picker, addr(i as u32 + 1), status(503), 1, ms(1));
    }
    let mut rng = seeded();
    (0..40)
        .map(
            |_| match picker.pick(&Default::default(), ms(10), &mut rng) {
                Ok(pick) => {
                    picker.complete(pick.endpoint, crate::Served::ByPick, ok(ms(5)), ms(10));
                    pick.endpoint
                }
                Err(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            },
        )
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// With no region known, to the proxy or of the endpoints, every pick is what it is with
    /// zones alone: endpoint regions a policy has no region for change nothing, and neither
    /// does a policy region no endpoint carries.
    #[test]
    fn without_a_region_on_both_sides_picks_are_those_of_zones_alone(
        places in proptest::collection::vec((0..4usize, 0..3usize), 1..10),
        ejected in proptest::collection::vec(any::<bool>(), 10),
        local_zone in 0..4usize,
        failover in proptest::collection::vec(1..4usize, 0..3),
        min_healthy_percent in 0..=100u32,
        least_request in any::<bool>(),
    ) {
        let mut zones_alone = policy(if least_request {
            LoadBalancer::LeastRequest(Default::default())
        } else {
            LoadBalancer::RoundRobin {}
        });
        zones_alone.outlier_detection = strict_outlier_detection(1);
        zones_alone.locality.local_zone = (local_zone > 0).then(|| ZONES[local_zone].to_owned());
        let mut failover: Vec<String> = failover.iter().map(|&z| ZONES[z].to_owned()).collect();
        failover.dedup();
        zones_alone.locality.failover = failover;
        zones_alone.locality.min_healthy_percent = min_healthy_percent;
        let ejected = &ejected[..places.len()];
        let expected = picks_after_ejecting(&zones_alone, &fleet(&places, false), ejected);
        prop_assert_eq!(
            &picks_after_ejecting(&zones_alone, &fleet(&places, true), ejected),
            &expected,
            "endpoint regions without a local region"
        );
        let mut with_region = zones_alone.clone();
        with_region.locality.local_region = Some("r1".into());
        prop_assert_eq!(
            &picks_after_ejecting(&with_region, &fleet(&places, false), ejected),
            &expected,
            "a local region without endpoint regions"
        );
    }
}
