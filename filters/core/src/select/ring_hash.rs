//! Ring hash: Karger et al. consistent hashing, built the way Envoy's `RING_HASH` builds it.
//!
//! Each endpoint gets `round(scale × weight / total_weight)` points (at least one), where
//! `scale` makes the lightest endpoint get about `minimum_ring_size × its share` points and
//! the ring holds at least `minimum_ring_size` (capped at [`MAX_RING_SIZE`]). A key is served
//! by the first point at or after its hash, wrapping. Adding one endpoint to `N` moves about
//! `1/(N+1)` of the keys.

use super::{Slot, hash::HashTable};
use crate::{rng::mix64, validate::MAX_RING_SIZE};

/// Builds the ring over `members` (slot indices).
pub(crate) fn build(members: &[u32], slots: &[Slot], minimum_ring_size: u32) -> HashTable {
    let total_weight: f64 = members
        .iter()
        .map(|&slot| f64::from(slots[slot as usize].weight()))
        .sum();
    let min_weight = members
        .iter()
        .map(|&slot| slots[slot as usize].weight())
        .min()
        .unwrap_or(1);
    let mut points: Vec<(u64, u32)> = Vec::new();
    if total_weight > 0.0 {
        let min_share = f64::from(min_weight) / total_weight;
        let minimum = f64::from(minimum_ring_size.clamp(1, MAX_RING_SIZE));
        let scale = ((min_share * minimum).ceil() / min_share).min(f64::from(MAX_RING_SIZE));
        for &slot in members {
            let s = &slots[slot as usize];
            let share = f64::from(s.weight()) / total_weight;
            let count = ((scale * share).round() as u64).max(1);
            for replica in 0..count {
                points.push((mix64(s.address_hash ^ mix64(replica)), slot));
            }
        }
    }
    points.sort_unstable();
    let (points, slots) = points.into_iter().unzip();
    HashTable::Ring { points, slots }
}
