//! The registry's Prometheus metrics, read from the text exposition after real REST and
//! gRPC calls over loopback (in-memory backend): calls per face, operation and code, their
//! latency histogram, the live-instances gauge following registrations, removals, expiry
//! and health, and service label values bounded however many services clients register.

use std::time::Duration;

use anyhow::{Context, Result};
use fulcrum_proto::registry::v1 as pb;
use fulcrum_registry::{Limits, Registry};
use fulcrum_test_support::eventually;
use reqwest::StatusCode;
use tonic::Code;

use crate::support::{
    ALICE, BOB, authed, grpc_client, http, instance, loopback, pb_instance, post_instance, scrape,
    serve, value,
};

fn requests(text: &str, api: &str, operation: &str, code: &str) -> Option<f64> {
    value(
        text,
        &format!(
            "fulcrum_registry_requests_total{{api=\"{api}\",operation=\"{operation}\",code=\"{code}\"}}"
        ),
    )
}

fn observed(text: &str, api: &str, operation: &str) -> Option<f64> {
    value(
        text,
        &format!(
            "fulcrum_registry_request_duration_seconds_count{{api=\"{api}\",operation=\"{operation}\"}}"
        ),
    )
}

fn instances(text: &str, service: &str, health: &str) -> Option<f64> {
    value(
        text,
        &format!("fulcrum_registry_instances{{service=\"{service}\",health=\"{health}\"}}"),
    )
}

#[tokio::test]
async fn rest_calls_are_counted_by_operation_and_code_with_their_latency() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let client = http();
    let register = format!("{}/v1/registry/instances", served.rest);
    for (id, port) in [("checkout-1", 8081), ("checkout-2", 8082)] {
        client
            .post(&register)
            .bearer_auth(ALICE)
            .json(&instance("checkout", id, port))
            .send()
            .await?
            .error_for_status()?;
    }
    let invalid = client
        .post(&register)
        .bearer_auth(ALICE)
        .json(&instance("checkout", "checkout-3", 0))
        .send()
        .await?;
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
    let unauthenticated = client
        .post(&register)
        .json(&instance("checkout", "checkout-4", 8084))
        .send()
        .await?;
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);
    let foreign = client
        .put(format!(
            "{}/v1/registry/instances/checkout-1/heartbeat",
            served.rest
        ))
        .bearer_auth(BOB)
        .send()
        .await?;
    assert_eq!(foreign.status(), StatusCode::FORBIDDEN);
    let unknown = client
        .delete(format!("{}/v1/registry/instances/nobody", served.rest))
        .bearer_auth(ALICE)
        .send()
        .await?;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    client
        .get(format!(
            "{}/v1/registry/services/checkout/instances",
            served.rest
        ))
        .bearer_auth(BOB)
        .send()
        .await?
        .error_for_status()?;
    client
        .get(format!("{}/v1/registry/watch?wait_ms=0", served.rest))
        .bearer_auth(BOB)
        .send()
        .await?
        .error_for_status()?;

    let text = scrape(&served)?;
    assert_eq!(
        requests(&text, "rest", "register", "ok"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        requests(&text, "rest", "register", "invalid_argument"),
        Some(1.0)
    );
    assert_eq!(
        requests(&text, "rest", "register", "unauthenticated"),
        Some(1.0)
    );
    assert_eq!(
        requests(&text, "rest", "heartbeat", "permission_denied"),
        Some(1.0)
    );
    assert_eq!(
        requests(&text, "rest", "deregister", "not_found"),
        Some(1.0)
    );
    assert_eq!(requests(&text, "rest", "discover", "ok"), Some(1.0));
    assert_eq!(requests(&text, "rest", "watch", "ok"), Some(1.0));
    assert_eq!(observed(&text, "rest", "register"), Some(4.0));
    assert_eq!(observed(&text, "rest", "discover"), Some(1.0));
    assert_eq!(requests(&text, "grpc", "register", "ok"), None);
    // The 50 ms bucket boundary exists, for a "discovery p99 above 50 ms" alert.
    assert!(
        text.contains(
            "fulcrum_registry_request_duration_seconds_bucket{le=\"0.05\",api=\"rest\",operation=\"discover\"}"
        ),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn grpc_calls_are_counted_and_a_watch_once_when_it_opens() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let mut client = grpc_client(&served).await?;
    client
        .register(authed(
            pb::RegisterRequest {
                instance: Some(pb_instance("search", "s-1", 1)),
            },
            ALICE,
        ))
        .await?;
    let invalid = client
        .register(authed(
            pb::RegisterRequest {
                instance: Some(pb_instance("search", "s-2", 0)),
            },
            ALICE,
        ))
        .await
        .expect_err("port 0");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let missing = client
        .register(authed(pb::RegisterRequest { instance: None }, ALICE))
        .await
        .expect_err("no instance");
    assert_eq!(missing.code(), Code::InvalidArgument);
    let unauthenticated = client
        .discover(tonic::Request::new(pb::DiscoverRequest {
            name: "search".into(),
            ..pb::DiscoverRequest::default()
        }))
        .await
        .expect_err("no token");
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    client
        .heartbeat(authed(pb::HeartbeatRequest { id: "s-1".into() }, ALICE))
        .await?;
    client
        .discover(authed(
            pb::DiscoverRequest {
                name: "search".into(),
                ..pb::DiscoverRequest::default()
            },
            BOB,
        ))
        .await?;
    let mut stream = client
        .watch(authed(pb::WatchRequest { after: None }, BOB))
        .await?
        .into_inner();
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .context("the watch's first answer")?;
    client
        .register(authed(
            pb::RegisterRequest {
                instance: Some(pb_instance("search", "s-3", 3)),
            },
            ALICE,
        ))
        .await?;
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .context("the watch's second answer")?;

    let text = scrape(&served)?;
    assert_eq!(
        requests(&text, "grpc", "register", "ok"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        requests(&text, "grpc", "register", "invalid_argument"),
        Some(2.0)
    );
    assert_eq!(
        requests(&text, "grpc", "discover", "unauthenticated"),
        Some(1.0)
    );
    assert_eq!(requests(&text, "grpc", "discover", "ok"), Some(1.0));
    assert_eq!(requests(&text, "grpc", "heartbeat", "ok"), Some(1.0));
    // Two answers on the stream, one count.
    assert_eq!(requests(&text, "grpc", "watch", "ok"), Some(1.0));
    assert_eq!(observed(&text, "grpc", "watch"), Some(1.0));
    assert_eq!(observed(&text, "grpc", "register"), Some(4.0));
    assert_eq!(observed(&text, "grpc", "discover"), Some(2.0));
    Ok(())
}

#[tokio::test]
async fn the_instances_gauge_follows_registrations_removals_expiry_and_health() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let client = http();
    let register = format!("{}/v1/registry/instances", served.rest);
    for (id, port) in [("checkout-1", 8081), ("checkout-2", 8082)] {
        client
            .post(&register)
            .bearer_auth(ALICE)
            .json(&instance("checkout", id, port))
            .send()
            .await?
            .error_for_status()?;
    }
    let gauge = |service: &'static str, health: &'static str| {
        let text = scrape(&served).expect("encodes");
        instances(&text, service, health)
    };
    eventually(
        Duration::from_secs(5),
        "two unknown checkout instances",
        || std::future::ready(gauge("checkout", "unknown") == Some(2.0)),
    )
    .await?;

    client
        .delete(format!("{}/v1/registry/instances/checkout-2", served.rest))
        .bearer_auth(ALICE)
        .send()
        .await?
        .error_for_status()?;
    eventually(Duration::from_secs(5), "one checkout instance left", || {
        std::future::ready(gauge("checkout", "unknown") == Some(1.0))
    })
    .await?;

    // Nothing listens on port 9 of 127.0.0.1: one failed TCP probe makes it unhealthy.
    let mut probed = instance("payments", "payments-1", 9);
    probed["health_check"] = serde_json::json!({
        "tcp": {}, "interval_ms": 100, "timeout_ms": 50, "unhealthy_threshold": 1
    });
    client
        .post(&register)
        .bearer_auth(ALICE)
        .json(&probed)
        .send()
        .await?
        .error_for_status()?;
    eventually(
        Duration::from_secs(5),
        "payments-1 counted unhealthy",
        || {
            std::future::ready(
                gauge("payments", "unhealthy") == Some(1.0)
                    && gauge("payments", "unknown").is_none(),
            )
        },
    )
    .await?;

    // An instance whose heartbeats never come expires, and its series goes with it.
    let mut short = instance("checkout", "checkout-3", 8083);
    short["ttl_ms"] = serde_json::json!(1000);
    client
        .post(&register)
        .bearer_auth(ALICE)
        .json(&short)
        .send()
        .await?
        .error_for_status()?;
    eventually(Duration::from_secs(5), "checkout-3 counted", || {
        std::future::ready(gauge("checkout", "unknown") == Some(2.0))
    })
    .await?;
    eventually(Duration::from_secs(5), "checkout-3 expired", || {
        std::future::ready(gauge("checkout", "unknown") == Some(1.0))
    })
    .await?;
    client
        .delete(format!("{}/v1/registry/instances/checkout-1", served.rest))
        .bearer_auth(ALICE)
        .send()
        .await?
        .error_for_status()?;
    eventually(Duration::from_secs(5), "no checkout series left", || {
        std::future::ready(gauge("checkout", "unknown").is_none())
    })
    .await?;
    Ok(())
}

/// The distinct `service` label values of `metric`'s series in `text`.
fn services(text: &str, metric: &str, label: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|line| {
            line.strip_prefix(metric)?
                .split_once(&format!("{label}=\""))?
                .1
                .split_once('"')
        })
        .map(|(service, _)| service.to_owned())
        .collect()
}

#[tokio::test]
async fn service_label_values_stay_bounded_however_many_services_clients_register() -> Result<()> {
    let limits = Limits {
        max_service_series: 3,
        ..loopback()
    };
    let served = serve(Registry::in_memory(limits)).await?;
    for index in 0..10 {
        let mut body = instance(&format!("svc-{index}"), &format!("i-{index}"), 8080);
        body["address"] = serde_json::json!(format!("10.0.0.{index}"));
        post_instance(&served, ALICE, &body)
            .await?
            .error_for_status()?;
    }
    eventually(Duration::from_secs(5), "ten instances counted", || {
        let text = scrape(&served).expect("encodes");
        std::future::ready(
            instances(&text, "(other)", "unknown") == Some(7.0)
                && services(&text, "fulcrum_registry_instances{", "service").len() == 4,
        )
    })
    .await?;
    let text = scrape(&served)?;
    assert_eq!(
        services(&text, "fulcrum_registry_instances{", "service"),
        ["(other)", "svc-0", "svc-1", "svc-2"]
            .map(String::from)
            .into()
    );

    // The registry's health checks count under the same labels.
    let a = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let b = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    for (service, listener) in [("svc-1", &a), ("checked-late", &b)] {
        let mut body = instance(
            service,
            &format!("{service}-probed"),
            listener.local_addr()?.port(),
        );
        body["health_check"] = serde_json::json!({ "tcp": {}, "interval_ms": 100 });
        post_instance(&served, ALICE, &body)
            .await?
            .error_for_status()?;
    }
    let health = || {
        let mut registry = prometheus_client::registry::Registry::default();
        fulcrum_health::HealthMetrics::global().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        services(&text, "fulcrum_health_checks_total{", "cluster")
    };
    // Only this test names more services than its registry's series cap.
    eventually(Duration::from_secs(5), "both probed", || {
        let labels = health();
        std::future::ready(labels.contains("svc-1") && labels.contains("(other)"))
    })
    .await?;
    assert!(!health().contains("checked-late"), "{:?}", health());
    Ok(())
}
