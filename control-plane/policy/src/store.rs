//! [`PolicyStore`]: accepted policy versions, the current one on a watch channel, rollback.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use fulcrum_core::{Policy, PolicyError};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{error, info};

/// Accepted versions kept for rollback unless configured otherwise.
pub const DEFAULT_HISTORY: usize = 16;

/// How a policy text is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyFormat {
    /// JSON, parsed with [`Policy::from_json`].
    Json,
    /// YAML, parsed with [`Policy::from_yaml`].
    Yaml,
}

impl PolicyFormat {
    /// JSON for names ending in `.json`, YAML otherwise (YAML also reads JSON).
    pub fn from_name(name: &str) -> Self {
        if name.to_ascii_lowercase().ends_with(".json") {
            Self::Json
        } else {
            Self::Yaml
        }
    }

    fn parse(self, text: &str) -> Result<Policy, PolicyError> {
        match self {
            Self::Json => Policy::from_json(text),
            Self::Yaml => Policy::from_yaml(text),
        }
    }
}

/// One accepted policy version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppliedPolicy {
    /// Increases by one with every accepted policy and every rollback; starts at 1.
    pub version: u64,
    /// A short hash of the policy's canonical JSON: equal policies have equal digests.
    pub digest: String,
    /// Where the text came from, e.g. `file:/etc/fulcrum/policy.yaml`.
    pub origin: String,
    /// The version this one restored, when it was made by a rollback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<u64>,
    /// When it was accepted, in milliseconds since the Unix epoch.
    pub accepted_at_unix_ms: u64,
    /// The validated policy.
    #[serde(serialize_with = "serialize_shared")]
    pub policy: Arc<Policy>,
}

fn serialize_shared<S: serde::Serializer>(
    policy: &Arc<Policy>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    Serialize::serialize(policy.as_ref(), serializer)
}

/// What [`PolicyStore::offer`] did with a valid policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// It became current as this version.
    Applied(u64),
    /// It equals the current policy, which stays as this version.
    Unchanged(u64),
}

/// A policy text refused; the current policy stays.
#[derive(Debug, thiserror::Error)]
#[error("policy from {origin} rejected (current version stays {kept:?}): {source}")]
pub struct PolicyRejected {
    /// Where the text came from.
    pub origin: String,
    /// The version still current, if any.
    pub kept: Option<u64>,
    /// Every parse or validation error.
    #[source]
    pub source: PolicyError,
}

/// Why a rollback was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RollbackError {
    /// The version is not (or no longer) in the history.
    #[error(
        "policy version {version} is not in the history (available: {available:?}); pick one from GET /v1/policy/history"
    )]
    UnknownVersion {
        /// The version asked for.
        version: u64,
        /// The versions kept.
        available: Vec<u64>,
    },
}

/// Prometheus metrics of the policy store. Cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct PolicyMetrics {
    /// `fulcrum_policy_accepted_total`: policies that became current, rollbacks included.
    pub accepted: Counter,
    /// `fulcrum_policy_rejected_total`: policy texts refused (malformed, invalid, missing).
    pub rejected: Counter,
    /// `fulcrum_policy_rollbacks_total`: rollbacks performed.
    pub rollbacks: Counter,
    /// `fulcrum_policy_version`: the current version (0 before the first).
    pub version: Gauge,
}

impl PolicyMetrics {
    /// Registers every metric under the `fulcrum_policy` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let policy = registry.sub_registry_with_prefix("fulcrum_policy");
        policy.register(
            "accepted",
            "Policies that became current, rollbacks included",
            self.accepted.clone(),
        );
        policy.register(
            "rejected",
            "Policy texts refused as malformed, invalid or missing",
            self.rejected.clone(),
        );
        policy.register("rollbacks", "Rollbacks performed", self.rollbacks.clone());
        policy.register(
            "version",
            "The current policy version (0 before the first)",
            self.version.clone(),
        );
    }
}

#[derive(Debug)]
struct History {
    capacity: usize,
    next_version: u64,
    /// Oldest first; the last entry is current.
    versions: VecDeque<Arc<AppliedPolicy>>,
}

/// Accepted policy versions and the current one. Cheap to clone (shared state).
///
/// Invariants: the history holds at most `capacity` versions, in increasing version order,
/// and its last entry is the one published on the watch channel.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    history: Arc<Mutex<History>>,
    current: watch::Sender<Option<Arc<AppliedPolicy>>>,
    metrics: PolicyMetrics,
}

impl Default for PolicyStore {
    fn default() -> Self {
        Self::new(DEFAULT_HISTORY)
    }
}

impl PolicyStore {
    /// An empty store keeping the last `capacity` (at least 1) accepted versions.
    pub fn new(capacity: usize) -> Self {
        let (current, _) = watch::channel(None);
        Self {
            history: Arc::new(Mutex::new(History {
                capacity: capacity.max(1),
                next_version: 1,
                versions: VecDeque::new(),
            })),
            current,
            metrics: PolicyMetrics::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, History> {
        self.history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current policy, then every change of it.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<AppliedPolicy>>> {
        self.current.subscribe()
    }

    /// The current policy, if one was accepted.
    pub fn current(&self) -> Option<Arc<AppliedPolicy>> {
        self.current.borrow().clone()
    }

    /// The kept versions, oldest first; the last is current.
    pub fn history(&self) -> Vec<Arc<AppliedPolicy>> {
        self.lock().versions.iter().cloned().collect()
    }

    /// The store's metrics, to register or read.
    pub fn metrics(&self) -> &PolicyMetrics {
        &self.metrics
    }

    /// Parses, validates and applies `text` from `origin`. A policy equal to the current one
    /// changes nothing. On error every problem is logged, the rejection is counted, and the
    /// current policy stays.
    pub fn offer(
        &self,
        text: &str,
        format: PolicyFormat,
        origin: &str,
    ) -> Result<Offered, PolicyRejected> {
        match format.parse(text) {
            Ok(policy) => Ok(self.accept(policy, origin, None)),
            Err(source) => {
                let kept = self.current().map(|current| current.version);
                self.log_rejection(origin, kept, &source);
                Err(PolicyRejected {
                    origin: origin.to_owned(),
                    kept,
                    source,
                })
            }
        }
    }

    /// Counts and logs a rejection that has no policy text (e.g. a ConfigMap without the key).
    pub(crate) fn reject_missing(&self, origin: &str, reason: &str) {
        self.metrics.rejected.inc();
        let kept = self.current().map(|current| current.version);
        error!(origin, reason, kept_version = ?kept, "no policy text; keeping the current policy");
    }

    /// Makes accepted `version` current again, as a new version.
    pub fn rollback(&self, version: u64) -> Result<Arc<AppliedPolicy>, RollbackError> {
        let target = {
            let history = self.lock();
            history
                .versions
                .iter()
                .find(|applied| applied.version == version)
                .cloned()
                .ok_or_else(|| RollbackError::UnknownVersion {
                    version,
                    available: history
                        .versions
                        .iter()
                        .map(|applied| applied.version)
                        .collect(),
                })?
        };
        self.metrics.rollbacks.inc();
        let origin = format!("rollback to version {version}");
        let applied = self.append(target.policy.clone(), &origin, Some(version));
        info!(
            from_version = version,
            version = applied.version,
            digest = %applied.digest,
            "policy rolled back"
        );
        Ok(applied)
    }

    fn accept(&self, policy: Policy, origin: &str, rolled_back_from: Option<u64>) -> Offered {
        if let Some(current) = self.current()
            && *current.policy == policy
        {
            info!(origin, version = current.version, "policy unchanged");
            return Offered::Unchanged(current.version);
        }
        let applied = self.append(Arc::new(policy), origin, rolled_back_from);
        info!(origin, version = applied.version, digest = %applied.digest, "policy applied");
        Offered::Applied(applied.version)
    }

    /// Records `policy` as the next version and publishes it, under one lock so the history
    /// and the channel change together.
    fn append(
        &self,
        policy: Arc<Policy>,
        origin: &str,
        rolled_back_from: Option<u64>,
    ) -> Arc<AppliedPolicy> {
        let mut history = self.lock();
        let applied = Arc::new(AppliedPolicy {
            version: history.next_version,
            digest: digest(&policy),
            origin: origin.to_owned(),
            rolled_back_from,
            accepted_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| {
                    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
                }),
            policy,
        });
        history.next_version += 1;
        history.versions.push_back(applied.clone());
        while history.versions.len() > history.capacity {
            history.versions.pop_front();
        }
        debug_assert!(
            history.versions.len() <= history.capacity,
            "policy history exceeds its capacity"
        );
        self.metrics.accepted.inc();
        self.metrics
            .version
            .set(i64::try_from(applied.version).unwrap_or(i64::MAX));
        self.current.send_replace(Some(applied.clone()));
        applied
    }

    fn log_rejection(&self, origin: &str, kept: Option<u64>, problem: &PolicyError) {
        self.metrics.rejected.inc();
        match problem {
            PolicyError::Invalid(invalid) => {
                for field in &invalid.errors {
                    error!(origin, path = %field.path, problem = %field.message, "invalid policy field");
                }
                error!(
                    origin,
                    errors = invalid.errors.len(),
                    kept_version = ?kept,
                    "policy rejected; keeping the current policy"
                );
            }
            malformed => error!(
                origin,
                error = %malformed,
                kept_version = ?kept,
                "policy rejected; keeping the current policy"
            ),
        }
    }
}

/// A short hex hash of the policy's canonical JSON.
fn digest(policy: &Policy) -> String {
    // Plain structs over ordered maps: serialization is canonical and cannot fail.
    let canonical = serde_json::to_vec(policy).unwrap_or_default();
    fulcrum_core::version::content_version(&[&canonical])
}
