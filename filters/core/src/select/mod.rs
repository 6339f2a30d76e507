//! Selection algorithms: each picks one endpoint among the admissible candidates.
//!
//! Following pingora-load-balancing's `selection/`, the structures that depend only on the
//! endpoint set (hash ring, Maglev table, sticky index) are built immutably by the picker
//! when endpoints change and swapped in whole; what changes per request (inflight, latency
//! estimate, smooth weights, breaker) lives in each endpoint's `Slot` and survives rebuilds.
//! The functions here are pure: candidates, stats, `now` and the RNG are passed in. Each
//! returns the position of its pick in `candidates`.

pub mod hash;
pub mod health_score;
pub mod least_request;
pub mod maglev;
pub mod peak_ewma;
pub mod ring_hash;
pub mod round_robin;
pub mod sticky;
pub mod weighted;

use std::time::Duration;

use crate::{breaker::Breaker, endpoint::Endpoint, policy::OutlierDetection, rng::Rng};

/// One endpoint as the picker holds it: its description and its mutable stats.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub endpoint: Endpoint,
    /// Hash of the address, seeding hash tables, sticky tokens and ejection jitter.
    pub address_hash: u64,
    pub stats: EndpointStats,
}

/// Per-endpoint state kept across endpoint-set rebuilds (keyed by address).
#[derive(Debug, Clone)]
pub(crate) struct EndpointStats {
    /// Requests picked and not yet completed.
    pub inflight: u32,
    /// Peak EWMA latency estimate.
    pub ewma: peak_ewma::Ewma,
    /// Circuit breaker / outlier detector.
    pub breaker: Breaker,
    /// Smooth weighted round robin's current weight.
    pub smooth_weight: i64,
}

impl EndpointStats {
    pub fn new(outlier_detection: &OutlierDetection) -> Self {
        Self {
            inflight: 0,
            ewma: peak_ewma::Ewma::default(),
            breaker: Breaker::new(outlier_detection, Duration::ZERO),
            smooth_weight: 0,
        }
    }
}

impl Slot {
    /// The endpoint's weight, treating 0 (invalid in a snapshot) as 1.
    pub fn weight(&self) -> u32 {
        self.endpoint.weight.max(1)
    }
}

/// Power of `choices` choices: the candidate with the lowest `cost` among `choices` draws
/// (distinct when `choices` is 2, with replacement otherwise, as Envoy does).
///
/// Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing" (2001).
pub(crate) fn power_of_choices<R: Rng + ?Sized>(
    candidates: &[u32],
    choices: u32,
    rng: &mut R,
    mut cost: impl FnMut(u32) -> f64,
) -> usize {
    let n = candidates.len();
    if n <= 1 {
        return 0;
    }
    let first = rng.below(n);
    let mut best = first;
    let mut best_cost = cost(candidates[first]);
    for draw in 1..choices.max(2) {
        let position = if draw == 1 {
            // Second draw distinct from the first.
            let other = rng.below(n - 1);
            if other >= first { other + 1 } else { other }
        } else {
            rng.below(n)
        };
        let candidate_cost = cost(candidates[position]);
        if candidate_cost < best_cost {
            best = position;
            best_cost = candidate_cost;
        }
    }
    best
}
