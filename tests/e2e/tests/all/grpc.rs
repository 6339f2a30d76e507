//! gRPC through real Envoy: tonic backends behind the HTTP/2 cluster the control plane
//! generates for a `protocol: grpc` service, the filter judging calls by `grpc-status`, and
//! Envoy retrying `UNAVAILABLE` on the next endpoint the filter handed it.

use std::{net::SocketAddr, path::Path, time::Duration};

use fulcrum_control_plane::{Config, ControlPlane};
use fulcrum_e2e::{SERVICE, envoy_with_control_plane_for_grpc};
use fulcrum_example_backend::grpc::{self, GrpcBackend};
use serde_json::json;

/// Calls in the run, and the longest it may take.
const CALLS: usize = 2000;
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// The calls after which the bad endpoint must have been ejected.
const WARM_UP: usize = 200;

fn write_grpc_service(path: &Path, addresses: &[SocketAddr]) {
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|address| json!({"address": address.to_string()}))
        .collect();
    let file = json!({"services": {SERVICE: {"protocol": "grpc", "endpoints": endpoints}}});
    std::fs::write(path, file.to_string()).unwrap();
}

#[tokio::test]
async fn a_grpc_endpoint_failing_30_percent_unavailable_is_ejected_and_retries_hide_its_failures() {
    let mut backends = Vec::new();
    for (index, unavailable_percent) in [0, 0, 0, 30].into_iter().enumerate() {
        let name = format!("g{}", index + 1);
        backends.push(
            GrpcBackend::start(&name, unavailable_percent)
                .await
                .unwrap(),
        );
    }
    let bad = &backends[3];
    let addresses: Vec<SocketAddr> = backends.iter().map(|backend| backend.addr).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    write_grpc_service(&file, &addresses);
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let control_plane = ControlPlane::start(Config {
        static_file: Some(file.clone()),
        poll_interval: Duration::from_millis(100),
        xds_address: any,
        http_address: any,
        debounce: Duration::from_millis(20),
        ..Config::default()
    })
    .await
    .unwrap();
    let policy = json!({
        "load_balancer": {"type": "round_robin"},
        "outlier_detection": {
            "consecutive_failures": 0,
            "failure_rate": {"threshold_percent": 20, "minimum_requests": 20},
            "base_ejection_time": "60s",
            "max_ejection_percent": 25,
        },
        "retry": 2,
    });
    let proxy = envoy_with_control_plane_for_grpc(
        control_plane.xds_address(),
        control_plane.http_address(),
        policy,
    )
    .await
    .unwrap();
    proxy
        .wait_for_endpoints(&addresses, Duration::from_secs(10))
        .await
        .unwrap();
    // The filter polls every 200 ms; give it two polls after Envoy has the endpoints.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut client = grpc::client(proxy.listener).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut failed = Vec::new();
    let mut bad_calls_at_warm_up = 0;
    let mut served = std::collections::BTreeMap::<String, usize>::new();
    let mut calls = 0;
    while calls < CALLS && started.elapsed() < RUN_LIMIT {
        let (backend, code) = grpc::check(&mut client).await;
        if code == tonic::Code::Ok {
            *served.entry(backend.unwrap_or_default()).or_default() += 1;
        } else {
            failed.push((backend, code));
        }
        calls += 1;
        if calls == WARM_UP {
            bad_calls_at_warm_up = bad.calls();
        }
    }
    let elapsed = started.elapsed();
    let received: Vec<u64> = backends.iter().map(GrpcBackend::calls).collect();
    eprintln!(
        "{calls} calls in {elapsed:?}: {} failed {failed:?}; served {served:?}; received by g1..g4 {received:?} ({bad_calls_at_warm_up} on g4 during the first {WARM_UP})",
        failed.len()
    );

    assert_eq!(calls, CALLS, "the run finished within {RUN_LIMIT:?}");
    let success = (calls - failed.len()) as f64 / calls as f64;
    assert!(
        success >= 0.9995,
        "success {:.4}% < 99.95%: {failed:?}",
        success * 100.0
    );
    let bad_served = served.get(&bad.name).copied().unwrap_or_default() as u64;
    assert!(
        bad.calls() > bad_served,
        "the failing endpoint failed some calls ({} received, {bad_served} served) and Envoy's retries hid them",
        bad.calls()
    );
    let fair_share = (CALLS / backends.len()) as u64;
    let bad_after_warm_up = bad.calls() - bad_calls_at_warm_up;
    assert!(
        bad_after_warm_up * 10 < fair_share,
        "the failing endpoint got {bad_after_warm_up} calls after the first {WARM_UP}, not well under a fair {fair_share}: it was not ejected"
    );
    assert!(
        proxy
            .endpoint_stat("ejections_total", bad.addr)
            .await
            .unwrap()
            >= 1,
        "the filter counted the ejection"
    );
    for good in &backends[..3] {
        assert!(
            served.get(&good.name).copied().unwrap_or_default() > CALLS / 5,
            "{} kept its share: {served:?}",
            good.name
        );
    }
    control_plane.shutdown().await;
}

#[tokio::test]
async fn a_grpc_call_needs_the_http2_cluster_the_control_plane_generates() {
    let backend = GrpcBackend::start("g1", 0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    // Without `protocol` the cluster is HTTP/1.1, which a tonic server does not speak.
    let http1 =
        json!({"services": {SERVICE: {"endpoints": [{"address": backend.addr.to_string()}]}}});
    std::fs::write(&file, http1.to_string()).unwrap();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let control_plane = ControlPlane::start(Config {
        static_file: Some(file.clone()),
        poll_interval: Duration::from_millis(100),
        xds_address: any,
        http_address: any,
        debounce: Duration::from_millis(20),
        ..Config::default()
    })
    .await
    .unwrap();
    let proxy = envoy_with_control_plane_for_grpc(
        control_plane.xds_address(),
        control_plane.http_address(),
        json!({"load_balancer": {"type": "round_robin"}}),
    )
    .await
    .unwrap();
    proxy
        .wait_for_endpoints(&[backend.addr], Duration::from_secs(10))
        .await
        .unwrap();
    let mut client = grpc::client(proxy.listener).await.unwrap();
    let (_, over_http1) = grpc::check(&mut client).await;
    assert_ne!(
        over_http1,
        tonic::Code::Ok,
        "a tonic server does not speak HTTP/1.1"
    );

    write_grpc_service(&file, &[backend.addr]);
    let answered = fulcrum_test_support::eventually(
        Duration::from_secs(10),
        "a call over the HTTP/2 cluster",
        || {
            let mut client = client.clone();
            async move {
                let (backend, code) = grpc::check(&mut client).await;
                (code == tonic::Code::Ok).then_some(backend)
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(answered.as_deref(), Some("g1"));
    control_plane.shutdown().await;
}
