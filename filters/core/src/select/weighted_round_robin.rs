//! Weighted round robin by earliest deadline first, as Envoy's `ROUND_ROBIN` with weights
//! (`EdfScheduler`): O(log n) per pick.
//!
//! Every endpoint of weight `w` is due every `1/w` of virtual time; a pick serves the endpoint
//! due first (ties to the lower slot, i.e. address) and makes it due `1/w` later. A fresh
//! endpoint is first due half a period in, at `1/(2w)` (Webster's rounding: its turns sit in
//! the middle of their intervals, so 5,1,1 gives `a a a b c a a`, each endpoint's turns evenly
//! spaced). Every unit of virtual time holds exactly `w` turns of each endpoint and the order
//! repeats every unit, so **any `W` consecutive picks (W the total weight) serve each endpoint
//! exactly its weight**, the guarantee of nginx's smooth WRR, which this replaces because it
//! costs O(n) per pick. Deadlines are exact rationals (`due / (PHASES · w)`, compared by cross
//! multiplication in `u128`), never floats, so ties and cycles stay exact.
//!
//! There is one schedule per locality tier, plus one over every tier for the rare pick whose
//! candidates span tiers. When a breaker is open the candidates are part of a tier: an endpoint
//! due that is not a candidate forfeits its turn (made due one period later), at most
//! `REDRAWS` times a pick, then the earliest due candidate is found by a scan. The
//! candidates' own deadlines never move for others, so they are served in exactly the order
//! (and shares) of a schedule over the candidates alone. On an endpoint-set change every
//! survivor keeps where it was in its period (to 1/`PHASES` of a period), so the rotation
//! carries on; a newcomer starts half a period in.

use std::{cmp::Ordering, collections::BinaryHeap};

use super::{
    Choice, EndpointSet, Request, Select,
    candidates::{Candidates, Scope},
    tiered::REDRAWS,
};
use crate::rng::Rng;

/// Resolution of a period when a schedule is carried across an endpoint-set change: a turn's
/// position in its period is kept to `1/PHASES`.
const PHASES: u64 = 1 << 16;

/// Weighted round robin: one schedule per tier, and one across the tiers when there are
/// several.
#[derive(Debug, Clone, Default)]
pub(crate) struct WeightedRoundRobin {
    tiers: Vec<Schedule>,
    across: Option<Schedule>,
}

/// One endpoint's next turn: due at virtual time `due / (PHASES · weight)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Turn {
    due: u64,
    weight: u32,
    slot: u32,
}

impl Turn {
    /// The turn after this one, one period later.
    fn next(self) -> Self {
        Self {
            due: self.due.saturating_add(PHASES),
            ..self
        }
    }

    /// Whether `self` is due before `other` (ties: the lower slot first).
    fn before(&self, other: &Self) -> bool {
        self > other
    }

    /// Where `self` is in its period when the schedule's time is `now` (a turn no later
    /// than `self`): `PHASES` fractions of a period to go, at least 1.
    fn phase_after(self, now: Turn) -> u64 {
        // (due / w - now.due / now.w) · w = due - now.due · w / now.w, in PHASES units.
        let due = u128::from(self.due) * u128::from(now.weight);
        let elapsed = u128::from(now.due) * u128::from(self.weight);
        let ahead = due.saturating_sub(elapsed).div_ceil(u128::from(now.weight));
        ahead.clamp(1, u128::from(PHASES)) as u64
    }
}

impl Ord for Turn {
    /// Earliest due is greatest, then the lower slot: `BinaryHeap` is a max-heap.
    fn cmp(&self, other: &Self) -> Ordering {
        let mine = u128::from(self.due) * u128::from(other.weight);
        let theirs = u128::from(other.due) * u128::from(self.weight);
        theirs.cmp(&mine).then_with(|| other.slot.cmp(&self.slot))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The next turn of every endpoint of one scope, earliest first, and the last turn served
/// (virtual time now).
#[derive(Debug, Clone)]
struct Schedule {
    turns: BinaryHeap<Turn>,
    now: Turn,
}

impl Schedule {
    fn new(turns: Vec<Turn>) -> Self {
        Self {
            turns: BinaryHeap::from(turns),
            now: Turn {
                due: 0,
                weight: 1,
                slot: 0,
            },
        }
    }

    /// Serves the turn due first if `is_candidate` says its endpoint is one, else forfeits
    /// it; up to `REDRAWS` forfeits. `None` when they are used up (or nothing is scheduled).
    fn serve_due(&mut self, mut is_candidate: impl FnMut(u32) -> bool) -> Option<u32> {
        for _ in 0..REDRAWS {
            let mut top = self.turns.peek_mut()?;
            let turn = *top;
            *top = turn.next();
            drop(top);
            self.now = turn;
            if is_candidate(turn.slot) {
                return Some(turn.slot);
            }
        }
        None
    }

    /// Serves the candidate due first, scanning every turn: O(n).
    fn serve_scan(&mut self, is_candidate: impl Fn(u32) -> bool) -> Option<u32> {
        let mut turns = std::mem::take(&mut self.turns).into_vec();
        let earliest = turns
            .iter_mut()
            .filter(|turn| is_candidate(turn.slot))
            .reduce(|earliest, turn| {
                if turn.before(earliest) {
                    turn
                } else {
                    earliest
                }
            });
        let served = earliest.map(|turn| std::mem::replace(turn, turn.next()));
        self.turns = BinaryHeap::from(turns);
        let served = served?;
        if self.now.before(&served) {
            self.now = served;
        }
        Some(served.slot)
    }
}

impl Select for WeightedRoundRobin {
    fn rebuild(&mut self, set: &EndpointSet<'_>) {
        // Where every endpoint was in its period, by its old slot.
        let mut phases: Vec<u64> = Vec::new();
        for schedule in &self.tiers {
            for turn in &schedule.turns {
                let old = turn.slot as usize;
                if phases.len() <= old {
                    phases.resize(old + 1, 0);
                }
                phases[old] = turn.phase_after(schedule.now);
            }
        }
        let turn = |&slot: &u32| {
            let phase = set.previous[slot as usize]
                .and_then(|old| phases.get(old as usize).copied())
                .filter(|&phase| phase > 0)
                .unwrap_or(PHASES / 2);
            Turn {
                due: phase,
                weight: set.slots[slot as usize].weight(),
                slot,
            }
        };
        self.tiers = set
            .tiers
            .iter()
            .map(|tier| Schedule::new(tier.iter().map(turn).collect()))
            .collect();
        self.across = (set.tiers.len() > 1)
            .then(|| Schedule::new(set.tiers.iter().flatten().map(turn).collect()));
    }

    fn pick<'a, R: Rng + ?Sized>(
        &'a mut self,
        candidates: &'a mut Candidates<'_>,
        _request: Request<'_, R>,
    ) -> Choice<'a> {
        let served = match candidates.scope() {
            Scope::Whole(tier) => self
                .tiers
                .get_mut(tier)
                .and_then(|schedule| schedule.serve_due(|_| true)),
            Scope::Part(tier) => self.tiers.get_mut(tier).and_then(|schedule| {
                schedule
                    .serve_due(|slot| candidates.position(slot).is_some())
                    .or_else(|| {
                        let membership = candidates.membership();
                        schedule.serve_scan(|slot| membership.contains(slot))
                    })
            }),
            Scope::Mixed => self.across.as_mut().and_then(|schedule| {
                let membership = candidates.membership();
                schedule.serve_scan(|slot| membership.contains(slot))
            }),
        };
        let position = served
            .and_then(|slot| candidates.position(slot))
            .unwrap_or(0);
        Choice::at(candidates, position)
    }
}
