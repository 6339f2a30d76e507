//! Least request, as Envoy's `LEAST_REQUEST` load balancer does it.
//!
//! Equal weights: power of `choice_count` choices on active requests. Unequal weights: each
//! candidate's effective weight is `weight / (active + 1)^active_request_bias` and a candidate
//! is drawn in proportion to it (Envoy schedules the same dynamic weights with EDF; a
//! proportional draw has the same long-run shares and needs no scheduler state, but costs
//! O(candidates) per pick; equal weights cost O(choice_count)).

use super::{Slot, power_of_choices, weighted::random_pick_by};
use crate::{policy::LeastRequest, rng::Rng};

pub(crate) fn pick<R: Rng + ?Sized>(
    config: &LeastRequest,
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
