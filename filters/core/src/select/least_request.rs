//! Least request, as Envoy's `LEAST_REQUEST` load balancer does it.
//!
//! Equal weights: power of `choice_count` choices on active requests. Unequal weights: each
//! candidate's effective weight is `weight / (active + 1)^active_request_bias` and a candidate
//! is drawn in proportion to it (Envoy schedules the same dynamic weights with EDF; a
//! proportional draw has the same long-run shares and needs no scheduler state, but costs
//! O(candidates) per pick; equal weights cost O(choice_count)).

use super::{
    Choice, EndpointSet, Request, Select, Slot, candidates::Candidates, power_of_choices,
    weighted::random_pick_by,
};
use crate::{policy, rng::Rng};

/// Least request under its policy, and whether the eligible endpoints' weights are all equal
/// (which selects the power-of-choices path).
#[derive(Debug, Clone)]
pub(crate) struct LeastRequest {
    config: policy::LeastRequest,
    uniform_weights: bool,
}

impl LeastRequest {
    pub fn new(config: &policy::LeastRequest) -> Self {
        Self {
            config: config.clone(),
            uniform_weights: true,
        }
    }
}

impl Select for LeastRequest {
    fn rebuild(&mut self, set: &EndpointSet<'_>) {
        let slots = set.slots;
        self.uniform_weights = set
            .eligible
            .windows(2)
            .all(|pair| slots[pair[0] as usize].weight() == slots[pair[1] as usize].weight());
    }

    fn pick<'a, R: Rng + ?Sized>(
        &'a mut self,
        candidates: &'a mut Candidates<'_>,
        request: Request<'_, R>,
    ) -> Choice<'a> {
        let position = pick(
            &self.config,
            candidates.slots(),
            request.slots,
            self.uniform_weights,
            request.rng,
        );
        Choice::at(candidates, position)
    }
}

fn pick<R: Rng + ?Sized>(
    config: &policy::LeastRequest,
    candidates: &[u32],
    slots: &[Slot],
    uniform_weights: bool,
    rng: &mut R,
) -> usize {
    if uniform_weights {
        return power_of_choices(candidates, config.choice_count, rng, |slot| {
            f64::from(slots[slot as usize].stats.inflight)
        });
    }
    let bias = config.active_request_bias;
    random_pick_by(candidates.len(), rng, |position| {
        let slot = &slots[candidates[position] as usize];
        let active = f64::from(slot.stats.inflight) + 1.0;
        let divisor = if bias == 1.0 {
            active
        } else {
            active.powf(bias)
        };
        f64::from(slot.weight()) / divisor
    })
}
