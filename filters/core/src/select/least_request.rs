//! Least request, as Envoy's `LEAST_REQUEST` load balancer does it.
//!
//! Equal weights: power of `choice_count` choices on active requests, O(choice_count).
//! Unequal weights: each candidate's effective weight is `weight / (active + 1)^bias`
//! (`active_request_bias`) and a candidate is drawn in proportion to it. Envoy schedules the
//! same dynamic weights with EDF, reading each host's weight only when the host is scheduled
//! again; the draw here reads every candidate's current load, as ever, and costs O(log n): the
//! effective weights sit in a sum tree (`SumTree`) laid out tier after tier, built with the
//! endpoint set and updated at every change of a load (`Select::load_changed`, one leaf and
//! its O(log n) ancestors, each recomputed from its children so nothing drifts). A draw
//! descends the tree from a uniform point of the tier's total, which picks the same endpoint
//! as walking the candidates' effective weights (up to the rounding of the sums); when a
//! breaker is open it is rejection sampling over the tier (`tiered::draw`), exact too.

use std::ops::Range;

use super::{
    Choice, EndpointSet, Request, Select, Slot,
    candidates::Candidates,
    power_of_choices,
    tiered::{self, TierOrder},
    weighted_random::random_pick_by,
};
use crate::{policy, rng::Rng};

/// Least request under its policy; with unequal weights, the effective weights' sum tree.
#[derive(Debug, Clone)]
pub(crate) struct LeastRequest {
    config: policy::LeastRequest,
    /// `None` while the eligible endpoints' weights are all equal (power of choices).
    weighted: Option<Weighted>,
}

/// The effective weights of the eligible endpoints, in tier order.
#[derive(Debug, Clone)]
struct Weighted {
    order: TierOrder,
    /// Per slot, its leaf in `tree` (`u32::MAX` if not eligible).
    leaf_of: Vec<u32>,
    tree: SumTree,
}

impl LeastRequest {
    pub fn new(config: &policy::LeastRequest) -> Self {
        Self {
            config: config.clone(),
            weighted: None,
        }
    }
}

/// `weight / (active + 1)^bias`.
fn effective_weight(slot: &Slot, bias: f64) -> f64 {
    let active = f64::from(slot.stats.inflight) + 1.0;
    let divisor = if bias == 1.0 {
        active
    } else {
        active.powf(bias)
    };
    f64::from(slot.weight()) / divisor
}

impl Select for LeastRequest {
    fn rebuild(&mut self, set: &EndpointSet<'_>) {
        let slots = set.slots;
        let uniform_weights = set
            .eligible
            .windows(2)
            .all(|pair| slots[pair[0] as usize].weight() == slots[pair[1] as usize].weight());
        self.weighted = (!uniform_weights).then(|| {
            let order = TierOrder::new(set.tiers);
            let mut leaf_of = vec![u32::MAX; slots.len()];
            for (leaf, &slot) in order.slots().iter().enumerate() {
                leaf_of[slot as usize] = leaf as u32;
            }
            let bias = self.config.active_request_bias;
            let tree = SumTree::new(
                order
                    .slots()
                    .iter()
                    .map(|&slot| effective_weight(&slots[slot as usize], bias)),
            );
            Weighted {
                order,
                leaf_of,
                tree,
            }
        });
    }

    fn load_changed(&mut self, slot: usize, slots: &[Slot]) {
        if let Some(weighted) = &mut self.weighted
            && let Some(&leaf) = weighted.leaf_of.get(slot)
            && leaf != u32::MAX
        {
            let weight = effective_weight(&slots[slot], self.config.active_request_bias);
            weighted.tree.set(leaf as usize, weight);
        }
    }

    fn pick<'a, R: Rng + ?Sized>(
        &'a mut self,
        candidates: &'a mut Candidates<'_>,
        request: Request<'_, R>,
    ) -> Choice<'a> {
        let slots = request.slots;
        let members = candidates.slots();
        let Some(weighted) = &self.weighted else {
            let (position, rival) =
                power_of_choices(members, self.config.choice_count, request.rng, |slot| {
                    f64::from(slots[slot as usize].stats.inflight)
                });
            return Choice::compared(candidates, position, rival);
        };
        let bias = self.config.active_request_bias;
        let position = tiered::draw(
            candidates,
            &weighted.order,
            request.rng,
            |range, rng| weighted.tree.draw(range, rng),
            |rng| {
                random_pick_by(members.len(), rng, |position| {
                    effective_weight(&slots[members[position] as usize], bias)
                })
            },
        );
        Choice::at(candidates, position)
    }
}

/// Non-negative weights in the leaves of a complete binary tree whose every inner node holds
/// the sum of its children: a weight is set and a weighted index drawn in O(log n).
#[derive(Debug, Clone)]
struct SumTree {
    /// Node 1 is the root, node `i` has children `2i` and `2i + 1`, leaf `j` is node
    /// `leaves + j`; node 0 is unused.
    nodes: Vec<f64>,
    /// Leaves in the tree (a power of two); those past `len` weigh 0.
    leaves: usize,
    len: usize,
}

impl SumTree {
    fn new(weights: impl ExactSizeIterator<Item = f64>) -> Self {
        let len = weights.len();
        let leaves = len.next_power_of_two();
        let mut nodes = vec![0.0; 2 * leaves];
        for (leaf, weight) in weights.enumerate() {
            nodes[leaves + leaf] = weight;
        }
        for node in (1..leaves).rev() {
            nodes[node] = nodes[2 * node] + nodes[2 * node + 1];
        }
        Self { nodes, leaves, len }
    }

    /// Sets leaf `leaf`'s weight and recomputes its ancestors from their children.
    fn set(&mut self, leaf: usize, weight: f64) {
        let mut node = self.leaves + leaf;
        self.nodes[node] = weight;
        while node > 1 {
            node /= 2;
            self.nodes[node] = self.nodes[2 * node] + self.nodes[2 * node + 1];
        }
    }

    /// The sum of the leaves before `leaf`.
    fn before(&self, leaf: usize) -> f64 {
        let mut sum = 0.0;
        let mut node = self.leaves + leaf;
        while node > 1 {
            if node % 2 == 1 {
                sum += self.nodes[node - 1];
            }
            node /= 2;
        }
        sum
    }

    /// The leaf where the running sum of the leaves first exceeds `target`, descending from
    /// the root; the last leaf if rounding carries `target` past the total.
    fn find(&self, mut target: f64) -> usize {
        let mut node = 1;
        while node < self.leaves {
            let left = self.nodes[2 * node];
            if target < left {
                node *= 2;
            } else {
                target -= left;
                node = 2 * node + 1;
            }
        }
        node - self.leaves
    }

    /// A leaf in `range` drawn in proportion to its weight, or `None` if their total is not
    /// positive (or not finite).
    fn draw<R: Rng + ?Sized>(&self, range: Range<usize>, rng: &mut R) -> Option<usize> {
        let base = if range.start == 0 {
            0.0
        } else {
            self.before(range.start)
        };
        let total = if range.end == self.len {
            self.nodes[1] - base
        } else {
            self.before(range.end) - base
        };
        if !(total > 0.0 && total.is_finite()) || range.is_empty() {
            return None;
        }
        let leaf = self.find(base + rng.unit() * total);
        // Rounding can land a hair outside the range, on a neighbour or an empty leaf.
        Some(leaf.clamp(range.start, range.end - 1))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::rng::Sequence;

    proptest! {
        /// With weights and fractions whose sums and products are exact in floating point, a draw from
        /// the tree lands, for every random number and every range, where walking the
        /// range's weights lands; setting a weight keeps it so.
        #[test]
        fn a_tree_draw_lands_where_the_linear_walk_does(
            eighths in proptest::collection::vec(0u32..64, 1..40),
            update in any::<(prop::sample::Index, u32)>(),
            bounds in any::<(prop::sample::Index, prop::sample::Index)>(),
            sixteenths in 0u32..(1 << 16),
        ) {
            // Fractions and weights of few bits: every sum and product below is exact.
            let fraction = f64::from(sixteenths) / f64::from(1 << 16);
            let mut weights: Vec<f64> = eighths.iter().map(|&e| f64::from(e) / 8.0).collect();
            let mut tree = SumTree::new(weights.iter().copied());
            let (leaf, value) = (update.0.index(weights.len()), f64::from(update.1 % 64) / 8.0);
            weights[leaf] = value;
            tree.set(leaf, value);
            let (a, b) = (bounds.0.index(weights.len() + 1), bounds.1.index(weights.len() + 1));
            let range = a.min(b)..a.max(b);
            let found = tree.draw(range.clone(), &mut Sequence::units(&[fraction]));
            let tier = &weights[range.clone()];
            if tier.iter().sum::<f64>() == 0.0 {
                prop_assert_eq!(found, None);
            } else {
                let walked = random_pick_by(tier.len(), &mut Sequence::units(&[fraction]), |i| tier[i]);
                prop_assert_eq!(found, Some(range.start + walked));
            }
        }
    }
}
