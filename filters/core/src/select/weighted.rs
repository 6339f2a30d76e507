//! Weighted selection: smooth weighted round robin (nginx) and weighted random.
//!
//! Smooth WRR is nginx's `ngx_http_upstream_get_peer`: every pick adds each candidate's weight
//! to its current weight, takes the largest and subtracts the total from it. Weights 5,1,1 give
//! `a a b a c a a` rather than `a a a a a b c`. Exact and deterministic; O(candidates) per pick.
//! Weighted random draws `below(total weight)` and walks the candidates.

use super::{Choice, EndpointSet, Request, Select, Slot, candidates::Candidates};
use crate::rng::Rng;

/// Smooth weighted round robin: every endpoint's current weight, by slot. An endpoint keeps
/// its current weight across endpoint-set changes; a new one starts at 0.
#[derive(Debug, Clone, Default)]
pub(crate) struct WeightedRoundRobin {
    current: Vec<i64>,
}

impl Select for WeightedRoundRobin {
    fn rebuild(&mut self, set: &EndpointSet<'_>) {
        let previous = std::mem::take(&mut self.current);
        self.current = set
            .previous
            .iter()
            .map(|old| {
                old.and_then(|old| previous.get(old as usize))
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
    }

    fn pick<'a, R: Rng + ?Sized>(
        &'a mut self,
        candidates: &'a mut Candidates<'_>,
        request: Request<'_, R>,
    ) -> Choice<'a> {
        let position = smooth_pick(candidates.slots(), request.slots, &mut self.current);
        Choice::at(candidates, position)
    }
}

/// Weighted random: stateless.
#[derive(Debug, Clone)]
pub(crate) struct WeightedRandom;

impl Select for WeightedRandom {
    fn pick<'a, R: Rng + ?Sized>(
        &'a mut self,
        candidates: &'a mut Candidates<'_>,
        request: Request<'_, R>,
    ) -> Choice<'a> {
        let position = random_pick(candidates.slots(), request.slots, request.rng);
        Choice::at(candidates, position)
    }
}

/// Smooth weighted round robin over `candidates`; updates their current weights.
fn smooth_pick(candidates: &[u32], slots: &[Slot], current: &mut [i64]) -> usize {
    let mut total: i64 = 0;
    let mut best: Option<(usize, i64)> = None;
    for (position, &slot) in candidates.iter().enumerate() {
        let weight = i64::from(slots[slot as usize].weight());
        let current = &mut current[slot as usize];
        *current = current.saturating_add(weight);
        total += weight;
        if best.is_none_or(|(_, highest)| *current > highest) {
            best = Some((position, *current));
        }
    }
    let Some((position, _)) = best else { return 0 };
    let chosen = &mut current[candidates[position] as usize];
    *chosen = chosen.saturating_sub(total);
    position
}

/// A candidate drawn with probability proportional to its weight.
fn random_pick<R: Rng + ?Sized>(candidates: &[u32], slots: &[Slot], rng: &mut R) -> usize {
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
fn below_u64<R: Rng + ?Sized>(rng: &mut R, bound: u64) -> u64 {
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
