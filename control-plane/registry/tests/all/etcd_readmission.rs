//! Records that reach etcd without this replica's admission (written by another etcd
//! client, or by a replica allowing more addresses) are admitted again as they are read, on
//! a real one-member etcd: what this replica would refuse never reaches its view, its
//! discovery answers or its endpoint source, and is counted by reason.

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use fulcrum_registry::{EtcdConfig, InstanceSpec, Limits, Registry, backend::etcd::StoredRecord};
use fulcrum_test_support::eventually;

use crate::{
    etcd_cluster::EtcdCluster,
    support::{discovered, loopback, value},
};

/// The registry's default key prefix.
const PREFIX: &str = "/fulcrum/registry/instances/";

/// A client writing straight into `cluster`, as any etcd client with write access can.
async fn writer(cluster: &EtcdCluster) -> Result<etcd_client::Client> {
    Ok(etcd_client::Client::connect(cluster.endpoints(), None).await?)
}

/// Puts `value` under instance `id`'s key.
async fn put(etcd: &mut etcd_client::Client, id: &str, value: Vec<u8>) -> Result<()> {
    etcd.put(format!("{PREFIX}{id}"), value, None).await?;
    Ok(())
}

/// Puts a stored registration of instance `id` of service `svc` at `address`:80.
async fn put_record(etcd: &mut etcd_client::Client, id: &str, address: &str) -> Result<()> {
    let stored = StoredRecord {
        instance: InstanceSpec {
            name: "svc".into(),
            id: id.into(),
            address: address.into(),
            port: 80,
            ttl_ms: 60_000,
            ..InstanceSpec::default()
        },
        owner: "mallory".into(),
        registered_at_unix_ms: 1,
    };
    stored.instance.validate()?;
    put(etcd, id, serde_json::to_vec(&stored)?).await
}

/// A replica on `cluster` admitting what `limits` allow.
async fn replica(cluster: &EtcdCluster, limits: Limits) -> Result<Arc<Registry>> {
    let mut config = EtcdConfig::new(cluster.endpoints());
    config.request_timeout = Duration::from_secs(2);
    Ok(Registry::on_etcd(config, limits).await?)
}

/// The addresses the registry's endpoint source publishes for service `svc`.
fn published(registry: &Registry) -> Vec<String> {
    registry
        .view()
        .services()
        .services
        .get("svc")
        .map(|service| {
            service
                .endpoints
                .iter()
                .map(|endpoint| endpoint.address.to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `fulcrum_registry_etcd_records_refused_total{reason}` as `registry` exposes it.
fn refused(registry: &Registry, reason: &str) -> Option<f64> {
    let mut metrics = prometheus_client::registry::Registry::default();
    registry.metrics().register(&mut metrics);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics).ok()?;
    value(
        &text,
        &format!("fulcrum_registry_etcd_records_refused_total{{reason=\"{reason}\"}}"),
    )
}

fn pair(id: &str, address: &str) -> (String, String) {
    (id.to_owned(), address.to_owned())
}

#[tokio::test]
async fn records_in_etcd_with_a_metadata_or_loopback_address_are_not_loaded_and_are_counted()
-> Result<()> {
    let cluster = EtcdCluster::start(1).await?;
    let mut etcd = writer(&cluster).await?;
    put_record(&mut etcd, "ok-1", "10.0.0.1").await?;
    put_record(&mut etcd, "metadata-1", "169.254.169.254").await?;
    put_record(&mut etcd, "loopback-1", "127.0.0.1").await?;

    let registry = replica(&cluster, Limits::default()).await?;

    assert_eq!(discovered(&registry), [pair("ok-1", "10.0.0.1:80")]);
    assert_eq!(published(&registry), ["10.0.0.1:80"]);
    assert!(registry.view().get("metadata-1").is_none());
    assert!(registry.view().get("loopback-1").is_none());
    assert_eq!(refused(&registry, "address_class"), Some(2.0));
    Ok(())
}

#[tokio::test]
async fn a_watched_record_with_a_refused_address_is_skipped_and_an_update_to_one_removes_it()
-> Result<()> {
    let cluster = EtcdCluster::start(1).await?;
    let registry = replica(&cluster, Limits::default()).await?;
    let mut etcd = writer(&cluster).await?;
    put_record(&mut etcd, "w-1", "10.0.0.1").await?;
    eventually(Duration::from_secs(5), "w-1 watched", || async {
        discovered(&registry) == [pair("w-1", "10.0.0.1:80")]
    })
    .await?;
    assert_eq!(refused(&registry, "address_class"), Some(0.0));

    put_record(&mut etcd, "w-2", "169.254.169.254").await?;
    put_record(&mut etcd, "w-1", "127.0.0.1").await?;
    // Watched after the two above: once it is in the view, so are their outcomes.
    put_record(&mut etcd, "w-3", "10.0.0.3").await?;
    eventually(Duration::from_secs(5), "w-3 watched", || async {
        registry.view().get("w-3").is_some()
    })
    .await?;

    assert_eq!(discovered(&registry), [pair("w-3", "10.0.0.3:80")]);
    assert_eq!(published(&registry), ["10.0.0.3:80"]);
    assert_eq!(refused(&registry, "address_class"), Some(2.0));
    Ok(())
}

#[tokio::test]
async fn a_refused_record_is_counted_once_per_revision_however_often_it_is_reloaded() -> Result<()>
{
    let mut cluster = EtcdCluster::start(1).await?;
    let mut etcd = writer(&cluster).await?;
    put_record(&mut etcd, "metadata-1", "169.254.169.254").await?;
    let registry = replica(&cluster, Limits::default()).await?;
    assert_eq!(refused(&registry, "address_class"), Some(1.0));

    // The watch breaks; the replica loads everything again once etcd is back.
    cluster.kill(0);
    cluster.restart(0).await?;
    let mut etcd = writer(&cluster).await?;
    put_record(&mut etcd, "ok-1", "10.0.0.1").await?;
    eventually(
        Duration::from_secs(20),
        "ok-1 seen after the restart",
        || async { registry.view().get("ok-1").is_some() },
    )
    .await?;
    assert_eq!(discovered(&registry), [pair("ok-1", "10.0.0.1:80")]);
    assert_eq!(refused(&registry, "address_class"), Some(1.0));

    // A new revision of the same key is a new refusal.
    put_record(&mut etcd, "metadata-1", "169.254.169.254").await?;
    eventually(Duration::from_secs(5), "the rewrite counted", || async {
        refused(&registry, "address_class") == Some(2.0)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn values_that_are_not_valid_registrations_are_skipped_and_counted_by_reason() -> Result<()> {
    let cluster = EtcdCluster::start(1).await?;
    let mut etcd = writer(&cluster).await?;
    put(&mut etcd, "garbage", b"not json".to_vec()).await?;
    let invalid = serde_json::json!({
        "instance": { "name": "svc", "id": "bad-port", "address": "10.0.0.9", "port": 0 },
        "owner": "mallory",
        "registered_at_unix_ms": 1,
    });
    put(&mut etcd, "bad-port", serde_json::to_vec(&invalid)?).await?;
    put_record(&mut etcd, "real-id", "10.0.0.1").await?;
    let moved = etcd
        .get(format!("{PREFIX}real-id"), None)
        .await?
        .kvs()
        .first()
        .map(|kv| kv.value().to_vec())
        .unwrap_or_default();
    put(&mut etcd, "other-id", moved).await?;

    let registry = replica(&cluster, Limits::default()).await?;

    assert_eq!(discovered(&registry), [pair("real-id", "10.0.0.1:80")]);
    assert!(registry.view().get("other-id").is_none());
    for reason in ["malformed", "invalid", "id_mismatch"] {
        assert_eq!(refused(&registry, reason), Some(1.0), "{reason}");
    }
    assert_eq!(refused(&registry, "address_class"), Some(0.0));
    Ok(())
}

#[tokio::test]
async fn a_replica_allowing_loopback_admits_a_loopback_record_but_still_refuses_metadata()
-> Result<()> {
    let cluster = EtcdCluster::start(1).await?;
    let mut etcd = writer(&cluster).await?;
    put_record(&mut etcd, "loopback-1", "127.0.0.1").await?;
    put_record(&mut etcd, "metadata-1", "169.254.169.254").await?;

    let registry = replica(&cluster, loopback()).await?;
    assert_eq!(discovered(&registry), [pair("loopback-1", "127.0.0.1:80")]);

    put_record(&mut etcd, "loopback-2", "127.0.0.2").await?;
    eventually(Duration::from_secs(5), "loopback-2 watched", || async {
        registry.view().get("loopback-2").is_some()
    })
    .await?;
    assert_eq!(
        discovered(&registry),
        [
            pair("loopback-1", "127.0.0.1:80"),
            pair("loopback-2", "127.0.0.2:80")
        ]
    );
    assert_eq!(refused(&registry, "address_class"), Some(1.0));
    Ok(())
}
