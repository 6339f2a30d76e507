//! The etcd backend on a real three-member etcd cluster on loopback.

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use fulcrum_registry::{
    BackendError, EtcdBackend, EtcdConfig, Identity, InstanceSpec, Query, Registry, RegistryError,
    View, registry::new_epoch,
};
use fulcrum_test_support::eventually;

use crate::{etcd_cluster::EtcdCluster, support::loopback};

/// A control-plane replica: a registry on the cluster, with a short request deadline.
async fn replica(cluster: &EtcdCluster) -> Result<Arc<Registry>> {
    let view = Arc::new(View::new(new_epoch()));
    let mut config = EtcdConfig::new(cluster.endpoints());
    config.request_timeout = Duration::from_secs(2);
    let backend = EtcdBackend::connect(config, view.clone()).await?;
    Ok(Registry::new(backend, view, loopback()))
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

fn discovered(registry: &Registry) -> Vec<String> {
    let query = Query {
        service: "svc".into(),
        ..Query::default()
    };
    registry
        .discover(&query)
        .expect("valid query")
        .entries
        .iter()
        .map(|entry| entry.record.registration.id.to_string())
        .collect()
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
        discovered(&a) == ["x-1", "x-2"] && discovered(&b) == ["x-1", "x-2"]
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
        || async { discovered(&a) == ["x-2"] },
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
        discovered(&registry),
        ["e-1"],
        "heartbeats keep it past its TTL"
    );
    let stopped = tokio::time::Instant::now();
    eventually(Duration::from_secs(5), "lease expired", || async {
        discovered(&registry).is_empty()
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
        discovered(&registry),
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
        || async { discovered(&fresh) == ["q-1", "q-2", "q-3"] },
    )
    .await?;
    assert_eq!(discovered(&registry), ["q-1", "q-2", "q-3"]);
    Ok(())
}
