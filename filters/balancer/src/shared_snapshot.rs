//! The snapshot in Envoy's shared data, one key per service, so that a change costs each
//! VM of the proxy only the services that changed: it copies out, parses and rebuilds those
//! and leaves the rest alone (`fulcrum_core::mesh`).
//!
//! **Layout**, under `fulcrum/<root_id>/snapshot/`:
//! - `services/<name>`: `<content hash>\n<the service's JSON as the control plane sent it>`;
//! - `policy`: `<content hash>\n<policy JSON>`;
//! - `index`: the published snapshot, `{"version": V, "policy": hash, "services": {name:
//!   hash}}` (JSON): which services, at which content;
//! - `version`: `V` alone, written after the index: the few bytes every VM reads each tick;
//! - `publisher`: the publish lock, a deadline (ns since the Unix epoch, u64 LE), 0 once
//!   released;
//! - `poll_lease`: the poll lease ([`SharedSnapshot::try_take_lease`]).
//!
//! A lease or lock deadline further ahead than anyone takes it for (the poll interval, the
//! lock's hold) reads as expired: shared data corrupted cannot stop polling or publishing.
//!
//! **Publishing** (the VM whose poll was answered, holding the lock): it reads the index,
//! hashes each service of the answer ([`fulcrum_core::distribution::content_hash`]), parses
//! and validates only the services whose hash the index does not already hold, then writes
//! their keys, the policy key if it changed, the index (compare-and-swap against the index
//! it read) and the version, and releases the lock. An answer that is a delta applies to
//! the index it was asked against; a whole snapshot replaces it.
//!
//! **Reading** (every VM, when `version` differs from its own): it reads the index and then
//! only the keys whose hash differs from what it holds, checks that each key holds the hash
//! the index names, parses them, and applies the change whole.
//!
//! Invariants:
//! 1. A key is written before any index that names its hash, so a VM reading an index finds
//!    each key at that hash or at a newer one.
//! 2. A VM never applies a torn or mixed view: a key holding another hash than the index
//!    names (a later publish got there first) makes the VM change nothing and try again on
//!    its next tick (`fulcrum_snapshot_torn_reads_total`), when the index has caught up.
//! 3. One publisher at a time (the lock), so keys never mix two publications. A publisher
//!    that dies holding the lock (a VM panic mid-publish) may leave keys ahead of the index;
//!    the next poller finds the lock expired, asks for a whole snapshot and rewrites every key.
//!    An index that does not decode (shared data corrupted) is likewise written over, whole, by
//!    the next answer; until then every VM keeps what it has and logs why.
//!
//! Shared data cannot delete a key: the key of a removed service (or one refused as invalid)
//! is emptied once an index without it is published, and reused if the service comes back.
//! What stays behind is its name, bounded by the services the proxy ever saw, like the
//! ejection records'.
//!
//! The keys are new in this layout: an older module of the same plugin (during a module
//! update Envoy may run both in one VM id) keeps its own `fulcrum/<root_id>/snapshot` and
//! `poll_lease` and polls on its own until it drains.

use fulcrum_core::duration::nanos;
use std::{collections::BTreeMap, time::Duration};

use fulcrum_core::{
    distribution::{Answer, content_hash, is_valid_version, parse_answer},
    mesh::{Change, Hashed, ServiceState, Services},
    receive::{ReceiveError, Skipped, receive_policy, receive_service},
};
use proxy_wasm::{hostcalls, types::Status};
use serde::{Deserialize, Serialize};

/// How long a publisher may hold the lock. Publishing is one synchronous callback, so this
/// only matters when the holder died mid-way.
const LOCK_HOLD: Duration = Duration::from_secs(10);

/// The published snapshot: its version, and the content hash of its policy and services.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// The snapshot's version.
    pub version: String,
    /// The content hash of the policy in force, `None` while the configured one is.
    pub policy: Option<String>,
    /// Every service and the content hash of its JSON.
    pub services: BTreeMap<String, String>,
}

/// The keys of one plugin's shared snapshot. See the module docs.
#[derive(Debug, Clone)]
pub struct SharedSnapshot {
    lease: String,
    lock: String,
    index: String,
    version: String,
    policy: String,
    /// `…/services/`, to which a service name is appended.
    services: String,
}

/// What publishing an answer did.
#[derive(Debug)]
pub struct Published {
    /// The version now published.
    pub version: String,
    /// Services of the answer left out as invalid, each with why.
    pub skipped: Vec<Skipped>,
    /// Why the answer's policy was refused (the one in force stays), if it was.
    pub policy_error: Option<String>,
    /// Service keys written: the services whose content changed.
    pub written: usize,
}

/// Why an answer was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The body is not a snapshot.
    #[error(transparent)]
    Malformed(#[from] ReceiveError),
    /// Another VM holds the publish lock.
    #[error("another VM of the proxy is publishing a snapshot")]
    Busy,
    /// A delta against another version than the one published.
    #[error(
        "the answer is a delta against version {base:?} but version {published:?} is published"
    )]
    OtherBase {
        base: String,
        published: Option<String>,
    },
    /// A delta, while keys may be ahead of the index (a publisher died mid-publish): only a
    /// whole snapshot can rewrite them.
    #[error(
        "a previous publisher died mid-publish; waiting for a whole snapshot to rewrite every key"
    )]
    NeedsWhole,
    /// Another VM wrote the index meanwhile.
    #[error("the published index changed while publishing")]
    Raced,
    /// The host refused a shared-data call.
    #[error("shared data refused a write: {0:?}")]
    Host(Status),
}

/// Why a VM could not read the published snapshot now.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A key is ahead of the index: a publish is under way. Retried next tick.
    #[error("service {0} is ahead of the published index (a publish is under way)")]
    Torn(String),
    /// What the publisher validated does not parse: shared data was corrupted.
    #[error("the published snapshot is invalid: {0}")]
    Invalid(String),
}

impl SharedSnapshot {
    pub fn new(root_id: &str) -> Self {
        let prefix = format!("fulcrum/{root_id}/snapshot/");
        Self {
            lease: format!("{prefix}poll_lease"),
            lock: format!("{prefix}publisher"),
            index: format!("{prefix}index"),
            version: format!("{prefix}version"),
            policy: format!("{prefix}policy"),
            services: format!("{prefix}services/"),
        }
    }

    /// Takes the poll lease until `now + interval` if it has expired. Returns whether this VM
    /// holds it and should poll.
    pub fn try_take_lease(&self, now: Duration, interval: Duration) -> bool {
        let Ok((value, cas)) = hostcalls::get_shared_data(&self.lease) else {
            return false;
        };
        if held(value.as_deref(), now, interval) {
            return false;
        }
        // Slightly shorter than the interval, so the holder's own next tick can take it again.
        let hold = interval.saturating_sub(interval / 10);
        let next = nanos(now).saturating_add(nanos(hold));
        // A missing key has no CAS; 0 means unconditional in Envoy, so two VMs may both win the
        // very first lease: one extra poll at start-up, harmless (the publish lock keeps their
        // publications apart).
        hostcalls::set_shared_data(
            &self.lease,
            Some(&next.to_le_bytes()),
            Some(cas.unwrap_or(0)),
        )
        .is_ok()
    }

    /// The published version, if any (cheap: the version key is small). One that is not a
    /// valid version ([`is_valid_version`]: shared data corrupted) reads as none: the next
    /// poll then asks for a whole snapshot, whose publication writes it over.
    pub fn published_version(&self) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(&self.version)
            .ok()?
            .0
            .filter(|version| is_valid_version(version))
    }

    /// Whether a publisher died holding the lock, so the next answer must be whole.
    pub fn needs_whole(&self, now: Duration) -> bool {
        let Ok((value, _)) = hostcalls::get_shared_data(&self.lock) else {
            return false;
        };
        deadline(value.as_deref()) != 0 && !held(value.as_deref(), now, LOCK_HOLD)
    }

    /// Publishes a poll answer (see the module docs).
    pub fn publish(&self, body: &[u8], now: Duration) -> Result<Published, PublishError> {
        let answer = parse_answer(body)?;
        let rewrite_all = self.lock(now)?;
        let published = self.publish_locked(&answer, rewrite_all);
        // A publication that stopped after writing keys (or found keys the last holder may
        // have left ahead of the index) keeps the lock until it expires: the next poller then
        // asks for a whole snapshot and rewrites every key. Any other is released.
        if !matches!(
            published,
            Err(PublishError::Raced | PublishError::Host(_) | PublishError::NeedsWhole)
        ) {
            hostcalls::set_shared_data(&self.lock, Some(&0u64.to_le_bytes()), None)
                .map_err(PublishError::Host)?;
        }
        published
    }

    /// Takes the publish lock: whether the previous holder died with it (every key must then
    /// be rewritten), or `Busy`.
    fn lock(&self, now: Duration) -> Result<bool, PublishError> {
        let (value, cas) = hostcalls::get_shared_data(&self.lock).map_err(PublishError::Host)?;
        if held(value.as_deref(), now, LOCK_HOLD) {
            return Err(PublishError::Busy);
        }
        let held_until = deadline(value.as_deref());
        let until = nanos(now).saturating_add(nanos(LOCK_HOLD));
        match hostcalls::set_shared_data(
            &self.lock,
            Some(&until.to_le_bytes()),
            Some(cas.unwrap_or(0)),
        ) {
            Ok(()) => Ok(held_until != 0),
            Err(Status::CasMismatch) => Err(PublishError::Busy),
            Err(status) => Err(PublishError::Host(status)),
        }
    }

    fn publish_locked(
        &self,
        answer: &Answer<'_>,
        rewrite_all: bool,
    ) -> Result<Published, PublishError> {
        // An index that does not decode (shared data corrupted) is written over: only a whole
        // snapshot can, and it rewrites every key.
        let (current, cas, rewrite_all) = match self.read_index() {
            Ok(Some((index, cas))) => (Some(index), cas, rewrite_all),
            Ok(None) => (None, None, rewrite_all),
            Err(_) => (None, None, true),
        };
        let empty = Index::default();
        let held = current.as_ref().unwrap_or(&empty);
        let mut next = Index {
            version: answer.version.clone(),
            policy: held.policy.clone(),
            services: BTreeMap::new(),
        };
        if let Some(base) = &answer.base {
            if rewrite_all && current.is_some() {
                return Err(PublishError::NeedsWhole);
            }
            if current.as_ref().map(|index| &index.version) != Some(base) {
                return Err(PublishError::OtherBase {
                    base: base.clone(),
                    published: current.map(|index| index.version),
                });
            }
            next.services = held.services.clone();
            for removed in &answer.removed {
                next.services.remove(removed);
            }
        }
        let mut writes: Vec<(&str, String, &[u8])> = Vec::new();
        let mut skipped = Vec::new();
        for (name, raw) in &answer.services {
            let json = raw.get().as_bytes();
            let hash = content_hash(json);
            if !rewrite_all && held.services.get(name) == Some(&hash) {
                next.services.insert(name.clone(), hash);
                continue;
            }
            match receive_service(name, json) {
                Ok(_) => {
                    next.services.insert(name.clone(), hash.clone());
                    writes.push((name, hash, json));
                }
                Err(reason) => {
                    next.services.remove(name);
                    skipped.push(Skipped {
                        service: name.clone(),
                        reason,
                    });
                }
            }
        }
        let mut policy_error = None;
        let mut policy_write = None;
        if let Some(json) = answer.policy_json() {
            let hash = content_hash(json);
            if rewrite_all || held.policy.as_ref() != Some(&hash) {
                match receive_policy(json) {
                    Ok(_) => {
                        next.policy = Some(hash.clone());
                        policy_write = Some((hash, json));
                    }
                    Err(reason) => policy_error = Some(reason),
                }
            }
        }
        for (name, hash, json) in &writes {
            self.write_content(&format!("{}{name}", self.services), hash, json)?;
        }
        if let Some((hash, json)) = policy_write {
            self.write_content(&self.policy, &hash, json)?;
        }
        // Strings over ordered maps: serialization cannot fail.
        let index = serde_json::to_vec(&next).unwrap_or_default();
        match hostcalls::set_shared_data(&self.index, Some(&index), Some(cas.unwrap_or(0))) {
            Ok(()) => {}
            Err(Status::CasMismatch) => return Err(PublishError::Raced),
            Err(status) => return Err(PublishError::Host(status)),
        }
        hostcalls::set_shared_data(&self.version, Some(next.version.as_bytes()), None)
            .map_err(PublishError::Host)?;
        // The services the index no longer names: their keys cannot be deleted, only
        // emptied, now that no index names their content. A VM still reading the previous
        // index finds the key empty, a torn read it retries on its next tick. A key left
        // full (a host error) only holds memory: nothing reads it until a publish rewrites it.
        for gone in held.services.keys() {
            if !next.services.contains_key(gone) {
                let _ = hostcalls::set_shared_data(
                    &format!("{}{gone}", self.services),
                    Some(&[]),
                    None,
                );
            }
        }
        Ok(Published {
            version: next.version,
            skipped,
            policy_error,
            written: writes.len(),
        })
    }

    /// The change that brings `services` to the published snapshot: `None` when they are at
    /// its version already (or nothing is published).
    pub fn read_change<S: ServiceState>(
        &self,
        services: &Services<S>,
    ) -> Result<Option<Change>, ReadError> {
        let index = match self.read_index() {
            Ok(Some((index, _))) => index,
            Ok(None) => return Ok(None),
            Err(error) => return Err(ReadError::Invalid(format!("index: {error}"))),
        };
        if services.version() == Some(index.version.as_str()) {
            return Ok(None);
        }
        let mut upserted = BTreeMap::new();
        for (name, hash) in &index.services {
            if services.content(name) == Some(hash.as_str()) {
                continue;
            }
            let json = self
                .read_content(&format!("{}{name}", self.services), hash)
                .ok_or_else(|| ReadError::Torn(name.clone()))?;
            let value = receive_service(name, &json).map_err(ReadError::Invalid)?;
            upserted.insert(
                name.clone(),
                Hashed {
                    hash: hash.clone(),
                    value,
                },
            );
        }
        let removed = services
            .contents()
            .filter(|(name, _)| !index.services.contains_key(*name))
            .map(|(name, _)| name.to_owned())
            .collect();
        let policy = match &index.policy {
            Some(hash) if services.policy_hash() != Some(hash.as_str()) => {
                let json = self
                    .read_content(&self.policy, hash)
                    .ok_or_else(|| ReadError::Torn("(the policy)".to_owned()))?;
                let value = receive_policy(&json).map_err(ReadError::Invalid)?;
                Some(Hashed {
                    hash: hash.clone(),
                    value,
                })
            }
            _ => None,
        };
        Ok(Some(Change {
            version: index.version,
            upserted,
            removed,
            policy,
        }))
    }

    /// The published index and its CAS version; `Err` with why when it does not decode or
    /// its version is not valid ([`is_valid_version`]).
    fn read_index(&self) -> Result<Option<(Index, Option<u32>)>, String> {
        let Ok((Some(bytes), cas)) = hostcalls::get_shared_data(&self.index) else {
            return Ok(None);
        };
        let index: Index = serde_json::from_slice(&bytes).map_err(|error| error.to_string())?;
        if !is_valid_version(index.version.as_bytes()) {
            return Err(format!(
                "its version ({} bytes) is not a valid snapshot version",
                index.version.len()
            ));
        }
        Ok(Some((index, cas)))
    }

    /// The JSON under `key` when it holds content of `hash`; `None` when it holds other
    /// content (or none).
    fn read_content(&self, key: &str, hash: &str) -> Option<Vec<u8>> {
        let mut bytes = hostcalls::get_shared_data(key).ok()?.0?;
        let header = hash.len() + 1;
        if bytes.get(..hash.len()) != Some(hash.as_bytes()) || bytes.get(hash.len()) != Some(&b'\n')
        {
            return None;
        }
        bytes.drain(..header);
        Some(bytes)
    }

    fn write_content(&self, key: &str, hash: &str, json: &[u8]) -> Result<(), PublishError> {
        let mut value = Vec::with_capacity(hash.len() + 1 + json.len());
        value.extend_from_slice(hash.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(json);
        hostcalls::set_shared_data(key, Some(&value), None).map_err(PublishError::Host)
    }
}

/// Whether a lease or lock value is held at `now`: its deadline is after `now`, by at most
/// `longest`, the longest anyone takes it for. A later deadline (shared data corrupted, or a
/// clock that jumped back) reads as expired, so it cannot stop polling or publishing.
fn held(value: Option<&[u8]>, now: Duration, longest: Duration) -> bool {
    let (now, until) = (nanos(now), deadline(value));
    until > now && until - now <= nanos(longest)
}

/// The deadline a lease or lock value holds; 0 when absent or not 8 bytes.
fn deadline(value: Option<&[u8]>) -> u64 {
    value
        .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
        .map_or(0, u64::from_le_bytes)
}
