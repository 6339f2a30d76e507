//! The sample backend's faults, driven through its admin API over real sockets.

use std::{net::SocketAddr, time::Duration};

use fulcrum_core::OVERRIDE_HEADER;
use fulcrum_example_backend::{Backend, Stats};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// One HTTP/1.1 exchange with `Connection: close`; returns (status, raw response).
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str("content-type: application/json\r\n");
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, response)
}

async fn backend() -> Backend {
    Backend::bind("b1", 0, 0).await.expect("bind")
}

#[tokio::test]
async fn answers_200_naming_itself_by_default() {
    let b = backend().await;
    let (status, response) = exchange(b.addr, "GET", "/anything", &[], "").await;
    assert_eq!(status, 200);
    assert!(response.contains("x-backend: b1"), "{response}");
    assert!(
        response.contains("x-saw-override-header: false"),
        "{response}"
    );
    assert_eq!(
        b.stats(),
        Stats {
            requests: 1,
            ..Stats::default()
        }
    );
}

#[tokio::test]
async fn reports_a_leaked_override_header() {
    let b = backend().await;
    let (_, response) = exchange(b.addr, "GET", "/", &[(OVERRIDE_HEADER, "127.0.0.1:1")], "").await;
    assert!(
        response.contains("x-saw-override-header: true"),
        "{response}"
    );
    assert_eq!(b.stats().saw_override_header, 1);
}

#[tokio::test]
async fn injected_errors_are_set_through_the_admin_api() {
    let b = backend().await;
    let (status, _) = exchange(
        b.admin_addr,
        "PUT",
        "/fault",
        &[],
        r#"{"error_rate":1.0,"error_status":502}"#,
    )
    .await;
    assert_eq!(status, 200);
    for _ in 0..3 {
        assert_eq!(exchange(b.addr, "GET", "/", &[], "").await.0, 502);
    }
    assert_eq!(b.stats().errors, 3);
    let (status, body) = exchange(b.admin_addr, "GET", "/stats", &[], "").await;
    assert_eq!(status, 200);
    assert!(body.contains(r#""errors":3"#), "{body}");
}

#[tokio::test]
async fn rejects_an_out_of_range_fault_and_keeps_the_old_one() {
    let b = backend().await;
    let (status, body) =
        exchange(b.admin_addr, "PUT", "/fault", &[], r#"{"error_rate":1.5}"#).await;
    assert_eq!(status, 400);
    assert!(
        body.contains("error_rate must be within 0.0..=1.0, got 1.5"),
        "{body}"
    );
    assert_eq!(exchange(b.addr, "GET", "/", &[], "").await.0, 200);
}

#[tokio::test]
async fn blackholed_requests_get_no_answer() {
    let b = backend().await;
    exchange(b.admin_addr, "PUT", "/fault", &[], r#"{"blackhole":true}"#).await;
    let held = tokio::time::timeout(
        Duration::from_millis(300),
        exchange(b.addr, "GET", "/", &[], ""),
    )
    .await;
    assert!(held.is_err(), "a black-holed request must not be answered");
    assert_eq!(b.stats().blackholed, 1);
}

#[tokio::test]
async fn health_checks_fail_on_demand_while_traffic_is_served() {
    let b = backend().await;
    assert_eq!(exchange(b.addr, "GET", "/healthz", &[], "").await.0, 200);
    exchange(
        b.admin_addr,
        "PUT",
        "/fault",
        &[],
        r#"{"fail_health_checks":true}"#,
    )
    .await;
    assert_eq!(exchange(b.addr, "GET", "/healthz", &[], "").await.0, 503);
    assert_eq!(exchange(b.addr, "GET", "/", &[], "").await.0, 200);
}

#[tokio::test]
async fn a_stopped_backend_refuses_connections() {
    let b = backend().await;
    let addr = b.addr;
    b.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
}
