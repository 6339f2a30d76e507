//! What the weighted algorithms share so that a pick costs O(log n) rather than O(n): their
//! structures are laid out over the eligible endpoints in tier order (`TierOrder`), built
//! when the endpoint set changes, and a pick draws from them restricted to its candidates
//! (`draw`).
//!
//! A pick's candidates are, in the steady state, a whole locality tier: a draw from the tier's
//! part of the structure is a draw among the candidates, unchanged. When a breaker is open they
//! are part of a tier, so the draw is *rejection sampling* (von Neumann): draw from the whole
//! tier and redraw while the endpoint drawn is not a candidate, at most `REDRAWS` times,
//! then take the exact O(candidates) pick. Both branches answer the tier's distribution
//! restricted to the candidates (a draw accepted on the k-th try is distributed as the
//! restriction, whatever k, and so is the fallback), so the mixture is exactly that
//! distribution too; with half the tier's weight ejected the fallback runs once in 2^16
//! picks. Candidates from several tiers (no tier healthy enough) always take the O(n) pick.

use std::ops::Range;

use super::candidates::{Candidates, Scope};
use crate::rng::Rng;

/// Draws from a tier before the exact fallback when the candidates are part of it.
pub(crate) const REDRAWS: usize = 16;

/// The eligible endpoints in tier order: tier `t` is `slots()[range(t)]`, ascending, exactly
/// the candidates of a pick when that tier is whole.
#[derive(Debug, Clone, Default)]
pub(crate) struct TierOrder {
    slots: Vec<u32>,
    /// Tier `t` starts at `starts[t]` and ends at `starts[t + 1]`.
    starts: Vec<usize>,
}

impl TierOrder {
    /// The layout of `tiers` (best first, each ascending).
    pub fn new(tiers: &[Vec<u32>]) -> Self {
        let mut starts = Vec::with_capacity(tiers.len() + 1);
        starts.push(0);
        for tier in tiers {
            starts.push(starts.last().copied().unwrap_or(0) + tier.len());
        }
        Self {
            slots: tiers.iter().flatten().copied().collect(),
            starts,
        }
    }

    /// Every eligible slot, tier after tier.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// Where tier `tier` lies in [`slots`](Self::slots) (empty for a tier that does not exist).
    pub fn range(&self, tier: usize) -> Range<usize> {
        match (self.starts.get(tier), self.starts.get(tier + 1)) {
            (Some(&start), Some(&end)) => start..end,
            _ => 0..0,
        }
    }
}

/// A candidate position drawn from a distribution kept per tier, restricted to the candidates.
///
/// `draw_in(range, rng)` draws an index of `order.slots()` within `range` (a tier) from the
/// algorithm's structure, or `None` if it cannot (e.g. all weights zero); `exact(rng)` is the
/// O(candidates) pick of the same distribution over the candidates, the fallback.
pub(crate) fn draw<R: Rng + ?Sized>(
    candidates: &Candidates<'_>,
    order: &TierOrder,
    rng: &mut R,
    mut draw_in: impl FnMut(Range<usize>, &mut R) -> Option<usize>,
    exact: impl FnOnce(&mut R) -> usize,
) -> usize {
    match candidates.scope() {
        Scope::Whole(tier) => {
            let range = order.range(tier);
            debug_assert_eq!(
                range.len(),
                candidates.slots().len(),
                "a whole tier's candidates are the tier as the structure was built"
            );
            if let Some(index) = draw_in(range.clone(), rng) {
                return index - range.start;
            }
        }
        Scope::Part(tier) => {
            let range = order.range(tier);
            for _ in 0..REDRAWS {
                let Some(index) = draw_in(range.clone(), rng) else {
                    break;
                };
                if let Some(position) = candidates.position(order.slots[index]) {
                    return position;
                }
            }
        }
        Scope::Mixed => {}
    }
    exact(rng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_are_laid_out_one_after_another() {
        let order = TierOrder::new(&[vec![2, 5], vec![0, 1, 7]]);
        assert_eq!(order.slots(), [2, 5, 0, 1, 7]);
        assert_eq!(order.range(0), 0..2);
        assert_eq!(order.range(1), 2..5);
        assert_eq!(order.range(2), 0..0);
    }
}
