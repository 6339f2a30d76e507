//! The filter and Envoy fed by fulcrum's control plane: clusters over ADS, snapshots polled.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use fulcrum_control_plane::{Config, ControlPlane, OptionalSources, PolicySource};
use fulcrum_e2e::{Reply, SERVICE, backends, count_by_backend, envoy_with_control_plane};
use fulcrum_test_support::eventually;
use serde_json::json;

fn write_endpoints(path: &Path, addresses: &[SocketAddr]) {
    let endpoints = fulcrum_e2e::endpoints_json(addresses);
    std::fs::write(
        path,
        json!({"services": {SERVICE: {"endpoints": endpoints}}}).to_string(),
    )
    .unwrap();
}

fn config(static_file: &Path, xds: SocketAddr, http: SocketAddr) -> Config {
    Config {
        static_file: Some(static_file.to_path_buf()),
        poll_interval: Duration::from_millis(100),
        xds_address: xds,
        http_address: http,
        debounce: Duration::from_millis(20),
        cluster_options: Default::default(),
        ..Config::default()
    }
}

#[tokio::test]
async fn an_endpoint_added_to_the_source_reaches_envoy_and_the_filter() {
    let backends = backends(3).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    write_endpoints(&file, &[backends[0].addr, backends[1].addr]);
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let control_plane = ControlPlane::start(config(&file, any, any)).await.unwrap();
    let proxy = envoy_with_control_plane(
        control_plane.xds_address(),
        control_plane.http_address(),
        json!({"load_balancer": {"type": "round_robin"}}),
    )
    .await
    .unwrap();
    proxy
        .wait_for_endpoints(
            &[backends[0].addr, backends[1].addr],
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    let all: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    write_endpoints(&file, &all);
    proxy
        .wait_for_endpoints(&all, Duration::from_secs(10))
        .await
        .unwrap();
    // The filter polls every 200 ms; give it two polls after Envoy has the endpoint.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = count_by_backend(&proxy.send(30).await);
    assert_eq!(counts.get("b3"), Some(&10), "{counts:?}");
    control_plane.shutdown().await;
}

#[tokio::test]
async fn restarting_the_control_plane_under_load_fails_no_request() {
    let backends = backends(3).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    let all: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    write_endpoints(&file, &all);
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let control_plane = ControlPlane::start(config(&file, any, any)).await.unwrap();
    let (xds, http) = (control_plane.xds_address(), control_plane.http_address());
    let proxy = Arc::new(
        envoy_with_control_plane(
            xds,
            http,
            json!({"load_balancer": {"type": "least_request"}}),
        )
        .await
        .unwrap(),
    );
    proxy
        .wait_for_endpoints(&all, Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let load = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut replies: Vec<Reply> = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(4);
            while tokio::time::Instant::now() < until && replies.len() < 20_000 {
                replies.push(proxy.send_with(&[]).await);
            }
            replies
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    control_plane.shutdown().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restarted = ControlPlane::start(config(&file, xds, http)).await.unwrap();
    let replies = load.await.unwrap();

    let failed: Vec<&Reply> = replies.iter().filter(|r| r.status != Some(200)).collect();
    assert!(replies.len() > 100, "load ran: {} requests", replies.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        replies.len(),
        &failed[..failed.len().min(5)]
    );
    let counts = count_by_backend(&replies);
    assert_eq!(counts.len(), 3, "every backend kept serving: {counts:?}");
    restarted.shutdown().await;
}

#[tokio::test]
async fn an_invalid_policy_is_rejected_and_the_last_good_one_stays_in_force() {
    let backends = backends(3).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let endpoints_file = dir.path().join("endpoints.yaml");
    let endpoints: Vec<_> = backends
        .iter()
        .map(|b| {
            let tags: Vec<&str> = if b.name == "b3" {
                vec!["canary"]
            } else {
                vec![]
            };
            json!({"address": b.addr.to_string(), "tags": tags})
        })
        .collect();
    std::fs::write(
        &endpoints_file,
        json!({"services": {SERVICE: {"endpoints": endpoints}}}).to_string(),
    )
    .unwrap();
    let policy_file = dir.path().join("policy.yaml");
    let write_policy =
        |policy: serde_json::Value| std::fs::write(&policy_file, policy.to_string()).unwrap();
    write_policy(json!({"services": {SERVICE: {"load_balancer": {"type": "round_robin"}}}}));

    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let control_plane = ControlPlane::start_with(
        config(&endpoints_file, any, any),
        OptionalSources {
            policy: Some(PolicySource::File(policy_file.clone())),
            ..OptionalSources::default()
        },
    )
    .await
    .unwrap();
    let snapshot_url = format!("http://{}/v1/snapshot", control_plane.http_address());
    let proxy = envoy_with_control_plane(
        control_plane.xds_address(),
        control_plane.http_address(),
        json!({"load_balancer": {"type": "weighted_random"}}),
    )
    .await
    .unwrap();
    let all: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    proxy
        .wait_for_endpoints(&all, Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let counts = count_by_backend(&proxy.send(30).await);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "the served round robin policy: {counts:?}"
    );
    let good_version = snapshot_version(&snapshot_url).await;

    write_policy(
        json!({"services": {SERVICE: {"load_balancer": {"type": "round_robin"}, "retry": 9}}}),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        snapshot_version(&snapshot_url).await,
        good_version,
        "an invalid policy must not reach the snapshot"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", control_plane.http_address()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rejected = metrics
        .lines()
        .find(|l| l.starts_with("fulcrum_policy_rejected_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        rejected.is_some_and(|r| r >= 1.0),
        "the rejection is counted:\n{metrics}"
    );
    let counts = count_by_backend(&proxy.send(30).await);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "still round robin: {counts:?}"
    );

    write_policy(
        json!({"services": {SERVICE: {"load_balancer": {"type": "round_robin"}, "endpoint_selector": {"tags": ["canary"]}}}}),
    );
    let only_canary = eventually(Duration::from_secs(5), "only b3 picked", || async {
        count_by_backend(&proxy.send(6).await).get("b3") == Some(&6)
    })
    .await;
    assert!(
        only_canary.is_ok(),
        "the next valid policy (canary only) applies"
    );
    control_plane.shutdown().await;
}

async fn snapshot_version(url: &str) -> String {
    let snapshot: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    snapshot["version"].as_str().unwrap().to_owned()
}
