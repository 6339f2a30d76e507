//! Round robin: each admissible candidate in turn, ignoring weights.
//!
//! Envoy's unweighted `ROUND_ROBIN`. The cursor is shared across candidate sets, so when
//! endpoints are ejected or return the rotation continues without restarting.

use super::{Choice, Request, Select, candidates::Candidates};
use crate::rng::Rng;

/// The rotation's cursor: how many picks it has made.
#[derive(Debug, Clone, Default)]
pub(crate) struct RoundRobin {
    cursor: u64,
}

impl Select for RoundRobin {
    fn pick<'a, R: Rng + ?Sized>(
        &'a mut self,
        candidates: &'a mut Candidates<'_>,
        _request: Request<'_, R>,
    ) -> Choice<'a> {
        let len = candidates.slots().len() as u64;
        let position = (self.cursor % len.max(1)) as usize;
        self.cursor = self.cursor.wrapping_add(1);
        Choice::at(candidates, position)
    }
}
