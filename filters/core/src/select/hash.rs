//! Hashing for consistent-hash tables and sticky tokens, and what both hash algorithms share:
//! the table, a cyclic sequence of endpoints that a key enters at one position and walks
//! forward, the request's key, and the pick: the first candidate from the key's entry within
//! the load bound (Envoy's `hash_balance_factor`), the candidates after it for retries.
//!
//! Keys are hashed with 64-bit FNV-1a followed by SplitMix64's finalizer (FNV alone mixes
//! short keys poorly). Not DoS-resistant: a client who can choose keys can at worst choose
//! which endpoint serves it, which the hash-on header already allows.

use std::net::{IpAddr, SocketAddr};

use super::{
    Choice, EndpointSet, Request, Select, Slot,
    candidates::{Candidates, Walk},
    sticky,
};
use crate::{
    policy::HashOn,
    rng::{Rng, mix64},
    service::{RequestAttributes, RequestNeeds},
};

/// A well-mixed 64-bit hash of `bytes`.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(hash)
}

/// A hash of an endpoint address (IP octets and port).
pub fn address_hash(address: &SocketAddr) -> u64 {
    let mut bytes = [0u8; 18];
    let len = match address.ip() {
        IpAddr::V4(ip) => {
            bytes[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            bytes[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    bytes[len..len + 2].copy_from_slice(&address.port().to_be_bytes());
    hash_bytes(&bytes[..len + 2])
}

/// A hash of a source IP address, for `hash_on: source_ip`.
pub fn ip_hash(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(ip) => hash_bytes(&ip.octets()),
        IpAddr::V6(ip) => hash_bytes(&ip.octets()),
    }
}

/// A consistent-hash lookup structure over slot indices, built once per endpoint set.
#[derive(Debug, Clone)]
pub(crate) enum HashTable {
    /// Sorted ring points and the slot owning each.
    Ring { points: Vec<u64>, slots: Vec<u32> },
    /// Maglev lookup table: entry `i` is the slot serving keys with `hash % len == i`.
    Maglev { table: Vec<u32> },
}

impl HashTable {
    /// The slot of every entry, in walking order.
    pub fn entries(&self) -> &[u32] {
        match self {
            Self::Ring { slots, .. } => slots,
            Self::Maglev { table } => table,
        }
    }

    /// The entry a key with this hash enters at.
    pub fn start(&self, key_hash: u64) -> usize {
        match self {
            Self::Ring { points, .. } => {
                let position = points.partition_point(|&point| point < key_hash);
                if position == points.len() {
                    0
                } else {
                    position
                }
            }
            Self::Maglev { table } => {
                if table.is_empty() {
                    0
                } else {
                    (key_hash % table.len() as u64) as usize
                }
            }
        }
    }
}

/// How a consistent-hash algorithm lays its table out over the eligible endpoints: the one
/// thing ring hash and Maglev do differently.
pub(crate) trait Layout {
    fn build(&self, eligible: &[u32], slots: &[Slot]) -> HashTable;
}

/// A consistent-hash algorithm: where the key comes from, the load bound, and the table its
/// layout `L` builds over the eligible endpoints.
#[derive(Debug, Clone)]
pub(crate) struct ConsistentHash<L> {
    hash_on: HashOn,
    bounded_load: Option<f64>,
    layout: L,
    table: HashTable,
}

impl<L: Layout> ConsistentHash<L> {
    pub fn new(hash_on: &HashOn, bounded_load: Option<f64>, layout: L) -> Self {
        Self {
            hash_on: hash_on.clone(),
            bounded_load,
            table: layout.build(&[], &[]),
            layout,
        }
    }

    /// Walks the table from `key`: the first candidate within the load bound is the pick
    /// (the first candidate at all if every one is over it, with no retry order), the
    /// candidates after it up to the end of the lap are the retry order. Apart from the
    /// RNG-generic [`Select::pick`] so that the walk is compiled here, once.
    fn walk<'a>(
        &'a self,
        key: u64,
        candidates: &'a mut Candidates<'_>,
        slots: &[Slot],
        total_inflight: u64,
    ) -> Choice<'a> {
        let fallback = candidates.slots().first().copied().unwrap_or(0) as usize;
        let limit = self.bounded_load.map(|factor| {
            factor * (total_inflight as f64 + 1.0) / candidates.slots().len().max(1) as f64
        });
        let table = &self.table;
        let mut walk = Walk::lap(table.entries(), table.start(key)).among(candidates.membership());
        let mut first_candidate = None;
        while let Some(slot) = walk.next() {
            let slot = slot as usize;
            first_candidate.get_or_insert(slot);
            let load = f64::from(slots[slot].stats.inflight) + 1.0;
            if limit.is_none_or(|limit| load <= limit) {
                return Choice {
                    slot,
                    then: walk,
                    set_cookie: None,
                    rival: None,
                };
            }
        }
        Choice {
            slot: first_candidate.unwrap_or(fallback),
            then: Walk::empty(),
            set_cookie: None,
            rival: None,
        }
    }
}

impl<L: Layout> Select for ConsistentHash<L> {
    fn rebuild(&mut self, set: &EndpointSet<'_>) {
        self.table = self.layout.build(set.eligible, set.slots);
    }

    fn pick<'a, R: Rng + ?Sized>(
        &'a mut self,
        candidates: &'a mut Candidates<'_>,
        request: Request<'_, R>,
    ) -> Choice<'a> {
        let mut set_cookie = None;
        let key = key(
            &self.hash_on,
            request.attributes,
            request.rng,
            &mut set_cookie,
        );
        Choice {
            set_cookie,
            ..self.walk(key, candidates, request.slots, request.total_inflight)
        }
    }

    fn needs<'a>(&'a self, needs: &mut RequestNeeds<'a>) {
        match &self.hash_on {
            HashOn::Header(name) => needs.hash_header = Some(name),
            HashOn::Cookie(cookie) => needs.hash_cookie = Some(&cookie.name),
            HashOn::SourceIp => needs.source_ip = true,
        }
    }
}

/// The hash key of a request; a random one when the attribute is missing (as Envoy does). For
/// a missing hash cookie, generates its value and the `Set-Cookie` to send.
fn key<R: Rng + ?Sized>(
    hash_on: &HashOn,
    attributes: &RequestAttributes<'_>,
    rng: &mut R,
    set_cookie: &mut Option<String>,
) -> u64 {
    let key = match hash_on {
        HashOn::Header(_) => attributes
            .hash_header
            .map(|value| hash_bytes(value.as_bytes())),
        HashOn::Cookie(cookie) => Some(match attributes.hash_cookie {
            Some(value) => hash_bytes(value.as_bytes()),
            None => {
                let value = sticky::format_token(rng.next_u64());
                let key = hash_bytes(value.as_bytes());
                *set_cookie = Some(sticky::set_cookie(&cookie.name, &value, cookie.ttl));
                key
            }
        }),
        HashOn::SourceIp => attributes.source_ip.map(ip_hash),
    };
    key.unwrap_or_else(|| rng.next_u64())
}
