//! Retry targets: the distinct admissible endpoints Envoy's `override_host` retries on after
//! the pick, written into the same header.
//!
//! Every algorithm hands back a [`Walk`], the order it would have picked the other candidates
//! in (the candidates after the pick for the list-based algorithms, the table after the
//! pick's entry for the hash ones); [`RetryTargets::after`] takes the first `retry` of them
//! that are not the pick, not ejected and not already taken. One rule for every algorithm
//! and for sticky sessions.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::{
    select::{Slot, candidates::Walk},
    validate::MAX_RETRY_TARGETS,
};

/// Up to five distinct endpoints for Envoy to retry on, best first, in a fixed-size array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryTargets {
    addresses: [SocketAddr; MAX_RETRY_TARGETS as usize],
    len: u8,
}

impl Default for RetryTargets {
    fn default() -> Self {
        Self {
            addresses: [SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
                MAX_RETRY_TARGETS as usize],
            len: 0,
        }
    }
}

impl RetryTargets {
    /// The targets, best first.
    pub fn as_slice(&self) -> &[SocketAddr] {
        &self.addresses[..usize::from(self.len)]
    }

    /// Whether `address` is one of the targets.
    pub fn contains(&self, address: &SocketAddr) -> bool {
        self.as_slice().contains(address)
    }

    /// Up to `retries` endpoints from `order`, skipping `chosen`, ejected endpoints (open or
    /// half-open breakers) and repeats.
    pub(crate) fn after(order: Walk<'_>, chosen: usize, slots: &[Slot], retries: usize) -> Self {
        let mut targets = Self::default();
        if retries == 0 {
            return targets;
        }
        for slot in order {
            let slot = slot as usize;
            let entry = &slots[slot];
            let address = entry.endpoint.address;
            if slot == chosen
                || entry.stats.breaker.state().is_ejected()
                || targets.contains(&address)
            {
                continue;
            }
            if !targets.push(address) || usize::from(targets.len) >= retries {
                break;
            }
        }
        targets
    }

    /// The first five of `addresses`, as they are: for tests that build a pick's parts.
    #[cfg(test)]
    pub(crate) fn of(addresses: &[SocketAddr]) -> Self {
        let mut targets = Self::default();
        for &address in addresses {
            targets.push(address);
        }
        targets
    }

    /// Adds `address` unless full; returns whether there is room for more.
    fn push(&mut self, address: SocketAddr) -> bool {
        if let Some(free) = self.addresses.get_mut(usize::from(self.len)) {
            *free = address;
            self.len += 1;
        }
        usize::from(self.len) < self.addresses.len()
    }
}
