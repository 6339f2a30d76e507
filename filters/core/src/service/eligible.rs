//! Which endpoints may serve a request: the eligible ones (healthy and selected by the
//! policy's `endpoint_selector`), grouped into locality tiers when the policy prefers the
//! local zone, and among them the admissible ones at pick time (breaker closed or probing),
//! with the panic threshold and the tier failover applied.
//!
//! The tiers are rebuilt with the endpoint set; narrowing them to the admissible candidates
//! happens per pick, in scratch space kept here so a pick does not allocate. With every
//! breaker closed (the steady state) the candidates are the first tier itself.

use std::time::Duration;

use super::{Rejection, slots::Slots};
use crate::{
    endpoint::Health,
    policy::ServicePolicy,
    select::{
        Slot,
        candidates::{Candidates, Marks},
    },
};

/// `tier_of` for an endpoint in no tier.
const NOT_ELIGIBLE: u16 = u16::MAX;

/// The eligible endpoints by locality tier, and the scratch space of a pick.
#[derive(Debug, Clone, Default)]
pub(super) struct Eligible {
    /// Eligible slot indices per locality tier, best tier first; no tier is empty.
    tiers: Vec<Vec<u32>>,
    /// Per slot: its index in `tiers`, or `NOT_ELIGIBLE`.
    tier_of: Vec<u16>,
    /// Every eligible slot, ascending.
    members: Vec<u32>,
    /// The admissible candidates of the current pick, tier after tier.
    admitted: Vec<u32>,
    /// `admitted[start..end]` per tier, for the current pick.
    tier_ranges: Vec<(usize, usize)>,
    /// Candidate marks for membership tests of the current pick.
    marks: Marks,
}

impl Eligible {
    /// The eligible endpoints of `slots` under `policy`.
    pub fn new(policy: &ServicePolicy, slots: &[Slot]) -> Self {
        let locality = &policy.locality;
        let local_zone = locality
            .local_zone
            .as_deref()
            .filter(|_| locality.prefer_local);
        let tier_count = if local_zone.is_some() {
            locality.failover.len() + 2
        } else {
            1
        };
        let mut raw_tiers: Vec<Vec<u32>> = vec![Vec::new(); tier_count];
        for (index, slot) in slots.iter().enumerate() {
            let endpoint = &slot.endpoint;
            if endpoint.health != Health::Healthy || !policy.endpoint_selector.matches(endpoint) {
                continue;
            }
            let tier = match local_zone {
                None => 0,
                Some(local) => {
                    let zone = endpoint.zone.as_deref();
                    if zone == Some(local) {
                        0
                    } else {
                        zone.and_then(|zone| locality.failover.iter().position(|f| f == zone))
                            .map_or(tier_count - 1, |position| position + 1)
                    }
                }
            };
            raw_tiers[tier].push(index as u32);
        }
        let tiers: Vec<Vec<u32>> = raw_tiers
            .into_iter()
            .filter(|tier| !tier.is_empty())
            .take(usize::from(NOT_ELIGIBLE))
            .collect();
        let mut tier_of = vec![NOT_ELIGIBLE; slots.len()];
        for (tier, members) in tiers.iter().enumerate() {
            for &slot in members {
                tier_of[slot as usize] = tier as u16;
            }
        }
        let mut members: Vec<u32> = tiers.iter().flatten().copied().collect();
        members.sort_unstable();
        let mut marks = Marks::default();
        marks.reset(slots.len());
        Self {
            tiers,
            tier_of,
            members,
            admitted: Vec::new(),
            tier_ranges: Vec::new(),
            marks,
        }
    }

    /// Every eligible slot, ascending.
    pub fn members(&self) -> &[u32] {
        &self.members
    }

    /// The eligible slots per locality tier, best first, each ascending.
    pub fn tiers(&self) -> &[Vec<u32>] {
        &self.tiers
    }

    /// The admissible candidates at `now`, or why there are none.
    ///
    /// Admissible: eligible and admitted by its breaker, unless fewer than the panic
    /// threshold are, in which case every eligible endpoint of the first tier (ejections are
    /// ignored rather than overload the few left). Of those, the first tier with at least
    /// `min_healthy_percent` of its members admissible, else all of them.
    pub fn candidates(
        &mut self,
        slots: &Slots,
        policy: &ServicePolicy,
        now: Duration,
    ) -> Result<Candidates<'_>, Rejection> {
        let action = policy.on_no_endpoint;
        let eligible = self.members.len();
        if eligible == 0 {
            return Err(Rejection::NoEndpoints { action });
        }
        if slots.not_closed() == 0 {
            return Ok(self.tier(0));
        }
        let outlier_detection = &policy.outlier_detection;
        self.admitted.clear();
        self.tier_ranges.clear();
        for tier in &self.tiers {
            let start = self.admitted.len();
            self.admitted.extend(tier.iter().copied().filter(|&slot| {
                slots[slot as usize]
                    .stats
                    .breaker
                    .admits(outlier_detection, now)
            }));
            self.tier_ranges.push((start, self.admitted.len()));
        }
        let admissible = self.admitted.len();
        let panic_percent = outlier_detection.panic_threshold_percent.min(100) as usize;
        if admissible * 100 < panic_percent * eligible {
            // Panic: too few endpoints left; ignore ejections rather than overload them.
            return Ok(self.tier(0));
        }
        if admissible == 0 {
            return Err(Rejection::AllEjected { action });
        }
        let min_healthy = policy.locality.min_healthy_percent.min(100) as usize;
        // Every admissible endpoint, unless a tier has enough of its own; with one tier that
        // is still part of the one tier.
        let mut range = (0, admissible, (self.tiers.len() == 1).then_some(0));
        for (index, (&(start, end), tier)) in self.tier_ranges.iter().zip(&self.tiers).enumerate() {
            if end > start && (end - start) * 100 >= min_healthy * tier.len() {
                range = (start, end, Some(index));
                break;
            }
        }
        Ok(Candidates::subset(
            &self.admitted[range.0..range.1],
            &mut self.marks,
            range.2,
        ))
    }

    /// Every member of tier `tier`.
    fn tier(&self, tier: usize) -> Candidates<'_> {
        Candidates::tier(&self.tiers[tier], &self.tier_of, tier)
    }
}
