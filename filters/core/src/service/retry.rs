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
    decimal::push_decimal,
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

    /// The [`OVERRIDE_HEADER`](crate::OVERRIDE_HEADER) value of a pick of `picked` with
    /// these targets: `IP:port` of the pick, then of each target, comma-separated (what
    /// Envoy's `override_host` policy tries in order).
    ///
    /// One allocation of the final length's bound; IPv4 addresses are written digit by digit
    /// (`core::fmt`'s `SocketAddr` display cost more than the rest of the header in the
    /// filter's profile), IPv6 ones through `Display`, which compresses zeros.
    pub fn override_value(&self, picked: SocketAddr) -> String {
        let targets = self.as_slice();
        let mut value = String::with_capacity(MAX_V4_ADDRESS * (1 + targets.len()));
        write_address(&mut value, picked);
        for &target in targets {
            value.push(',');
            write_address(&mut value, target);
        }
        value
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

/// The longest `IP:port` of an IPv4 address: `255.255.255.255:65535`.
const MAX_V4_ADDRESS: usize = 21;

/// Appends `address` as `Display` writes it.
fn write_address(out: &mut String, address: SocketAddr) {
    match address {
        SocketAddr::V4(v4) => {
            for (index, octet) in v4.ip().octets().into_iter().enumerate() {
                if index > 0 {
                    out.push('.');
                }
                push_decimal(out, u64::from(octet));
            }
            out.push(':');
            push_decimal(out, u64::from(v4.port()));
        }
        SocketAddr::V6(_) => {
            use std::fmt::Write as _;
            // Writing to a `String` cannot fail.
            let _ = write!(out, "{address}");
        }
    }
}

#[cfg(test)]
mod override_value_tests {
    use std::net::{Ipv6Addr, SocketAddrV6};

    use proptest::prelude::*;

    use super::*;

    fn address() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port))),
            (any::<[u16; 8]>(), any::<u16>()).prop_map(|(segments, port)| {
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(segments), port, 0, 0))
            }),
        ]
    }

    proptest! {
        #[test]
        fn the_override_value_is_the_pick_then_each_target_as_display_writes_them(
            picked in address(),
            targets in proptest::collection::vec(address(), 0..=5),
        ) {
            let expected: Vec<String> = std::iter::once(picked)
                .chain(targets.iter().copied())
                .map(|address| address.to_string())
                .collect();
            let value = RetryTargets::of(&targets).override_value(picked);
            prop_assert_eq!(value, expected.join(","));
        }
    }

    #[test]
    fn the_longest_ipv4_address_fits_the_bound() {
        let longest = SocketAddr::from(([255, 255, 255, 255], 65535));
        assert_eq!(
            RetryTargets::default().override_value(longest).len(),
            MAX_V4_ADDRESS
        );
        assert_eq!(
            RetryTargets::default().override_value(SocketAddr::from(([0, 0, 0, 0], 0))),
            "0.0.0.0:0"
        );
    }
}
