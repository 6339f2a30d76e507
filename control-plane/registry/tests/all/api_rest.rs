//! The REST API over loopback, on the in-memory backend.

use std::time::Duration;

use anyhow::Result;
use fulcrum_core::Health;
use fulcrum_registry::{
    Registry,
    api::rest::{DiscoverJson, ErrorJson, RegisterJson, WatchJson},
};
use fulcrum_test_support::eventually;
use reqwest::StatusCode;

use crate::support::{ALICE, BOB, http, instance, loopback, published, serve};

#[tokio::test]
async fn a_registered_instance_is_discoverable_and_published_to_the_snapshot() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let mut body = instance("checkout", "checkout-1", 8081);
    body["tags"] = serde_json::json!(["canary"]);
    body["capabilities"] = serde_json::json!(["llm.chat"]);
    body["metadata"] = serde_json::json!({ "version": "v2" });
    body["zone"] = serde_json::json!("zone-a");
    body["weight"] = serde_json::json!(3);
    let response = http()
        .post(format!("{}/v1/registry/instances", served.rest))
        .bearer_auth(ALICE)
        .json(&body)
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let registered: RegisterJson = response.json().await?;
    assert_eq!(registered.registration.owner, "alice");
    assert_eq!(registered.registration.ttl_ms, 30_000);
    http()
        .post(format!("{}/v1/registry/instances", served.rest))
        .bearer_auth(ALICE)
        .json(&instance("checkout", "checkout-2", 8082))
        .send()
        .await?
        .error_for_status()?;

    let found: DiscoverJson = http()
        .get(format!(
            "{}/v1/registry/services/checkout/instances?tags=canary&capabilities=llm.chat&metadata.version=v2&zone=zone-a",
            served.rest
        ))
        .bearer_auth(BOB)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let ids: Vec<&str> = found
        .registrations
        .iter()
        .map(|r| r.instance.id.as_str())
        .collect();
    assert_eq!(ids, ["checkout-1"]);

    let picked: DiscoverJson = http()
        .get(format!(
            "{}/v1/registry/services/checkout/instances?pick=true",
            served.rest
        ))
        .bearer_auth(BOB)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(picked.registrations.len(), 1);

    eventually(
        Duration::from_secs(5),
        "both endpoints in the snapshot",
        || async {
            published(&served, "checkout") == [(8081, Health::Healthy), (8082, Health::Healthy)]
        },
    )
    .await?;
    let snapshot = served.snapshots.borrow().clone().expect("snapshot");
    let endpoint = &snapshot.services["checkout"].endpoints[0];
    assert_eq!(endpoint.weight, 3);
    assert_eq!(endpoint.zone(), Some("zone-a"));
    assert!(endpoint.tags().contains("canary"));
    Ok(())
}

#[tokio::test]
async fn an_unauthenticated_request_gets_401_and_changes_nothing() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let url = format!("{}/v1/registry/instances", served.rest);
    let missing = http()
        .post(&url)
        .json(&instance("a", "a-1", 1))
        .send()
        .await?;
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert!(missing.headers().contains_key("www-authenticate"));
    let wrong = http()
        .post(&url)
        .bearer_auth("not-a-configured-token")
        .json(&instance("a", "a-1", 1))
        .send()
        .await?;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(served.registry.view().is_empty());

    http()
        .post(&url)
        .bearer_auth(ALICE)
        .json(&instance("a", "a-1", 1))
        .send()
        .await?
        .error_for_status()?;
    let delete = http().delete(format!("{url}/a-1")).send().await?;
    assert_eq!(delete.status(), StatusCode::UNAUTHORIZED);
    let discover = http()
        .get(format!("{}/v1/registry/services/a/instances", served.rest))
        .send()
        .await?;
    assert_eq!(discover.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(served.registry.view().len(), 1);
    Ok(())
}

#[tokio::test]
async fn another_token_cannot_deregister_heartbeat_or_replace_a_registration() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let url = format!("{}/v1/registry/instances", served.rest);
    http()
        .post(&url)
        .bearer_auth(ALICE)
        .json(&instance("a", "a-1", 1))
        .send()
        .await?
        .error_for_status()?;
    let delete = http()
        .delete(format!("{url}/a-1"))
        .bearer_auth(BOB)
        .send()
        .await?;
    assert_eq!(delete.status(), StatusCode::FORBIDDEN);
    let error: ErrorJson = delete.json().await?;
    assert_eq!(error.error, "permission_denied");
    let heartbeat = http()
        .put(format!("{url}/a-1/heartbeat"))
        .bearer_auth(BOB)
        .send()
        .await?;
    assert_eq!(heartbeat.status(), StatusCode::FORBIDDEN);
    let replace = http()
        .post(&url)
        .bearer_auth(BOB)
        .json(&instance("a", "a-1", 2))
        .send()
        .await?;
    assert_eq!(replace.status(), StatusCode::FORBIDDEN);
    let entry = served.registry.view().get("a-1").expect("still registered");
    assert_eq!(&*entry.record.owner, "alice");
    assert_eq!(entry.record.registration.address().port(), 1);

    let delete = http()
        .delete(format!("{url}/a-1"))
        .bearer_auth(ALICE)
        .send()
        .await?;
    assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    assert!(served.registry.view().is_empty());
    let again = http()
        .delete(format!("{url}/a-1"))
        .bearer_auth(ALICE)
        .send()
        .await?;
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn an_invalid_registration_gets_400_naming_every_bad_field() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let url = format!("{}/v1/registry/instances", served.rest);
    let mut body = instance("Bad Name", "a-1", 0);
    body["address"] = serde_json::json!("example.com");
    let response = http()
        .post(&url)
        .bearer_auth(ALICE)
        .json(&body)
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error: ErrorJson = response.json().await?;
    assert_eq!(error.error, "invalid_argument");
    let fields: Vec<&str> = error.fields.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(fields, ["name", "address", "port"]);

    let typo = http()
        .post(&url)
        .bearer_auth(ALICE)
        .header("content-type", "application/json")
        .body(r#"{"name":"a","id":"a-1","adress":"127.0.0.1","port":1}"#)
        .send()
        .await?;
    assert_eq!(typo.status(), StatusCode::BAD_REQUEST);
    let error: ErrorJson = typo.json().await?;
    assert!(error.message.contains("adress"), "{}", error.message);

    let bad_filter = http()
        .get(format!(
            "{}/v1/registry/services/a/instances?health=sick",
            served.rest
        ))
        .bearer_auth(ALICE)
        .send()
        .await?;
    assert_eq!(bad_filter.status(), StatusCode::BAD_REQUEST);
    assert!(served.registry.view().is_empty());
    Ok(())
}

#[tokio::test]
async fn an_instance_whose_heartbeats_stop_is_removed_within_its_ttl() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let url = format!("{}/v1/registry/instances", served.rest);
    let mut body = instance("a", "a-1", 1);
    body["ttl_ms"] = serde_json::json!(1000);
    http()
        .post(&url)
        .bearer_auth(ALICE)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        http()
            .put(format!("{url}/a-1/heartbeat"))
            .bearer_auth(ALICE)
            .send()
            .await?
            .error_for_status()?;
    }
    assert!(
        served.registry.view().get("a-1").is_some(),
        "heartbeats keep it alive past its TTL"
    );
    let stopped = tokio::time::Instant::now();
    eventually(Duration::from_secs(3), "expired", || async {
        served.registry.view().get("a-1").is_none()
    })
    .await?;
    let gone_after = stopped.elapsed();
    assert!(
        gone_after <= Duration::from_millis(1000 + 150),
        "removed {gone_after:?} after the last heartbeat"
    );
    eventually(Duration::from_secs(2), "gone from the snapshot", || async {
        published(&served, "a").is_empty()
    })
    .await?;
    let late = http()
        .put(format!("{url}/a-1/heartbeat"))
        .bearer_auth(ALICE)
        .send()
        .await?;
    assert_eq!(late.status(), StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn watch_long_poll_returns_the_changes_after_the_cursor() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let url = format!("{}/v1/registry/instances", served.rest);
    http()
        .post(&url)
        .bearer_auth(ALICE)
        .json(&instance("a", "a-1", 1))
        .send()
        .await?
        .error_for_status()?;
    let first: WatchJson = http()
        .get(format!("{}/v1/registry/watch", served.rest))
        .bearer_auth(ALICE)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert!(first.reset);
    assert_eq!(first.changes.len(), 1);

    let poll = {
        let watch_url = format!(
            "{}/v1/registry/watch?epoch={}&revision={}&wait_ms=5000",
            served.rest, first.cursor.epoch, first.cursor.revision
        );
        tokio::spawn(async move { http().get(watch_url).bearer_auth(ALICE).send().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    http()
        .delete(format!("{url}/a-1"))
        .bearer_auth(ALICE)
        .send()
        .await?
        .error_for_status()?;
    let next: WatchJson = poll.await??.error_for_status()?.json().await?;
    assert!(!next.reset);
    let kinds: Vec<(&str, &str)> = next
        .changes
        .iter()
        .map(|c| (c.kind.as_str(), c.id.as_str()))
        .collect();
    assert_eq!(kinds, [("delete", "a-1")]);
    assert!(next.cursor.revision > first.cursor.revision);
    Ok(())
}
