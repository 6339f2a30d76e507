//! The ejections of one service, and its endpoints' consecutive-failure counters, as every
//! worker of a proxy shares them: an [`EjectionRecord`] and its compact binary encoding.
//!
//! Envoy runs one VM per worker and each has its own breakers, so without sharing a dead
//! endpoint costs every worker its own run of failures before that worker avoids it. The
//! filter keeps one record per service in proxy-wasm shared data: the worker whose breaker
//! opens writes the ejection, the one whose breaker closes after it removes it, and every worker
//! applies the record ([`ServicePicker::apply_shared_ejections`]) through its breakers'
//! transition function. Shared data cannot delete keys, so the record is one value per service
//! holding at most [`EjectionRecord::MAX_ENTRIES`] entries, and an ejection that ended is an
//! entry that is gone.
//!
//! **Failures are counted once per proxy too.** The record also holds, per endpoint in a run
//! of failures, the proxy's consecutive counters ([`SharedCount`]), as Envoy's outlier detection
//! keeps one set of counters per host for all its workers. A worker counts a failure of a
//! closed endpoint into the record with compare-and-swap *before* its breaker judges it
//! ([`FailureCounts`], [`ServicePicker::complete_counted`]), and the breaker judges the count it
//! got back ([`Event::CompleteCounted`]): the increments are atomic, so exactly the failure that
//! brings the proxy's count to the threshold ejects, on whichever worker it lands, and two
//! workers pay for a dead endpoint what one does. A success resets the count, and an ejection
//! drops it (counters restart after one). Only the consecutive rules are shared: the sliding
//! window's rates (failure rate, slow calls, relative latency) stay per worker, since each
//! worker's window samples the same traffic and sharing them would cost a write per request,
//! successes included.
//!
//! **A success costs no host call** unless the worker believes the proxy's count for that
//! endpoint is not zero: its breaker's counters are the proxy's as last learnt, from its own
//! counting or from the record it applies on every tick ([`Event::CountedElsewhere`]). (While
//! a worker knows of any count in the service, the filter also reads the record before each
//! pick, [`ServicePicker::knows_of_failures`], so an ejection judged elsewhere is seen before
//! the worker fails on the endpoint itself.) The
//! staleness this allows is one tick: a success on a worker that has not yet seen another
//! worker's failures does not reset them, so for at most a tick a run may span a success on
//! another worker. That errs towards ejecting an endpoint that fails most of its requests a
//! little sooner (an intermittent endpoint still needs the threshold's failures with no success
//! this worker knew to reset), never towards keeping a dead one, and it keeps successes — nearly
//! every request — free of host calls.
//!
//! A record carries the fingerprint of the rules it was judged under ([`rules_fingerprint`]:
//! the service's `outlier_detection` and `failure_kinds`): a worker applies only a record of
//! its own rules, and one writing under other rules starts the record afresh, so a policy
//! change that restarts a service's breakers is not undone by ejections judged before it, and
//! restarts the counts as well.
//!
//! Encoding (version 2), little-endian: a version byte ([`EjectionRecord::VERSION`]), the rules
//! fingerprint (`u64`), a `u16` ejection count, then per ejection, sorted by address and unique:
//! the address (family `4` or `6`, the IP in 4 or 16 bytes, the port as `u16`), `until` in
//! nanoseconds of the caller's clock (`u64`; the filter uses the Unix epoch, which every worker
//! shares) and the ejection number (`u32`); then a `u16` count of counters and per counter,
//! sorted by address and unique: the address, consecutive failures (`u32`), consecutive gateway
//! errors (`u32`) and when it was last counted (`u64` ns). At most 33 bytes an ejection and 35
//! a counter after 13 bytes of counts and header, so a full record is under 42 KiB. A record
//! of another version (version 1 held no counters) is refused like any bytes the filter would
//! not write, and replaced by the next write. The bytes come from shared data, which any plugin
//! in the VM may write: [`EjectionRecord::decode`] trusts nothing, never panics, allocates at
//! most what the entry caps allow and refuses anything it would not have written.
//!
//! [`ServicePicker::apply_shared_ejections`]: crate::ServicePicker::apply_shared_ejections
//! [`ServicePicker::complete_counted`]: crate::ServicePicker::complete_counted
//! [`ServicePicker::knows_of_failures`]: crate::ServicePicker::knows_of_failures
//! [`Event::CompleteCounted`]: crate::breaker::Event::CompleteCounted
//! [`Event::CountedElsewhere`]: crate::breaker::Event::CountedElsewhere

use crate::duration::nanos;
use std::{
    hash::Hasher,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use siphasher::sip::SipHasher13;

use crate::{
    breaker::{Consecutive, Verdict},
    policy::{FailureKinds, OutlierDetection},
};

/// A fingerprint of the rules ejections are judged by: equal rules give equal fingerprints in
/// every worker and every build of the same version.
pub fn rules_fingerprint(
    outlier_detection: &OutlierDetection,
    failure_kinds: &FailureKinds,
) -> u64 {
    // Serializing plain policy structs cannot fail; an empty input would still be consistent.
    let bytes = serde_json::to_vec(&(outlier_detection, failure_kinds)).unwrap_or_default();
    let mut hasher = SipHasher13::new_with_keys(0, 0);
    hasher.write(&bytes);
    hasher.finish()
}

/// One endpoint's ejection as another worker judged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedEjection {
    /// The ejected endpoint.
    pub address: SocketAddr,
    /// When the ejection expires, in the clock every worker shares.
    pub until: Duration,
    /// The ejection's number, 1 for the first.
    pub ejections: u32,
}

/// One endpoint's consecutive-failure counters as the workers of a proxy counted them together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedCount {
    /// The endpoint.
    pub address: SocketAddr,
    /// Its counters, never both zero in a record (a zero count is an entry that is gone).
    pub consecutive: Consecutive,
    /// When it was last counted, in the clock every worker shares.
    pub at: Duration,
}

/// What counting an outcome did to a record ([`EjectionRecord::count_outcome`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// The proxy's counters after the outcome.
    pub proxy: Consecutive,
    /// Whether the record changed (a success on an endpoint with no count changes nothing).
    pub changed: bool,
}

/// Where a service's consecutive-failure counters are kept for the whole proxy (the filter:
/// its shared record, with compare-and-swap). [`ServicePicker::complete_counted`] counts a
/// closed endpoint's outcome here before its breaker judges it.
///
/// [`ServicePicker::complete_counted`]: crate::ServicePicker::complete_counted
pub trait FailureCounts {
    /// Counts `verdict` for `address` at `now` and returns the proxy's counters after it, this
    /// outcome included; `None` when it could not be counted (the breaker then counts alone).
    fn count(
        &mut self,
        address: SocketAddr,
        verdict: &Verdict,
        now: Duration,
    ) -> Option<Consecutive>;
}

/// Counters kept by each breaker alone ([`crate::ServicePicker::complete`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unshared;

impl FailureCounts for Unshared {
    fn count(&mut self, _: SocketAddr, _: &Verdict, _: Duration) -> Option<Consecutive> {
        None
    }
}

/// Why bytes read from shared data are not an [`EjectionRecord`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end inside the header or an entry.
    #[error("the shared ejection record is truncated")]
    Truncated,
    /// Another version of the filter wrote it (or something else did).
    #[error("the shared ejection record has version {0}, expected {version}", version = EjectionRecord::VERSION)]
    UnknownVersion(u8),
    /// More ejections than a record may hold.
    #[error("the shared ejection record claims {0} entries, more than {max}", max = EjectionRecord::MAX_ENTRIES)]
    TooManyEntries(usize),
    /// More failure counters than a record may hold.
    #[error("the shared ejection record claims {0} failure counters, more than {max}", max = EjectionRecord::MAX_COUNTS)]
    TooManyCounts(usize),
    /// An address family byte other than 4 or 6.
    #[error("the shared ejection record has an address family byte {0}, expected 4 or 6")]
    BadFamily(u8),
    /// Entries (or counters) out of order or repeated.
    #[error("the shared ejection record's entries are not sorted by address and unique")]
    Unsorted,
    /// A failure counter at zero, which the filter never writes.
    #[error("the shared ejection record holds a failure counter at zero")]
    ZeroCount,
    /// Bytes after the last entry.
    #[error("the shared ejection record has {0} bytes after its last entry")]
    TrailingBytes(usize),
}

/// A service's current ejections and failure counters under one set of rules, each list
/// sorted by address and unique, at most [`MAX_ENTRIES`](Self::MAX_ENTRIES) ejections and
/// [`MAX_COUNTS`](Self::MAX_COUNTS) counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EjectionRecord {
    rules: u64,
    entries: Vec<SharedEjection>,
    counts: Vec<SharedCount>,
}

impl EjectionRecord {
    /// The encoding's version byte.
    pub const VERSION: u8 = 2;
    /// Most ejections a record holds: far more endpoints than `max_ejection_percent` lets a
    /// service of a few thousand eject.
    pub const MAX_ENTRIES: usize = 1024;
    /// Most failure counters a record holds: endpoints in a run of failures right now (a
    /// counter goes on the first success or the ejection); past this, an endpoint's failures
    /// are counted by each worker alone, as without sharing.
    pub const MAX_COUNTS: usize = 256;

    /// An empty record for ejections judged under `rules` ([`rules_fingerprint`]).
    pub fn new(rules: u64) -> Self {
        Self {
            rules,
            entries: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// The fingerprint of the rules its ejections were judged under.
    pub fn rules(&self) -> u64 {
        self.rules
    }

    /// The ejections, sorted by address.
    pub fn entries(&self) -> &[SharedEjection] {
        &self.entries
    }

    /// The ejection of `address`, if one is recorded.
    pub fn get(&self, address: SocketAddr) -> Option<&SharedEjection> {
        self.position(address)
            .ok()
            .map(|index| &self.entries[index])
    }

    /// Whether the record holds [`MAX_ENTRIES`](Self::MAX_ENTRIES): a missing endpoint then
    /// may be one that did not fit, so absence says nothing about it.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= Self::MAX_ENTRIES
    }

    /// Records `ejection`, keeping the later deadline and the larger ejection number when the
    /// endpoint is already there. Returns whether the record changed; `false` too when it is
    /// full and the endpoint is not in it.
    pub fn record_ejection(&mut self, ejection: SharedEjection) -> bool {
        match self.position(ejection.address) {
            Ok(index) => {
                let entry = &mut self.entries[index];
                let merged = SharedEjection {
                    address: ejection.address,
                    until: entry.until.max(ejection.until),
                    ejections: entry.ejections.max(ejection.ejections),
                };
                let changed = *entry != merged;
                *entry = merged;
                changed
            }
            Err(_) if self.is_full() => false,
            Err(index) => {
                self.entries.insert(index, ejection);
                true
            }
        }
    }

    /// Removes `address`'s ejection once it has expired at `now`: its breaker closed after
    /// probes. An ejection still running (another worker's, newer) stays. Returns whether the
    /// record changed.
    pub fn record_restored(&mut self, address: SocketAddr, now: Duration) -> bool {
        match self.position(address) {
            Ok(index) if self.entries[index].until <= now => {
                self.entries.remove(index);
                true
            }
            _ => false,
        }
    }

    /// Drops ejections that expired before `expired_before` and that no worker closed (the
    /// endpoint left the service, say), and counters last counted before it, so they do not
    /// hold a place for ever. Returns whether the record changed.
    pub fn prune(&mut self, expired_before: Duration) -> bool {
        let before = (self.entries.len(), self.counts.len());
        self.entries.retain(|entry| entry.until >= expired_before);
        self.counts.retain(|count| count.at >= expired_before);
        (self.entries.len(), self.counts.len()) != before
    }

    /// The failure counters, sorted by address.
    pub fn counts(&self) -> &[SharedCount] {
        &self.counts
    }

    /// The proxy's counters for `address`: `Some(zero)` when it has none and the record is not
    /// full of counters, `None` when the record cannot tell (it is full and lacks it).
    pub fn consecutive(&self, address: SocketAddr) -> Option<Consecutive> {
        match self.count_position(address) {
            Ok(index) => Some(self.counts[index].consecutive),
            Err(_) if self.counts.len() >= Self::MAX_COUNTS => None,
            Err(_) => Some(Consecutive::default()),
        }
    }

    /// Counts `verdict` for `address` at `now`: its counters grow or restart
    /// ([`Consecutive::after`]), and counters back at zero leave the record. `None` when the
    /// record is full of counters and holds none for `address`, which then cannot be shared.
    pub fn count_outcome(
        &mut self,
        address: SocketAddr,
        verdict: &Verdict,
        now: Duration,
    ) -> Option<Counted> {
        let position = self.count_position(address);
        let current = position
            .ok()
            .map_or_else(Consecutive::default, |index| self.counts[index].consecutive);
        let proxy = current.after(verdict);
        let changed = match position {
            Ok(index) if proxy.is_zero() => {
                self.counts.remove(index);
                true
            }
            Ok(index) => {
                self.counts[index] = SharedCount {
                    address,
                    consecutive: proxy,
                    at: now,
                };
                true
            }
            Err(_) if proxy.is_zero() => false,
            Err(_) if self.counts.len() >= Self::MAX_COUNTS => return None,
            Err(index) => {
                self.counts.insert(
                    index,
                    SharedCount {
                        address,
                        consecutive: proxy,
                        at: now,
                    },
                );
                true
            }
        };
        Some(Counted { proxy, changed })
    }

    /// Drops `address`'s counters (its breaker opened: counters restart after an ejection).
    /// Returns whether the record changed.
    pub fn forget_count(&mut self, address: SocketAddr) -> bool {
        match self.count_position(address) {
            Ok(index) => {
                self.counts.remove(index);
                true
            }
            Err(_) => false,
        }
    }

    /// The record's bytes (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(13 + self.entries.len() * 33 + self.counts.len() * 35);
        bytes.push(Self::VERSION);
        bytes.extend_from_slice(&self.rules.to_le_bytes());
        // Both caps fit a u16; a record never holds more.
        let ejections = u16::try_from(self.entries.len()).unwrap_or(u16::MAX);
        bytes.extend_from_slice(&ejections.to_le_bytes());
        for entry in self.entries.iter().take(usize::from(ejections)) {
            write_address(&mut bytes, entry.address);
            bytes.extend_from_slice(&nanos(entry.until).to_le_bytes());
            bytes.extend_from_slice(&entry.ejections.to_le_bytes());
        }
        let counts = u16::try_from(self.counts.len()).unwrap_or(u16::MAX);
        bytes.extend_from_slice(&counts.to_le_bytes());
        for count in self.counts.iter().take(usize::from(counts)) {
            write_address(&mut bytes, count.address);
            bytes.extend_from_slice(&count.consecutive.failures.to_le_bytes());
            bytes.extend_from_slice(&count.consecutive.gateway_errors.to_le_bytes());
            bytes.extend_from_slice(&nanos(count.at).to_le_bytes());
        }
        bytes
    }

    /// Reads a record from untrusted bytes: exactly what [`encode`](Self::encode) writes, or
    /// an error. Allocates at most [`MAX_ENTRIES`](Self::MAX_ENTRIES) ejections and
    /// [`MAX_COUNTS`](Self::MAX_COUNTS) counters.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader(bytes);
        let version = reader.u8()?;
        if version != Self::VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let rules = u64::from_le_bytes(reader.array()?);
        let count = usize::from(reader.u16()?);
        if count > Self::MAX_ENTRIES {
            return Err(DecodeError::TooManyEntries(count));
        }
        let mut entries: Vec<SharedEjection> = Vec::with_capacity(count);
        for _ in 0..count {
            let address = reader.address()?;
            let until = Duration::from_nanos(reader.u64()?);
            let ejections = reader.u32()?;
            if entries.last().is_some_and(|last| last.address >= address) {
                return Err(DecodeError::Unsorted);
            }
            entries.push(SharedEjection {
                address,
                until,
                ejections,
            });
        }
        let count = usize::from(reader.u16()?);
        if count > Self::MAX_COUNTS {
            return Err(DecodeError::TooManyCounts(count));
        }
        let mut counts: Vec<SharedCount> = Vec::with_capacity(count);
        for _ in 0..count {
            let address = reader.address()?;
            let consecutive = Consecutive {
                failures: reader.u32()?,
                gateway_errors: reader.u32()?,
            };
            let at = Duration::from_nanos(reader.u64()?);
            if counts.last().is_some_and(|last| last.address >= address) {
                return Err(DecodeError::Unsorted);
            }
            if consecutive.is_zero() {
                return Err(DecodeError::ZeroCount);
            }
            counts.push(SharedCount {
                address,
                consecutive,
                at,
            });
        }
        match reader.0.len() {
            0 => Ok(Self {
                rules,
                entries,
                counts,
            }),
            trailing => Err(DecodeError::TrailingBytes(trailing)),
        }
    }

    fn position(&self, address: SocketAddr) -> Result<usize, usize> {
        self.entries
            .binary_search_by_key(&address, |entry| entry.address)
    }

    fn count_position(&self, address: SocketAddr) -> Result<usize, usize> {
        self.counts
            .binary_search_by_key(&address, |count| count.address)
    }
}

/// Appends an address: family byte, IP, port.
fn write_address(bytes: &mut Vec<u8>, address: SocketAddr) {
    match address.ip() {
        IpAddr::V4(ip) => {
            bytes.push(4);
            bytes.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            bytes.push(6);
            bytes.extend_from_slice(&ip.octets());
        }
    }
    bytes.extend_from_slice(&address.port().to_le_bytes());
}

/// Reads fixed-size fields off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array::<1>().map(|[byte]| byte)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }

    fn address(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            family => return Err(DecodeError::BadFamily(family)),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }
}
