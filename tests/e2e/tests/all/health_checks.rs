//! Active health checks, asked for by the policy on endpoints from the static file, or by a
//! registration: a backend whose `/healthz` fails (while its traffic still answers 200, so
//! only the check can be the reason) is published unhealthy to Envoy and the filter, which
//! stops picking it, and is picked again once it passes.

use std::{net::SocketAddr, path::Path, time::Duration};

use fulcrum_control_plane::{
    Config, ControlPlane, OptionalSources, PolicySource, RegistryBackendOptions, RegistryOptions,
    registry::Limits,
};
use fulcrum_e2e::{Proxy, SERVICE, backends, count_by_backend, envoy_with_control_plane};
use fulcrum_example_backend::{Backend, Fault};
use fulcrum_test_support::eventually;
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(10);

fn write_endpoints(path: &Path, addresses: &[SocketAddr]) {
    let endpoints = fulcrum_e2e::endpoints_json(addresses);
    std::fs::write(
        path,
        json!({"services": {SERVICE: {"endpoints": endpoints}}}).to_string(),
    )
    .unwrap();
}

/// The health of `address` in the control plane's snapshot.
async fn snapshot_health(control_plane: &ControlPlane, address: SocketAddr) -> Option<String> {
    let url = format!("http://{}/v1/snapshot", control_plane.http_address());
    let snapshot: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
    snapshot["services"][SERVICE]["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["address"] == address.to_string())
        .map(|e| e["health"].as_str().unwrap_or("healthy").to_owned())
}

/// Envoy's EDS health of `address` in the service's cluster.
async fn envoy_health(proxy: &Proxy, address: SocketAddr) -> Option<String> {
    let hosts = proxy.envoy.cluster_hosts().await.ok()?;
    hosts
        .get(SERVICE)?
        .iter()
        .find(|host| host.address == address.to_string())
        .map(|host| host.eds_health_status.clone())
}

async fn metrics(control_plane: &ControlPlane) -> String {
    reqwest::get(format!("http://{}/metrics", control_plane.http_address()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the metric line starting with `series` (name and labels).
fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Fail-open requests the filter left to Envoy, over every reason.
async fn fail_open_total(proxy: &Proxy) -> u64 {
    let mut total = 0;
    for reason in [
        "no_snapshot",
        "unknown_service",
        "no_service",
        "no_endpoints",
        "all_ejected",
        "internal",
    ] {
        let stat = format!("wasmcustom.fulcrum_fail_open_total.reason.{reason}");
        total += proxy.envoy.stat(&stat).await.unwrap().unwrap_or(0);
    }
    total
}

#[tokio::test]
async fn an_endpoint_failing_the_policys_health_check_is_not_picked_until_it_passes_again() {
    let backends = backends(3).await.unwrap();
    let all: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let dir = tempfile::tempdir().unwrap();
    let endpoints_file = dir.path().join("endpoints.yaml");
    write_endpoints(&endpoints_file, &all);
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(
        &policy_file,
        json!({"services": {SERVICE: {
            "load_balancer": {"type": "round_robin"},
            "health_check": {
                "http": {"path": "/healthz", "expected_statuses": [200]},
                "interval": "100ms", "timeout": "100ms", "jitter": "10ms",
                "healthy_threshold": 2, "unhealthy_threshold": 2
            }
        }}})
        .to_string(),
    )
    .unwrap();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let control_plane = ControlPlane::start_with(
        Config {
            static_file: Some(endpoints_file),
            poll_interval: Duration::from_millis(100),
            xds_address: any,
            http_address: any,
            debounce: Duration::from_millis(20),
            cluster_options: Default::default(),
            ..Config::default()
        },
        OptionalSources {
            policy: Some(PolicySource::File(policy_file)),
            ..OptionalSources::default()
        },
    )
    .await
    .unwrap();
    let proxy = envoy_with_control_plane(
        control_plane.xds_address(),
        control_plane.http_address(),
        json!({"load_balancer": {"type": "least_request"}}),
    )
    .await
    .unwrap();
    proxy.wait_for_endpoints(&all, PATIENCE).await.unwrap();
    // Two filter polls (200 ms each) after Envoy has the endpoints.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = count_by_backend(&proxy.send(30).await);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "every backend passes its checks and serves: {counts:?}"
    );

    fails_then_recovers(&control_plane, &proxy, &backends).await;
    control_plane.shutdown().await;
}

/// Makes `backends[0]` fail its health checks, sees it published unhealthy and never picked
/// (the other two share the round robin), then restores it and sees it picked again.
async fn fails_then_recovers(control_plane: &ControlPlane, proxy: &Proxy, backends: &[Backend]) {
    let checked = backends[0].addr;
    backends[0]
        .set_fault(Fault {
            fail_health_checks: true,
            ..Fault::default()
        })
        .unwrap();
    let unhealthy = eventually(PATIENCE, "b1 unhealthy in the snapshot", || async {
        snapshot_health(control_plane, checked).await.as_deref() == Some("unhealthy")
    })
    .await;
    assert!(unhealthy.is_ok(), "the control plane marks b1 unhealthy");
    let in_envoy = eventually(PATIENCE, "b1 unhealthy in Envoy", || async {
        envoy_health(proxy, checked).await.as_deref() == Some("UNHEALTHY")
    })
    .await;
    assert!(
        in_envoy.is_ok(),
        "Envoy's /clusters shows b1 unhealthy over EDS"
    );
    let metrics_text = metrics(control_plane).await;
    assert_eq!(
        metric(
            &metrics_text,
            &format!("fulcrum_cluster_endpoints{{cluster=\"{SERVICE}\",health=\"unhealthy\"}}")
        ),
        Some(1.0),
        "{metrics_text}"
    );
    assert!(
        metric(
            &metrics_text,
            &format!("fulcrum_health_checks_total{{cluster=\"{SERVICE}\",result=\"failure\"}}")
        )
        .is_some_and(|failures| failures >= 2.0),
        "{metrics_text}"
    );

    // Two filter polls after the control plane published it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let picks_before = proxy.picks(checked).await.unwrap();
    let served_before = backends[0].stats().requests;
    let fail_open_before = fail_open_total(proxy).await;
    let replies = proxy.send(30).await;
    let counts = count_by_backend(&replies);
    assert!(
        replies.iter().all(|r| r.status == Some(200)),
        "the other backends serve everything: {counts:?}"
    );
    assert_eq!(counts.get("b1"), None, "b1 gets nothing: {counts:?}");
    assert_eq!(
        (counts.get("b2"), counts.get("b3")),
        (Some(&15), Some(&15)),
        "round robin over the two healthy backends: {counts:?}"
    );
    assert_eq!(
        proxy.picks(checked).await.unwrap(),
        picks_before,
        "the filter never picked b1"
    );
    assert_eq!(
        fail_open_total(proxy).await,
        fail_open_before,
        "the filter picked every request itself"
    );
    assert_eq!(backends[0].stats().requests, served_before);

    backends[0].set_fault(Fault::default()).unwrap();
    let healthy = eventually(PATIENCE, "b1 healthy in the snapshot", || async {
        snapshot_health(control_plane, checked).await.as_deref() == Some("healthy")
    })
    .await;
    assert!(healthy.is_ok(), "b1 passes two checks and is healthy again");
    let picked_again = eventually(Duration::from_secs(5), "b1 picked again", || async {
        let counts = count_by_backend(&proxy.send(6).await);
        counts.get("b1").is_some_and(|hits| *hits >= 2)
    })
    .await;
    assert!(picked_again.is_ok(), "the filter picks b1 again");
    assert!(
        proxy.picks(checked).await.unwrap() > picks_before,
        "by the filter's own pick"
    );
}

const TOKEN: &str = "e2e-registry-token-0123456789";

#[tokio::test]
async fn a_registered_instance_failing_its_own_health_check_is_not_picked_until_it_passes_again() {
    let backends = backends(3).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("tokens");
    std::fs::write(&token_file, format!("e2e {TOKEN}\n")).unwrap();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let control_plane = ControlPlane::start_with(
        Config {
            static_file: None,
            poll_interval: Duration::from_millis(100),
            xds_address: any,
            http_address: any,
            debounce: Duration::from_millis(20),
            cluster_options: Default::default(),
            ..Config::default()
        },
        OptionalSources {
            registry: Some(RegistryOptions {
                backend: RegistryBackendOptions::Memory,
                token_file,
                // The instances live on this host: an explicit allowance.
                limits: Limits::allowing(vec!["127.0.0.0/8".parse().expect("range")]),
                grpc_address: any,
            }),
            ..OptionalSources::default()
        },
    )
    .await
    .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    for backend in &backends {
        client
            .post(format!(
                "http://{}/v1/registry/instances",
                control_plane.http_address()
            ))
            .bearer_auth(TOKEN)
            .json(&json!({
                "name": SERVICE, "id": backend.name, "address": "127.0.0.1",
                "port": backend.addr.port(), "ttl_ms": 120_000,
                "health_check": {
                    "http": {"path": "/healthz", "expected_statuses": [200]},
                    "interval_ms": 100, "timeout_ms": 100, "jitter_ms": 10,
                    "healthy_threshold": 2, "unhealthy_threshold": 2
                }
            }))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
    }
    // No policy source: the filter's own round robin, and no policy-driven check.
    let proxy = envoy_with_control_plane(
        control_plane.xds_address(),
        control_plane.http_address(),
        json!({"load_balancer": {"type": "round_robin"}}),
    )
    .await
    .unwrap();
    let all: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    proxy.wait_for_endpoints(&all, PATIENCE).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = count_by_backend(&proxy.send(30).await);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "every instance serves: {counts:?}"
    );

    fails_then_recovers(&control_plane, &proxy, &backends).await;
    control_plane.shutdown().await;
}
