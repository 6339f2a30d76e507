//! The native data plane fed by fulcrum's control plane: a service whose policy says
//! `data_plane: native` reaches Envoy over ADS as a cluster whose load-balancing policy is the
//! module, configured with that policy; a policy change reaches Envoy as a new cluster.
//! Needs `FULCRUM_NATIVE_MODULE` (`cargo xtask test` builds and sets it).

use std::{net::SocketAddr, path::Path, time::Duration};

use fulcrum_control_plane::{Config, ControlPlane, OptionalSources, PolicySource};
use fulcrum_e2e::{
    SERVICE, backends, connect_failures, count_by_backend, dead_address,
    native::{
        Clusters, NativeProxy, RETRY_A_CONNECT_FAILURE, bootstrap, dead_endpoint_policy,
        round_robin_ejecting_after,
    },
};
use fulcrum_example_backend::Fault;
use fulcrum_test_support::eventually;
use serde_json::{Value, json};

const WORKERS: u32 = 2;

/// The service's endpoints, the last one tagged `canary`.
fn write_endpoints(path: &Path, addresses: &[SocketAddr]) {
    let last = addresses.len().saturating_sub(1);
    let endpoints: Vec<Value> = addresses
        .iter()
        .enumerate()
        .map(|(i, address)| {
            let tags: Vec<&str> = if i == last { vec!["canary"] } else { vec![] };
            json!({"address": address.to_string(), "tags": tags})
        })
        .collect();
    std::fs::write(
        path,
        json!({"services": {SERVICE: {"endpoints": endpoints}}}).to_string(),
    )
    .unwrap();
}

/// The policy file: `policy` for the service, on the native data plane.
fn write_policy(path: &Path, mut policy: Value) {
    policy["data_plane"] = json!("native");
    let staged = path.with_extension("new");
    std::fs::write(&staged, json!({"services": {SERVICE: policy}}).to_string()).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// The control plane over `endpoints_file` with the native policy in `policy_file`.
async fn control_plane(endpoints_file: &Path, policy_file: &Path) -> ControlPlane {
    ControlPlane::start_with(
        config(endpoints_file),
        OptionalSources {
            policy: Some(PolicySource::File(policy_file.to_path_buf())),
            ..OptionalSources::default()
        },
    )
    .await
    .unwrap()
}

fn config(static_file: &Path) -> Config {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    Config {
        static_file: Some(static_file.to_path_buf()),
        poll_interval: Duration::from_millis(100),
        xds_address: any,
        http_address: any,
        debounce: Duration::from_millis(20),
        ..Config::default()
    }
}

#[tokio::test]
async fn a_native_service_from_the_control_plane_is_balanced_by_the_module_and_follows_policy_changes()
 {
    let backends = backends(3).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let endpoints_file = dir.path().join("endpoints.json");
    let policy_file = dir.path().join("policy.json");
    write_endpoints(
        &endpoints_file,
        &backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
    );
    write_policy(
        &policy_file,
        round_robin_ejecting_after("consecutive_failures", 3),
    );
    let control_plane = control_plane(&endpoints_file, &policy_file).await;
    let proxy = NativeProxy::start(
        &bootstrap(Clusters::Ads(control_plane.xds_address()), None),
        WORKERS,
    )
    .await
    .unwrap();

    let served = eventually(
        Duration::from_secs(10),
        "the cluster from the control plane to serve from every endpoint",
        || async {
            let counts = count_by_backend(&proxy.send(6).await);
            (counts.len() == 3).then_some(counts)
        },
    )
    .await;
    assert!(
        served.is_ok(),
        "the native cluster arrives over ADS and serves"
    );
    let dump = proxy.envoy.config_dump(false).await.unwrap().to_string();
    assert!(
        dump.contains("DynamicModulesLoadBalancerConfig") && dump.contains("round_robin"),
        "the cluster's policy is the module, configured with the served policy:\n{dump}"
    );
    let counts = count_by_backend(&proxy.send(30).await);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "round robin spreads evenly: {counts:?}"
    );

    backends[1]
        .set_fault(Fault {
            error_rate: 1.0,
            ..Fault::default()
        })
        .unwrap();
    let replies = proxy.send(30).await;
    let errors = replies.iter().filter(|r| r.status == Some(503)).count();
    assert_eq!(
        errors,
        3,
        "the module learns from outcomes: three failures eject the endpoint: {:?}",
        count_by_backend(&replies)
    );
    assert_eq!(backends[1].stats().errors, 3);
    let b2 = backends[1].addr;
    assert_eq!(proxy.endpoint_metric("circuit_open", b2).await.unwrap(), 1);

    let modified_before = proxy
        .envoy
        .stat("cluster_manager.cluster_modified")
        .await
        .unwrap()
        .unwrap_or(0);
    write_policy(
        &policy_file,
        json!({"load_balancer": {"type": "round_robin"}, "endpoint_selector": {"tags": ["canary"]}}),
    );
    let only_canary = eventually(
        Duration::from_secs(10),
        "only the canary picked",
        || async {
            let counts = count_by_backend(&proxy.send(6).await);
            (counts.get("b3") == Some(&6)).then_some(())
        },
    )
    .await;
    assert!(
        only_canary.is_ok(),
        "the new policy reaches the module as a new cluster"
    );
    let modified_after = proxy
        .envoy
        .stat("cluster_manager.cluster_modified")
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(
        modified_after > modified_before,
        "Envoy replaced the cluster: cluster_modified {modified_before} -> {modified_after}"
    );
    let gauge_closed = eventually(
        Duration::from_secs(10),
        "the replaced cluster's open circuit to be reported closed",
        || async {
            (proxy.endpoint_metric("circuit_open", b2).await.ok() == Some(0)).then_some(())
        },
    )
    .await;
    assert!(
        gauge_closed.is_ok(),
        "a replaced cluster's circuits end with it: the new one starts with every breaker closed"
    );
    assert_eq!(
        proxy
            .counter("fulcrum_native_fail_open_total")
            .await
            .unwrap(),
        0
    );
    control_plane.shutdown().await;
}

/// A retry is chosen by the module for the request's stream, on the cluster exactly as the
/// control plane generates it: the stream header must still be there when Envoy asks for the
/// retry's host. Were it stripped on the way upstream (an upstream filter edits the request's
/// own header map), the retry would be an unobserved pick and the live endpoint's answer would
/// be charged to the dead one, which would then never be ejected.
#[tokio::test]
async fn a_retry_on_a_control_plane_cluster_is_charged_to_the_endpoint_that_served_it() {
    let live = backends(2).await.unwrap();
    let dead = dead_address().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let endpoints_file = dir.path().join("endpoints.json");
    let policy_file = dir.path().join("policy.json");
    let mut addresses: Vec<SocketAddr> = live.iter().map(|b| b.addr).collect();
    addresses.push(dead);
    write_endpoints(&endpoints_file, &addresses);
    write_policy(&policy_file, dead_endpoint_policy());
    let control_plane = control_plane(&endpoints_file, &policy_file).await;
    let proxy = NativeProxy::start(
        &bootstrap(
            Clusters::Ads(control_plane.xds_address()),
            Some(RETRY_A_CONNECT_FAILURE),
        ),
        WORKERS,
    )
    .await
    .unwrap();
    let arrived = eventually(
        Duration::from_secs(10),
        "the cluster from the control plane to serve",
        || async {
            let replies = proxy.send(1).await;
            (replies.first().and_then(|reply| reply.status) == Some(200)).then_some(())
        },
    )
    .await;
    assert!(arrived.is_ok(), "the native cluster arrives over ADS");

    let replies = proxy.send(60).await;

    assert!(
        replies.iter().all(|reply| reply.status == Some(200)),
        "every request that met the dead endpoint was retried onto a live one: {replies:?}"
    );
    let connect_failures = connect_failures(&proxy.envoy).await.unwrap();
    assert!(
        (1..=3).contains(&connect_failures),
        "the dead endpoint is charged its connect failures and ejected after 3, got {connect_failures}"
    );
    assert_eq!(
        proxy
            .counter("fulcrum_native_unobserved_total")
            .await
            .unwrap(),
        0,
        "every attempt, retries included, was chosen for its stream"
    );
    control_plane.shutdown().await;
}
