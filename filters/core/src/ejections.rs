//! The ejections of one service as every worker of a proxy shares them: an [`EjectionRecord`]
//! and its compact binary encoding.
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
//! A record carries the fingerprint of the rules it was judged under ([`rules_fingerprint`]:
//! the service's `outlier_detection` and `failure_kinds`): a worker applies only a record of
//! its own rules, and one writing under other rules starts the record afresh, so a policy
//! change that restarts a service's breakers is not undone by ejections judged before it.
//!
//! Encoding, little-endian: a version byte ([`EjectionRecord::VERSION`]), the rules
//! fingerprint (`u64`), a `u16` entry count, then per entry, sorted by address and unique: the address family (`4` or `6`), the IP (4 or
//! 16 bytes), the port (`u16`), `until` in nanoseconds of the caller's clock (`u64`; the filter
//! uses the Unix epoch, which every worker shares) and the ejection number (`u32`). At most
//! 33 bytes an entry after an 11-byte header, so a full record is under 34 KiB. The bytes come from shared data, which
//! any plugin in the VM may write: [`EjectionRecord::decode`] trusts nothing, never panics,
//! allocates at most what the entry cap allows and refuses anything it would not have written.
//!
//! [`ServicePicker::apply_shared_ejections`]: crate::ServicePicker::apply_shared_ejections

use std::{
    hash::Hasher,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use siphasher::sip::SipHasher13;

use crate::policy::{FailureKinds, OutlierDetection};

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

/// Why bytes read from shared data are not an [`EjectionRecord`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end inside the header or an entry.
    #[error("the shared ejection record is truncated")]
    Truncated,
    /// Another version of the filter wrote it (or something else did).
    #[error("the shared ejection record has version {0}, expected {version}", version = EjectionRecord::VERSION)]
    UnknownVersion(u8),
    /// More entries than a record may hold.
    #[error("the shared ejection record claims {0} entries, more than {max}", max = EjectionRecord::MAX_ENTRIES)]
    TooManyEntries(usize),
    /// An address family byte other than 4 or 6.
    #[error("the shared ejection record has an address family byte {0}, expected 4 or 6")]
    BadFamily(u8),
    /// Entries out of order or repeated.
    #[error("the shared ejection record's entries are not sorted by address and unique")]
    Unsorted,
    /// Bytes after the last entry.
    #[error("the shared ejection record has {0} bytes after its last entry")]
    TrailingBytes(usize),
}

/// A service's current ejections under one set of rules, sorted by address, unique, at most
/// [`MAX_ENTRIES`](Self::MAX_ENTRIES).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EjectionRecord {
    rules: u64,
    entries: Vec<SharedEjection>,
}

impl EjectionRecord {
    /// The encoding's version byte.
    pub const VERSION: u8 = 1;
    /// Most entries a record holds: far more endpoints than `max_ejection_percent` lets a
    /// service of a few thousand eject, and a full record stays under 34 KiB.
    pub const MAX_ENTRIES: usize = 1024;

    /// An empty record for ejections judged under `rules` ([`rules_fingerprint`]).
    pub fn new(rules: u64) -> Self {
        Self {
            rules,
            entries: Vec::new(),
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
    /// endpoint left the service, say), so they do not hold a place for ever. Returns whether
    /// the record changed.
    pub fn prune(&mut self, expired_before: Duration) -> bool {
        let before = self.entries.len();
        self.entries.retain(|entry| entry.until >= expired_before);
        self.entries.len() != before
    }

    /// The record's bytes (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(11 + self.entries.len() * 33);
        bytes.push(Self::VERSION);
        bytes.extend_from_slice(&self.rules.to_le_bytes());
        // `MAX_ENTRIES` fits a u16; a record never holds more.
        let count = u16::try_from(self.entries.len()).unwrap_or(u16::MAX);
        bytes.extend_from_slice(&count.to_le_bytes());
        for entry in self.entries.iter().take(usize::from(count)) {
            match entry.address.ip() {
                IpAddr::V4(ip) => {
                    bytes.push(4);
                    bytes.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    bytes.push(6);
                    bytes.extend_from_slice(&ip.octets());
                }
            }
            bytes.extend_from_slice(&entry.address.port().to_le_bytes());
            let until = u64::try_from(entry.until.as_nanos()).unwrap_or(u64::MAX);
            bytes.extend_from_slice(&until.to_le_bytes());
            bytes.extend_from_slice(&entry.ejections.to_le_bytes());
        }
        bytes
    }

    /// Reads a record from untrusted bytes: exactly what [`encode`](Self::encode) writes, or
    /// an error. Allocates at most [`MAX_ENTRIES`](Self::MAX_ENTRIES) entries.
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
            let ip = match reader.u8()? {
                4 => IpAddr::V4(Ipv4Addr::from(reader.array::<4>()?)),
                6 => IpAddr::V6(Ipv6Addr::from(reader.array::<16>()?)),
                family => return Err(DecodeError::BadFamily(family)),
            };
            let address = SocketAddr::new(ip, reader.u16()?);
            let until = Duration::from_nanos(u64::from_le_bytes(reader.array()?));
            let ejections = u32::from_le_bytes(reader.array()?);
            if entries.last().is_some_and(|last| last.address >= address) {
                return Err(DecodeError::Unsorted);
            }
            entries.push(SharedEjection {
                address,
                until,
                ejections,
            });
        }
        match reader.0.len() {
            0 => Ok(Self { rules, entries }),
            trailing => Err(DecodeError::TrailingBytes(trailing)),
        }
    }

    fn position(&self, address: SocketAddr) -> Result<usize, usize> {
        self.entries
            .binary_search_by_key(&address, |entry| entry.address)
    }
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
}
