//! The filter alone: endpoints listed in its configuration and in a static cluster.

use std::time::Duration;

use fulcrum_core::OVERRIDE_HEADER;
use fulcrum_e2e::{backends, count_by_backend, envoy_with_static_endpoints};
use fulcrum_example_backend::Fault;
use fulcrum_test_support::Endpoints;
use serde_json::json;

#[tokio::test]
async fn smooth_weighted_round_robin_spreads_exactly_by_weight() {
    let backends = backends(3).await.unwrap();
    let proxy = {
        let addresses: Vec<_> = backends.iter().map(|b| b.addr).collect();
        let endpoints: Vec<_> = addresses
            .iter()
            .zip([1, 2, 3])
            .map(|(a, w)| json!({"address": a.to_string(), "weight": w}))
            .collect();
        let config = json!({
            "endpoints": {fulcrum_e2e::SERVICE: endpoints},
            "policy": {"default": {"load_balancer": {"type": "weighted_round_robin"}}}
        });
        fulcrum_e2e::Proxy::start_for_test(Endpoints::Static(addresses), config)
            .await
            .unwrap()
    };
    let counts = count_by_backend(&proxy.send(60).await);
    assert_eq!(counts.get("b1"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("b2"), Some(&20), "{counts:?}");
    assert_eq!(counts.get("b3"), Some(&30), "{counts:?}");
    for backend in &backends {
        assert_eq!(
            backend.stats().saw_override_header,
            0,
            "Envoy must strip the header before {}",
            backend.name
        );
    }
}

#[tokio::test]
async fn a_client_supplied_override_header_has_no_effect() {
    let backends = backends(3).await.unwrap();
    let proxy =
        envoy_with_static_endpoints(&backends, json!({"load_balancer": {"type": "round_robin"}}))
            .await
            .unwrap();
    let steer = backends[0].addr.to_string();
    let mut replies = Vec::new();
    for _ in 0..12 {
        replies.push(proxy.send_with(&[(OVERRIDE_HEADER, steer.as_str())]).await);
    }
    let counts = count_by_backend(&replies);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [4, 4, 4],
        "{counts:?}"
    );
    let stripped = proxy
        .envoy
        .stat("wasmcustom.fulcrum_override_header_stripped_total")
        .await
        .unwrap();
    assert_eq!(stripped, Some(12));
    assert!(backends.iter().all(|b| b.stats().saw_override_header == 0));
}

#[tokio::test]
async fn an_erroring_backend_is_ejected_then_readmitted_through_half_open() {
    let backends = backends(3).await.unwrap();
    let policy = json!({
        "load_balancer": {"type": "round_robin"},
        "outlier_detection": {
            "consecutive_failures": 3,
            "base_ejection_time": "1s",
            "ejection_jitter_percent": 0,
            "max_ejection_percent": 50
        }
    });
    let proxy = envoy_with_static_endpoints(&backends, policy)
        .await
        .unwrap();
    backends[0]
        .set_fault(Fault {
            error_rate: 1.0,
            ..Fault::default()
        })
        .unwrap();

    let warm_up = proxy.send(12).await;
    let failures = warm_up.iter().filter(|r| r.status == Some(503)).count();
    assert_eq!(failures, 3, "three failures eject b1: {warm_up:?}");
    let ejected = count_by_backend(&proxy.send(20).await);
    assert_eq!(
        ejected.get("b1"),
        None,
        "an ejected endpoint gets nothing: {ejected:?}"
    );
    assert_eq!(
        proxy
            .endpoint_stat("ejections_total", backends[0].addr)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        proxy
            .endpoint_stat("circuit_open", backends[0].addr)
            .await
            .unwrap(),
        1
    );

    backends[0].set_fault(Fault::default()).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let readmitted = count_by_backend(&proxy.send(30).await);
    assert!(
        readmitted.get("b1").copied().unwrap_or(0) >= 9,
        "a recovered endpoint is probed and closed again: {readmitted:?}"
    );
    assert_eq!(
        proxy
            .endpoint_stat("circuit_open", backends[0].addr)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn an_explained_pick_counts_an_ejected_backend_among_the_excluded() {
    let backends = backends(3).await.unwrap();
    let addresses: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let endpoints = fulcrum_e2e::endpoints_json(&addresses);
    let config = json!({
        "endpoints": {fulcrum_e2e::SERVICE: endpoints},
        "explain_picks": "always",
        "policy": {"default": {
            "load_balancer": {"type": "round_robin"},
            "outlier_detection": {
                "consecutive_failures": 3,
                "base_ejection_time": "30s",
                "ejection_jitter_percent": 0,
                "max_ejection_percent": 50
            }
        }}
    });
    let proxy = fulcrum_e2e::Proxy::start_for_test(Endpoints::Static(addresses), config)
        .await
        .unwrap();
    let address_of = |reply: &fulcrum_e2e::Reply| {
        let name = reply.backend.as_deref().expect("a backend answered");
        let backend = backends.iter().find(|b| b.name == name).expect("a backend");
        backend.addr
    };
    let before = proxy.send_with(&[]).await;
    assert_eq!(
        before.explanation,
        Some(format!(
            "endpoint={}; algorithm=round_robin; via=algorithm; candidates=3 of 3; \
             excluded=none; panic=no; estimate_ms=-; inflight=0; breaker=closed; retry=none",
            address_of(&before)
        ))
    );

    backends[0]
        .set_fault(Fault {
            error_rate: 1.0,
            ..Fault::default()
        })
        .unwrap();
    let warm_up = proxy.send(12).await;
    assert_eq!(
        warm_up.iter().filter(|r| r.status == Some(503)).count(),
        3,
        "three failures eject b1: {warm_up:?}"
    );
    for reply in proxy.send(4).await {
        let explanation = reply
            .explanation
            .clone()
            .expect("every response is explained");
        let expected = format!(
            "endpoint={}; algorithm=round_robin; via=algorithm; candidates=2 of 3; \
             excluded=ejected:1; panic=no; ",
            address_of(&reply)
        );
        assert!(explanation.starts_with(&expected), "{explanation}");
        assert!(
            !explanation.contains(&backends[0].addr.to_string()),
            "the ejected endpoint is neither picked nor a retry target: {explanation}"
        );
    }
}

#[tokio::test]
async fn peak_ewma_keeps_traffic_away_from_a_slow_backend() {
    let backends = backends(3).await.unwrap();
    let proxy =
        envoy_with_static_endpoints(&backends, json!({"load_balancer": {"type": "peak_ewma"}}))
            .await
            .unwrap();
    backends[0]
        .set_fault(Fault {
            latency_ms: 150,
            ..Fault::default()
        })
        .unwrap();
    let counts = count_by_backend(&proxy.send(60).await);
    let slow = counts.get("b1").copied().unwrap_or(0);
    assert!(
        slow <= 3,
        "the slow backend is tried, then avoided: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 60);
}

#[tokio::test]
async fn a_killed_backend_stops_getting_traffic_and_no_request_fails() {
    let mut backends = backends(3).await.unwrap();
    let policy = json!({
        "load_balancer": {"type": "round_robin"},
        "retry": 2,
        "outlier_detection": {"consecutive_failures": 3, "max_ejection_percent": 50}
    });
    let proxy = envoy_with_static_endpoints(&backends, policy)
        .await
        .unwrap();
    assert_eq!(count_by_backend(&proxy.send(6).await).len(), 3);
    let killed = backends.remove(0);
    let killed_addr = killed.addr;
    killed.stop();
    let picks_before = proxy.picks(killed_addr).await.unwrap();

    let replies = proxy.send(30).await;
    assert!(
        replies.iter().all(|r| r.status == Some(200)),
        "retry targets absorb the connect failures: {replies:?}"
    );
    let picks = proxy.picks(killed_addr).await.unwrap() - picks_before;
    assert_eq!(
        picks, 3,
        "picked until three connect failures eject it, then never"
    );
    assert_eq!(
        proxy
            .endpoint_stat("ejections_total", killed_addr)
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn the_service_can_be_the_cluster_of_the_resolved_route() {
    let backends = backends(2).await.unwrap();
    let addresses: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let endpoints = fulcrum_e2e::endpoints_json(&addresses);
    let config = json!({
        "service": {"from": "route_cluster"},
        "endpoints": {fulcrum_e2e::SERVICE: endpoints},
        "policy": {"default": {"load_balancer": {"type": "round_robin"}}}
    });
    let proxy = fulcrum_e2e::Proxy::start_for_test(Endpoints::Static(addresses.clone()), config)
        .await
        .unwrap();
    for _ in 0..4 {
        let reply = proxy.send_with(&[("host", "not-the-cluster-name")]).await;
        assert_eq!(reply.status, Some(200));
    }
    for address in addresses {
        assert_eq!(proxy.picks(address).await.unwrap(), 2);
    }
}

#[tokio::test]
async fn the_rate_limit_answers_429_once_the_burst_is_spent() {
    let backends = backends(2).await.unwrap();
    let policy = json!({
        "load_balancer": {"type": "round_robin"},
        "rate_limit": {"requests_per_second": 0.5, "burst": 3}
    });
    let proxy = envoy_with_static_endpoints(&backends, policy)
        .await
        .unwrap();
    let statuses: Vec<Option<u16>> = proxy.send(5).await.into_iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [Some(200), Some(200), Some(200), Some(429), Some(429)]
    );
    let limited = proxy
        .envoy
        .stat(&format!(
            "wasmcustom.fulcrum_rate_limited_total.service.{}",
            fulcrum_e2e::SERVICE
        ))
        .await
        .unwrap();
    assert_eq!(limited, Some(2));
    assert_eq!(backends.iter().map(|b| b.stats().requests).sum::<u64>(), 3);
}

async fn all_unhealthy_proxy(
    backends: &[fulcrum_example_backend::Backend],
    on_no_endpoint: &str,
) -> fulcrum_e2e::Proxy {
    let addresses: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|a| json!({"address": a.to_string(), "health": "unhealthy"}))
        .collect();
    let config = json!({
        "endpoints": {fulcrum_e2e::SERVICE: endpoints},
        "policy": {"default": {"on_no_endpoint": on_no_endpoint}}
    });
    fulcrum_e2e::Proxy::start_for_test(Endpoints::Static(addresses), config)
        .await
        .unwrap()
}

#[tokio::test]
async fn with_no_admissible_endpoint_fail_fast_answers_503_without_calling_upstream() {
    let backends = backends(2).await.unwrap();
    let proxy = all_unhealthy_proxy(&backends, "fail_fast").await;
    let replies = proxy.send(4).await;
    assert!(
        replies
            .iter()
            .all(|r| r.status == Some(503) && r.backend.is_none()),
        "{replies:?}"
    );
    let fail_fast = proxy
        .envoy
        .stat(&format!(
            "wasmcustom.fulcrum_fail_fast_total.service.{}",
            fulcrum_e2e::SERVICE
        ))
        .await
        .unwrap();
    assert_eq!(fail_fast, Some(4));
    assert_eq!(backends.iter().map(|b| b.stats().requests).sum::<u64>(), 0);
}

#[tokio::test]
async fn with_no_admissible_endpoint_fail_open_leaves_the_pick_to_envoys_fallback() {
    let backends = backends(2).await.unwrap();
    let proxy = all_unhealthy_proxy(&backends, "fail_open").await;
    let replies = proxy.send(4).await;
    assert!(
        replies
            .iter()
            .all(|r| r.status == Some(200) && r.backend.is_some()),
        "{replies:?}"
    );
    let fail_open = proxy
        .envoy
        .stat("wasmcustom.fulcrum_fail_open_total.reason.no_endpoints")
        .await
        .unwrap();
    assert_eq!(fail_open, Some(4));
}
