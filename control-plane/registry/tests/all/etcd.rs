//! The etcd backend on a real etcd cluster on loopback: three members, or one where only the
//! data matters.

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use fulcrum_registry::{
    BackendError, EtcdBackend, EtcdConfig, Identity, InstanceSpec, Registry, RegistryError, View,
    backend::etcd::StoredRecord, registry::new_epoch,
};
use fulcrum_test_support::eventually;

use crate::{
    etcd_cluster::EtcdCluster,
    support::{discovered_ids, loopback},
};

/// A control-plane replica: a registry on the cluster, with a short request deadline.
async fn replica(cluster: &EtcdCluster) -> Result<Arc<Registry>> {
    let mut config = EtcdConfig::new(cluster.endpoints());
    config.request_timeout = Duration::from_secs(2);
    Ok(Registry::on_etcd(config, loopback()).await?)
}

fn spec(id: &str, port: u16, ttl_ms: u32) -> InstanceSpec {
    InstanceSpec {
        name: "svc".into(),
        id: id.into(),
        address: "127.0.0.1".into(),
        port: u32::from(port),
        ttl_ms,
        ..InstanceSpec::default()
    }
}

#[tokio::test]
async fn replicas_on_one_etcd_see_the_same_registry_and_enforce_ownership() -> Result<()> {
    let cluster = EtcdCluster::start(3).await?;
    let a = replica(&cluster).await?;
    let b = replica(&cluster).await?;
    a.register(&spec("x-1", 1, 10_000), &Identity::unscoped("alice"))
        .await?;
    a.register(&spec("x-1", 1, 10_000), &Identity::unscoped("alice"))
        .await?; // idempotent
    b.register(&spec("x-2", 2, 10_000), &Identity::unscoped("bob"))
        .await?;
    eventually(Duration::from_secs(5), "both replicas see both", || async {
        discovered_ids(&a) == ["x-1", "x-2"] && discovered_ids(&b) == ["x-1", "x-2"]
    })
    .await?;
    let error = b
        .deregister("x-1", "bob")
        .await
        .expect_err("bob does not own x-1");
    assert!(
        matches!(error, RegistryError::Backend(BackendError::NotOwner { .. })),
        "{error}"
    );
    b.deregister("x-1", "alice").await?;
    eventually(
        Duration::from_secs(5),
        "removal seen by the other replica",
        || async { discovered_ids(&a) == ["x-2"] },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_etcd_registration_without_heartbeats_is_removed_when_its_lease_expires() -> Result<()> {
    let cluster = EtcdCluster::start(3).await?;
    let registry = replica(&cluster).await?;
    registry
        .register(&spec("e-1", 1, 1000), &Identity::unscoped("alice"))
        .await?;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        registry.heartbeat("e-1", "alice").await?;
    }
    assert_eq!(
        discovered_ids(&registry),
        ["e-1"],
        "heartbeats keep it past its TTL"
    );
    let stopped = tokio::time::Instant::now();
    eventually(Duration::from_secs(5), "lease expired", || async {
        discovered_ids(&registry).is_empty()
    })
    .await?;
    // etcd rounds a lease up to whole seconds and expires it on its leader's clock,
    // checking about every 500 ms.
    let gone_after = stopped.elapsed();
    assert!(
        gone_after <= Duration::from_millis(2000),
        "removed {gone_after:?} after the last heartbeat"
    );
    let late = registry
        .heartbeat("e-1", "alice")
        .await
        .expect_err("expired");
    assert!(
        matches!(late, RegistryError::Backend(BackendError::NotFound { .. })),
        "{late}"
    );
    Ok(())
}

#[tokio::test]
async fn one_member_down_keeps_writes_two_down_refuse_them_and_a_restore_loses_nothing()
-> Result<()> {
    let mut cluster = EtcdCluster::start(3).await?;
    let registry = replica(&cluster).await?;
    registry
        .register(&spec("q-1", 1, 60_000), &Identity::unscoped("alice"))
        .await?;

    cluster.kill(0);
    // The client may first try the dead member; a write succeeds within a few attempts.
    eventually(
        Duration::from_secs(15),
        "a write with one member down",
        || async {
            registry
                .register(&spec("q-2", 2, 60_000), &Identity::unscoped("alice"))
                .await
                .is_ok()
        },
    )
    .await?;
    registry.heartbeat("q-1", "alice").await?;

    cluster.kill(1);
    let error = registry
        .register(&spec("q-3", 3, 60_000), &Identity::unscoped("alice"))
        .await
        .expect_err("no quorum");
    assert!(
        matches!(
            error,
            RegistryError::Backend(BackendError::Unavailable { .. })
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("majority of the etcd members"),
        "{error}"
    );
    assert_eq!(
        discovered_ids(&registry),
        ["q-1", "q-2"],
        "reads serve the last known state"
    );

    cluster.restart(0).await?;
    cluster.restart(1).await?;
    eventually(
        Duration::from_secs(20),
        "writes again after the restore",
        || async {
            registry
                .register(&spec("q-3", 3, 60_000), &Identity::unscoped("alice"))
                .await
                .is_ok()
        },
    )
    .await?;
    let fresh = replica(&cluster).await?;
    eventually(
        Duration::from_secs(5),
        "a new replica sees everything",
        || async { discovered_ids(&fresh) == ["q-1", "q-2", "q-3"] },
    )
    .await?;
    assert_eq!(discovered_ids(&registry), ["q-1", "q-2", "q-3"]);
    Ok(())
}

/// Registrations written straight to etcd, ~2 KiB each (large metadata), in transactions
/// of 100 puts (etcd allows 128 operations a transaction).
async fn write_large_registrations(etcd: &mut etcd_client::Client, count: usize) -> Result<usize> {
    let mut written = 0;
    let ids: Vec<String> = (0..count).map(|index| format!("big-{index:05}")).collect();
    for chunk in ids.chunks(100) {
        let mut puts = Vec::new();
        for id in chunk {
            let stored = StoredRecord {
                instance: InstanceSpec {
                    metadata: (0..7)
                        .map(|key| (format!("k{key}"), "v".repeat(250)))
                        .collect(),
                    ..spec(id, 1, 60_000)
                },
                owner: "alice".into(),
                registered_at_unix_ms: 1,
            };
            stored.instance.validate()?;
            let value = serde_json::to_vec(&stored)?;
            written += value.len();
            puts.push(etcd_client::TxnOp::put(
                format!("/fulcrum/registry/instances/{id}"),
                value,
                None,
            ));
        }
        etcd.txn(etcd_client::Txn::new().and_then(puts)).await?;
    }
    Ok(written)
}

#[tokio::test]
async fn a_registry_larger_than_one_etcd_response_loads_whole() -> Result<()> {
    const COUNT: usize = 2_500;
    let cluster = EtcdCluster::start(1).await?;
    let mut etcd = etcd_client::Client::connect(cluster.endpoints(), None).await?;
    let written = write_large_registrations(&mut etcd, COUNT).await?;
    assert!(
        written > 4 << 20,
        "{written} bytes do not exceed the client's 4 MiB answer"
    );
    let unpaged = etcd
        .get(
            "/fulcrum/registry/instances/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await;
    assert!(
        unpaged.is_err(),
        "one read of the whole prefix fits one answer: the test proves nothing"
    );

    let view = Arc::new(View::new(new_epoch()));
    let config = EtcdConfig::new(cluster.endpoints());
    let _backend = EtcdBackend::connect(config, view.clone(), loopback().addresses).await?;
    assert_eq!(view.len(), COUNT);
    for index in 0..COUNT {
        let id = format!("big-{index:05}");
        assert!(view.get(&id).is_some(), "{id} missing from the loaded view");
    }
    Ok(())
}

#[tokio::test]
async fn values_too_large_for_a_page_of_the_load_are_read_fewer_at_a_time() -> Result<()> {
    let cluster = EtcdCluster::start(1).await?;
    let mut etcd = etcd_client::Client::connect(cluster.endpoints(), None).await?;
    // 40 values of 200 KiB under the prefix (not registrations: another writer's), 8 MB in
    // all, before and after two real ones.
    for index in 0..40 {
        etcd.put(
            format!("/fulcrum/registry/instances/blob-{index:02}"),
            vec![b'x'; 200 << 10],
            None,
        )
        .await?;
    }
    write_large_registrations(&mut etcd, 2).await?;

    let view = Arc::new(View::new(new_epoch()));
    let config = EtcdConfig::new(cluster.endpoints());
    let _backend = EtcdBackend::connect(config, view.clone(), loopback().addresses).await?;

    assert_eq!(view.len(), 2, "the registrations loaded, the blobs skipped");
    assert!(view.get("big-00000").is_some() && view.get("big-00001").is_some());
    Ok(())
}

/// `fulcrum_registry_etcd_reload_failures_total` as `registry` exposes it.
fn reload_failures(registry: &Registry) -> Option<f64> {
    let mut metrics = prometheus_client::registry::Registry::default();
    registry.metrics().register(&mut metrics);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("fulcrum_registry_etcd_reload_failures_total "))?
        .parse()
        .ok()
}

#[tokio::test]
async fn a_reload_that_fails_after_the_watch_broke_is_counted_and_the_last_state_served()
-> Result<()> {
    let mut cluster = EtcdCluster::start(1).await?;
    let registry = replica(&cluster).await?;
    registry
        .register(&spec("r-1", 1, 60_000), &Identity::unscoped("alice"))
        .await?;
    assert_eq!(reload_failures(&registry), Some(0.0));
    cluster.kill(0);
    eventually(
        Duration::from_secs(15),
        "a failed reload counted",
        || async { reload_failures(&registry).is_some_and(|failures| failures >= 1.0) },
    )
    .await?;
    assert_eq!(discovered_ids(&registry), ["r-1"]);
    Ok(())
}
