//! [`PolicyConfigMap`]: a policy in one key of a Kubernetes ConfigMap, watched with kube-rs.
//!
//! The watcher lists and watches only that ConfigMap (`fieldSelector=metadata.name=NAME`),
//! relisting after `410 Gone` like every kube-rs watcher. Each distinct text of the key is
//! offered once; a ConfigMap missing (at a list), deleted or without the key is reported and
//! counted, and the current policy stays (deleting the ConfigMap never removes the policy).
//! A valid text that cannot be recorded yet (the status ConfigMap unreachable) is offered
//! again until it is.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::{OfferError, PolicyFormat, PolicyStore};

/// The policy in `key` of ConfigMap `namespace/name`. Format: JSON when the key ends in
/// `.json`, YAML otherwise.
#[derive(Clone)]
pub struct PolicyConfigMap {
    client: Client,
    namespace: String,
    name: String,
    key: String,
}

impl std::fmt::Debug for PolicyConfigMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyConfigMap")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl PolicyConfigMap {
    /// Watches `key` of ConfigMap `namespace/name` through `client`.
    pub fn new(
        client: Client,
        namespace: impl Into<String>,
        name: impl Into<String>,
        key: impl Into<String>,
    ) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            name: name.into(),
            key: key.into(),
        }
    }

    fn origin(&self) -> String {
        format!("configmap:{}/{}:{}", self.namespace, self.name, self.key)
    }

    /// Offers the key's text to `store` on every change, until dropped. A valid text that
    /// could not be recorded (the status ConfigMap unreachable) is offered again every
    /// two seconds until it is, unless a newer text replaces it.
    pub async fn run(self, store: PolicyStore) {
        let origin = self.origin();
        let format = PolicyFormat::from_name(&self.key);
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = watcher(api, config).default_backoff().boxed();
        let mut last_offered: Option<[u8; 32]> = None;
        let mut unrecorded: Option<String> = None;
        let mut listed_it = false;
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                () = tokio::time::sleep(RETRY), if unrecorded.is_some() => {
                    if let Some(text) = unrecorded.take() {
                        unrecorded = offer(&store, text, format, &origin).await;
                    }
                    continue;
                }
            };
            let Some(event) = event else { return };
            match event {
                Ok(watcher::Event::Apply(map) | watcher::Event::InitApply(map)) => {
                    listed_it = true;
                    match map.data.as_ref().and_then(|data| data.get(&self.key)) {
                        Some(text) => {
                            let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
                            if last_offered == Some(hash) {
                                continue;
                            }
                            last_offered = Some(hash);
                            unrecorded = offer(&store, text.clone(), format, &origin).await;
                        }
                        None => {
                            last_offered = None;
                            unrecorded = None;
                            store.reject_missing(&origin, "the ConfigMap has no such key");
                        }
                    }
                }
                Ok(watcher::Event::Delete(_)) => {
                    last_offered = None;
                    unrecorded = None;
                    store.reject_missing(&origin, "the ConfigMap was deleted");
                }
                Ok(watcher::Event::Init) => listed_it = false,
                Ok(watcher::Event::InitDone) => {
                    if !listed_it {
                        last_offered = None;
                        unrecorded = None;
                        store.reject_missing(&origin, "no such ConfigMap");
                    }
                }
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    info!(origin = %origin, "watch expired (410 Gone); relisting");
                }
                Err(problem) => {
                    warn!(origin = %origin, error = %problem, "watch failed; retrying after a backoff");
                }
            }
        }
    }
}

/// How long a text that could not be recorded waits before it is offered again.
const RETRY: Duration = Duration::from_secs(2);

/// Offers `text`; returns it when it must be offered again (valid, but not recorded).
/// Rejections are logged and counted by the store.
async fn offer(
    store: &PolicyStore,
    text: String,
    format: PolicyFormat,
    origin: &str,
) -> Option<String> {
    match store.offer(&text, format, origin).await {
        Err(OfferError::NotRecorded(_)) => Some(text),
        Ok(_) | Err(OfferError::Rejected(_)) => None,
    }
}
