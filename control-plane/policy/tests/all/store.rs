//! The store: acceptance, rejection, history and rollback.

use fulcrum_core::PolicyError;
use fulcrum_policy::{OfferError, Offered, PolicyFormat, PolicyStore, RollbackError};

use crate::support::{CapturedLogs, INVALID_YAML, failures, valid_yaml};

#[tokio::test]
async fn valid_policy_becomes_current_and_is_published_on_the_watch_channel() {
    let store = PolicyStore::default();
    let mut current = store.subscribe();
    assert!(store.current().is_none());
    let offered = store
        .offer(&valid_yaml(3), PolicyFormat::Yaml, "test")
        .await;
    assert_eq!(offered.ok(), Some(Offered::Applied(1)));
    assert!(current.has_changed().expect("store alive"));
    let published = current.borrow_and_update().clone().expect("a policy");
    assert_eq!((published.version, failures(&published)), (1, 3));
    assert_eq!(published.origin, "test");
    assert_eq!(store.metrics().accepted.get(), 1);
    assert_eq!(store.metrics().version.get(), 1);
}

#[tokio::test]
async fn invalid_policy_is_rejected_with_every_error_logged_and_counted_and_the_last_good_stays() {
    let store = PolicyStore::default();
    store
        .offer(&valid_yaml(3), PolicyFormat::Yaml, "test")
        .await
        .expect("valid");
    let logs = CapturedLogs::default();
    let Err(OfferError::Rejected(rejected)) = logs
        .capture(store.offer(INVALID_YAML, PolicyFormat::Yaml, "file:/etc/policy.yaml"))
        .await
    else {
        panic!("an invalid policy is rejected");
    };
    assert_eq!(rejected.kept, Some(1));
    let PolicyError::Invalid(invalid) = &rejected.source else {
        panic!("expected validation errors, got {rejected}");
    };
    let paths: Vec<&str> = invalid
        .errors
        .iter()
        .map(|error| error.path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "services.checkout.outlier_detection.half_open_max_probes",
            "services.checkout.outlier_detection.max_ejection_percent",
        ]
    );
    let logged = logs.text();
    for path in paths {
        assert!(logged.contains(path), "{path} not logged in:\n{logged}");
    }
    assert!(logged.contains("file:/etc/policy.yaml"), "{logged}");
    assert_eq!(store.metrics().rejected.get(), 1);
    let current = store.current().expect("the last good policy");
    assert_eq!((current.version, failures(&current)), (1, 3));
}

#[tokio::test]
async fn malformed_json_is_rejected_with_its_line() {
    let store = PolicyStore::default();
    let Err(OfferError::Rejected(rejected)) = store
        .offer(
            "{\n  \"default\": {\"retries\": 2}\n}",
            PolicyFormat::Json,
            "test",
        )
        .await
    else {
        panic!("an unknown field is rejected");
    };
    assert!(
        matches!(rejected.source, PolicyError::Json { line: 2, .. }),
        "{rejected}"
    );
    assert_eq!(rejected.kept, None);
    assert!(store.current().is_none());
    assert_eq!(store.metrics().rejected.get(), 1);
}

#[tokio::test]
async fn an_equal_policy_is_not_a_new_version() {
    let store = PolicyStore::default();
    store
        .offer(&valid_yaml(3), PolicyFormat::Yaml, "a")
        .await
        .expect("valid");
    let again = store
        .offer(
            "{\"default\": {\"outlier_detection\": {\"consecutive_failures\": 3}}}",
            PolicyFormat::Json,
            "b",
        )
        .await;
    assert_eq!(again.ok(), Some(Offered::Unchanged(1)));
    assert_eq!(store.history().len(), 1);
}

#[tokio::test]
async fn history_keeps_only_the_last_versions_up_to_its_capacity() {
    let store = PolicyStore::new(4);
    for failures in 1..=10 {
        store
            .offer(&valid_yaml(failures), PolicyFormat::Yaml, "test")
            .await
            .expect("valid");
    }
    let versions: Vec<u64> = store
        .history()
        .iter()
        .map(|applied| applied.version)
        .collect();
    assert_eq!(versions, [7, 8, 9, 10]);
    assert_eq!(store.current().map(|current| current.version), Some(10));
}

#[tokio::test]
async fn rollback_makes_an_old_version_current_as_a_new_version() {
    let store = PolicyStore::default();
    for failures in [3, 4, 5] {
        store
            .offer(&valid_yaml(failures), PolicyFormat::Yaml, "test")
            .await
            .expect("valid");
    }
    let mut current = store.subscribe();
    let restored = store.rollback(1).await.expect("version 1 is kept");
    assert_eq!(
        (
            restored.version,
            restored.rolled_back_from,
            failures(&restored)
        ),
        (4, Some(1), 3)
    );
    assert_eq!(restored.digest, store.history()[0].digest);
    let published = current.borrow_and_update().clone().expect("a policy");
    assert_eq!(published.version, 4);
    assert_eq!(store.metrics().rollbacks.get(), 1);
    let versions: Vec<u64> = store
        .history()
        .iter()
        .map(|applied| applied.version)
        .collect();
    assert_eq!(versions, [1, 2, 3, 4]);
}

#[tokio::test]
async fn rollback_to_a_version_no_longer_kept_is_refused_with_the_kept_ones() {
    let store = PolicyStore::new(2);
    for failures in [3, 4, 5] {
        store
            .offer(&valid_yaml(failures), PolicyFormat::Yaml, "test")
            .await
            .expect("valid");
    }
    assert_eq!(
        store.rollback(1).await.expect_err("forgotten"),
        RollbackError::UnknownVersion {
            version: 1,
            available: vec![2, 3]
        }
    );
    assert_eq!(store.current().map(|current| current.version), Some(3));
}

#[tokio::test]
async fn rolling_back_to_the_policy_in_force_makes_no_new_version() {
    let store = PolicyStore::new(4);
    for failures in [3, 4] {
        store
            .offer(&valid_yaml(failures), PolicyFormat::Yaml, "test")
            .await
            .expect("valid");
    }
    store.rollback(1).await.expect("version 1 is kept");
    for _ in 0..10 {
        let again = store.rollback(1).await.expect("version 1 is kept");
        assert_eq!(again.version, 3, "the rollback in force stays");
    }
    let versions: Vec<u64> = store.history().iter().map(|kept| kept.version).collect();
    assert_eq!(versions, [1, 2, 3], "repeated rollbacks push nothing out");
}

#[tokio::test]
async fn a_text_decided_before_does_not_undo_a_rollback_but_a_new_text_does() {
    let store = PolicyStore::default();
    for failures in [3, 4] {
        store
            .offer(&valid_yaml(failures), PolicyFormat::Yaml, "test")
            .await
            .expect("valid");
    }
    store.rollback(1).await.expect("version 1 is kept");
    let again = store
        .offer(&valid_yaml(4), PolicyFormat::Yaml, "test")
        .await
        .expect("valid");
    assert_eq!(again, Offered::AlreadyDecided(3));
    assert_eq!(store.current().map(|current| failures(&current)), Some(3));
    let changed = store
        .offer(&valid_yaml(5), PolicyFormat::Yaml, "test")
        .await
        .expect("valid");
    assert_eq!(changed, Offered::Applied(4));
}
