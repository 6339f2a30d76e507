//! With two Envoy workers, what must hold for the proxy as a whole: the rate limit admits the
//! configured rate per proxy (its buckets are in shared data, not per worker VM), and a pick
//! Envoy's `override_host` cannot honour is charged to nobody on any worker. Each test also
//! checks that both workers served connections, so it cannot pass on one worker alone.

use std::{net::SocketAddr, time::Duration};

use fulcrum_e2e::{Proxy, SERVICE, backends, count_by_backend, filter_wasm};
use fulcrum_test_support::{Endpoints, FailurePolicy, FilterSetup};
use serde_json::{Value, json};

/// Envoy with two workers whose cluster has `cluster` and whose filter has `filter_endpoints`.
async fn two_worker_proxy(
    cluster: &[SocketAddr],
    filter_endpoints: &[SocketAddr],
    policy: Value,
) -> Proxy {
    let endpoints: Vec<Value> = filter_endpoints
        .iter()
        .map(|address| json!({"address": address.to_string()}))
        .collect();
    Proxy::start_with_workers(
        Endpoints::Static(cluster.to_vec()),
        FilterSetup {
            wasm: filter_wasm().expect("the release filter"),
            config: json!({"endpoints": {SERVICE: endpoints}, "policy": {"default": policy}}),
            failure_policy: FailurePolicy::default(),
        },
        2,
    )
    .await
    .expect("Envoy starts with two workers")
}

async fn assert_both_workers_served(proxy: &Proxy) {
    let per_worker = proxy.connections_per_worker().await.unwrap();
    assert_eq!(per_worker.len(), 2, "{per_worker:?}");
    assert!(
        per_worker.iter().all(|connections| *connections > 0),
        "connections per worker: {per_worker:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_for_the_proxy_within_five_percent() {
    const RATE: f64 = 100.0;
    const BURST: f64 = 20.0;
    let backends = backends(2).await.unwrap();
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let policy = json!({
        "load_balancer": {"type": "round_robin"},
        "rate_limit": {"requests_per_second": RATE, "burst": BURST as u32}
    });
    let proxy = two_worker_proxy(&addresses, &addresses, policy).await;
    // Four times the limit, over 16 connections, for 4 s.
    let replies = proxy
        .offer_load(4.0 * RATE, 16, Duration::from_secs(4))
        .await;
    assert_both_workers_served(&proxy).await;
    let admitted = replies
        .iter()
        .filter(|(_, reply)| reply.status == Some(200))
        .count();
    let limited = replies
        .iter()
        .filter(|(_, reply)| reply.status == Some(429))
        .count();
    assert_eq!(admitted + limited, replies.len(), "only 200s and 429s");
    let window = replies.last().unwrap().0 - replies.first().unwrap().0;
    let expected = BURST + RATE * window.as_secs_f64();
    let error = (admitted as f64 - expected).abs() / expected;
    println!(
        "offered {} in {window:?}: admitted {admitted}, expected {expected:.0}, error {:.2} %",
        replies.len(),
        100.0 * error
    );
    assert!(
        error <= 0.05,
        "admitted {admitted}, expected {expected:.0} (error {:.1} %)",
        100.0 * error
    );
    let counted = proxy
        .envoy
        .stat(&format!(
            "wasmcustom.fulcrum_rate_limited_total.service.{SERVICE}"
        ))
        .await
        .unwrap();
    assert_eq!(counted, Some(limited as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pick_outside_the_routed_cluster_is_charged_to_nobody_on_any_worker() {
    let backends = backends(5).await.unwrap();
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    // The filter knows b5; Envoy's cluster does not (EDS lagging the snapshot, say).
    let (cluster, outside) = (&addresses[..4], addresses[4]);
    let policy = json!({
        "load_balancer": {"type": "round_robin"},
        "outlier_detection": {"consecutive_gateway_errors": 2}
    });
    let proxy = two_worker_proxy(cluster, &addresses, policy).await;
    let replies = proxy.offer_load(200.0, 16, Duration::from_secs(1)).await;
    assert_both_workers_served(&proxy).await;
    let counts = count_by_backend(
        &replies
            .iter()
            .map(|(_, reply)| reply.clone())
            .collect::<Vec<_>>(),
    );
    assert!(
        replies.iter().all(|(_, reply)| reply.status == Some(200)),
        "{counts:?}"
    );
    assert_eq!(
        counts.get("b5"),
        None,
        "b5 is not in the cluster: {counts:?}"
    );
    let picked_outside = proxy.endpoint_stat("picks_total", outside).await.unwrap();
    assert!(
        picked_outside >= 10,
        "round robin picks b5 a fifth of the time"
    );
    let ignored = proxy
        .envoy
        .stat(&format!(
            "wasmcustom.fulcrum_override_ignored_total.service.{SERVICE}"
        ))
        .await
        .unwrap();
    assert_eq!(ignored, Some(picked_outside));
    assert_eq!(
        proxy
            .endpoint_stat("ejections_total", outside)
            .await
            .unwrap(),
        0,
        "b5 never received a request and must not be ejected"
    );
    assert_eq!(
        proxy.endpoint_stat("circuit_open", outside).await.unwrap(),
        0
    );
}
