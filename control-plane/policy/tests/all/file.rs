//! The polled policy file.

use std::time::Duration;

use fulcrum_policy::{PolicyFile, PolicyStore};

use crate::support::{INVALID_YAML, failures, until_current, until_rejected, valid_yaml};

fn start(path: &std::path::Path, store: &PolicyStore) -> tokio::task::JoinHandle<()> {
    let file = PolicyFile::new(path).with_interval(Duration::from_millis(10));
    tokio::spawn(file.run(store.clone()))
}

#[tokio::test]
async fn file_edits_are_applied_and_a_bad_edit_keeps_the_last_good_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, valid_yaml(3)).expect("write");
    let store = PolicyStore::default();
    let poller = start(&path, &store);
    until_current(&store, "the file's policy", |applied| {
        failures(applied) == 3
    })
    .await;
    std::fs::write(&path, INVALID_YAML).expect("write");
    until_rejected(&store, 1).await;
    assert_eq!(store.current().map(|current| failures(&current)), Some(3));
    std::fs::write(&path, valid_yaml(7)).expect("write");
    let applied = until_current(&store, "the fixed policy", |applied| failures(applied) == 7).await;
    assert_eq!(applied.version, 2);
    assert_eq!(
        store.metrics().rejected.get(),
        1,
        "a bad content is rejected once"
    );
    poller.abort();
}

#[tokio::test]
async fn json_file_is_read_as_json_and_a_missing_file_keeps_the_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.json");
    std::fs::write(
        &path,
        r#"{"default": {"outlier_detection": {"consecutive_failures": 9}}}"#,
    )
    .expect("write");
    let store = PolicyStore::default();
    let poller = start(&path, &store);
    until_current(&store, "the JSON policy", |applied| failures(applied) == 9).await;
    std::fs::remove_file(&path).expect("remove");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.current().map(|current| failures(&current)), Some(9));
    poller.abort();
}

#[tokio::test]
async fn a_rollback_holds_until_the_file_changes_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, valid_yaml(3)).expect("write");
    let store = PolicyStore::default();
    let poller = start(&path, &store);
    until_current(&store, "version 1", |applied| failures(applied) == 3).await;
    std::fs::write(&path, valid_yaml(4)).expect("write");
    until_current(&store, "version 2", |applied| failures(applied) == 4).await;
    store.rollback(1).await.expect("kept");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let current = store.current().expect("a policy");
    assert_eq!((current.version, failures(&current)), (3, 3));
    std::fs::write(&path, valid_yaml(5)).expect("write");
    until_current(&store, "the next edit", |applied| failures(applied) == 5).await;
    poller.abort();
}
