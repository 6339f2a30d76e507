//! Which endpoints may serve a request: the eligible ones (healthy and selected by the
//! policy's `endpoint_selector`), grouped into locality tiers when the policy prefers the
//! local zone or region (Envoy's and Istio's locality order: zone, then region, then the
//! rest; `failover` zones right after the local one), and among them the admissible ones at pick time (breaker closed or probing),
//! with the panic threshold and the tier failover applied.
//!
//! The tiers are rebuilt with the endpoint set; narrowing them to the admissible candidates
//! happens at pick time, in space kept here so a pick does not allocate. With every breaker
//! closed (the steady state) the candidates are the first tier itself; otherwise they are
//! worked out at one pick and reused by the next ones until a breaker that is not closed
//! changes or an ejection ends with time, so a pick costs O(1) here either way but at those
//! events (O(eligible)).

use std::time::Duration;

use super::{Exclusions, Rejection, slots::Slots};
use crate::{
    endpoint::{Endpoint, Health},
    policy::{Locality, ServicePolicy},
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
    /// The last answer worked out while a breaker was not closed, and how long it holds.
    admission: Option<Admission>,
}

/// Which endpoints are admissible, as worked out at one time, and how long that holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Admission {
    answer: Answer,
    /// `Slots::ejection_changes` when worked out: any change of a not-closed breaker since
    /// may change the answer.
    changes: u64,
    /// When it was worked out (a clock going back may change the answer)...
    from: Duration,
    /// ...and the first time an ejection or a probe round's wait ends after that.
    until: Duration,
}

/// The candidates when a breaker is not closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Fewer than the panic threshold admissible: the whole first tier.
    Panic,
    /// None admissible.
    AllEjected,
    /// `admitted[start..end]`, all within tier `tier` when it is `Some`.
    Subset {
        start: usize,
        end: usize,
        tier: Option<usize>,
    },
}

/// Works out the admissible endpoints of `tiers` at `now` into `admitted` (tier after tier,
/// each tier's range in `tier_ranges`). See [`Eligible::candidates`].
fn admit(
    tiers: &[Vec<u32>],
    slots: &Slots,
    policy: &ServicePolicy,
    now: Duration,
    admitted: &mut Vec<u32>,
    tier_ranges: &mut Vec<(usize, usize)>,
) -> Admission {
    let outlier_detection = &policy.outlier_detection;
    admitted.clear();
    tier_ranges.clear();
    let mut until = Duration::MAX;
    for tier in tiers {
        let start = admitted.len();
        for &slot in tier {
            let breaker = &slots[slot as usize].stats.breaker;
            if breaker.admits(outlier_detection, now) {
                admitted.push(slot);
            } else if let Some(from) = breaker.admits_from(outlier_detection, now) {
                until = until.min(from);
            }
        }
        tier_ranges.push((start, admitted.len()));
    }
    let eligible: usize = tiers.iter().map(Vec::len).sum();
    let admissible = admitted.len();
    let panic_percent = outlier_detection.panic_threshold_percent.min(100) as usize;
    let answer = if admissible * 100 < panic_percent * eligible {
        // Panic: too few endpoints left; ignore ejections rather than overload them.
        Answer::Panic
    } else if admissible == 0 {
        Answer::AllEjected
    } else {
        let min_healthy = policy.locality.min_healthy_percent.min(100) as usize;
        // Every admissible endpoint, unless a tier has enough of its own; with one tier
        // that is still part of the one tier.
        let mut answer = Answer::Subset {
            start: 0,
            end: admissible,
            tier: (tiers.len() == 1).then_some(0),
        };
        for (index, (&(start, end), tier)) in tier_ranges.iter().zip(tiers).enumerate() {
            if end > start && (end - start) * 100 >= min_healthy * tier.len() {
                answer = Answer::Subset {
                    start,
                    end,
                    tier: Some(index),
                };
                break;
            }
        }
        answer
    };
    Admission {
        answer,
        changes: slots.ejection_changes(),
        from: now,
        until,
    }
}

/// Where the policy's locality ranks an endpoint.
#[derive(Debug, Clone, Copy)]
struct Ranking<'a> {
    /// The local zone, when preferred and known.
    zone: Option<&'a str>,
    /// The zones ranked right after the local zone: `failover`, and only with a local zone.
    failover: &'a [String],
    /// The local region, when preferred and known.
    region: Option<&'a str>,
}

impl<'a> Ranking<'a> {
    fn new(locality: &'a Locality) -> Self {
        let preferred =
            |value: &'a Option<String>| value.as_deref().filter(|_| locality.prefer_local);
        let zone = preferred(&locality.local_zone);
        Self {
            zone,
            failover: if zone.is_some() {
                &locality.failover
            } else {
                &[]
            },
            region: preferred(&locality.local_region),
        }
    }

    /// The raw tiers: local zone, failover zones, local region, others; or one.
    fn tier_count(self) -> usize {
        if self.zone.is_none() && self.region.is_none() {
            1
        } else {
            self.failover.len() + 3
        }
    }

    /// The raw tier of `endpoint`, below [`Ranking::tier_count`].
    fn tier(self, endpoint: &Endpoint) -> usize {
        if self.tier_count() == 1 {
            return 0;
        }
        let zone = endpoint.zone();
        if zone.is_some() && zone == self.zone {
            return 0;
        }
        if let Some(position) = zone.and_then(|zone| self.failover.iter().position(|f| f == zone)) {
            return position + 1;
        }
        let same_region = self.region.is_some() && endpoint.region() == self.region;
        self.failover.len() + if same_region { 1 } else { 2 }
    }
}

impl Eligible {
    /// The eligible endpoints of `slots` under `policy`, by locality tier: the local zone,
    /// each `failover` zone in order, the other zones of the local region, all others (empty
    /// tiers dropped). One tier when the policy knows neither a local zone nor a region.
    pub fn new(policy: &ServicePolicy, slots: &[Slot]) -> Self {
        let ranking = Ranking::new(&policy.locality);
        let mut raw_tiers: Vec<Vec<u32>> = vec![Vec::new(); ranking.tier_count()];
        for (index, slot) in slots.iter().enumerate() {
            let endpoint = &slot.endpoint;
            if endpoint.health != Health::Healthy || !policy.endpoint_selector.matches(endpoint) {
                continue;
            }
            raw_tiers[ranking.tier(endpoint)].push(index as u32);
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
            admission: None,
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
    ///
    /// With every breaker closed that is the first tier, O(1). Otherwise the answer is
    /// worked out once (O(eligible)) and reused until a breaker that is not closed changes
    /// or an ejection ends with time, so picks between those events cost O(1) here too.
    pub fn candidates(
        &mut self,
        slots: &Slots,
        policy: &ServicePolicy,
        now: Duration,
    ) -> Result<Candidates<'_>, Rejection> {
        let action = policy.on_no_endpoint;
        if self.members.is_empty() {
            return Err(Rejection::NoEndpoints { action });
        }
        if slots.not_closed() == 0 {
            return Ok(self.tier(0));
        }
        let current = self.admission.filter(|admission| {
            admission.changes == slots.ejection_changes()
                && admission.from <= now
                && now < admission.until
        });
        let admission = match current {
            Some(admission) => {
                debug_assert!(
                    {
                        let (mut admitted, mut ranges) = (Vec::new(), Vec::new());
                        let fresh =
                            admit(&self.tiers, slots, policy, now, &mut admitted, &mut ranges);
                        fresh.answer == admission.answer && admitted == self.admitted
                    },
                    "a reused admission must be what working it out afresh gives"
                );
                admission
            }
            None => {
                let admission = admit(
                    &self.tiers,
                    slots,
                    policy,
                    now,
                    &mut self.admitted,
                    &mut self.tier_ranges,
                );
                self.admission = Some(admission);
                admission
            }
        };
        match admission.answer {
            Answer::Panic => Ok(self.tier(0)),
            Answer::AllEjected => Err(Rejection::AllEjected { action }),
            Answer::Subset { start, end, tier } => Ok(Candidates::subset(
                &self.admitted[start..end],
                &mut self.marks,
                tier,
            )),
        }
    }

    /// The endpoints of `slots` by why they are candidates at `now` or not, as
    /// [`candidates`](Self::candidates) decides (worked out afresh, O(endpoints), with its
    /// own scratch space: only for an explanation). An endpoint is counted by the first
    /// reason that excludes it: unhealthy, draining, not selected, not admitted by its
    /// breaker (never in panic, where ejections are ignored), in another tier than the
    /// candidates (less preferred, or failed over for want of `min_healthy_percent`).
    pub fn exclusions(&self, slots: &Slots, policy: &ServicePolicy, now: Duration) -> Exclusions {
        let mut counts = Exclusions::default();
        let mut eligible = 0usize;
        for slot in slots.iter() {
            let endpoint = &slot.endpoint;
            match endpoint.health {
                Health::Unhealthy => counts.unhealthy += 1,
                Health::Draining => counts.draining += 1,
                Health::Healthy if !policy.endpoint_selector.matches(endpoint) => {
                    counts.unselected += 1
                }
                Health::Healthy => eligible += 1,
            }
        }
        // Tiers past the last one kept (`NOT_ELIGIBLE` of them) never serve: less preferred.
        counts.other_tier = eligible.saturating_sub(self.members.len());
        let Some(first) = self.tiers.first() else {
            return counts;
        };
        let in_later_tiers = self.members.len().saturating_sub(first.len());
        if slots.not_closed() == 0 {
            counts.candidates = first.len();
            counts.other_tier += in_later_tiers;
            return counts;
        }
        let (mut admitted, mut tier_ranges) = (Vec::new(), Vec::new());
        let admission = admit(
            &self.tiers,
            slots,
            policy,
            now,
            &mut admitted,
            &mut tier_ranges,
        );
        let ejected = self.members.len().saturating_sub(admitted.len());
        match admission.answer {
            Answer::Panic => {
                counts.candidates = first.len();
                counts.other_tier += in_later_tiers;
                counts.panic = true;
            }
            Answer::AllEjected => counts.ejected = ejected,
            Answer::Subset { start, end, .. } => {
                counts.candidates = end.saturating_sub(start);
                counts.ejected = ejected;
                counts.other_tier += admitted.len().saturating_sub(end - start);
            }
        }
        counts
    }

    /// Every member of tier `tier`.
    fn tier(&self, tier: usize) -> Candidates<'_> {
        Candidates::tier(&self.tiers[tier], &self.tier_of, tier)
    }
}
