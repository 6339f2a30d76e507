//! Active health checks against real servers on loopback: the sample backend (HTTP), a
//! closed port (TCP) and a tonic gRPC health server.

use std::time::Duration;

use anyhow::Result;
use fulcrum_core::Health;
use fulcrum_example_backend::{Backend, Fault};
use fulcrum_registry::{HealthStatus, Registry};
use fulcrum_test_support::eventually;
use tonic_health::ServingStatus;

use crate::support::{ALICE, http, instance, loopback, published, serve};

fn check(kind: serde_json::Value) -> serde_json::Value {
    let mut check = serde_json::json!({
        "interval_ms": 100, "timeout_ms": 100, "jitter_ms": 10,
        "healthy_threshold": 1, "unhealthy_threshold": 2,
    });
    for (key, value) in kind.as_object().expect("object") {
        check[key] = value.clone();
    }
    check
}

#[tokio::test]
async fn a_failing_http_health_check_marks_the_instance_unhealthy_until_it_passes_again()
-> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let backend = Backend::bind("checked", 0, 0).await?;
    let mut body = instance("web", "web-1", backend.addr.port());
    body["health_check"] = check(serde_json::json!({ "http": { "path": "/healthz" } }));
    http()
        .post(format!("{}/v1/registry/instances", served.rest))
        .bearer_auth(ALICE)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let view = served.registry.view().clone();
    eventually(Duration::from_secs(5), "healthy", || async {
        view.get("web-1")
            .is_some_and(|e| e.health == HealthStatus::Healthy)
    })
    .await?;

    backend
        .set_fault(Fault {
            fail_health_checks: true,
            ..Fault::default()
        })
        .map_err(anyhow::Error::msg)?;
    eventually(Duration::from_secs(5), "unhealthy", || async {
        view.get("web-1")
            .is_some_and(|e| e.health == HealthStatus::Unhealthy)
    })
    .await?;
    let port = backend.addr.port();
    eventually(Duration::from_secs(5), "published unhealthy", || async {
        published(&served, "web") == [(port, Health::Unhealthy)]
    })
    .await?;
    let serving = http()
        .get(format!(
            "{}/v1/registry/services/web/instances",
            served.rest
        ))
        .bearer_auth(ALICE)
        .send()
        .await?
        .json::<serde_json::Value>()
        .await?;
    assert_eq!(
        serving["registrations"],
        serde_json::json!([]),
        "unhealthy is not discovered by default"
    );

    backend
        .set_fault(Fault::default())
        .map_err(anyhow::Error::msg)?;
    eventually(Duration::from_secs(5), "healthy again", || async {
        published(&served, "web") == [(port, Health::Healthy)]
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_tcp_check_of_a_closed_port_marks_the_instance_unhealthy() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut body = instance("db", "db-1", closed);
    body["health_check"] = check(serde_json::json!({ "tcp": {} }));
    http()
        .post(format!("{}/v1/registry/instances", served.rest))
        .bearer_auth(ALICE)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let view = served.registry.view().clone();
    eventually(Duration::from_secs(5), "unhealthy", || async {
        view.get("db-1")
            .is_some_and(|e| e.health == HealthStatus::Unhealthy)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_grpc_health_check_follows_the_servers_serving_status() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("model.v1.Chat", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut body = instance("chat", "chat-1", port);
    body["protocol"] = serde_json::json!("grpc");
    body["health_check"] = check(serde_json::json!({ "grpc": { "service": "model.v1.Chat" } }));
    http()
        .post(format!("{}/v1/registry/instances", served.rest))
        .bearer_auth(ALICE)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let view = served.registry.view().clone();
    eventually(Duration::from_secs(5), "healthy", || async {
        view.get("chat-1")
            .is_some_and(|e| e.health == HealthStatus::Healthy)
    })
    .await?;
    reporter
        .set_service_status("model.v1.Chat", ServingStatus::NotServing)
        .await;
    eventually(Duration::from_secs(5), "unhealthy", || async {
        view.get("chat-1")
            .is_some_and(|e| e.health == HealthStatus::Unhealthy)
    })
    .await?;
    server.abort();
    Ok(())
}
