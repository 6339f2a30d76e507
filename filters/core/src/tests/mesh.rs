//! Applying snapshot changes to a VM's services: what changed is rebuilt, nothing else;
//! table memory is budgeted; deltas carry exactly what changed.

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::{
    BreakerState, Endpoint, LoadBalancer, Policy, ServiceEndpoints, ServicePicker, ServicePolicy,
    Snapshot,
    distribution::{self, content_hash, parse_answer},
    mesh::{Applied, Change, Hashed, Lifecycle, Services},
    policy::{Maglev, RingHash},
    receive::{ReceiveError, receive_service},
    tables::{self, DEFAULT_TABLE_BUDGET_BYTES},
    test_support::{addr, endpoints, fail_on, policy, secs, status, strict_outlier_detection},
};

/// The lifecycle of bare pickers, counting what it is asked to do.
#[derive(Default)]
struct Pickers {
    created: Vec<String>,
    released: usize,
}

impl Lifecycle<ServicePicker> for Pickers {
    fn create(
        &mut self,
        name: &str,
        policy: &ServicePolicy,
        endpoints: &[Endpoint],
    ) -> ServicePicker {
        self.created.push(name.to_owned());
        ServicePicker::new(policy, endpoints)
    }

    fn release(&mut self, _state: &mut ServicePicker, _remaining: &[Endpoint]) {
        self.released += 1;
    }
}

fn service(endpoints: Vec<Endpoint>) -> Hashed<ServiceEndpoints> {
    let value = ServiceEndpoints {
        endpoints,
        protocol: None,
    };
    Hashed {
        hash: content_hash(&serde_json::to_vec(&value).expect("json")),
        value,
    }
}

fn hashed_policy(policy: Policy) -> Hashed<Policy> {
    Hashed {
        hash: content_hash(&serde_json::to_vec(&policy).expect("json")),
        value: policy,
    }
}

fn strict() -> Policy {
    Policy {
        default: ServicePolicy {
            outlier_detection: strict_outlier_detection(2),
            ..ServicePolicy::default()
        },
        ..Policy::default()
    }
}

fn whole(
    services: &Services<ServicePicker>,
    version: &str,
    named: &[(&str, Vec<Endpoint>)],
) -> Change {
    let map = named
        .iter()
        .map(|(name, endpoints)| ((*name).to_owned(), service(endpoints.clone())))
        .collect();
    services.whole(version.to_owned(), map, None)
}

fn is_open(picker: &ServicePicker, address: std::net::SocketAddr) -> bool {
    picker.endpoints().any(|view| {
        view.endpoint.address == address && matches!(view.breaker, BreakerState::Open { .. })
    })
}

/// Two services, `shop` and `cart`, three endpoints each, with strict breakers.
fn two_services(lifecycle: &mut Pickers) -> Services<ServicePicker> {
    let mut services = Services::new(strict());
    let change = whole(
        &services,
        "v1",
        &[("shop", endpoints(3)), ("cart", endpoints(3))],
    );
    services
        .apply(change, DEFAULT_TABLE_BUDGET_BYTES, lifecycle)
        .expect("within budget");
    services
}

#[test]
fn an_unchanged_service_keeps_its_breaker_state_across_a_change_of_another_service() {
    let mut lifecycle = Pickers::default();
    let mut services = two_services(&mut lifecycle);
    let shop = services.get_mut("shop").expect("shop");
    fail_on(shop, addr(1), status(503), 2, secs(1));
    assert!(
        is_open(shop, addr(1)),
        "two failures open the strict breaker"
    );

    let change = whole(
        &services,
        "v2",
        &[("shop", endpoints(3)), ("cart", endpoints(4))],
    );
    assert_eq!(
        change.upserted.keys().collect::<Vec<_>>(),
        ["cart"],
        "only cart changed"
    );
    let applied = services
        .apply(change, DEFAULT_TABLE_BUDGET_BYTES, &mut lifecycle)
        .expect("within budget");

    assert_eq!(
        applied,
        Applied {
            updated: 1,
            untouched: 1,
            ..Applied::default()
        }
    );
    assert!(is_open(services.get_mut("shop").expect("shop"), addr(1)));
    assert_eq!(services.get_mut("cart").expect("cart").endpoints().len(), 4);
    assert_eq!(services.version(), Some("v2"));
    assert_eq!(
        lifecycle.created,
        ["cart", "shop"],
        "nothing was created again"
    );
}

#[test]
fn a_changed_service_keeps_its_surviving_endpoints_state_and_takes_the_new_endpoints() {
    let mut lifecycle = Pickers::default();
    let mut services = two_services(&mut lifecycle);
    fail_on(
        services.get_mut("shop").expect("shop"),
        addr(1),
        status(503),
        2,
        secs(1),
    );

    let mut grown = endpoints(3);
    grown.push(Endpoint::new(addr(9)));
    let change = whole(&services, "v2", &[("shop", grown), ("cart", endpoints(3))]);
    let applied = services
        .apply(change, DEFAULT_TABLE_BUDGET_BYTES, &mut lifecycle)
        .expect("within budget");

    assert_eq!(applied.updated, 1);
    let shop = services.get_mut("shop").expect("shop");
    assert_eq!(shop.endpoints().len(), 4);
    assert!(
        is_open(shop, addr(1)),
        "a surviving endpoint keeps its breaker"
    );
    assert_eq!(
        services.content("shop"),
        Some(
            service({
                let mut grown = endpoints(3);
                grown.push(Endpoint::new(addr(9)));
                grown
            })
            .hash
            .as_str()
        )
    );
}

#[test]
fn a_changed_service_under_another_selection_policy_is_rebuilt_and_others_are_not() {
    let mut lifecycle = Pickers::default();
    let mut services = two_services(&mut lifecycle);
    fail_on(
        services.get_mut("cart").expect("cart"),
        addr(2),
        status(503),
        2,
        secs(1),
    );
    let mut policy = strict();
    policy.services.insert(
        "shop".to_owned(),
        ServicePolicy {
            load_balancer: LoadBalancer::RoundRobin {},
            ..strict().default
        },
    );
    let change = Change {
        version: "v2".to_owned(),
        policy: Some(hashed_policy(policy)),
        ..Change::default()
    };
    let applied = services
        .apply(change, DEFAULT_TABLE_BUDGET_BYTES, &mut lifecycle)
        .expect("within budget");

    assert_eq!(
        applied,
        Applied {
            rebuilt: 1,
            untouched: 1,
            ..Applied::default()
        }
    );
    assert_eq!(lifecycle.created, ["cart", "shop", "shop"]);
    assert_eq!(
        services
            .get_mut("shop")
            .expect("shop")
            .policy()
            .load_balancer,
        LoadBalancer::RoundRobin {}
    );
    assert_eq!(
        services.get_mut("shop").expect("shop").endpoints().len(),
        3,
        "rebuilt from the endpoints it had"
    );
    assert!(
        is_open(services.get_mut("cart").expect("cart"), addr(2)),
        "cart's selection did not change"
    );
}

#[test]
fn a_removed_service_disappears_and_its_endpoints_are_released() {
    let mut lifecycle = Pickers::default();
    let mut services = two_services(&mut lifecycle);
    let change = whole(&services, "v2", &[("shop", endpoints(3))]);
    assert!(change.upserted.is_empty());
    let applied = services
        .apply(change, DEFAULT_TABLE_BUDGET_BYTES, &mut lifecycle)
        .expect("within budget");
    assert_eq!(applied.removed, 1);
    assert!(services.get_mut("cart").is_none());
    assert_eq!(services.len(), 1);
    assert_eq!(lifecycle.released, 1);
}

fn maglev(table_size: u32) -> LoadBalancer {
    LoadBalancer::Maglev(Maglev {
        table_size,
        ..Maglev::default()
    })
}

#[test]
fn a_change_whose_tables_exceed_the_budget_is_refused_naming_service_and_field_and_nothing_changes()
{
    let mut lifecycle = Pickers::default();
    let mut services = two_services(&mut lifecycle);
    let mut policy = strict();
    policy
        .services
        .insert("shop".to_owned(), policy_with(maglev(65537)));
    let before = services.version().map(str::to_owned);
    let change = Change {
        version: "v2".to_owned(),
        upserted: [("cart".to_owned(), service(endpoints(5)))].into(),
        policy: Some(hashed_policy(policy)),
        ..Change::default()
    };
    let error = services
        .apply(change, 65537 * 4 - 1, &mut lifecycle)
        .expect_err("a 256 KiB table over a budget one byte short");
    assert_eq!(error.service, "shop");
    assert_eq!(
        error.field,
        "policy.services.shop.load_balancer.maglev.table_size"
    );
    assert_eq!(error.value, 65537);
    assert_eq!(error.bytes, 65537 * 4);
    let message = error.to_string();
    assert!(
        message.contains("max_table_bytes") && message.contains("shop"),
        "{message}"
    );
    assert_eq!(
        services.version().map(str::to_owned),
        before,
        "the last good state stays"
    );
    assert_eq!(services.get_mut("cart").expect("cart").endpoints().len(), 3);
    assert_eq!(
        services
            .get_mut("shop")
            .expect("shop")
            .policy()
            .load_balancer,
        strict().default.load_balancer
    );
}

fn policy_with(load_balancer: LoadBalancer) -> ServicePolicy {
    ServicePolicy {
        load_balancer,
        ..policy(LoadBalancer::RoundRobin {})
    }
}

#[test]
fn the_default_policy_s_tables_add_up_over_every_service_and_name_the_default_field() {
    let policy = Policy {
        default: policy_with(LoadBalancer::RingHash(RingHash {
            minimum_ring_size: 1024,
            ..RingHash::default()
        })),
        ..Policy::default()
    };
    let three = endpoints(3);
    let services = ["a", "b", "c"].map(|name| (name, three.iter().map(|e| e.weight)));
    // 3 endpoints of weight 1: 512 points each (1024 / 3 rounded up to a power of two).
    let per_service = 3 * 512 * tables::RING_POINT_BYTES;
    assert_eq!(
        tables::check_budget(&policy, services.clone(), u64::MAX),
        Ok(3 * per_service)
    );
    let error = tables::check_budget(&policy, services, 2 * per_service).expect_err("over");
    assert_eq!(error.service, "c", "services add up in name order");
    assert_eq!(
        error.field,
        "policy.default.load_balancer.ring_hash.minimum_ring_size"
    );
}

#[test]
fn a_maglev_table_costs_what_the_built_table_holds() {
    let picker = ServicePicker::new(&policy_with(maglev(65537)), &endpoints(3));
    let cost = tables::table_cost(&picker.policy().load_balancer, &[1, 1, 1]).expect("a table");
    assert_eq!(cost.bytes, 65537 * tables::MAGLEV_ENTRY_BYTES);
    assert_eq!(
        tables::table_cost(&picker.policy().load_balancer, &[]).map(|cost| cost.bytes),
        Some(0),
        "no endpoints, no table"
    );
}

fn snapshot(version: &str, services: &[(&str, Vec<Endpoint>)], policy: Option<Policy>) -> Snapshot {
    Snapshot {
        version: version.to_owned(),
        services: services
            .iter()
            .map(|(name, endpoints)| {
                (
                    (*name).to_owned(),
                    std::sync::Arc::new(ServiceEndpoints {
                        endpoints: endpoints.clone(),
                        protocol: None,
                    }),
                )
            })
            .collect(),
        policy,
    }
}

#[test]
fn a_delta_carries_only_added_and_changed_services_the_removed_names_and_a_changed_policy() {
    let base = snapshot(
        "v1",
        &[
            ("a", endpoints(1)),
            ("b", endpoints(2)),
            ("c", endpoints(3)),
        ],
        None,
    );
    let current = snapshot(
        "v2",
        &[
            ("a", endpoints(1)),
            ("b", endpoints(3)),
            ("d", endpoints(1)),
        ],
        Some(strict()),
    );
    let delta = distribution::delta(&base, &current);
    assert_eq!(
        delta.services.keys().copied().collect::<Vec<_>>(),
        ["b", "d"]
    );
    assert_eq!(delta.removed, ["c"]);
    assert_eq!(delta.policy, Some(&strict()));
    let unchanged_policy = distribution::delta(&current, &current);
    assert!(unchanged_policy.services.is_empty() && unchanged_policy.policy.is_none());

    let body = serde_json::to_vec(&delta).expect("json");
    let answer = parse_answer(&body).expect("a delta parses");
    assert_eq!(answer.base.as_deref(), Some("v1"));
    assert_eq!(answer.version, "v2");
    assert!(answer.removed.contains("c"));
    let whole = serde_json::to_vec(&current).expect("json");
    let whole = parse_answer(&whole).expect("a whole snapshot parses");
    assert_eq!(whole.base, None, "a whole snapshot has no base");
    assert_eq!(
        content_hash(answer.services["b"].get().as_bytes()),
        content_hash(whole.services["b"].get().as_bytes()),
        "a service hashes the same in a delta and in a whole snapshot"
    );
}

#[test]
fn a_service_parsed_from_its_raw_json_equals_the_one_serialized() {
    let sent = ServiceEndpoints {
        endpoints: endpoints(3),
        protocol: None,
    };
    let json = serde_json::to_vec(&sent).expect("json");
    assert_eq!(receive_service("shop", &json), Ok(sent));
    assert!(
        receive_service("shop", b"{\"endpoints\": [{\"address\": \"10.0.0.1:0\"}]}")
            .expect_err("port 0")
            .contains("services.shop.endpoints[0].address")
    );
}

#[test]
fn an_answer_whose_version_is_over_long_or_unprintable_is_refused_as_malformed() {
    let answer = |version: &str| serde_json::to_vec(&serde_json::json!({"version": version}));
    let body = answer(&"7".repeat(1 << 20)).expect("json");
    assert!(matches!(
        parse_answer(&body),
        Err(ReceiveError::Malformed { .. })
    ));
    let body = answer("v1\nInjected: header").expect("json");
    assert!(matches!(
        parse_answer(&body),
        Err(ReceiveError::Malformed { .. })
    ));
    let longest = "f".repeat(distribution::MAX_VERSION_BYTES);
    for version in ["0123456789abcdef", "static", longest.as_str()] {
        let body = answer(version).expect("json");
        assert_eq!(
            parse_answer(&body).expect("a valid version").version,
            version
        );
    }
    let body = answer(&"f".repeat(distribution::MAX_VERSION_BYTES + 1)).expect("json");
    assert!(parse_answer(&body).is_err(), "one byte over the bound");
}

proptest! {
    /// Whatever bytes a poll answer holds, reading it never panics, and every service it
    /// yields either parses or is refused with a reason.
    #[test]
    fn any_answer_body_is_read_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(answer) = parse_answer(&body) {
            for (name, raw) in &answer.services {
                let _ = receive_service(name, raw.get().as_bytes());
            }
        }
    }

    /// Answers built from JSON-shaped pieces (services of arbitrary values, removed names,
    /// bases) read back as what was written.
    #[test]
    fn an_answer_of_any_shape_reads_back_its_structure(
        names in proptest::collection::btree_set("[a-z]{1,8}", 0..6),
        removed in proptest::collection::btree_set("[a-z]{1,8}", 0..4),
        base in proptest::option::of("[0-9a-f]{16}"),
        ports in proptest::collection::vec(0u16..4, 6),
    ) {
        let services: BTreeMap<&str, serde_json::Value> = names
            .iter()
            .zip(&ports)
            .map(|(name, &port)| (name.as_str(), serde_json::json!({"endpoints": [{"address": format!("10.0.0.1:{port}")}]})))
            .collect();
        let body = serde_json::json!({"version": "v", "base": base, "services": services, "removed": removed});
        let body = serde_json::to_vec(&body).expect("json");
        let answer = parse_answer(&body).expect("well-formed");
        prop_assert_eq!(&answer.base, &base);
        prop_assert_eq!(answer.services.keys().cloned().collect::<Vec<_>>(), names.iter().cloned().collect::<Vec<_>>());
        prop_assert_eq!(&answer.removed, &removed);
        for (name, raw) in &answer.services {
            let parsed = receive_service(name, raw.get().as_bytes());
            prop_assert_eq!(parsed.is_ok(), !raw.get().contains(":0\""), "{}", raw.get());
        }
    }
}
