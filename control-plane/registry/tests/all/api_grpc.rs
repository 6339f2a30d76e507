//! The gRPC API over loopback, on the in-memory backend.

use std::time::Duration;

use anyhow::Result;
use fulcrum_proto::registry::v1 as pb;
use fulcrum_registry::Registry;
use tonic::Code;

use crate::support::{ALICE, BOB, authed, grpc_client, loopback, pb_instance, serve};

#[tokio::test]
async fn grpc_register_discover_pick_heartbeat_and_deregister() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let mut client = grpc_client(&served).await?;
    for (id, port, tag) in [("s-1", 1, "gpu"), ("s-2", 2, "cpu"), ("s-3", 3, "gpu")] {
        let mut instance = pb_instance("search", id, port);
        instance.tags = vec![tag.into()];
        instance.capabilities = vec!["tools.search".into()];
        let response = client
            .register(authed(
                pb::RegisterRequest {
                    instance: Some(instance),
                },
                ALICE,
            ))
            .await?
            .into_inner();
        let registration = response.registration.expect("registration");
        assert_eq!(registration.owner, "alice");
        assert_eq!(registration.health, pb::HealthStatus::Unknown as i32);
    }
    let found = client
        .discover(authed(
            pb::DiscoverRequest {
                name: "search".into(),
                tags: vec!["gpu".into()],
                capabilities: vec!["tools.search".into()],
                ..pb::DiscoverRequest::default()
            },
            BOB,
        ))
        .await?
        .into_inner();
    let ids: Vec<String> = found
        .registrations
        .iter()
        .map(|r| r.instance.as_ref().expect("instance").id.clone())
        .collect();
    assert_eq!(ids, ["s-1", "s-3"]);
    let picked = client
        .discover(authed(
            pb::DiscoverRequest {
                name: "search".into(),
                tags: vec!["gpu".into()],
                pick: true,
                ..pb::DiscoverRequest::default()
            },
            BOB,
        ))
        .await?
        .into_inner();
    assert_eq!(picked.registrations.len(), 1);
    let picked_id = &picked.registrations[0]
        .instance
        .as_ref()
        .expect("instance")
        .id;
    assert!(picked_id == "s-1" || picked_id == "s-3", "{picked_id}");

    let heartbeat = client
        .heartbeat(authed(pb::HeartbeatRequest { id: "s-2".into() }, ALICE))
        .await?
        .into_inner();
    assert_eq!(heartbeat.ttl_ms, 30_000);
    client
        .deregister(authed(pb::DeregisterRequest { id: "s-2".into() }, ALICE))
        .await?;
    assert!(served.registry.view().get("s-2").is_none());
    Ok(())
}

#[tokio::test]
async fn grpc_refuses_unauthenticated_and_foreign_calls_and_changes_nothing() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let mut client = grpc_client(&served).await?;
    let unauthenticated = client
        .register(tonic::Request::new(pb::RegisterRequest {
            instance: Some(pb_instance("a", "a-1", 1)),
        }))
        .await
        .expect_err("no token");
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    assert!(served.registry.view().is_empty());

    client
        .register(authed(
            pb::RegisterRequest {
                instance: Some(pb_instance("a", "a-1", 1)),
            },
            ALICE,
        ))
        .await?;
    let foreign = client
        .deregister(authed(pb::DeregisterRequest { id: "a-1".into() }, BOB))
        .await
        .expect_err("bob did not register it");
    assert_eq!(foreign.code(), Code::PermissionDenied);
    assert!(served.registry.view().get("a-1").is_some());
    Ok(())
}

#[tokio::test]
async fn grpc_invalid_argument_names_the_field() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let mut client = grpc_client(&served).await?;
    let mut instance = pb_instance("a", "a-1", 1);
    instance.health_check = Some(pb::HealthCheck {
        kind: Some(pb::health_check::Kind::Http(pb::HttpCheck {
            path: "healthz".into(),
            ..pb::HttpCheck::default()
        })),
        ..pb::HealthCheck::default()
    });
    let error = client
        .register(authed(
            pb::RegisterRequest {
                instance: Some(instance),
            },
            ALICE,
        ))
        .await
        .expect_err("relative path");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("health_check.http.path"),
        "{}",
        error.message()
    );
    assert!(served.registry.view().is_empty());
    Ok(())
}

#[tokio::test]
async fn grpc_discover_with_filters_beyond_a_registrations_bounds_is_invalid_naming_the_field()
-> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let mut client = grpc_client(&served).await?;
    let error = client
        .discover(authed(
            pb::DiscoverRequest {
                name: "a".into(),
                tags: (0..1_000).map(|index| format!("t{index}")).collect(),
                ..pb::DiscoverRequest::default()
            },
            ALICE,
        ))
        .await
        .expect_err("too many tags");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error
            .message()
            .contains("tags: at most 64 entries, got 1000"),
        "{}",
        error.message()
    );
    let error = client
        .discover(authed(
            pb::DiscoverRequest {
                name: "a".into(),
                zone: "z".repeat(100),
                ..pb::DiscoverRequest::default()
            },
            ALICE,
        ))
        .await
        .expect_err("zone too long");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("zone:"), "{}", error.message());
    Ok(())
}

#[tokio::test]
async fn grpc_watch_streams_a_reset_then_each_change() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let mut client = grpc_client(&served).await?;
    client
        .register(authed(
            pb::RegisterRequest {
                instance: Some(pb_instance("a", "a-1", 1)),
            },
            ALICE,
        ))
        .await?;
    let mut stream = client
        .watch(authed(pb::WatchRequest { after: None }, ALICE))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .expect("reset");
    assert!(first.reset);
    assert_eq!(first.changes.len(), 1);
    client
        .register(authed(
            pb::RegisterRequest {
                instance: Some(pb_instance("a", "a-2", 2)),
            },
            ALICE,
        ))
        .await?;
    let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .expect("change");
    assert!(!next.reset);
    assert_eq!(next.changes[0].id, "a-2");
    assert_eq!(next.changes[0].kind, pb::change::Kind::Put as i32);
    Ok(())
}
