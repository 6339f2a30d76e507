//! Zone and region preference on real Envoy: the filter takes the proxy's zone and region from
//! its node locality (here `--service-zone`, which sets the node's `locality.zone`, or the
//! bootstrap's `node.locality`, as Istio's bootstrap does from the pod's node labels; the
//! filter reads them as `xds.node.locality.zone` and `.region`), and a `local_zone` in the
//! policy overrides the zone.

use std::net::SocketAddr;

use fulcrum_core::endpoint::REGION_KEY;
use fulcrum_e2e::{Proxy, SERVICE, backends, count_by_backend, filter_wasm};
use fulcrum_test_support::{Endpoints, EnvoyOptions, FailurePolicy, FilterSetup, NodeLocality};
use serde_json::{Value, json};

/// Envoy in `node_zone` in front of b1, b2 (zone `a`) and b3, b4 (zone `b`), with `locality`
/// as the policy's; returns which backends answered 40 requests.
async fn backends_answering(node_zone: &str, locality: Value) -> Vec<String> {
    let backends = backends(4).await.unwrap();
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let endpoints: Vec<Value> = addresses
        .iter()
        .enumerate()
        .map(|(i, address)| {
            json!({"address": address.to_string(), "zone": if i < 2 { "a" } else { "b" }})
        })
        .collect();
    let options = EnvoyOptions {
        extra_args: vec!["--service-zone".to_owned(), node_zone.to_owned()],
        ..EnvoyOptions::default()
    };
    let proxy = Proxy::start_with_options(
        Endpoints::Static(addresses),
        FilterSetup {
            wasm: filter_wasm().expect("the release filter"),
            config: json!({"endpoints": {SERVICE: endpoints}, "policy": {"default": {
                "load_balancer": {"type": "round_robin"}, "locality": locality}}}),
            failure_policy: FailurePolicy::default(),
        },
        &options,
    )
    .await
    .expect("Envoy starts");
    let replies = proxy.send(40).await;
    assert!(replies.iter().all(|reply| reply.status == Some(200)));
    count_by_backend(&replies).into_keys().collect()
}

#[tokio::test]
async fn requests_stay_in_the_zone_of_the_envoy_node() {
    assert_eq!(backends_answering("b", json!({})).await, ["b3", "b4"]);
}

#[tokio::test]
async fn a_policy_local_zone_overrides_the_zone_of_the_envoy_node() {
    assert_eq!(
        backends_answering("b", json!({"local_zone": "a"})).await,
        ["b1", "b2"]
    );
}

#[tokio::test]
async fn with_the_local_zone_down_requests_go_to_another_zone_of_the_region_not_another_region() {
    // A proxy in zone z1 of region r1 (its bootstrap's node locality, as Istio writes it);
    // b1 in z1 is unhealthy, b2 is in z2 of r1, b3 in z3 of r2.
    let backends = backends(3).await.unwrap();
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let places = [
        ("z1", "r1", "unhealthy"),
        ("z2", "r1", "healthy"),
        ("z3", "r2", "healthy"),
    ];
    let endpoints: Vec<Value> = addresses
        .iter()
        .zip(places)
        .map(|(address, (zone, region, health))| {
            json!({"address": address.to_string(), "zone": zone, "health": health,
                   "metadata": {REGION_KEY: region}})
        })
        .collect();
    let proxy = Proxy::start_in(
        NodeLocality {
            region: Some("r1".to_owned()),
            zone: Some("z1".to_owned()),
        },
        Endpoints::Static(addresses),
        FilterSetup {
            wasm: filter_wasm().expect("the release filter"),
            config: json!({"endpoints": {SERVICE: endpoints}, "policy": {"default": {
                "load_balancer": {"type": "round_robin"}}}}),
            failure_policy: FailurePolicy::default(),
        },
    )
    .await
    .expect("Envoy starts");
    let replies = proxy.send(40).await;
    assert!(replies.iter().all(|reply| reply.status == Some(200)));
    assert_eq!(
        count_by_backend(&replies).into_keys().collect::<Vec<_>>(),
        ["b2"]
    );
}
