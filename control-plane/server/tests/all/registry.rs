//! The self-registration registry inside the control plane, seen from real Envoy: an instance
//! registered over REST with a token reaches Envoy's cluster of its service; deregistration
//! and a lapsed TTL remove it; a call without a valid token changes nothing; gRPC
//! registrations make their service's cluster HTTP/2.

use std::time::{Duration, Instant};

use fulcrum_control_plane::{
    ControlPlane, OptionalSources, RegistryBackendOptions, RegistryOptions, registry::Limits,
};
use fulcrum_test_support::{AdsApi, Bootstrap, Envoy, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{
    PATIENCE, addresses, hosts, http_client, loopback_config, wait_for_hosts, wait_for_protocol,
};

const TOKEN: &str = "registry-test-token-0123456789";

/// A control plane whose only endpoint source is the in-memory registry, and an Envoy on it.
struct RegistryFixture {
    control_plane: ControlPlane,
    envoy: Envoy,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl RegistryFixture {
    async fn start(node_id: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let token_file = dir.path().join("tokens");
        std::fs::write(&token_file, format!("# test tokens\ntester {TOKEN}\n")).expect("tokens");
        let control_plane = ControlPlane::start_with(
            loopback_config(None),
            OptionalSources {
                registry: Some(RegistryOptions {
                    backend: RegistryBackendOptions::Memory,
                    token_file,
                    // The instances live on this host: an explicit allowance.
                    limits: Limits::allowing(vec!["127.0.0.0/8".parse().expect("range")]),
                    grpc_address: "127.0.0.1:0".parse().expect("address"),
                }),
                ..OptionalSources::default()
            },
        )
        .await
        .expect("control plane starts");
        assert!(control_plane.registry_address().is_some());
        let http = http_client();
        let ready = eventually(PATIENCE, "a first snapshot", || async {
            let response = http
                .get(format!("http://{}/readyz", control_plane.http_address()))
                .send()
                .await
                .ok()?;
            response.status().is_success().then_some(())
        })
        .await;
        assert!(ready.is_ok(), "the registry alone yields a first snapshot");
        let bootstrap = Bootstrap::ads(node_id, control_plane.xds_address(), AdsApi::Sotw);
        let envoy = Envoy::start(&bootstrap).await.expect("Envoy starts");
        Self {
            control_plane,
            envoy,
            http,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.control_plane.http_address())
    }

    async fn register(&self, token: Option<&str>, instance: &Value) -> (StatusCode, Value) {
        let mut request = self
            .http
            .post(self.url("/v1/registry/instances"))
            .json(instance);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("register");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn heartbeat(&self, id: &str) -> StatusCode {
        self.http
            .put(self.url(&format!("/v1/registry/instances/{id}/heartbeat")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("heartbeat")
            .status()
    }
}

fn instance(service: &str, id: &str, port: u16, ttl_ms: u32) -> Value {
    json!({
        "name": service, "id": id, "address": "127.0.0.1", "port": port,
        "weight": 3, "zone": "zone-a", "tags": ["canary"], "ttl_ms": ttl_ms,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_instance_reaches_envoy_until_deregistered_and_unauthenticated_calls_change_nothing()
 {
    let fixture = RegistryFixture::start("registry-rest").await;

    // Without a token, and with an unknown one: 401, nothing registered.
    let intruder = instance("checkout", "checkout-intruder", 19301, 30_000);
    let (status, body) = fixture.register(None, &intruder).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "unauthenticated", "{body}");
    let (status, _) = fixture
        .register(Some("not-a-known-token-at-all"), &intruder)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A registration made after the refused ones reaches Envoy; had the refused ones
    // registered anything, it would be there by then too.
    let (status, body) = fixture
        .register(Some(TOKEN), &instance("search", "search-1", 19401, 30_000))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for_hosts(
        &fixture.envoy,
        "search",
        "the registered instance",
        |hosts| addresses(hosts) == ["127.0.0.1:19401"],
    )
    .await;
    assert!(
        hosts(&fixture.envoy, "checkout").await.is_empty(),
        "an unauthenticated register reached Envoy"
    );

    // Registered with the token: in Envoy's cluster of its service, healthy, weighted.
    let (status, body) = fixture
        .register(
            Some(TOKEN),
            &instance("checkout", "checkout-1", 19302, 30_000),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["registration"]["instance"]["id"], "checkout-1",
        "{body}"
    );
    assert_eq!(body["registration"]["owner"], "tester", "{body}");
    let checkout = wait_for_hosts(&fixture.envoy, "checkout", "checkout-1", |hosts| {
        addresses(hosts) == ["127.0.0.1:19302"]
    })
    .await;
    assert_eq!(checkout[0].eds_health_status, "HEALTHY");
    assert_eq!(checkout[0].weight, 3);

    // Deregistration without a token is refused and changes nothing; with it, the
    // instance leaves Envoy while the other service keeps its instance.
    let refused = fixture
        .http
        .delete(fixture.url("/v1/registry/instances/checkout-1"))
        .send()
        .await
        .expect("deregister");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let deregistered = fixture
        .http
        .delete(fixture.url("/v1/registry/instances/checkout-1"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("deregister");
    assert_eq!(deregistered.status(), StatusCode::NO_CONTENT);
    wait_for_hosts(&fixture.envoy, "checkout", "no host", <[_]>::is_empty).await;
    assert_eq!(
        addresses(&hosts(&fixture.envoy, "search").await),
        ["127.0.0.1:19401"]
    );

    // The control plane's /metrics serves the registry's own metrics: both deregistrations
    // above are counted with their codes, and the live instances by service.
    let metrics = fixture
        .http
        .get(fixture.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    for line in [
        r#"fulcrum_registry_requests_total{api="rest",operation="deregister",code="unauthenticated"} 1"#,
        r#"fulcrum_registry_requests_total{api="rest",operation="deregister",code="ok"} 1"#,
        r#"fulcrum_registry_instances{service="search",health="unknown"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from:\n{metrics}"
        );
    }
    fixture.control_plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_stays_in_envoy_while_heartbeating_and_leaves_after_its_ttl() {
    const TTL: Duration = Duration::from_secs(1);
    let fixture = RegistryFixture::start("registry-ttl").await;
    let (status, body) = fixture
        .register(Some(TOKEN), &instance("leased", "leased-1", 19501, 1_000))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for_hosts(
        &fixture.envoy,
        "leased",
        "the registered instance",
        |hosts| addresses(hosts) == ["127.0.0.1:19501"],
    )
    .await;

    // Heartbeats every 250 ms for twice the TTL keep it.
    let heartbeating = Instant::now();
    let mut last_heartbeat = heartbeating;
    while heartbeating.elapsed() < 2 * TTL {
        last_heartbeat = Instant::now();
        assert_eq!(fixture.heartbeat("leased-1").await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        addresses(&hosts(&fixture.envoy, "leased").await),
        ["127.0.0.1:19501"],
        "a heartbeating instance left Envoy"
    );

    // Without heartbeats it leaves Envoy, not before its TTL ran out (the lease was renewed
    // after `last_heartbeat`), and a late heartbeat finds nothing.
    wait_for_hosts(&fixture.envoy, "leased", "no host", <[_]>::is_empty).await;
    let gone_after = last_heartbeat.elapsed();
    assert!(
        gone_after >= TTL,
        "left Envoy {gone_after:?} after the last heartbeat, before its {TTL:?} TTL"
    );
    assert_eq!(fixture.heartbeat("leased-1").await, StatusCode::NOT_FOUND);
    eprintln!("left Envoy {gone_after:?} after the last heartbeat (TTL {TTL:?})");
    fixture.control_plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_registrations_get_an_http2_cluster_and_a_disagreeing_one_is_counted() {
    let fixture = RegistryFixture::start("registry-grpc").await;
    let speaking = |id: &str, port: u16, protocol: &str| {
        let mut registration = instance("payments", id, port, 30_000);
        registration["protocol"] = json!(protocol);
        registration
    };
    for (id, port, protocol) in [
        ("payments-1", 19501, "grpc"),
        ("payments-2", 19502, "http2"),
    ] {
        let (status, body) = fixture
            .register(Some(TOKEN), &speaking(id, port, protocol))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    wait_for_protocol(&fixture.envoy, "payments", "http2_protocol_options").await;

    // A later registration naming HTTP/1.1 loses to the earliest one, and is counted.
    let (status, body) = fixture
        .register(Some(TOKEN), &speaking("payments-3", 19503, "http"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for_hosts(&fixture.envoy, "payments", "three instances", |hosts| {
        hosts.len() == 3
    })
    .await;
    wait_for_protocol(&fixture.envoy, "payments", "http2_protocol_options").await;
    let metrics = fixture
        .http
        .get(fixture.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics.contains("fulcrum_registry_protocol_conflicts 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fulcrum_service_protocol_conflicts 0"),
        "one source: no disagreement between sources\n{metrics}"
    );
    fixture.control_plane.shutdown().await;
}
