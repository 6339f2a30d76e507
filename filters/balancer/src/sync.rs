//! What the VMs of one plugin (the main thread's and every worker's) share through Envoy's
//! shared data: the control-plane snapshot, and the rate limit's token buckets.
//!
//! **The snapshot.** `on_tick` runs in every root context (the main thread's and each worker's), so without
//! coordination N+1 VMs would poll the control plane. Instead one VM per poll interval wins a
//! lease (a deadline in shared data, taken with compare-and-swap), fetches the snapshot, and
//! publishes it; every VM notices the new version on its next tick and applies it.
//!
//! Keys, namespaced by the plugin's root id so two fulcrum plugins in one VM do not collide:
//! - `fulcrum/<root_id>/poll_lease`: the deadline (ns since the Unix epoch, u64 LE) before
//!   which no other VM polls;
//! - `fulcrum/<root_id>/snapshot`: the snapshot JSON as the control plane sent it;
//! - `fulcrum/<root_id>/version`: the snapshot's version, written *after* the snapshot;
//! - `fulcrum/<root_id>/replica`: the control-plane replica the plugin follows and when it
//!   last answered ([`fulcrum_core::replica::Followed`]), written by the VM that polled.
//!
//! Invariant: the snapshot key is always at least as new as the version key, so a VM that sees
//! a new version and then reads the snapshot gets that version or a newer one; it takes the
//! version from the snapshot body itself, never from the version key.
//!
//! **The rate limit's buckets** ([`SharedBuckets`]): `fulcrum/<root_id>/rate_limit/<service>/
//! service` and `…/client/<slot>`, 24 bytes each, read and written with compare-and-swap, so
//! all workers of a proxy draw from one bucket per service and the limit is per proxy. Their
//! number is bounded by the policy (`max_clients + 1` per service), not by clients. Shared
//! data cannot delete a key: a service that leaves the snapshot leaves its buckets behind,
//! which a service that comes back reuses.

use std::{fmt::Write as _, time::Duration};

use fulcrum_core::{
    ratelimit::{BucketId, BucketState, BucketStore},
    replica::Followed,
};
use proxy_wasm::{hostcalls, types::Status};

/// The shared-data keys of one plugin.
#[derive(Debug, Clone)]
pub struct SharedKeys {
    lease: String,
    snapshot: String,
    version: String,
    replica: String,
    rate_limit: String,
}

impl SharedKeys {
    pub fn new(root_id: &str) -> Self {
        Self {
            lease: format!("fulcrum/{root_id}/poll_lease"),
            snapshot: format!("fulcrum/{root_id}/snapshot"),
            version: format!("fulcrum/{root_id}/version"),
            replica: format!("fulcrum/{root_id}/replica"),
            rate_limit: format!("fulcrum/{root_id}/rate_limit/"),
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

    /// Takes the poll lease until `now + interval` if it has expired. Returns whether this VM
    /// holds it and should poll.
    pub fn try_take_lease(&self, now: Duration, interval: Duration) -> bool {
        let Ok((value, cas)) = hostcalls::get_shared_data(&self.lease) else {
            return false;
        };
        let deadline = value
            .as_deref()
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map_or(0, u64::from_le_bytes);
        let now_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        if now_ns < deadline {
            return false;
        }
        // Slightly shorter than the interval, so the holder's own next tick can take it again.
        let hold = interval.saturating_sub(interval / 10);
        let next = now_ns.saturating_add(u64::try_from(hold.as_nanos()).unwrap_or(u64::MAX));
        // A missing key has no CAS; 0 means unconditional in Envoy, so two VMs may both win the
        // very first lease: one extra poll at start-up, harmless.
        hostcalls::set_shared_data(
            &self.lease,
            Some(&next.to_le_bytes()),
            Some(cas.unwrap_or(0)),
        )
        .is_ok()
    }

    /// Publishes a validated snapshot body and its version to every VM.
    pub fn publish(&self, body: &[u8], version: &str) -> Result<(), Status> {
        hostcalls::set_shared_data(&self.snapshot, Some(body), None)?;
        hostcalls::set_shared_data(&self.version, Some(version.as_bytes()), None)
    }

    /// The published version, if any (cheap: the version key is small).
    pub fn published_version(&self) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(&self.version).ok()?.0
    }

    /// The published snapshot body, if any.
    pub fn published_snapshot(&self) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(&self.snapshot).ok()?.0
    }

    /// The control-plane replica the plugin follows, if one answered yet.
    pub fn followed(&self) -> Option<Followed> {
        Followed::decode(&hostcalls::get_shared_data(&self.replica).ok()?.0?)
    }

    /// Records the replica followed from now on and when it answered.
    pub fn follow(&self, followed: &Followed) -> Result<(), Status> {
        hostcalls::set_shared_data(&self.replica, Some(&followed.encode()), None)
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
