//! Weighted random: each candidate with probability proportional to its weight, in
//! O(log n) per pick.
//!
//! The eligible endpoints' cumulative weights are summed once per endpoint set, tier after
//! tier (`TierOrder`); a pick draws one integer below its tier's total weight and finds the
//! endpoint whose interval holds it by binary search. That is the very draw the linear walk
//! over the candidates makes (same random number, same endpoint), so the distribution is exact
//! in integers. When a breaker is open the candidates are part of a tier and the draw is
//! rejection sampling over the tier (`tiered::draw`), exact too. Prefix sums rather than an
//! alias table (O(1)): they keep the pick a single draw, identical to the walk, and binary
//! search over 10,000 endpoints is 14 steps.

use std::ops::Range;

use super::{
    Choice, EndpointSet, Request, Select, Slot,
    candidates::Candidates,
    tiered::{self, TierOrder},
};
use crate::rng::Rng;

/// Weighted random: the eligible endpoints' cumulative weights in tier order.
#[derive(Debug, Clone, Default)]
pub(crate) struct WeightedRandom {
    order: TierOrder,
    /// `cumulative[i]` is the total weight of `order.slots()[..i]`; one entry more.
    cumulative: Vec<u64>,
}

impl Select for WeightedRandom {
    fn rebuild(&mut self, set: &EndpointSet<'_>) {
        self.order = TierOrder::new(set.tiers);
        let mut total = 0u64;
        self.cumulative = std::iter::once(0)
            .chain(self.order.slots().iter().map(|&slot| {
                total += u64::from(set.slots[slot as usize].weight());
                total
            }))
            .collect();
    }

    fn pick<'a, R: Rng + ?Sized>(
        &'a mut self,
        candidates: &'a mut Candidates<'_>,
        request: Request<'_, R>,
    ) -> Choice<'a> {
        let cumulative = &self.cumulative;
        let position = tiered::draw(
            candidates,
            &self.order,
            request.rng,
            |range, rng| Some(draw_in(cumulative, range, rng)),
            |rng| random_pick(candidates.slots(), request.slots, rng),
        );
        Choice::at(candidates, position)
    }
}

/// An index in `range` drawn with probability proportional to its weight, given the
/// cumulative weights: the last index whose cumulative weight is at most the draw.
fn draw_in<R: Rng + ?Sized>(cumulative: &[u64], range: Range<usize>, rng: &mut R) -> usize {
    let base = cumulative[range.start];
    let target = base + below_u64(rng, cumulative[range.end] - base);
    let within = &cumulative[range.start..range.end];
    range.start + within.partition_point(|&sum| sum <= target) - 1
}

/// A candidate drawn with probability proportional to its weight, walking the candidates.
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::rng::Sequence;

    proptest! {
        /// The binary search finds the endpoint the linear walk finds for the same draw, in
        /// any tier: the prefix sums change the cost, never the distribution.
        #[test]
        fn the_binary_search_lands_where_the_linear_walk_does(
            weights in proptest::collection::vec(1u64..1000, 1..40),
            split in any::<prop::sample::Index>(),
            draw in any::<u64>(),
        ) {
            let split = split.index(weights.len());
            let mut cumulative = vec![0];
            for weight in &weights {
                cumulative.push(cumulative.last().unwrap() + weight);
            }
            for range in [0..split, split..weights.len()] {
                if range.is_empty() {
                    continue;
                }
                let found = draw_in(&cumulative, range.clone(), &mut Sequence::new([draw]));
                let tier = &weights[range.clone()];
                let mut remaining = below_u64(&mut Sequence::new([draw]), tier.iter().sum());
                let walked = tier.iter().position(|&weight| {
                    let here = remaining < weight;
                    remaining = remaining.saturating_sub(weight);
                    here
                });
                prop_assert_eq!(Some(found - range.start), walked);
            }
        }
    }
}
