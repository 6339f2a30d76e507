//! The record shared through a status ConfigMap: two replicas (two stores, each with its
//! ConfigMap source and its follower, as the control plane runs them) against one fake API
//! server, restarted by dropping their tasks and starting new stores.

use std::{collections::BTreeMap, time::Duration};

use fulcrum_policy::{
    OfferError, Offered, PolicyConfigMap, PolicyFormat, PolicyRecord, PolicyStatus, PolicyStore,
    RECORD_KEY, RollbackError, StatusError,
};
use fulcrum_test_support::kube_api::FakeApiServer;
use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use crate::support::{INVALID_YAML, WAIT, failures, until_current, until_rejected, valid_yaml};

const STATUS: &str = "fulcrum-accepted";

fn policy_map(text: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some("fulcrum".to_owned()),
            namespace: Some("mesh".to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "policy.yaml".to_owned(),
            text.to_owned(),
        )])),
        ..ConfigMap::default()
    }
}

/// One control-plane replica's policy side: a store shared through the status ConfigMap,
/// the operator's ConfigMap offered to it, and the status followed. Stops when dropped.
struct Replica {
    store: PolicyStore,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Replica {
    fn start(server: &FakeApiServer) -> Self {
        let status = PolicyStatus::new(server.client(), "mesh", STATUS);
        let store = PolicyStore::shared_through(status.clone(), 16);
        let source = PolicyConfigMap::new(server.client(), "mesh", "fulcrum", "policy.yaml");
        let tasks = vec![
            tokio::spawn(source.run(store.clone())),
            tokio::spawn(status.follow(store.clone())),
        ];
        Self { store, tasks }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn stored_record(server: &FakeApiServer) -> PolicyRecord {
    let map = server
        .get::<ConfigMap>("mesh", STATUS)
        .expect("the status ConfigMap exists");
    let text = &map.data.expect("data")[RECORD_KEY];
    PolicyRecord::from_json(text).expect("the stored record reads back")
}

#[tokio::test]
async fn a_restart_while_the_configmap_holds_an_invalid_policy_serves_the_accepted_one() {
    let server = FakeApiServer::start().await;
    server.apply(&policy_map(&valid_yaml(3)));
    let first = Replica::start(&server);
    until_current(&first.store, "the accepted policy", |p| failures(p) == 3).await;
    server.apply(&policy_map(INVALID_YAML));
    until_rejected(&first.store, 1).await;
    drop(first);

    let restarted = Replica::start(&server);
    let current = until_current(&restarted.store, "the recorded policy", |_| true).await;
    assert_eq!((current.version, failures(&current)), (1, 3));
    until_rejected(&restarted.store, 1).await;
    assert_eq!(
        restarted.store.current().map(|c| c.version),
        Some(1),
        "the invalid text changes nothing after the restart either"
    );
}

#[tokio::test]
async fn a_rollback_on_one_replica_is_adopted_by_the_other_and_outlives_restarts_of_both() {
    let server = FakeApiServer::start().await;
    server.apply(&policy_map(&valid_yaml(3)));
    let a = Replica::start(&server);
    let b = Replica::start(&server);
    for replica in [&a, &b] {
        until_current(&replica.store, "version 1", |p| p.version == 1).await;
    }
    server.apply(&policy_map(&valid_yaml(4)));
    for replica in [&a, &b] {
        until_current(&replica.store, "version 2", |p| p.version == 2).await;
    }

    let restored = a.store.rollback(1).await.expect("version 1 is kept");
    assert_eq!((restored.version, failures(&restored)), (3, 3));
    let seen = until_current(&b.store, "the rollback", |p| p.version == 3).await;
    assert_eq!((seen.rolled_back_from, failures(&seen)), (Some(1), 3));
    drop((a, b));

    let (a, b) = (Replica::start(&server), Replica::start(&server));
    for replica in [&a, &b] {
        let current = until_current(&replica.store, "the rollback", |_| true).await;
        assert_eq!((current.version, failures(&current)), (3, 3));
    }
    // Both restarted replicas read the operator's text again; it was decided before, so the
    // rollback stays and no version is made.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for replica in [&a, &b] {
        let current = replica.store.current().expect("a policy");
        assert_eq!((current.version, failures(&current)), (3, 3));
        let versions: Vec<u64> = replica.store.history().iter().map(|k| k.version).collect();
        assert_eq!(versions, [1, 2, 3]);
    }
    assert_eq!(stored_record(&server).next_version, 4);
}

#[tokio::test]
async fn replicas_deciding_the_same_change_at_once_make_one_version() {
    let server = FakeApiServer::start().await;
    let replicas: Vec<Replica> = (0..3).map(|_| Replica::start(&server)).collect();
    // Every replica offers the same new text at the same moment, through the watch.
    server.apply(&policy_map(&valid_yaml(3)));
    for replica in &replicas {
        until_current(&replica.store, "the policy", |p| failures(p) == 3).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for replica in &replicas {
        let versions: Vec<u64> = replica.store.history().iter().map(|k| k.version).collect();
        assert_eq!(versions, [1], "one version, agreed");
    }
    let record = stored_record(&server);
    assert_eq!((record.next_version, record.versions.len()), (2, 1));
}

#[tokio::test]
async fn a_change_that_cannot_be_recorded_is_not_applied_and_is_offered_again() {
    let server = FakeApiServer::start().await;
    server.apply(&policy_map(&valid_yaml(3)));
    let replica = Replica::start(&server);
    until_current(&replica.store, "the first policy", |p| failures(p) == 3).await;

    server.refuse_writes(true);
    server.apply(&policy_map(&valid_yaml(4)));
    let deadline = tokio::time::Instant::now() + WAIT;
    while replica.store.metrics().status_failures.get() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no failed write");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(replica.store.current().map(|c| failures(&c)), Some(3));

    server.refuse_writes(false);
    let applied = until_current(&replica.store, "the retried text", |p| failures(p) == 4).await;
    assert_eq!(applied.version, 2);
}

#[tokio::test]
async fn a_rollback_the_api_server_refuses_changes_nothing_and_says_why() {
    let server = FakeApiServer::start().await;
    let status = PolicyStatus::new(server.client(), "mesh", STATUS);
    let store = PolicyStore::shared_through(status, 16);
    for failures in [3, 4] {
        store
            .offer(&valid_yaml(failures), PolicyFormat::Yaml, "test")
            .await
            .expect("recorded");
    }
    server.refuse_writes(true);
    let refused = store.rollback(1).await.expect_err("not recorded");
    let RollbackError::NotRecorded(StatusError::Unavailable { status, action, .. }) = &refused
    else {
        panic!("expected the status to be unavailable, got {refused:?}");
    };
    assert_eq!(
        (status.as_str(), *action),
        ("mesh/fulcrum-accepted", "write")
    );
    assert!(refused.to_string().contains("RBAC"), "{refused}");
    assert_eq!(store.current().map(|c| c.version), Some(2));
    assert_eq!(store.metrics().status_failures.get(), 1);
    let not_offered = store
        .offer(&valid_yaml(5), PolicyFormat::Yaml, "test")
        .await
        .expect_err("not recorded");
    assert!(matches!(not_offered, OfferError::NotRecorded(_)));
    assert_eq!(store.current().map(|c| c.version), Some(2));
}

#[tokio::test]
async fn a_corrupt_status_record_is_ignored_counted_and_replaced_by_the_next_change() {
    let server = FakeApiServer::start().await;
    let mut corrupt = policy_map("");
    corrupt.metadata.name = Some(STATUS.to_owned());
    corrupt.data = Some(BTreeMap::from([(
        RECORD_KEY.to_owned(),
        r#"{"revision": 9, "next_version": 3, "versions": [{"version": 2, "digest": "x", "origin": "hand", "accepted_at_unix_ms": 0, "policy": {"default": {"outlier_detection": {"max_ejection_percent": 400}}}}]}"#.to_owned(),
    )]));
    server.apply(&corrupt);
    let status = PolicyStatus::new(server.client(), "mesh", STATUS);
    let store = PolicyStore::shared_through(status, 16);
    let offered = store
        .offer(&valid_yaml(3), PolicyFormat::Yaml, "test")
        .await
        .expect("recorded over the corrupt record");
    assert_eq!(offered, Offered::Applied(1));
    assert_eq!(store.metrics().status_invalid.get(), 1);
    let record = stored_record(&server);
    assert_eq!(record.versions.len(), 1);
    assert_eq!(failures(&record.versions[0]), 3);
}

#[test]
fn a_record_with_an_invalid_policy_names_the_version_and_the_field() {
    let text = r#"{"revision": 1, "next_version": 3, "versions": [{"version": 2, "digest": "x", "origin": "hand", "accepted_at_unix_ms": 0, "policy": {"default": {"outlier_detection": {"max_ejection_percent": 400}}}}]}"#;
    let problem = PolicyRecord::from_json(text)
        .expect_err("invalid policy")
        .to_string();
    assert!(problem.contains("version 2"), "{problem}");
    assert!(problem.contains("max_ejection_percent"), "{problem}");
}

#[test]
fn a_record_whose_versions_are_not_below_next_version_is_refused() {
    let text = r#"{"revision": 1, "next_version": 2, "versions": [{"version": 2, "digest": "x", "origin": "hand", "accepted_at_unix_ms": 0, "policy": {}}]}"#;
    let problem = PolicyRecord::from_json(text).expect_err("inconsistent");
    assert!(problem.to_string().contains("next_version 2"), "{problem}");
}

#[test]
fn a_record_whose_counters_could_overflow_is_refused_naming_the_field() {
    for (field, text) in [
        (
            "revision",
            r#"{"revision": 18446744073709551615, "next_version": 3, "versions": []}"#,
        ),
        (
            "next_version",
            r#"{"revision": 1, "next_version": 18446744073709551615, "versions": []}"#,
        ),
    ] {
        let problem = PolicyRecord::from_json(text)
            .expect_err("a counter at u64::MAX")
            .to_string();
        assert!(
            problem.contains(&format!("{field} is 18446744073709551615")),
            "{problem}"
        );
    }
    let largest =
        r#"{"revision": 9007199254740992, "next_version": 9007199254740992, "versions": []}"#;
    PolicyRecord::from_json(largest).expect("2^53 is still a counter");
}
