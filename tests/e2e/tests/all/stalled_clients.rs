//! A client that stalls its request body until Envoy's stream idle timeout, on real Envoy,
//! through both data planes: Envoy answers it with a local 408 and the `SI` response flag,
//! the client's doing, not the endpoint's. A handful of stalled uploads must not eject an
//! endpoint; the same endpoints, silent on whole requests, are ejected.
//!
//! The backends answer after 3 s, the listener's `stream_idle_timeout` is 500 ms. The route's
//! timeout (2 s for the wasm filter's proxy, 1 s for the native one) starts only once the
//! request is whole: a stalled upload idles out first (408, `SI`), a whole request waits for
//! the route's timeout (504, `UT`), as Envoy 1.40 does it.

use std::{net::SocketAddr, time::Duration};

use fulcrum_e2e::{
    Proxy, SERVICE, backends, endpoints_json, filter_wasm,
    native::{Clusters, NativeProxy, Upstream, bootstrap, cluster},
    set_ingress_settings,
};
use fulcrum_example_backend::{Backend, Fault};
use fulcrum_test_support::{Endpoints, FailurePolicy, FilterSetup};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The listener's `stream_idle_timeout`.
const IDLE: Duration = Duration::from_millis(500);

/// Two failures in a row eject an endpoint, at most one of the two at once.
fn policy() -> Value {
    json!({
        "load_balancer": {"type": "round_robin"},
        "outlier_detection": {
            "consecutive_failures": 2,
            "base_ejection_time": "30s",
            "ejection_jitter_percent": 0,
            "max_ejection_percent": 50,
            "panic_threshold_percent": 0
        }
    })
}

fn idle_timeout() -> Value {
    json!({"stream_idle_timeout": format!("{}s", IDLE.as_secs_f64())})
}

/// Two backends answering after 3 s: longer than the idle timeout.
async fn slow_backends() -> Vec<Backend> {
    let backends = backends(2).await.expect("backends start");
    for backend in &backends {
        backend
            .set_fault(Fault {
                latency_ms: 3000,
                ..Fault::default()
            })
            .expect("the fault is set");
    }
    backends
}

/// One request on its own connection: headers announcing a body of 1 KiB, then `sent` bytes
/// of it (all of it ends the request; fewer stall it). Returns the status of Envoy's answer.
async fn request_with_body(listener: SocketAddr, sent: usize) -> Option<u16> {
    let mut stream = TcpStream::connect(listener).await.ok()?;
    let head = format!(
        "GET / HTTP/1.1\r\nhost: {SERVICE}\r\ncontent-length: 1024\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.ok()?;
    stream.write_all(&vec![b'x'; sent]).await.ok()?;
    let mut answer = Vec::new();
    // Envoy answers at the idle timeout; the bound keeps a wrong answer from hanging the test.
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let status = answer.get(9..12)?;
    std::str::from_utf8(status).ok()?.parse().ok()
}

/// Four requests, one after another, each stalled after 100 bytes or sent whole.
async fn four_requests(listener: SocketAddr, whole: bool) -> Vec<Option<u16>> {
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(request_with_body(listener, if whole { 1024 } else { 100 }).await);
    }
    statuses
}

#[tokio::test]
async fn stalled_uploads_eject_no_endpoint_through_the_wasm_filter() {
    let backends = slow_backends().await;
    let addresses: Vec<SocketAddr> = backends.iter().map(|backend| backend.addr).collect();
    let filter = FilterSetup {
        wasm: filter_wasm().expect("the release filter"),
        config: json!({"endpoints": {SERVICE: endpoints_json(&addresses)},
                       "policy": {"default": policy()}}),
        failure_policy: FailurePolicy::default(),
    };
    let proxy = Proxy::start_with_ingress_settings(
        Endpoints::Static(addresses.clone()),
        filter,
        &idle_timeout(),
    )
    .await
    .expect("Envoy starts");
    let ejections = async || {
        let mut total = 0;
        for address in &addresses {
            total += proxy
                .endpoint_stat("ejections_total", *address)
                .await
                .expect("stats");
        }
        total
    };

    let stalled = four_requests(proxy.listener, false).await;
    assert_eq!(stalled, vec![Some(408); 4], "{}", proxy.envoy.log_tail(30));
    assert_eq!(ejections().await, 0, "a stalled client ejected an endpoint");

    let whole = four_requests(proxy.listener, true).await;
    assert_eq!(whole, vec![Some(504); 4], "{}", proxy.envoy.log_tail(30));
    assert_eq!(ejections().await, 1, "endpoints silent on whole requests");
}

#[tokio::test]
async fn stalled_uploads_eject_no_endpoint_through_the_native_module() {
    let backends = slow_backends().await;
    let upstreams: Vec<Upstream> = backends.iter().map(|b| Upstream::at(b.addr)).collect();
    let clusters = [cluster(&upstreams, &policy())];
    let mut bootstrap = bootstrap(Clusters::Static(&clusters), None);
    set_ingress_settings(&mut bootstrap, &idle_timeout()).expect("an ingress listener");
    let proxy = NativeProxy::start(&bootstrap, 1)
        .await
        .expect("Envoy starts with the native module");
    let listener = proxy.envoy.ingress_address().await.expect("the listener");
    let ejections = async || {
        let mut total = 0;
        for backend in &backends {
            total += proxy
                .endpoint_metric("ejections_total", backend.addr)
                .await
                .expect("stats");
        }
        total
    };

    let stalled = four_requests(listener, false).await;
    assert_eq!(stalled, vec![Some(408); 4], "{}", proxy.envoy.log_tail(30));
    assert_eq!(ejections().await, 0, "a stalled client ejected an endpoint");

    let whole = four_requests(listener, true).await;
    assert_eq!(whole, vec![Some(504); 4], "{}", proxy.envoy.log_tail(30));
    assert_eq!(ejections().await, 1, "endpoints silent on whole requests");
}
