//! Hashing for consistent-hash tables and sticky tokens, and the table both hash algorithms
//! share: a cyclic sequence of endpoints that a key enters at one position and walks forward.
//!
//! Keys are hashed with 64-bit FNV-1a followed by SplitMix64's finalizer (FNV alone mixes
//! short keys poorly). Not DoS-resistant: a client who can choose keys can at worst choose
//! which endpoint serves it, which the hash-on header already allows.

use std::net::{IpAddr, SocketAddr};

use crate::rng::mix64;

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
    /// Number of entries.
    pub fn len(&self) -> usize {
        match self {
            Self::Ring { slots, .. } => slots.len(),
            Self::Maglev { table } => table.len(),
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

    /// The slot at entry `index` (taken modulo the length).
    pub fn slot_at(&self, index: usize) -> u32 {
        match self {
            Self::Ring { slots, .. } => slots[index % slots.len()],
            Self::Maglev { table } => table[index % table.len()],
        }
    }
}
