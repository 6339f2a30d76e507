//! The policy ConfigMap, watched with kube-rs's real client against the fake API server.

use std::collections::BTreeMap;

use fulcrum_policy::{PolicyConfigMap, PolicyStore};
use fulcrum_test_support::kube_api::FakeApiServer;
use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use crate::support::{INVALID_YAML, WAIT, failures, until_current, until_rejected, valid_yaml};

fn config_map(name: &str, key: &str, text: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("mesh".to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(key.to_owned(), text.to_owned())])),
        ..ConfigMap::default()
    }
}

async fn start(server: &FakeApiServer, store: &PolicyStore) -> tokio::task::JoinHandle<()> {
    let source = PolicyConfigMap::new(server.client(), "mesh", "fulcrum", "policy.yaml");
    tokio::spawn(source.run(store.clone()))
}

#[tokio::test]
async fn configmap_key_is_applied_and_followed_through_the_watch() {
    let server = FakeApiServer::start().await;
    server.apply(&config_map("fulcrum", "policy.yaml", &valid_yaml(3)));
    server.apply(&config_map("other", "policy.yaml", &valid_yaml(8)));
    let store = PolicyStore::default();
    let watcher = start(&server, &store).await;
    until_current(&store, "the ConfigMap's policy", |applied| {
        failures(applied) == 3
    })
    .await;
    server.apply(&config_map("fulcrum", "policy.yaml", &valid_yaml(4)));
    let applied = until_current(&store, "the update", |applied| failures(applied) == 4).await;
    assert_eq!(applied.origin, "configmap:mesh/fulcrum:policy.yaml");
    for request in server.requests() {
        assert_eq!(
            request.field_selector.as_deref(),
            Some("metadata.name=fulcrum")
        );
        assert_eq!(request.namespace.as_deref(), Some("mesh"));
    }
    watcher.abort();
}

#[tokio::test]
async fn bad_update_missing_key_and_deletion_are_counted_and_the_policy_stays() {
    let server = FakeApiServer::start().await;
    server.apply(&config_map("fulcrum", "policy.yaml", &valid_yaml(3)));
    let store = PolicyStore::default();
    let watcher = start(&server, &store).await;
    until_current(&store, "the first policy", |applied| failures(applied) == 3).await;
    server.apply(&config_map("fulcrum", "policy.yaml", INVALID_YAML));
    until_rejected(&store, 1).await;
    server.apply(&config_map("fulcrum", "renamed.yaml", &valid_yaml(5)));
    until_rejected(&store, 2).await;
    server.delete::<ConfigMap>("mesh", "fulcrum");
    until_rejected(&store, 3).await;
    let current = store.current().expect("the last good policy");
    assert_eq!((current.version, failures(&current)), (1, 3));
    watcher.abort();
}

#[tokio::test]
async fn configmap_watch_relists_after_410_gone() {
    let server = FakeApiServer::start().await;
    server.apply(&config_map("fulcrum", "policy.yaml", &valid_yaml(3)));
    let store = PolicyStore::default();
    let watcher = start(&server, &store).await;
    until_current(&store, "the first policy", |applied| failures(applied) == 3).await;
    tokio::time::timeout(WAIT, async {
        while server.watches::<ConfigMap>().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the watch opens after the list");
    server.apply_unannounced(&config_map("fulcrum", "policy.yaml", &valid_yaml(6)));
    server.expire_watches();
    until_current(&store, "the missed update", |applied| {
        failures(applied) == 6
    })
    .await;
    assert_eq!(server.list_count::<ConfigMap>(), 2);
    watcher.abort();
}
