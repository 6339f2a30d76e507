//! Weighted selection: smooth weighted round robin (nginx) and weighted random.
//!
//! Smooth WRR is nginx's `ngx_http_upstream_get_peer`: every pick adds each candidate's weight
//! to its current weight, takes the largest and subtracts the total from it. Weights 5,1,1 give
//! `a a b a c a a` rather than `a a a a a b c`. Exact and deterministic; O(candidates) per pick.
//! Weighted random draws `below(total weight)` and walks the candidates.

use super::Slot;
use crate::rng::Rng;

/// Smooth weighted round robin over `candidates`; updates their current weights.
pub(crate) fn smooth_pick(candidates: &[u32], slots: &mut [Slot]) -> usize {
    let mut total: i64 = 0;
    let mut best: Option<(usize, i64)> = None;
    for (position, &slot) in candidates.iter().enumerate() {
        let slot = &mut slots[slot as usize];
        let weight = i64::from(slot.weight());
        slot.stats.smooth_weight = slot.stats.smooth_weight.saturating_add(weight);
        total += weight;
        if best.is_none_or(|(_, current)| slot.stats.smooth_weight > current) {
            best = Some((position, slot.stats.smooth_weight));
        }
    }
    let Some((position, _)) = best else { return 0 };
    let chosen = &mut slots[candidates[position] as usize].stats.smooth_weight;
    *chosen = chosen.saturating_sub(total);
    position
}

/// A candidate drawn with probability proportional to its weight.
pub(crate) fn random_pick<R: Rng + ?Sized>(
    candidates: &[u32],
    slots: &[Slot],
    rng: &mut R,
) -> usize {
    let total: u64 = candidates
        .iter()
        .map(|&slot| u64::from(slots[slot as usize].weight()))
        .sum();
    let mut remaining = below_u64(rng, total);
    for (position, &slot) in candidates.iter().enumerate() {
        let weight = u64::from(slots[slot as usize].weight());
        if remaining < weight {
            return position;
        }
        remaining -= weight;
    }
    candidates.len().saturating_sub(1)
}

/// A value in `0..bound` for bounds that may exceed `usize` on 32-bit targets.
pub(crate) fn below_u64<R: Rng + ?Sized>(rng: &mut R, bound: u64) -> u64 {
    ((u128::from(rng.next_u64()) * u128::from(bound)) >> 64) as u64
}

/// A position drawn with probability proportional to `weight(position)` (non-negative,
/// finite); uniform when all weights are zero.
pub(crate) fn random_pick_by<R: Rng + ?Sized>(
    len: usize,
    rng: &mut R,
    weight: impl Fn(usize) -> f64,
) -> usize {
    let total: f64 = (0..len).map(&weight).sum();
    if !(total > 0.0 && total.is_finite()) {
        return rng.below(len);
    }
    let mut remaining = rng.unit() * total;
    for position in 0..len {
        let w = weight(position);
        if remaining < w {
            return position;
        }
        remaining -= w;
    }
    len.saturating_sub(1)
}
