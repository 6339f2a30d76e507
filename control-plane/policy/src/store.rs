//! [`PolicyStore`]: accepted policy versions, the current one on a watch channel, rollback;
//! every change a compare-and-swap of the [`PolicyRecord`], in memory or shared by replicas.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use fulcrum_core::{Policy, PolicyError};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info};

use crate::{PolicyRecord, PolicyStatus, StatusError, record::source_digest, status::StatusWrite};

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

    /// Parses and validates `text` as the control plane does with every offered policy (the
    /// `fulcrum` CLI's `policy validate` calls this, so it judges exactly the same).
    pub fn parse(self, text: &str) -> Result<Policy, PolicyError> {
        match self {
            Self::Json => Policy::from_json(text),
            Self::Yaml => Policy::from_yaml(text),
        }
    }
}

/// One accepted policy version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedPolicy {
    /// Increases by one with every accepted policy and every rollback; starts at 1.
    pub version: u64,
    /// A short hash of the policy's canonical JSON: equal policies have equal digests.
    pub digest: String,
    /// Where the text came from, e.g. `file:/etc/fulcrum/policy.yaml`.
    pub origin: String,
    /// The version this one restored, when it was made by a rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<u64>,
    /// When it was accepted, in milliseconds since the Unix epoch.
    pub accepted_at_unix_ms: u64,
    /// The validated policy.
    pub policy: Arc<Policy>,
}

/// What [`PolicyStore::offer`] did with a valid policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// It became current as this version.
    Applied(u64),
    /// It equals the current policy, which stays as this version.
    Unchanged(u64),
    /// This very text was decided before (on this or another replica, before a restart or
    /// not); the current version, possibly a rollback made since, stays.
    AlreadyDecided(u64),
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

/// Why an offered policy text did not become current.
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    /// The text is not a valid policy.
    #[error(transparent)]
    Rejected(#[from] PolicyRejected),
    /// The text is valid but could not be recorded where every replica reads it; nothing
    /// changed, and the source offers it again.
    #[error(transparent)]
    NotRecorded(#[from] StatusError),
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
    /// The rollback could not be recorded where every replica reads it; nothing changed.
    #[error(transparent)]
    NotRecorded(#[from] StatusError),
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
    /// `fulcrum_policy_status_failures_total`: reads or writes of the status ConfigMap that
    /// failed, so a policy change or rollback was not applied (retried for source texts).
    pub status_failures: Counter,
    /// `fulcrum_policy_status_conflicts_total`: writes that lost a race with another replica
    /// and were redone on the newer record.
    pub status_conflicts: Counter,
    /// `fulcrum_policy_status_invalid_total`: status records that could not be read back
    /// (edited by hand or corrupted); the in-memory record stays and the next write replaces it.
    pub status_invalid: Counter,
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
        policy.register(
            "status_failures",
            "Reads or writes of the policy status ConfigMap that failed; the change was not applied",
            self.status_failures.clone(),
        );
        policy.register(
            "status_conflicts",
            "Policy status writes redone after another replica wrote first",
            self.status_conflicts.clone(),
        );
        policy.register(
            "status_invalid",
            "Policy status records that could not be read back",
            self.status_invalid.clone(),
        );
    }
}

/// Compare-and-swap attempts of one change before giving up as contended.
const WRITE_ATTEMPTS: u32 = 8;

#[derive(Debug)]
struct Shared {
    capacity: usize,
    /// The record in force here: the last one written or adopted.
    record: Mutex<PolicyRecord>,
    current: watch::Sender<Option<Arc<AppliedPolicy>>>,
    metrics: PolicyMetrics,
    /// Where the record is shared with the other replicas, if anywhere.
    status: Option<PolicyStatus>,
    /// One change at a time from this process: read, decide, compare-and-swap.
    writing: tokio::sync::Mutex<()>,
}

/// Accepted policy versions and the current one. Cheap to clone (shared state).
///
/// Every change is made the same way: read the newest [`PolicyRecord`], decide the next one
/// with its pure rules, and write it back with compare-and-swap, redoing the change on the
/// newer record when another replica wrote first. With a [`PolicyStatus`] the record lives in
/// a ConfigMap every replica reads and writes, so the accepted policy, its history and
/// rollbacks survive restarts and are the same on every replica; without one it lives in this
/// process only.
///
/// Invariants: the history holds at most `capacity` versions, in increasing version order,
/// and its last entry is the one published on the watch channel.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    shared: Arc<Shared>,
}

impl Default for PolicyStore {
    fn default() -> Self {
        Self::new(DEFAULT_HISTORY)
    }
}

impl PolicyStore {
    /// An empty store, in this process only, keeping the last `capacity` (at least 1)
    /// accepted versions.
    pub fn new(capacity: usize) -> Self {
        Self::build(capacity, None)
    }

    /// An empty store whose record is shared through `status`: it adopts the stored record at
    /// its first change or when [`PolicyStatus::follow`] reads it, and writes every change
    /// there before applying it.
    pub fn shared_through(status: PolicyStatus, capacity: usize) -> Self {
        Self::build(capacity, Some(status))
    }

    fn build(capacity: usize, status: Option<PolicyStatus>) -> Self {
        let (current, _) = watch::channel(None);
        Self {
            shared: Arc::new(Shared {
                capacity: capacity.max(1),
                record: Mutex::new(PolicyRecord::default()),
                current,
                metrics: PolicyMetrics::default(),
                status,
                writing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PolicyRecord> {
        self.shared
            .record
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current policy, then every change of it.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<AppliedPolicy>>> {
        self.shared.current.subscribe()
    }

    /// The current policy, if one was accepted.
    pub fn current(&self) -> Option<Arc<AppliedPolicy>> {
        self.shared.current.borrow().clone()
    }

    /// The kept versions, oldest first; the last is current.
    pub fn history(&self) -> Vec<Arc<AppliedPolicy>> {
        self.lock().versions.clone()
    }

    /// The record in force here.
    pub fn record(&self) -> PolicyRecord {
        self.lock().clone()
    }

    /// The store's metrics, to register or read.
    pub fn metrics(&self) -> &PolicyMetrics {
        &self.shared.metrics
    }

    /// Parses, validates and applies `text` from `origin`. A policy equal to the current one,
    /// or a text decided before, changes nothing. An invalid text is logged field by field and
    /// counted, and the current policy stays; so it does when the change cannot be recorded.
    pub async fn offer(
        &self,
        text: &str,
        format: PolicyFormat,
        origin: &str,
    ) -> Result<Offered, OfferError> {
        let policy = match format.parse(text) {
            Ok(policy) => policy,
            Err(source) => {
                let kept = self.current().map(|current| current.version);
                self.log_rejection(origin, kept, &source);
                return Err(PolicyRejected {
                    origin: origin.to_owned(),
                    kept,
                    source,
                }
                .into());
            }
        };
        let source = source_digest(text);
        let capacity = self.shared.capacity;
        let decided = self
            .commit(|record| {
                Ok::<_, std::convert::Infallible>(record.offered(
                    &source,
                    &policy,
                    origin,
                    capacity,
                    now_unix_ms(),
                ))
            })
            .await
            .map_err(|problem| self.not_recorded(origin, problem))?;
        let Ok(offered) = decided;
        match offered {
            Offered::Applied(version) => {
                self.shared.metrics.accepted.inc();
                let digest = self.current().map(|current| current.digest.clone());
                info!(origin, version, digest = ?digest, "policy applied");
            }
            Offered::Unchanged(version) => info!(origin, version, "policy unchanged"),
            Offered::AlreadyDecided(version) => info!(
                origin,
                version,
                "policy text decided before; the current version (a rollback included) stays"
            ),
        }
        Ok(offered)
    }

    /// Counts and logs a rejection that has no policy text (e.g. a ConfigMap without the key).
    pub(crate) fn reject_missing(&self, origin: &str, reason: &str) {
        self.shared.metrics.rejected.inc();
        let kept = self.current().map(|current| current.version);
        error!(origin, reason, kept_version = ?kept, "no policy text; keeping the current policy");
    }

    /// Makes accepted `version` current again, as a new version (none when its policy is
    /// already current), on every replica sharing the record.
    pub async fn rollback(&self, version: u64) -> Result<Arc<AppliedPolicy>, RollbackError> {
        let capacity = self.shared.capacity;
        let origin = format!("rollback to version {version}");
        let (applied, made_version) = self
            .commit(|record| {
                record
                    .rolled_back(version, capacity, now_unix_ms())
                    .map(|(next, applied)| {
                        let made_version = next.is_some();
                        (next, (applied, made_version))
                    })
            })
            .await
            .map_err(|problem| self.not_recorded(&origin, problem))??;
        self.shared.metrics.rollbacks.inc();
        if made_version {
            self.shared.metrics.accepted.inc();
        }
        info!(
            from_version = version,
            version = applied.version,
            digest = %applied.digest,
            "policy rolled back"
        );
        Ok(applied)
    }

    /// Adopts `record`, read from the shared status, if it is newer than the one in force.
    pub(crate) fn adopt(&self, record: PolicyRecord) {
        let newer = record.revision > self.lock().revision;
        if newer {
            let version = record.current().map(|current| current.version);
            self.install(record);
            info!(version = ?version, "adopted the policy record the replicas share");
        }
    }

    /// Counts that the shared status could not be read back.
    pub(crate) fn count_invalid_status(&self) {
        self.shared.metrics.status_invalid.inc();
    }

    /// Reads the newest record, decides the next one with `change`, writes it back with
    /// compare-and-swap and installs it; redone on the newer record after a conflict.
    async fn commit<T, E>(
        &self,
        change: impl Fn(&PolicyRecord) -> Result<(Option<PolicyRecord>, T), E>,
    ) -> Result<Result<T, E>, StatusError> {
        let _one_at_a_time = self.shared.writing.lock().await;
        let Some(status) = &self.shared.status else {
            let decided = change(&self.record());
            return Ok(decided.map(|(next, outcome)| {
                if let Some(mut next) = next {
                    next.revision += 1;
                    self.install(next);
                }
                outcome
            }));
        };
        for _ in 0..WRITE_ATTEMPTS {
            let stored = status.load(self).await.inspect_err(|_| {
                self.shared.metrics.status_failures.inc();
            })?;
            let base = match &stored.record {
                Some(record) => {
                    self.adopt(record.clone());
                    record.clone()
                }
                // Nothing stored (first start, deleted, or unreadable): go on from this
                // replica's memory.
                None => self.record(),
            };
            let (next, outcome) = match change(&base) {
                Ok(decided) => decided,
                Err(refused) => return Ok(Err(refused)),
            };
            let Some(mut next) = next else {
                return Ok(Ok(outcome));
            };
            next.revision = base.revision.max(self.lock().revision) + 1;
            match status.save(next, &stored).await {
                Ok(written) => {
                    self.install(written);
                    return Ok(Ok(outcome));
                }
                Err(StatusWrite::Conflict) => self.shared.metrics.status_conflicts.inc(),
                Err(StatusWrite::Failed(problem)) => {
                    self.shared.metrics.status_failures.inc();
                    return Err(problem);
                }
            };
        }
        self.shared.metrics.status_failures.inc();
        Err(StatusError::Contended {
            status: status.to_string(),
            attempts: WRITE_ATTEMPTS,
        })
    }

    fn not_recorded(&self, origin: &str, problem: StatusError) -> StatusError {
        let kept = self.current().map(|current| current.version);
        error!(origin, error = %problem, kept_version = ?kept, "policy change not recorded; keeping the current policy");
        problem
    }

    /// Makes `record` the one in force and publishes its current version, under one lock so
    /// the history and the channel change together.
    fn install(&self, record: PolicyRecord) {
        let mut held = self.lock();
        let current = record.current().cloned();
        *held = record;
        if let Some(current) = &current {
            self.shared
                .metrics
                .version
                .set(i64::try_from(current.version).unwrap_or(i64::MAX));
        }
        self.shared.current.send_if_modified(|published| {
            let changed = published.as_ref().map(|p| (p.version, &p.digest))
                != current.as_ref().map(|c| (c.version, &c.digest));
            if changed {
                published.clone_from(&current);
            }
            changed
        });
    }

    fn log_rejection(&self, origin: &str, kept: Option<u64>, problem: &PolicyError) {
        self.shared.metrics.rejected.inc();
        match problem {
            PolicyError::Invalid(invalid) => {
                for field in &invalid.errors {
                    error!(origin, path = %field.path, problem = %field.message, "invalid policy field");
                }
                error!(
                    origin,
                    errors = invalid.found(),
                    errors_not_logged = invalid.omitted,
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

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}
