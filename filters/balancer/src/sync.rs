//! What the VMs of one plugin (the main thread's and every worker's) share through Envoy's
//! shared data: the control-plane snapshot, the rate limit's token buckets, and each
//! service's ejections.
//!
//! **The snapshot.** `on_tick` runs in every root context (the main thread's and each worker's), so without
//! coordination N+1 VMs would poll the control plane. Instead one VM per poll interval wins a
//! lease (a deadline in shared data, taken with compare-and-swap), fetches the snapshot (a
//! delta against the published version when the control plane can, see
//! `fulcrum_core::distribution`), and publishes it one key per service; every VM notices the
//! new version on its next tick and copies out, parses and applies only the services whose
//! content changed. The layout and its invariants (no VM ever applies a torn or mixed view)
//! are in [`crate::shared_snapshot`]. Beside it, `fulcrum/<root_id>/replica`: the
//! control-plane replica the plugin follows and when it last answered
//! ([`fulcrum_core::replica::Followed`]), written by the VM that polled; and
//! `fulcrum/<root_id>/rejected`: the last snapshot a VM refused, which the next poll reports
//! (`crate::report`).
//!
//! **The rate limit's buckets** ([`SharedBuckets`]): `fulcrum/<root_id>/rate_limit/<service>/
//! service` and `…/client/<slot>`, 24 bytes each, read and written with compare-and-swap, so
//! all workers of a proxy draw from one bucket per service and the limit is per proxy. Their
//! number is bounded by the policy (`max_clients + 1` per service), not by clients. Shared
//! data cannot delete a key: a service that leaves the snapshot leaves its buckets behind,
//! which a service that comes back reuses.
//!
//! **Ejections and failure counts** ([`SharedEjections`]): `fulcrum/<root_id>/ejections/
//! <service>`, one [`EjectionRecord`] per service (at most 1024 ejections and 256 failure
//! counters, under 42 KiB), so a breaker that opens on one worker opens on every worker of the
//! proxy, and the consecutive failures that open it are counted once per proxy. A worker
//! writes it with compare-and-swap when one of its breakers opens (the ejection, its deadline
//! in ns since the Unix epoch, its number; the endpoint's counters go) or closes after an
//! ejection (the entry goes once expired), and when a closed endpoint fails (its counters grow,
//! before its breaker judges them) or succeeds while the worker knows of a count (they go);
//! writes prune entries older than `max_ejection_time`. Every worker reads it on each tick,
//! before it records a response that may be a failure (that read is the first round of
//! the failure's compare-and-swap), and before each pick while it knows of a failure count in
//! the service, and applies it when its CAS version changed
//! ([`fulcrum_core::ServicePicker::apply_shared_ejections`]: ejections, their ends, and the
//! counters). The record carries a fingerprint of the rules its ejections were judged under
//! (`outlier_detection`, `failure_kinds`): a VM applies only records of its own rules and a
//! write under other rules starts the record afresh, so new rules restart ejections and
//! counts everywhere. A successful response costs no host call unless the worker knows of a
//! failure count on that endpoint (see [`fulcrum_core::ejections`] for the one tick of
//! staleness this allows). What is not shared, and why: in-flight counts and latency estimates
//! change on every request (sharing them would cost a write per request), and each worker's
//! balancing only needs its own; the sliding windows of the rate rules likewise stay per
//! worker.
//!
//! A missing key has no CAS version, so two workers creating a service's record at the same
//! moment may overwrite each other's first entry; the loser's breaker is open regardless and
//! its next transition writes again.

use std::fmt::Write as _;

use fulcrum_core::{
    ejections::{DecodeError, EjectionRecord},
    ratelimit::{BucketId, BucketState, BucketStore},
    replica::Followed,
};
use proxy_wasm::{hostcalls, types::Status};

use crate::{input::header_text, report::MAX_REJECTED_BYTES};

/// The shared-data keys of one plugin.
#[derive(Debug, Clone)]
pub struct SharedKeys {
    replica: String,
    /// The last snapshot a VM of the proxy refused (`crate::report`).
    rejected: String,
    rate_limit: String,
    ejections: String,
}

impl SharedKeys {
    pub fn new(root_id: &str) -> Self {
        Self {
            replica: format!("fulcrum/{root_id}/replica"),
            rejected: format!("fulcrum/{root_id}/rejected"),
            rate_limit: format!("fulcrum/{root_id}/rate_limit/"),
            ejections: format!("fulcrum/{root_id}/ejections/"),
        }
    }

    /// The shared ejection record of `service`, whose ejections are judged under `rules`
    /// ([`fulcrum_core::ejections::rules_fingerprint`]).
    pub fn ejections(&self, service: &str, rules: u64) -> SharedEjections {
        SharedEjections {
            key: format!("{}{service}", self.ejections),
            rules,
            seen: None,
        }
    }

    /// The rate limit's buckets of `service`, shared by every VM of the plugin.
    pub fn rate_limit_buckets(&self, service: &str) -> SharedBuckets {
        let prefix = format!("{}{service}/", self.rate_limit);
        SharedBuckets {
            key: String::with_capacity(prefix.len() + "client/65535".len()),
            prefix,
        }
    }

    /// The control-plane replica the plugin follows, if one answered yet.
    pub fn followed(&self) -> Option<Followed> {
        Followed::decode(&hostcalls::get_shared_data(&self.replica).ok()?.0?)
    }

    /// Records the replica followed from now on and when it answered.
    pub fn follow(&self, followed: &Followed) -> Result<(), Status> {
        hostcalls::set_shared_data(&self.replica, Some(&followed.encode()), None)
    }

    /// Records the last snapshot a VM of the proxy refused, as the `x-fulcrum-rejected`
    /// value ([`crate::report::rejected_value`]); the last writer wins.
    pub fn record_rejection(&self, value: &str) -> Result<(), Status> {
        hostcalls::set_shared_data(&self.rejected, Some(value.as_bytes()), None)
    }

    /// The last snapshot a VM of the proxy refused, when one did and the record is a header
    /// value of at most [`MAX_REJECTED_BYTES`] (anything else is not sent).
    pub fn last_rejection(&self) -> Option<String> {
        let bytes = hostcalls::get_shared_data(&self.rejected).ok()?.0?;
        if bytes.is_empty() || bytes.len() > MAX_REJECTED_BYTES {
            return None;
        }
        header_text(&bytes, MAX_REJECTED_BYTES)
    }
}

/// One service's rate-limit buckets in shared data (see the module docs).
#[derive(Debug, Clone)]
pub struct SharedBuckets {
    /// `fulcrum/<root_id>/rate_limit/<service>/`.
    prefix: String,
    /// The key of the bucket at hand, rebuilt in place: no allocation per request.
    key: String,
}

impl SharedBuckets {
    fn key(&mut self, bucket: BucketId) -> &str {
        self.key.clear();
        self.key.push_str(&self.prefix);
        let _ = match bucket {
            BucketId::Service => write!(self.key, "service"),
            BucketId::Client(slot) => write!(self.key, "client/{slot}"),
        };
        &self.key
    }
}

impl BucketStore for SharedBuckets {
    fn read(&mut self, bucket: BucketId) -> (Option<BucketState>, u32) {
        match hostcalls::get_shared_data(self.key(bucket)) {
            Ok((bytes, cas)) => (
                bytes.as_deref().and_then(BucketState::from_bytes),
                cas.unwrap_or(0),
            ),
            Err(_) => (None, 0),
        }
    }

    fn write(&mut self, bucket: BucketId, state: BucketState, version: u32) -> bool {
        let bytes = state.to_bytes();
        hostcalls::set_shared_data(self.key(bucket), Some(&bytes), Some(version)).is_ok()
    }
}

/// Most compare-and-swap attempts to update an ejection record: workers write it when a
/// breaker changes state or an endpoint fails (or succeeds after failing), so contention is
/// between failures landing together on two workers and settles in a round or two; past this
/// the change is counted as not shared.
const MAX_WRITE_ATTEMPTS: usize = 4;

/// What reading a service's shared ejections found.
#[derive(Debug)]
pub enum EjectionsRead {
    /// No worker has written the record yet, it did not change since the last read, or it
    /// holds ejections judged under other rules (a policy change on its way).
    Unchanged,
    /// A record this VM has not applied yet.
    Changed(EjectionRecord),
    /// Bytes that are not a record; left alone until the next write replaces them.
    Invalid(DecodeError),
}

/// Why an ejection record could not be updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionsWriteError {
    /// Other workers kept changing it ([`MAX_WRITE_ATTEMPTS`]).
    Contended,
    /// The record is full and holds no entry for the endpoint.
    Full,
    /// The host refused the read or write.
    Host(Status),
}

/// The record's bytes and CAS version as one host call read them: applied, then used as the
/// first round of a compare-and-swap, so a response that may be a failure reads once.
#[derive(Debug)]
pub struct Fetched {
    bytes: Option<Vec<u8>>,
    cas: Option<u32>,
}

/// One service's shared ejection record (see the module docs).
#[derive(Debug, Clone)]
pub struct SharedEjections {
    /// `fulcrum/<root_id>/ejections/<service>`.
    key: String,
    /// The fingerprint of the service's ejection rules in this VM: a record judged under
    /// other rules is not applied, and is replaced by the next write.
    rules: u64,
    /// The CAS version of the record this VM last read, so an unchanged record is not decoded.
    seen: Option<u32>,
}

impl SharedEjections {
    /// Reads the record's bytes: one host call.
    pub fn fetch(&self) -> Result<Fetched, Status> {
        let (bytes, cas) = hostcalls::get_shared_data(&self.key)?;
        Ok(Fetched { bytes, cas })
    }

    /// What `fetched` holds for this VM: decoded only when its version changed since the
    /// last read.
    pub fn read(&mut self, fetched: &Fetched) -> EjectionsRead {
        let Some(bytes) = &fetched.bytes else {
            return EjectionsRead::Unchanged;
        };
        if fetched.cas.is_some() && fetched.cas == self.seen {
            return EjectionsRead::Unchanged;
        }
        self.seen = fetched.cas;
        match EjectionRecord::decode(bytes) {
            Ok(record) if record.rules() != self.rules => EjectionsRead::Unchanged,
            Ok(record) => EjectionsRead::Changed(record),
            Err(error) => EjectionsRead::Invalid(error),
        }
    }

    /// Applies `update` to the record with compare-and-swap, starting from `fetched` when
    /// given (else reading it); `update` returns whether it changed anything (nothing is
    /// written otherwise). Bytes that do not decode, and a record of other rules, are replaced
    /// by a record of this VM's rules.
    pub fn write(
        &self,
        mut fetched: Option<Fetched>,
        mut update: impl FnMut(&mut EjectionRecord) -> Result<bool, EjectionsWriteError>,
    ) -> Result<(), EjectionsWriteError> {
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let Fetched { bytes, cas } = match fetched.take() {
                Some(fetched) => fetched,
                None => self.fetch().map_err(EjectionsWriteError::Host)?,
            };
            let mut record = bytes
                .as_deref()
                .and_then(|bytes| EjectionRecord::decode(bytes).ok())
                .filter(|record| record.rules() == self.rules)
                .unwrap_or_else(|| EjectionRecord::new(self.rules));
            if !update(&mut record)? {
                return Ok(());
            }
            match hostcalls::set_shared_data(
                &self.key,
                Some(&record.encode()),
                Some(cas.unwrap_or(0)),
            ) {
                Ok(()) => return Ok(()),
                Err(Status::CasMismatch) => continue,
                Err(status) => return Err(EjectionsWriteError::Host(status)),
            }
        }
        Err(EjectionsWriteError::Contended)
    }
}
