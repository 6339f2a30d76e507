//! Ring hash: Karger et al. consistent hashing with virtual nodes, like Envoy's `RING_HASH`.
//!
//! Each endpoint gets `weight × points_per_weight` points on a 64-bit ring; a key is served
//! by the first point at or after its hash, wrapping. Envoy sizes the ring so that it holds
//! about `minimum_ring_size` points, which changes every endpoint's point count whenever one
//! endpoint joins, so keys move between endpoints that did not change. Here
//! `points_per_weight` is `minimum_ring_size / total_weight` rounded *up to a power of two*:
//! the ring holds between one and two times `minimum_ring_size` points (at most
//! [`MAX_RING_SIZE`]), and adding or removing an endpoint moves only the keys of that endpoint
//! — about `1/N` — except when the total weight crosses a power-of-two boundary, where the
//! point count halves or doubles once.

use super::{
    Slot,
    hash::{HashTable, Layout},
};
use crate::{rng::mix64, validate::MAX_RING_SIZE};

/// The ring's layout: its `minimum_ring_size` from the policy.
#[derive(Debug, Clone)]
pub(crate) struct Ring(pub u32);

impl Layout for Ring {
    fn build(&self, eligible: &[u32], slots: &[Slot]) -> HashTable {
        build(eligible, slots, self.0)
    }
}

/// Points per unit of weight for a ring over `total_weight`.
pub(crate) fn points_per_weight(minimum_ring_size: u32, total_weight: u64) -> u64 {
    let total_weight = total_weight.max(1);
    let wanted = u64::from(minimum_ring_size.clamp(1, MAX_RING_SIZE)).div_ceil(total_weight);
    let mut points = wanted.next_power_of_two();
    while points > 1 && points * total_weight > u64::from(MAX_RING_SIZE) {
        points /= 2;
    }
    points
}

/// How many points each weight gets on a ring of `minimum_ring_size` over endpoints of
/// these `weights`: `weight × points_per_weight`, or, only when the weights alone exceed
/// [`MAX_RING_SIZE`], counts scaled down proportionally (at least one each).
fn point_counts(
    minimum_ring_size: u32,
    weights: impl Iterator<Item = u64> + Clone,
) -> impl Iterator<Item = u64> {
    let total_weight: u64 = weights.clone().sum();
    let per_weight = points_per_weight(minimum_ring_size, total_weight);
    let over_cap = per_weight * total_weight > u64::from(MAX_RING_SIZE);
    weights.map(move |weight| {
        if over_cap {
            (weight * u64::from(MAX_RING_SIZE) / total_weight.max(1)).max(1)
        } else {
            weight * per_weight
        }
    })
}

/// The number of points a ring of `minimum_ring_size` holds over endpoints of these
/// `weights`: what [`build`] allocates, for the table memory budget ([`crate::tables`]).
pub(crate) fn ring_points(
    minimum_ring_size: u32,
    weights: impl Iterator<Item = u64> + Clone,
) -> u64 {
    point_counts(minimum_ring_size, weights).sum()
}

/// Builds the ring over `members` (slot indices).
pub(crate) fn build(members: &[u32], slots: &[Slot], minimum_ring_size: u32) -> HashTable {
    let weights = members
        .iter()
        .map(|&slot| u64::from(slots[slot as usize].weight()));
    let mut points: Vec<(u64, u32)> = Vec::new();
    for (&slot, count) in members.iter().zip(point_counts(minimum_ring_size, weights)) {
        let s = &slots[slot as usize];
        for replica in 0..count {
            points.push((
                mix64(
                    s.address_hash
                        .wrapping_add((replica + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                ),
                slot,
            ));
        }
    }
    points.sort_unstable();
    let (points, slots) = points.into_iter().unzip();
    HashTable::Ring { points, slots }
}
