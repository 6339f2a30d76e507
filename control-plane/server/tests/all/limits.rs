//! What a client on the network cannot do to the control plane: change state without the
//! admin credentials, hold more requests or streams than the limits allow, or keep a request
//! open past its deadline.

use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use fulcrum_control_plane::{
    Config, ControlPlane, ListenerLimits, OptionalSources, RegistryBackendOptions, RegistryOptions,
};
use reqwest::StatusCode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;

use crate::support::{endpoint, endpoints_file, http_client, loopback_config};

const ADMIN_TOKEN: &str = "admin-test-token-0123456789";

async fn started(config: Config) -> (ControlPlane, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("endpoints.yaml");
    std::fs::write(
        &file,
        endpoints_file(&[("checkout", vec![endpoint("127.0.0.1:19001", "")])]),
    )
    .expect("endpoints");
    let control_plane = ControlPlane::start(Config {
        static_file: Some(file),
        ..config
    })
    .await
    .expect("control plane starts");
    (control_plane, dir)
}

#[tokio::test]
async fn policy_rollback_is_served_on_the_admin_listener_only() {
    let (control_plane, _dir) = started(loopback_config(None)).await;
    let http = http_client();
    let public = http
        .post(format!(
            "http://{}/v1/policy/rollback?version=1",
            control_plane.http_address()
        ))
        .send()
        .await
        .expect("request");
    assert_eq!(
        public.status(),
        StatusCode::NOT_FOUND,
        "the public listener has no state-changing route"
    );
    let admin = http
        .post(format!(
            "http://{}/v1/policy/rollback?version=1",
            control_plane.admin_address()
        ))
        .send()
        .await
        .expect("request");
    assert_eq!(
        admin.status(),
        StatusCode::NOT_FOUND,
        "reached: no policy version 1 is kept"
    );
    assert!(control_plane.admin_address().ip().is_loopback());
    control_plane.shutdown().await;
}

#[tokio::test]
async fn the_admin_api_requires_a_listed_bearer_token_when_tokens_are_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("admin-tokens");
    std::fs::write(&tokens, format!("ops {ADMIN_TOKEN}\n")).expect("tokens");
    let (control_plane, _endpoints) = started(Config {
        admin_token_file: Some(tokens),
        ..loopback_config(None)
    })
    .await;
    let http = http_client();
    let history = format!("http://{}/v1/policy/history", control_plane.admin_address());
    let rollback = format!(
        "http://{}/v1/policy/rollback?version=1",
        control_plane.admin_address()
    );

    let anonymous = http.post(&rollback).send().await.expect("request");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        anonymous
            .headers()
            .get("www-authenticate")
            .and_then(|value| value.to_str().ok()),
        Some("Bearer")
    );
    let wrong = http
        .post(&rollback)
        .bearer_auth("not-the-admin-token-0000")
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let allowed = http
        .get(&history)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("request");
    assert_eq!(allowed.status(), StatusCode::OK);
    let through = http
        .post(&rollback)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("request");
    assert_eq!(
        through.status(),
        StatusCode::NOT_FOUND,
        "past the token check: no policy version 1 is kept"
    );
    control_plane.shutdown().await;
}

#[tokio::test]
async fn an_admin_api_off_loopback_without_tokens_refuses_to_start() {
    let error = ControlPlane::start(Config {
        admin_address: "0.0.0.0:0".parse().expect("address"),
        ..loopback_config(None)
    })
    .await
    .expect_err("an open admin API on every interface");
    let message = format!("{error:#}");
    assert!(message.contains("--admin-token-file"), "{message}");
}

/// A control plane within `limits`, its endpoints file in the returned directory.
async fn started_within(limits: ListenerLimits) -> (ControlPlane, tempfile::TempDir) {
    started(Config {
        limits,
        ..loopback_config(None)
    })
    .await
}

/// A control plane within `limits` serving the in-memory registry, its token file in `dir`
/// (the token `registry-test-token-0123456789`).
async fn with_registry(dir: &tempfile::TempDir, limits: ListenerLimits) -> ControlPlane {
    let token_file = dir.path().join("tokens");
    std::fs::write(&token_file, "tester registry-test-token-0123456789\n").expect("tokens");
    ControlPlane::start_with(
        Config {
            limits,
            ..loopback_config(None)
        },
        OptionalSources {
            registry: Some(RegistryOptions {
                backend: RegistryBackendOptions::Memory,
                token_file,
                limits: fulcrum_control_plane::registry::Limits::default(),
                grpc_address: "127.0.0.1:0".parse().expect("address"),
            }),
            ..OptionalSources::default()
        },
    )
    .await
    .expect("control plane starts")
}

/// Sends the head of a request whose body never comes, holding a request slot open.
async fn stalled_upload(address: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(
            b"POST /v1/registry/instances HTTP/1.1\r\nhost: cp\r\ncontent-type: application/json\r\n\
              authorization: Bearer registry-test-token-0123456789\r\ncontent-length: 100\r\n\r\n{",
        )
        .await
        .expect("write");
    stream
}

/// Reads what the server answers on `stream`, within `within`.
async fn answer(stream: &mut TcpStream, within: Duration) -> String {
    let mut answer = vec![0; 256];
    let read = tokio::time::timeout(within, stream.read(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    String::from_utf8_lossy(&answer[..read]).into_owned()
}

#[tokio::test]
async fn requests_beyond_the_in_flight_cap_are_refused_at_once_stalled_ones_cut_at_the_deadline_and_big_bodies_refused()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let control_plane = with_registry(
        &dir,
        ListenerLimits {
            http_max_in_flight: 2,
            http_request_timeout: Duration::from_secs(1),
            ..ListenerLimits::default()
        },
    )
    .await;
    let address = control_plane.http_address();
    let mut held = [stalled_upload(address).await, stalled_upload(address).await];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let http = http_client();
    let refused = http
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        refused.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "both slots are held by uploads that never finish"
    );
    let probed = http
        .get(format!("http://{address}/healthz"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        probed.status(),
        StatusCode::OK,
        "the liveness probe takes no slot: slow clients cannot get the replica restarted"
    );
    for stalled in &mut held {
        let answer = answer(stalled, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    }
    let served = http
        .get(format!("http://{address}/v1/status"))
        .send()
        .await
        .expect("request");
    assert_eq!(served.status(), StatusCode::OK, "the slots are free again");
    let metrics = http
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    let oversized = http
        .post(format!("http://{address}/v1/registry/instances"))
        .bearer_auth("registry-test-token-0123456789")
        .header("content-type", "application/json")
        .body(vec![
            b' ';
            ListenerLimits::default().http_max_body_bytes + 1
        ])
        .send()
        .await
        .expect("request");
    assert_eq!(oversized.status(), StatusCode::PAYLOAD_TOO_LARGE);
    for series in [
        "fulcrum_http_requests_limited_total{reason=\"in_flight\"} 1",
        "fulcrum_http_requests_limited_total{reason=\"timeout\"} 2",
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
    control_plane.shutdown().await;
}

#[tokio::test]
async fn watch_long_polls_are_served_from_their_own_quarter_of_the_cap_and_leave_the_rest_to_other_requests()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let control_plane = with_registry(
        &dir,
        ListenerLimits {
            // A quarter of 4: one long poll at a time.
            http_max_in_flight: 4,
            ..ListenerLimits::default()
        },
    )
    .await;
    let address = control_plane.http_address();
    let http = http_client();
    let watch = format!("http://{address}/v1/registry/watch");
    // No cursor: answered at once with the current state and a cursor to wait from.
    let first: fulcrum_registry::api::rest::WatchJson = http
        .get(&watch)
        .bearer_auth("registry-test-token-0123456789")
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("a watch answer");
    let waiting_url = format!(
        "{watch}?epoch={}&revision={}&wait_ms=30000",
        first.cursor.epoch, first.cursor.revision
    );
    let waiting = tokio::spawn({
        let (http, url) = (http.clone(), waiting_url.clone());
        async move {
            http.get(url)
                .bearer_auth("registry-test-token-0123456789")
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = http
        .get(&waiting_url)
        .bearer_auth("registry-test-token-0123456789")
        .send()
        .await
        .expect("request");
    assert_eq!(
        second.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the long polls' one slot is taken"
    );
    for path in ["/metrics", "/v1/status", "/healthz"] {
        let served = http
            .get(format!("http://{address}{path}"))
            .send()
            .await
            .expect("request");
        assert_eq!(
            served.status(),
            StatusCode::OK,
            "{path} has slots of its own"
        );
    }
    let metrics = http
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    let series = "fulcrum_http_requests_limited_total{reason=\"long_poll\"} 1";
    assert!(metrics.contains(series), "{series} in {metrics}");
    waiting.abort();
    control_plane.shutdown().await;
}

/// Opens an ADS stream and sends its first request; the stream's answer, or its refusal.
async fn open_ads_stream(
    address: std::net::SocketAddr,
) -> (
    Result<
        tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
        tonic::Status,
    >,
    mpsc::Sender<DiscoveryRequest>,
) {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{address}"))
        .await
        .expect("connect");
    let (requests, receiver) = mpsc::channel(4);
    requests
        .send(DiscoveryRequest {
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".to_owned(),
            ..DiscoveryRequest::default()
        })
        .await
        .expect("queue the first request");
    let stream = client
        .stream_aggregated_resources(ReceiverStream::new(receiver))
        .await
        .map(tonic::Response::into_inner);
    (stream, requests)
}

#[tokio::test]
async fn xds_streams_beyond_the_cap_are_refused_with_resource_exhausted_until_one_closes() {
    let (control_plane, _dir) = started_within(ListenerLimits {
        xds_max_streams: 2,
        ..ListenerLimits::default()
    })
    .await;
    let address = control_plane.xds_address();
    let first = open_ads_stream(address).await;
    let second = open_ads_stream(address).await;
    assert!(first.0.is_ok() && second.0.is_ok());
    let (third, _requests) = open_ads_stream(address).await;
    let refused = third.expect_err("a third stream is over the cap");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");

    drop(first);
    let reopened = fulcrum_test_support::eventually(
        Duration::from_secs(5),
        "a slot freed by the closed stream",
        || async {
            let (stream, requests) = open_ads_stream(address).await;
            stream.ok().map(|stream| (stream, requests))
        },
    )
    .await;
    assert!(reopened.is_ok(), "closing a stream frees its slot");
    control_plane.shutdown().await;
}

#[tokio::test]
async fn an_ads_request_many_times_the_first_request_buffer_is_read_whole_and_one_over_the_limit_ends_the_stream()
 {
    let (control_plane, _dir) = started_within(ListenerLimits {
        grpc_max_message_bytes: 64 * 1024,
        ..ListenerLimits::default()
    })
    .await;
    let address = control_plane.xds_address();
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{address}"))
        .await
        .expect("connect");
    let (requests, receiver) = mpsc::channel(4);
    // 2,000 names, about 30 KiB: the stream's request buffer starts at 1 KiB.
    let names: Vec<String> = (0..2_000)
        .map(|i| format!("outbound|80||svc-{i}"))
        .collect();
    requests
        .send(DiscoveryRequest {
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".to_owned(),
            resource_names: names
                .iter()
                .cloned()
                .chain(["checkout".to_owned()])
                .collect(),
            ..DiscoveryRequest::default()
        })
        .await
        .expect("queue the first request");
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(receiver))
        .await
        .expect("stream")
        .into_inner();
    let answer = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("answered in time")
        .expect("an answer, not an error")
        .expect("not closed");
    assert_eq!(
        answer.resources.len(),
        1,
        "the one subscribed cluster that exists"
    );

    requests
        .send(DiscoveryRequest {
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".to_owned(),
            resource_names: names.iter().map(|name| name.repeat(3)).collect(),
            ..DiscoveryRequest::default()
        })
        .await
        .expect("queue the oversized request");
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        }
    })
    .await
    .expect("ended in time");
    let status = ended.expect_err("a request over the limit ends the stream with an error");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
    control_plane.shutdown().await;
}

/// The control plane's metrics text.
async fn metrics_of(address: std::net::SocketAddr) -> String {
    http_client()
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body")
}

/// Asserts the control plane's metrics hold `series` (a line's start: name, labels, value).
async fn assert_counted(address: std::net::SocketAddr, series: &str) {
    let metrics = metrics_of(address).await;
    assert!(metrics.contains(series), "{series} in {metrics}");
}

/// Asserts snapshot polls are answered while other requests hold their own slots.
async fn snapshot_polls_are_served(address: std::net::SocketAddr) {
    for _ in 0..4 {
        let polled = http_client()
            .get(format!("http://{address}/v1/snapshot"))
            .send()
            .await
            .expect("poll");
        assert_eq!(
            polled.status(),
            StatusCode::OK,
            "snapshot polls keep their slots"
        );
    }
}

/// Whether the server closed `stream` within `within` (a read ends, or fails).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buffer = [0; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // An answer (a 408, say) before the close.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_half_sent_request_head_and_an_idle_connection_are_closed_at_their_deadlines() {
    let (control_plane, _dir) = started_within(ListenerLimits {
        http_header_read_timeout: Duration::from_secs(1),
        http_idle_timeout: Duration::from_secs(2),
        ..ListenerLimits::default()
    })
    .await;
    let address = control_plane.http_address();
    let mut half_sent = TcpStream::connect(address).await.expect("connect");
    half_sent
        .write_all(b"GET /v1/status HTTP/1.1\r\nhost: cp\r\nx-slow: aaaa")
        .await
        .expect("write");
    let mut idle = TcpStream::connect(address).await.expect("connect");
    let mut served = TcpStream::connect(address).await.expect("connect");
    served
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: cp\r\n\r\n")
        .await
        .expect("write");
    let answered = answer(&mut served, Duration::from_secs(5)).await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");

    assert!(
        closed_within(&mut half_sent, Duration::from_secs(5)).await,
        "a head not finished within the header deadline is cut"
    );
    assert!(
        closed_within(&mut idle, Duration::from_secs(6)).await,
        "a connection that sends nothing is closed (stalled, at the idle timeout)"
    );
    assert!(
        closed_within(&mut served, Duration::from_secs(6)).await,
        "an idle keep-alive connection is closed (at the head deadline, which runs while it waits for its next request)"
    );
    let metrics = metrics_of(address).await;
    for series in [
        "fulcrum_http_connections_closed_total{reason=\"header_timeout\"} ",
        "fulcrum_http_connections_closed_total{reason=\"stalled\"} ",
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
    control_plane.shutdown().await;
}

#[tokio::test]
async fn a_listener_holding_its_most_connections_closes_the_next_as_it_is_accepted() {
    let (control_plane, _dir) = started_within(ListenerLimits {
        http_max_connections: 2,
        ..ListenerLimits::default()
    })
    .await;
    let address = control_plane.http_address();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: cp\r\n\r\n")
            .await
            .expect("write");
        let answered = answer(&mut stream, Duration::from_secs(5)).await;
        assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
        held.push(stream);
    }
    let mut third = TcpStream::connect(address).await.expect("connect");
    assert!(
        closed_within(&mut third, Duration::from_secs(5)).await,
        "a third connection is closed as it is accepted"
    );
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = TcpStream::connect(address).await.expect("connect");
    again
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: cp\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut metrics = String::new();
    tokio::time::timeout(Duration::from_secs(5), again.read_to_string(&mut metrics))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(
        metrics.starts_with("HTTP/1.1 200"),
        "a freed place serves again"
    );
    let series = "fulcrum_http_connections_closed_total{reason=\"max_connections\"} 1";
    assert!(metrics.contains(series), "{series} in {metrics}");
    assert!(
        metrics.contains("fulcrum_http_connections 2"),
        "the held connection and this one: {metrics}"
    );
    control_plane.shutdown().await;
}

/// Polls the snapshot as `nodes` proxies with long names, so that `GET /v1/proxies` answers
/// with at least that many rows of a few hundred bytes.
async fn polled_by(address: std::net::SocketAddr, nodes: usize) {
    let http = http_client();
    let snapshot = format!("http://{address}/v1/snapshot");
    let published = tokio::time::Instant::now() + Duration::from_secs(10);
    while !http
        .get(&snapshot)
        .send()
        .await
        .expect("poll")
        .status()
        .is_success()
    {
        assert!(
            tokio::time::Instant::now() < published,
            "no snapshot published"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in 0..nodes {
        let answer = http
            .get(format!("http://{address}/v1/snapshot"))
            .header(
                "x-fulcrum-node-id",
                format!("{node:06}-{}", "n".repeat(240)),
            )
            .header("x-fulcrum-node-cluster", "c".repeat(200))
            .send()
            .await
            .expect("poll");
        assert!(answer.status().is_success(), "{}", answer.status());
    }
}

/// Sends `GET path` over HTTP/2 on a connection that grants the server a flow-control
/// window of one byte: the answer's headers and first byte come, the rest stays unsent in
/// the server for as long as the connection lives (it answers pings: it is not stalled).
async fn unread_request(address: std::net::SocketAddr, path: &str) -> impl Sized {
    let tcp = TcpStream::connect(address).await.expect("connect");
    let (mut client, connection) = h2::client::Builder::new()
        .initial_window_size(1)
        .handshake::<_, axum::body::Bytes>(tcp)
        .await
        .expect("h2c handshake");
    let driver = tokio::spawn(connection);
    let request = axum::http::Request::get(format!("http://{address}{path}"))
        .body(())
        .expect("request");
    let (response, _) = client.send_request(request, true).expect("sent");
    let response = response.await.expect("the answer's head");
    assert_eq!(response.status(), StatusCode::OK);
    // The body is never read, its window never widened.
    (client, response, AbortOnDrop(driver))
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test]
async fn large_answers_clients_do_not_read_hold_at_most_the_answer_budget() {
    let (control_plane, _dir) = started_within(ListenerLimits {
        http_max_answer_bytes: 1 << 20,
        ..ListenerLimits::default()
    })
    .await;
    let address = control_plane.http_address();
    polled_by(address, 1500).await;
    let size = http_client()
        .get(format!("http://{address}/v1/proxies"))
        .send()
        .await
        .expect("request")
        .bytes()
        .await
        .expect("body")
        .len();
    assert!(
        (1 << 19..1 << 20).contains(&size),
        "one answer fits the budget, two do not: {size} bytes"
    );
    let unread = unread_request(address, "/v1/proxies").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = http_client()
        .get(format!("http://{address}/v1/proxies"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        refused.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the unread answer holds more than half the budget"
    );
    let snapshot = http_client()
        .get(format!("http://{address}/v1/snapshot"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        snapshot.status(),
        StatusCode::OK,
        "snapshot answers share one copy and are not held against the budget"
    );
    drop(unread);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let served = http_client()
        .get(format!("http://{address}/v1/proxies"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        served.status(),
        StatusCode::OK,
        "the budget comes back when the reader goes"
    );
    assert_counted(
        address,
        "fulcrum_http_requests_limited_total{reason=\"answer_bytes\"} 1",
    )
    .await;
    control_plane.shutdown().await;
}

#[tokio::test]
async fn endpoint_diagnostics_asks_wait_in_the_long_polls_share_and_leave_snapshot_polls_served() {
    let (control_plane, _dir) = started_within(ListenerLimits {
        // A quarter of 4: one long poll at a time.
        http_max_in_flight: 4,
        ..ListenerLimits::default()
    })
    .await;
    let address = control_plane.http_address();
    polled_by(address, 1).await;
    let node = format!("{:06}-{}", 0, "n".repeat(240));
    let ask = format!("http://{address}/v1/proxies/{node}/endpoints?service=checkout&wait=20");
    let waiting = tokio::spawn({
        let ask = ask.clone();
        async move { http_client().get(ask).send().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = http_client().get(&ask).send().await.expect("request");
    assert_eq!(
        second.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the long polls' one slot is taken by the first ask"
    );
    snapshot_polls_are_served(address).await;
    assert_counted(
        address,
        "fulcrum_http_requests_limited_total{reason=\"long_poll\"} 1",
    )
    .await;
    waiting.abort();
    control_plane.shutdown().await;
}

/// A report of `service` answering request `id`: two workers of `endpoints` endpoints each.
fn diagnostics_report(service: &str, id: u64, endpoints: usize) -> Vec<u8> {
    use fulcrum_core::{
        Health,
        diagnostics::{BreakerKind, DiagnosticsReport, EndpointDiagnostics, WorkerDiagnostics},
    };
    let worker = |slot: u32| WorkerDiagnostics {
        worker: slot,
        version: Some("v1".to_owned()),
        endpoints: (0..endpoints)
            .map(|i| EndpointDiagnostics {
                address: format!("10.1.{}.{}:8080", i / 250, i % 250)
                    .parse()
                    .expect("address"),
                health: Health::Healthy,
                weight: 1,
                breaker: BreakerKind::Closed,
                reason: None,
                ejections: 0,
                readmit_in_ms: None,
                latency_ms: Some(1.5),
                inflight: 0,
                picks: 12,
                consecutive_failures: 0,
                window_requests: 40,
                window_failures: 0,
            })
            .collect(),
        omitted: 0,
    };
    serde_json::to_vec(&DiagnosticsReport {
        service: service.to_owned(),
        request: id,
        workers: vec![worker(0), worker(1)],
    })
    .expect("a report")
}

#[tokio::test]
async fn a_diagnostics_report_over_the_listeners_body_bound_is_taken_up_to_its_own() {
    let (control_plane, _dir) = started(loopback_config(None)).await;
    let address = control_plane.http_address();
    polled_by(address, 1).await;
    let node = format!("{:06}-{}", 0, "n".repeat(240));
    let ask = tokio::spawn({
        let url = format!("http://{address}/v1/proxies/{node}/endpoints?service=checkout&wait=10");
        async move { http_client().get(url).send().await }
    });
    let poll = || {
        http_client()
            .get(format!("http://{address}/v1/snapshot"))
            .header("x-fulcrum-node-id", node.clone())
            .send()
    };
    let asked = tokio::time::Instant::now() + Duration::from_secs(5);
    let id = loop {
        let answer = poll().await.expect("poll");
        if let Some(value) = answer.headers().get("x-fulcrum-diagnose") {
            let value = value.to_str().expect("text").to_owned();
            let (id, service) = value.split_once(' ').expect("id and service");
            assert_eq!(service, "checkout");
            break id.parse::<u64>().expect("an id");
        }
        assert!(tokio::time::Instant::now() < asked, "no request named");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let body = diagnostics_report("checkout", id, 250);
    assert!(
        body.len() > ListenerLimits::default().http_max_body_bytes,
        "over the listener's bound: {} bytes",
        body.len()
    );
    let posted = http_client()
        .post(format!("http://{address}/v1/diagnostics"))
        .header("x-fulcrum-node-id", node.clone())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("post");
    assert_eq!(posted.status(), StatusCode::NO_CONTENT);
    let view = ask
        .await
        .expect("the ask")
        .expect("answered")
        .text()
        .await
        .expect("body");
    assert!(
        view.contains("10.1.0.249:8080"),
        "the operator gets the report: {view}"
    );

    let oversized = http_client()
        .post(format!("http://{address}/v1/diagnostics"))
        .header("x-fulcrum-node-id", node)
        .body(vec![b' '; fulcrum_core::diagnostics::MAX_REPORT_BYTES + 1])
        .send()
        .await
        .expect("post");
    assert_eq!(oversized.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_counted(
        address,
        "fulcrum_http_requests_limited_total{reason=\"body_too_large\"} 1",
    )
    .await;
    control_plane.shutdown().await;
}

#[tokio::test]
async fn report_uploads_that_never_finish_hold_the_large_body_slots_only() {
    let (control_plane, _dir) = started(loopback_config(None)).await;
    let address = control_plane.http_address();
    polled_by(address, 1).await;
    let mut uploads = Vec::new();
    for _ in 0..fulcrum_control_plane::limits::LARGE_BODY_SLOTS {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream
            .write_all(
                b"POST /v1/diagnostics HTTP/1.1\r\nhost: cp\r\nx-fulcrum-node-id: n\r\n\
                  content-type: application/json\r\ncontent-length: 100000\r\n\r\n{",
            )
            .await
            .expect("write");
        uploads.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = http_client()
        .post(format!("http://{address}/v1/diagnostics"))
        .header("x-fulcrum-node-id", "n")
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(
        refused.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "every report slot is held by an upload that never ends"
    );
    snapshot_polls_are_served(address).await;
    assert_counted(
        address,
        "fulcrum_http_requests_limited_total{reason=\"large_body\"} 1",
    )
    .await;
    drop(uploads);
    control_plane.shutdown().await;
}
