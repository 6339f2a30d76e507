//! Selection algorithms: each picks one endpoint among a request's admissible candidates.
//!
//! Every algorithm is a type implementing `Select` in its own file, its state (a cursor,
//! a deadline schedule, prefix sums, a hash table) beside its code; `Algorithm` is the one place they are
//! registered: the policy's [`LoadBalancer`] → its implementation, dispatched statically.
//! The shape is pingora-load-balancing's `selection/` (`BackendSelection` built from the
//! backend set, then asked per request) and tower's `p2c` (load read from the endpoints at
//! pick time): what depends only on the endpoint set (hash ring, Maglev table, cumulative
//! weights, whether weights are uniform) is rebuilt by `Select::rebuild` when the set changes;
//! what changes per request (inflight, latency estimate, breaker) lives in each endpoint's
//! `Slot`, kept by the picker across rebuilds, and an algorithm that keeps a structure over
//! the loads follows every change through `Select::load_changed`. Every algorithm's pick
//! costs O(1) or O(log n) in the endpoints, with breakers open too (`tiered` says how the
//! weighted ones restrict a structure built per tier to a pick's candidates); only the rare
//! pick whose candidates span locality tiers costs O(n).
//! Picks are pure: candidates, stats, `now` and the RNG are passed in (`Request`), and a pick
//! allocates nothing but a cookie it asks the filter to set.
//!
//! Sticky sessions ([`sticky`]) are a layer in front of an algorithm, not one: a request
//! whose cookie names an admissible endpoint goes there, any other is picked by the fallback
//! algorithm and given a cookie.

pub(crate) mod candidates;
pub mod hash;
pub mod health_score;
pub mod least_request;
pub mod maglev;
pub mod peak_ewma;
pub mod ring_hash;
pub mod round_robin;
pub mod sticky;
mod tiered;
pub mod weighted_random;
pub mod weighted_round_robin;

use std::time::Duration;

use self::candidates::{Candidates, Walk};
use crate::{
    breaker::Breaker,
    endpoint::Endpoint,
    policy::{self, LoadBalancer},
    rng::Rng,
    service::{RequestAttributes, RequestNeeds, Warmup},
};

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
    /// Where its slow start stands.
    pub warmup: Warmup,
    /// Requests picked for it since its diagnostics were last taken
    /// ([`crate::ServicePicker::diagnose`]).
    pub picks: u64,
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self {
            inflight: 0,
            ewma: peak_ewma::Ewma::default(),
            breaker: Breaker::new(Duration::ZERO),
            warmup: Warmup::Warm,
            picks: 0,
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
/// (distinct when `choices` is 2, with replacement otherwise, as Envoy does). Returns its
/// position and, when another candidate was drawn, the position of the cheapest of the
/// others: the rival it was compared with.
///
/// Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing" (2001).
pub(crate) fn power_of_choices<R: Rng + ?Sized>(
    candidates: &[u32],
    choices: u32,
    rng: &mut R,
    mut cost: impl FnMut(u32) -> f64,
) -> (usize, Option<usize>) {
    let n = candidates.len();
    if n <= 1 {
        return (0, None);
    }
    let first = rng.below(n);
    let mut best = (first, cost(candidates[first]));
    let mut rival: Option<(usize, f64)> = None;
    for draw in 1..choices.max(2) {
        let position = if draw == 1 {
            // Second draw distinct from the first.
            let other = rng.below(n - 1);
            if other >= first { other + 1 } else { other }
        } else {
            rng.below(n)
        };
        if position == best.0 || rival.is_some_and(|(rival, _)| rival == position) {
            continue;
        }
        let drawn = (position, cost(candidates[position]));
        if drawn.1 < best.1 {
            rival = Some(best);
            best = drawn;
        } else if rival.is_none_or(|(_, cost)| drawn.1 < cost) {
            rival = Some(drawn);
        }
    }
    (best.0, rival.map(|(position, _)| position))
}

/// One selection algorithm over one service's endpoints.
pub(crate) trait Select {
    /// Recomputes what depends on the endpoint set; the picker calls it on every change of
    /// the set (and once at the start). Nothing by default.
    fn rebuild(&mut self, _set: &EndpointSet<'_>) {}

    /// Chooses the endpoint for one request among `candidates` (never empty), and the order
    /// in which it would take the others: the picker draws the retry targets from it.
    fn pick<'a, R: Rng + ?Sized>(
        &'a mut self,
        candidates: &'a mut Candidates<'_>,
        request: Request<'_, R>,
    ) -> Choice<'a>;

    /// Records in `needs` the request attributes [`pick`](Self::pick) reads. None by default.
    fn needs<'a>(&'a self, _needs: &mut RequestNeeds<'a>) {}

    /// Follows a change of `slot`'s in-flight count (a pick sent it a request, or one
    /// completed), for algorithms that keep a structure over the loads. Nothing by default.
    fn load_changed(&mut self, _slot: usize, _slots: &[Slot]) {}

    /// How response times are folded into every endpoint's latency estimate (recorded for
    /// all algorithms; health score reads it too): peak EWMA's own settings, the defaults
    /// otherwise.
    fn latency_estimate(&self) -> policy::PeakEwma {
        policy::PeakEwma::default()
    }
}

/// The endpoint set an algorithm rebuilds over.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EndpointSet<'a> {
    /// Every endpoint, sorted by address.
    pub slots: &'a [Slot],
    /// The eligible ones (healthy, selected), ascending: the only ones ever candidates.
    pub eligible: &'a [u32],
    /// The eligible ones by locality tier, best first, each ascending: a pick's candidates
    /// are one of them, part of one, or (rarely) parts of several ([`candidates::Scope`]).
    pub tiers: &'a [Vec<u32>],
    /// Per slot, its index in the previous set if it was there: what per-endpoint state
    /// survives the change.
    pub previous: &'a [Option<u32>],
}

/// What one pick may read.
#[derive(Debug)]
pub(crate) struct Request<'a, R: ?Sized> {
    /// What the filter extracted from the request.
    pub attributes: &'a RequestAttributes<'a>,
    /// Every endpoint with its stats; candidates index into it.
    pub slots: &'a [Slot],
    /// The sum of the endpoints' in-flight requests.
    pub total_inflight: u64,
    /// The service's latency level in nanoseconds, which endpoints' latency estimates are
    /// kept relative to ([`peak_ewma::Level`]).
    pub level: f64,
    pub now: Duration,
    pub rng: &'a mut R,
}

/// An algorithm's answer for one request.
#[derive(Debug)]
pub(crate) struct Choice<'a> {
    /// The slot picked.
    pub slot: usize,
    /// The rest, in the order the algorithm prefers them: where retries go.
    pub then: Walk<'a>,
    /// A `Set-Cookie` value for the response (a generated hash cookie).
    pub set_cookie: Option<String>,
    /// The slot the pick was compared with and won against, for the algorithms that compare
    /// two (or more) drawn candidates; `None` for the others and when there was one candidate.
    pub rival: Option<usize>,
}

impl<'a> Choice<'a> {
    /// The candidate at `position` (the first if out of range), then the others in
    /// candidate order from the next one: the answer of every list-based algorithm.
    #[inline]
    pub fn at(candidates: &Candidates<'a>, position: usize) -> Self {
        let slots = candidates.slots();
        let slot = slots.get(position).copied().unwrap_or(slots[0]) as usize;
        Self {
            slot,
            then: Walk::lap(slots, position + 1),
            set_cookie: None,
            rival: None,
        }
    }

    /// [`Choice::at`] for a comparison: the candidate at `position` won against the one at
    /// `rival`, when there was one.
    #[inline]
    pub fn compared(candidates: &Candidates<'a>, position: usize, rival: Option<usize>) -> Self {
        Self {
            rival: rival
                .and_then(|rival| candidates.slots().get(rival))
                .map(|&slot| slot as usize),
            ..Self::at(candidates, position)
        }
    }
}

/// Power of two choices by latency and load, lowest cost wins (tower's `p2c`): the answer of
/// the latency-aware algorithms.
///
/// `latency(slot, now)` is an endpoint's latency estimate in nanoseconds (`None` before its
/// first sample) and `cost(slot, latency)` its cost given an estimate. Two candidates whose
/// estimates are equal within `estimate.tolerance` are both costed at the lower estimate, so
/// what else the cost weighs (the requests in flight) decides, and with nothing else apart,
/// the first draw: chance. Without it, at one request at a time the lower estimate wins
/// every comparison however small the difference, so equal endpoints' noise sets their
/// shares.
///
/// An endpoint with no sample yet is taken as typical: estimated at the service's latency
/// `level`, or at its rival's estimate when that is lower; and at equal cost it wins, so
/// every endpoint is tried early (at one request at a time, at once). Estimated at `default_rtt` (30
/// ms), it lost every comparison with sampled peers answering in 0.2 ms and never got the
/// sample that would correct it (measured: 0 % of 50,000 picks at one connection); costed
/// at its rival's estimate whatever that was, it tied with an endpoint known to answer 150
/// ms slower than the others, which then won half of those comparisons (measured: up to six
/// of the first sixty picks, one request at a time). `default_rtt` is the estimate only
/// where neither candidate has a sample.
pub(crate) fn two_choices<'a, R: Rng + ?Sized>(
    candidates: &Candidates<'a>,
    request: Request<'_, R>,
    estimate: &policy::PeakEwma,
    latency: impl Fn(&Slot, Duration) -> Option<f64>,
    cost: impl Fn(&Slot, f64) -> f64,
) -> Choice<'a> {
    let Request {
        slots,
        now,
        rng,
        level,
        ..
    } = request;
    let drawn = candidates.slots();
    let n = drawn.len();
    if n <= 1 {
        return Choice::at(candidates, 0);
    }
    let first = rng.below(n);
    let other = rng.below(n - 1);
    let second = if other >= first { other + 1 } else { other };
    let (a, b) = (
        &slots[drawn[first] as usize],
        &slots[drawn[second] as usize],
    );
    // An endpoint never sampled is taken as typical: at the service's level, or at its
    // rival's estimate when that is lower (or there is no level yet).
    let typical = |known: f64| if level > 0.0 { known.min(level) } else { known };
    let (estimate_a, estimate_b) = (latency(a, now), latency(b, now));
    let (latency_a, latency_b) = match (estimate_a, estimate_b) {
        (Some(x), None) => (x, typical(x)),
        (None, Some(y)) => (typical(y), y),
        (None, None) => {
            let default = crate::duration::nanos_f64(estimate.default_rtt);
            (default, default)
        }
        (Some(x), Some(y)) => (x, y),
    };
    let (latency_a, latency_b) = if estimate.tolerance.equal(latency_a, latency_b) {
        let lower = latency_a.min(latency_b);
        (lower, lower)
    } else {
        (latency_a, latency_b)
    };
    // At equal cost an endpoint never sampled wins: it gets the sample that places it.
    let (cost_a, cost_b) = (cost(a, latency_a), cost(b, latency_b));
    let b_wins =
        cost_b < cost_a || (cost_b == cost_a && estimate_b.is_none() && estimate_a.is_some());
    let (position, rival) = if b_wins {
        (second, first)
    } else {
        (first, second)
    };
    Choice::compared(candidates, position, Some(rival))
}

/// Declares [`Algorithm`], one variant per implementation, and its [`Select`] by delegation.
macro_rules! algorithms {
    ($($variant:ident($implementation:ty),)*) => {
        /// The algorithm of a service's policy: one variant per implementation of
        /// [`Select`], so a pick is one `match` and no virtual call.
        #[derive(Debug, Clone)]
        pub(crate) enum Algorithm {
            $($variant($implementation),)*
        }

        impl Select for Algorithm {
            fn rebuild(&mut self, set: &EndpointSet<'_>) {
                match self {
                    $(Self::$variant(algorithm) => algorithm.rebuild(set),)*
                }
            }

            fn pick<'a, R: Rng + ?Sized>(
                &'a mut self,
                candidates: &'a mut Candidates<'_>,
                request: Request<'_, R>,
            ) -> Choice<'a> {
                match self {
                    $(Self::$variant(algorithm) => algorithm.pick(candidates, request),)*
                }
            }

            fn needs<'a>(&'a self, needs: &mut RequestNeeds<'a>) {
                match self {
                    $(Self::$variant(algorithm) => algorithm.needs(needs),)*
                }
            }

            fn load_changed(&mut self, slot: usize, slots: &[Slot]) {
                match self {
                    $(Self::$variant(algorithm) => algorithm.load_changed(slot, slots),)*
                }
            }

            fn latency_estimate(&self) -> policy::PeakEwma {
                match self {
                    $(Self::$variant(algorithm) => algorithm.latency_estimate(),)*
                }
            }
        }
    };
}

algorithms! {
    RoundRobin(round_robin::RoundRobin),
    WeightedRoundRobin(weighted_round_robin::WeightedRoundRobin),
    WeightedRandom(weighted_random::WeightedRandom),
    LeastRequest(least_request::LeastRequest),
    PeakEwma(peak_ewma::PeakEwma),
    HealthScore(health_score::HealthScore),
    RingHash(hash::ConsistentHash<ring_hash::Ring>),
    Maglev(hash::ConsistentHash<maglev::Table>),
}

impl Algorithm {
    /// Whether this is consistent hashing (`ring_hash`, `maglev`), where a key must keep its
    /// endpoint: slow start leaves it alone.
    pub fn is_consistent_hash(&self) -> bool {
        matches!(self, Self::RingHash(_) | Self::Maglev(_))
    }

    /// The implementation of the algorithm that picks new requests under `load_balancer`
    /// (`sticky`'s fallback for `sticky`): where a new algorithm is registered.
    pub fn new(load_balancer: &LoadBalancer) -> Self {
        match load_balancer.algorithm() {
            LoadBalancer::RoundRobin {} => Self::RoundRobin(Default::default()),
            LoadBalancer::WeightedRoundRobin {} => Self::WeightedRoundRobin(Default::default()),
            LoadBalancer::WeightedRandom {} => Self::WeightedRandom(Default::default()),
            LoadBalancer::LeastRequest(config) => {
                Self::LeastRequest(least_request::LeastRequest::new(config))
            }
            LoadBalancer::PeakEwma(config) => Self::PeakEwma(peak_ewma::PeakEwma(config.clone())),
            LoadBalancer::HealthScore(config) => {
                Self::HealthScore(health_score::HealthScore(config.clone()))
            }
            LoadBalancer::RingHash(config) => Self::RingHash(hash::ConsistentHash::new(
                &config.hash_on,
                config.bounded_load,
                ring_hash::Ring(config.minimum_ring_size),
            )),
            LoadBalancer::Maglev(config) => Self::Maglev(hash::ConsistentHash::new(
                &config.hash_on,
                config.bounded_load,
                maglev::Table(config.table_size),
            )),
            // `sticky` as `sticky`'s fallback: refused by validation; round robin, as ever.
            LoadBalancer::Sticky(_) => Self::RoundRobin(Default::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Sequence;

    const COSTS: [f64; 4] = [5.0, 1.0, 3.0, 9.0];

    #[test]
    fn the_rival_of_several_choices_is_the_cheapest_of_the_others_drawn() {
        // Draws: position 0 (5), then 2 (3), then 1 (1).
        let mut rng = Sequence::units(&[0.0, 0.5, 0.3]);
        let drawn = power_of_choices(&[0, 1, 2, 3], 3, &mut rng, |slot| COSTS[slot as usize]);
        assert_eq!(drawn, (1, Some(2)));
    }

    #[test]
    fn a_candidate_drawn_again_is_not_its_own_rival() {
        // Draws: position 0 (5), then 2 (3), then 2 again.
        let mut rng = Sequence::units(&[0.0, 0.5, 0.5]);
        let drawn = power_of_choices(&[0, 1, 2, 3], 3, &mut rng, |slot| COSTS[slot as usize]);
        assert_eq!(drawn, (2, Some(0)));
        assert_eq!(
            power_of_choices(&[7], 2, &mut rng, |_| 0.0),
            (0, None),
            "one candidate: nothing to compare"
        );
    }
}
