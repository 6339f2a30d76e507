//! [`PolicyRecord`]: everything the policy store decides, as one value, and the pure rules
//! that change it.
//!
//! A record holds the accepted versions (oldest first, the last current), the next version
//! number, and the digest of the last source text decided. Every change (a text accepted, a
//! rollback) makes a new record from the old one, so the same rules apply whether the record
//! lives in one process's memory or in a status ConfigMap every replica reads and writes with
//! compare-and-swap ([`crate::PolicyStatus`]): replicas agree because they agree on the record.
//!
//! The source digest is what keeps a rollback across restarts: a replica that starts and reads
//! the same source text the record already decided does not apply it again, so a rollback holds
//! until the text changes, on every replica and after every restart.
//!
//! A record read back from the cluster is untrusted: [`PolicyRecord::from_json`] validates every
//! policy in it with `fulcrum-core`, as if it were a new policy text.

use std::{collections::VecDeque, sync::Arc};

use fulcrum_core::{Policy, ValidationErrors};
use serde::{Deserialize, Serialize};

use crate::{AppliedPolicy, Offered, RollbackError};

/// The accepted versions, the next version number and the last decided source text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Increases with every write of the record, so a replica adopts only newer records.
    pub revision: u64,
    /// The version the next accepted policy gets; versions are never reused.
    pub next_version: u64,
    /// [`source_digest`] of the last source text accepted or found unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_digest: Option<String>,
    /// Oldest first; the last is current.
    pub versions: Vec<Arc<AppliedPolicy>>,
}

/// Why a stored record cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not a record at all.
    #[error(
        "the policy record is not valid JSON of a record (line {line}, column {column}): {source}; \
         delete the status ConfigMap to have it rewritten from a replica's memory"
    )]
    Malformed {
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A kept policy does not validate (edited by hand, or written by a newer version with
    /// rules this one does not know).
    #[error("the policy record's version {version} is not a valid policy: {source}")]
    InvalidPolicy {
        /// The version that failed.
        version: u64,
        /// Every invalid field.
        #[source]
        source: ValidationErrors,
    },
    /// Versions out of order or not below `next_version`.
    #[error(
        "the policy record's versions {versions:?} are not increasing and below next_version {next_version}"
    )]
    Inconsistent {
        /// The versions found.
        versions: Vec<u64>,
        /// The record's next version.
        next_version: u64,
    },
    /// A counter no replica could have counted to: incrementing it could overflow.
    #[error(
        "the policy record's {field} is {value}, above {MAX_COUNTER} (2^53): fulcrum never \
         counts that far, so the record was written by something else; delete the status \
         ConfigMap to have it rewritten from a replica's memory"
    )]
    CounterOutOfRange {
        /// `revision` or `next_version`.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

/// The largest `revision` or `next_version` a record may hold: 2^53, the largest integer
/// every JSON reader (kubectl's, a dashboard's JavaScript) keeps exact, and far from where
/// adding one could overflow.
const MAX_COUNTER: u64 = 1 << 53;

/// The digest of a source text: equal texts have equal digests.
pub fn source_digest(text: &str) -> String {
    fulcrum_core::version::content_version(&[text.as_bytes()])
}

/// A short hex hash of the policy's canonical JSON.
pub(crate) fn policy_digest(policy: &Policy) -> String {
    // Plain structs over ordered maps: serialization is canonical and cannot fail.
    let canonical = serde_json::to_vec(policy).unwrap_or_default();
    fulcrum_core::version::content_version(&[&canonical])
}

impl PolicyRecord {
    /// The current version, if any was accepted.
    pub fn current(&self) -> Option<&Arc<AppliedPolicy>> {
        self.versions.last()
    }

    /// Reads and validates a record written by [`to_json`](Self::to_json). Digests are
    /// recomputed, not trusted.
    pub fn from_json(text: &str) -> Result<Self, RecordError> {
        let mut record: Self =
            serde_json::from_str(text).map_err(|source| RecordError::Malformed {
                line: source.line(),
                column: source.column(),
                source,
            })?;
        for (field, value) in [
            ("revision", record.revision),
            ("next_version", record.next_version),
        ] {
            if value > MAX_COUNTER {
                return Err(RecordError::CounterOutOfRange { field, value });
            }
        }
        let numbers: Vec<u64> = record.versions.iter().map(|kept| kept.version).collect();
        let increasing = numbers.windows(2).all(|pair| pair[0] < pair[1]);
        if !increasing
            || numbers
                .last()
                .is_some_and(|last| *last >= record.next_version)
        {
            return Err(RecordError::Inconsistent {
                versions: numbers,
                next_version: record.next_version,
            });
        }
        for kept in &mut record.versions {
            kept.policy
                .validate()
                .map_err(|source| RecordError::InvalidPolicy {
                    version: kept.version,
                    source,
                })?;
            let digest = policy_digest(&kept.policy);
            if kept.digest != digest {
                Arc::make_mut(kept).digest = digest;
            }
        }
        Ok(record)
    }

    /// The record as JSON.
    pub fn to_json(&self) -> String {
        // Plain data: serialization cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The record after `text` (with digest `source`), parsed as `policy`, was offered, and
    /// what that did. `None` when nothing changes: the text was decided before (a rollback
    /// since then holds), or it carries the current policy under the same text.
    pub(crate) fn offered(
        &self,
        source: &str,
        policy: &Policy,
        origin: &str,
        capacity: usize,
        now_unix_ms: u64,
    ) -> (Option<Self>, Offered) {
        if let Some(current) = self.current() {
            if self.source_digest.as_deref() == Some(source) {
                return (None, Offered::AlreadyDecided(current.version));
            }
            if *current.policy == *policy {
                let mut next = self.clone();
                next.source_digest = Some(source.to_owned());
                return (Some(next), Offered::Unchanged(current.version));
            }
        }
        let mut next = self.clone();
        next.source_digest = Some(source.to_owned());
        let applied = next.append(
            Arc::new(policy.clone()),
            origin,
            None,
            capacity,
            now_unix_ms,
        );
        (Some(next), Offered::Applied(applied.version))
    }

    /// The record after a rollback to kept `version`, and the version now current. `None`
    /// when that version's policy is already current: rolling back to what is in force makes
    /// no new version and pushes nothing out of the history.
    pub(crate) fn rolled_back(
        &self,
        version: u64,
        capacity: usize,
        now_unix_ms: u64,
    ) -> Result<(Option<Self>, Arc<AppliedPolicy>), RollbackError> {
        let target = self
            .versions
            .iter()
            .find(|kept| kept.version == version)
            .ok_or_else(|| RollbackError::UnknownVersion {
                version,
                available: self.versions.iter().map(|kept| kept.version).collect(),
            })?;
        if let Some(current) = self.current()
            && current.digest == target.digest
        {
            return Ok((None, current.clone()));
        }
        let mut next = self.clone();
        let origin = format!("rollback to version {version}");
        let applied = next.append(
            target.policy.clone(),
            &origin,
            Some(version),
            capacity,
            now_unix_ms,
        );
        Ok((Some(next), applied))
    }

    /// Appends `policy` as the next version, forgetting the oldest beyond `capacity`.
    fn append(
        &mut self,
        policy: Arc<Policy>,
        origin: &str,
        rolled_back_from: Option<u64>,
        capacity: usize,
        now_unix_ms: u64,
    ) -> Arc<AppliedPolicy> {
        let version = self.next_version.max(1);
        let applied = Arc::new(AppliedPolicy {
            version,
            digest: policy_digest(&policy),
            origin: origin.to_owned(),
            rolled_back_from,
            accepted_at_unix_ms: now_unix_ms,
            policy,
        });
        self.next_version = version + 1;
        let mut versions: VecDeque<_> = std::mem::take(&mut self.versions).into();
        versions.push_back(applied.clone());
        while versions.len() > capacity.max(1) {
            versions.pop_front();
        }
        self.versions = versions.into();
        applied
    }

    /// Forgets the oldest versions until the JSON fits in `limit` bytes, keeping at least the
    /// current one. Fails with the smallest size when even the current version alone does not
    /// fit.
    pub(crate) fn fitted(mut self, limit: usize) -> Result<(Self, String), usize> {
        loop {
            let json = self.to_json();
            if json.len() <= limit {
                return Ok((self, json));
            }
            if self.versions.len() <= 1 {
                return Err(json.len());
            }
            self.versions.remove(0);
        }
    }
}
