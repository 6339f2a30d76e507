//! [`PolicyStatus`]: the policy record in a ConfigMap the control plane owns, shared by every
//! replica.
//!
//! The operator's ConfigMap says which policy is wanted; this one says which is accepted. It
//! holds one key, `record.json` (a [`PolicyRecord`]: the kept versions, the next version number
//! and the digest of the last decided source text), and annotations that show the current
//! version to `kubectl get -o yaml`. Every change is a compare-and-swap on its
//! `resourceVersion` (`create` when it does not exist, `replace` with the version read
//! otherwise), so two replicas deciding at once cannot both win: the loser gets `409
//! Conflict`, reads the winner's record and decides again on it.
//!
//! [`PolicyStatus::follow`] watches it, so a change written by one replica (a new policy, a
//! rollback) is adopted by every other within the watch's latency, and a restarted replica
//! starts from it: it serves the accepted policy even when the operator's ConfigMap holds an
//! invalid one, and a rollback outlives restarts.
//!
//! A record that cannot be read back (edited by hand, corrupted, from a newer version with
//! rules this one does not know) is logged, counted, and ignored: the replica keeps its
//! record, and its next change replaces the stored one.

use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};

use crate::{PolicyRecord, PolicyStore};

/// The key of the status ConfigMap holding the record.
pub const RECORD_KEY: &str = "record.json";

/// The largest record written: below the API server's 1 MiB object limit, with room for the
/// object's metadata. The oldest versions are forgotten first to stay under it.
pub const MAX_RECORD_BYTES: usize = 900 * 1024;

/// How long one read or write of the status may take before it counts as failed.
const API_DEADLINE: Duration = Duration::from_secs(10);

/// Why the shared record could not be read or written; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    /// The API server refused or did not answer.
    #[error(
        "cannot {action} the policy status ConfigMap {status}: {reason}; check the API server \
         and that the control plane may get, create and update it (RBAC)"
    )]
    Unavailable {
        /// `namespace/name` of the status ConfigMap.
        status: String,
        /// `read` or `write`.
        action: &'static str,
        /// What the API server or the client said.
        reason: String,
    },
    /// Other replicas kept writing first.
    #[error(
        "the policy status ConfigMap {status} changed under {attempts} consecutive writes; try again"
    )]
    Contended {
        /// `namespace/name` of the status ConfigMap.
        status: String,
        /// Writes attempted.
        attempts: u32,
    },
    /// Even the current version alone is larger than a ConfigMap can hold.
    #[error(
        "the policy is too large to record in the status ConfigMap {status} ({bytes} bytes, \
         at most {MAX_RECORD_BYTES}); make it smaller"
    )]
    TooLarge {
        /// `namespace/name` of the status ConfigMap.
        status: String,
        /// The size of the smallest record.
        bytes: usize,
    },
}

/// How a compare-and-swap failed.
#[derive(Debug)]
pub(crate) enum StatusWrite {
    /// Another replica wrote first: read again and redo the change.
    Conflict,
    /// Anything else; the change is abandoned.
    Failed(StatusError),
}

/// The stored record and the resource version to compare against.
#[derive(Debug)]
pub(crate) struct Stored {
    /// The record, unless there is none or it cannot be read back.
    pub record: Option<PolicyRecord>,
    /// `None` when the ConfigMap does not exist: the write creates it.
    pub resource_version: Option<String>,
}

/// The status ConfigMap `namespace/name`. Cheap to clone.
#[derive(Clone)]
pub struct PolicyStatus {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
}

impl std::fmt::Debug for PolicyStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStatus")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for PolicyStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl PolicyStatus {
    /// The status ConfigMap `namespace/name`, read and written through `client`.
    pub fn new(client: Client, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        let namespace = namespace.into();
        Self {
            api: Api::namespaced(client, &namespace),
            namespace,
            name: name.into(),
        }
    }

    fn unavailable(&self, action: &'static str, reason: impl ToString) -> StatusError {
        StatusError::Unavailable {
            status: self.to_string(),
            action,
            reason: reason.to_string(),
        }
    }

    /// The record in `map`, if it has one that reads back; a bad one is logged and counted.
    fn record_of(&self, map: &ConfigMap, store: &PolicyStore) -> Option<PolicyRecord> {
        let text = map.data.as_ref()?.get(RECORD_KEY)?;
        match PolicyRecord::from_json(text) {
            Ok(record) => Some(record),
            Err(problem) => {
                store.count_invalid_status();
                warn!(
                    status = %self,
                    error = %problem,
                    "ignoring the stored policy record; the next change replaces it"
                );
                None
            }
        }
    }

    /// Reads the stored record for a compare-and-swap.
    pub(crate) async fn load(&self, store: &PolicyStore) -> Result<Stored, StatusError> {
        let map = tokio::time::timeout(API_DEADLINE, self.api.get_opt(&self.name))
            .await
            .map_err(|_| self.unavailable("read", format!("no answer within {API_DEADLINE:?}")))?
            .map_err(|problem| self.unavailable("read", problem))?;
        Ok(match map {
            Some(map) => Stored {
                record: self.record_of(&map, store),
                resource_version: map.metadata.resource_version.clone(),
            },
            None => Stored {
                record: None,
                resource_version: None,
            },
        })
    }

    /// Writes `record` if the ConfigMap is still as `stored` read it; returns what was
    /// written (the oldest versions forgotten if it had to shrink).
    pub(crate) async fn save(
        &self,
        record: PolicyRecord,
        stored: &Stored,
    ) -> Result<PolicyRecord, StatusWrite> {
        let (record, json) = record.fitted(MAX_RECORD_BYTES).map_err(|bytes| {
            StatusWrite::Failed(StatusError::TooLarge {
                status: self.to_string(),
                bytes,
            })
        })?;
        let current = record.current();
        let annotations = BTreeMap::from([
            (
                "fulcrum.io/policy-version".to_owned(),
                current.map_or_else(String::new, |c| c.version.to_string()),
            ),
            (
                "fulcrum.io/policy-digest".to_owned(),
                current.map_or_else(String::new, |c| c.digest.clone()),
            ),
            (
                "fulcrum.io/record-revision".to_owned(),
                record.revision.to_string(),
            ),
        ]);
        let map = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: stored.resource_version.clone(),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "fulcrum-control-plane".to_owned(),
                )])),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(RECORD_KEY.to_owned(), json)])),
            ..ConfigMap::default()
        };
        let params = PostParams::default();
        let write = async {
            match &stored.resource_version {
                None => self.api.create(&params, &map).await,
                Some(_) => self.api.replace(&self.name, &params, &map).await,
            }
        };
        match tokio::time::timeout(API_DEADLINE, write).await {
            Ok(Ok(_)) => Ok(record),
            Ok(Err(kube::Error::Api(status)))
                if status.is_conflict() || status.is_already_exists() =>
            {
                Err(StatusWrite::Conflict)
            }
            Ok(Err(problem)) => Err(StatusWrite::Failed(self.unavailable("write", problem))),
            Err(_) => Err(StatusWrite::Failed(
                self.unavailable("write", format!("no answer within {API_DEADLINE:?}")),
            )),
        }
    }

    /// Adopts every newer record written to the status ConfigMap into `store`, until dropped.
    pub async fn follow(self, store: PolicyStore) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = watcher(self.api.clone(), config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(map) | watcher::Event::InitApply(map)) => {
                    if let Some(record) = self.record_of(&map, &store) {
                        store.adopt(record);
                    }
                }
                Ok(watcher::Event::Delete(_)) => warn!(
                    status = %self,
                    "the policy status ConfigMap was deleted; the next policy change recreates it from this replica's record"
                ),
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    info!(status = %self, "watch expired (410 Gone); relisting");
                }
                Err(problem) => {
                    warn!(status = %self, error = %problem, "watch failed; retrying after a backoff");
                }
            }
        }
    }
}
