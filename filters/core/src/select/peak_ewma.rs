//! Peak EWMA latency estimate and its power-of-two-choices pick.
//!
//! tower's `load/peak_ewma.rs` (as used by Linkerd): a sample above the estimate replaces it
//! (peak-sensitive, so a slowing endpoint is noticed at once); a lower one is blended in with
//! weight `1 - exp(-elapsed / decay)`; between samples the estimate decays toward zero the same
//! way, so an idle endpoint is eventually tried again. Cost = estimate × (inflight + 1).
//! A failure also sets a penalty (`failure_penalty`) under which the estimate never falls, so
//! fast errors do not look fast. The penalty wears off on its own, faster time constant
//! (`failure_penalty_decay`): folded into the latency estimate as a peak (as tower records
//! failures), 500 ms took a minute to decay to a 2 ms peer's level, and a recovered endpoint
//! that P2C shuns gets no samples to correct it.

use std::time::Duration;

use super::{Choice, Request, Select, candidates::Candidates, two_choices};
use crate::{policy, rng::Rng};

/// A peak-sensitive, time-decayed latency estimate in nanoseconds, and a failure penalty.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ewma {
    estimate_nanos: f64,
    /// When the estimate was last updated; `None` before the first sample.
    updated_at: Option<Duration>,
    /// The failure penalty as last set, in nanoseconds...
    penalty_nanos: f64,
    /// ...and when (`None`: never).
    penalized_at: Option<Duration>,
}

impl Ewma {
    /// An estimate of `estimate`, as if just observed at `now`.
    pub fn starting_at(estimate: Duration, now: Duration) -> Self {
        Self {
            estimate_nanos: estimate.as_nanos() as f64,
            updated_at: Some(now),
            ..Self::default()
        }
    }

    /// Records a failure at `now`: the estimate stays at least `penalty`, wearing off with
    /// time constant `decay`.
    pub fn penalize(&mut self, penalty: Duration, now: Duration, decay: Duration) {
        let left = self.penalty_at(now, decay);
        self.penalty_nanos = left.max(penalty.as_nanos() as f64);
        self.penalized_at = Some(now);
    }

    fn penalty_at(&self, now: Duration, decay: Duration) -> f64 {
        self.penalized_at.map_or(0.0, |at| {
            self.penalty_nanos * decay_weight(now.saturating_sub(at), decay)
        })
    }

    /// Records one response time observed at `now`.
    pub fn observe(&mut self, rtt: Duration, now: Duration, decay: Duration) {
        let rtt = rtt.as_nanos() as f64;
        self.estimate_nanos = match self.updated_at {
            Some(at) if self.estimate_nanos >= rtt => {
                let weight = decay_weight(now.saturating_sub(at), decay);
                self.estimate_nanos * weight + rtt * (1.0 - weight)
            }
            _ => rtt,
        };
        self.updated_at = Some(now);
    }

    /// The estimate at `now`, in nanoseconds: before any sample the service's `typical`
    /// latency when known, else `default_rtt`; then decayed toward zero since the last sample;
    /// never below what is left of the failure penalty.
    ///
    /// A fixed `default_rtt` (30 ms) for an endpoint never sampled starves it wherever the
    /// service answers faster: every power-of-two comparison puts it against a sampled peer
    /// and it loses them all, so it never gets the sample that would correct it (measured:
    /// 0 % of 50,000 picks at one connection). At the typical latency it competes as an
    /// average peer, neither starved nor, at high concurrency, flooded as an estimate of zero
    /// would be.
    pub fn estimate_nanos(
        &self,
        now: Duration,
        config: &policy::PeakEwma,
        typical: Option<Duration>,
    ) -> f64 {
        let latency = match self.updated_at {
            None => typical.unwrap_or(config.default_rtt).as_nanos() as f64,
            Some(at) => self.estimate_nanos * decay_weight(now.saturating_sub(at), config.decay),
        };
        latency.max(self.penalty_at(now, config.failure_penalty_decay))
    }
}

/// `exp(-elapsed / decay)`: the weight the old estimate keeps after `elapsed`.
fn decay_weight(elapsed: Duration, decay: Duration) -> f64 {
    let decay = decay.as_nanos() as f64;
    if decay <= 0.0 {
        return 0.0;
    }
    (-(elapsed.as_nanos() as f64) / decay).exp()
}

/// Peak EWMA under its policy, which also sets how every endpoint's estimate is kept.
#[derive(Debug, Clone)]
pub(crate) struct PeakEwma(pub policy::PeakEwma);

impl Select for PeakEwma {
    fn pick<'a, R: Rng + ?Sized>(
        &'a mut self,
        candidates: &'a mut Candidates<'_>,
        request: Request<'_, R>,
    ) -> Choice<'a> {
        let config = &self.0;
        let typical = request.typical_latency;
        two_choices(candidates, request, |slot, now| {
            let stats = &slot.stats;
            stats.ewma.estimate_nanos(now, config, typical) * (f64::from(stats.inflight) + 1.0)
        })
    }

    fn latency_estimate(&self) -> policy::PeakEwma {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECAY: Duration = Duration::from_secs(10);

    /// Decay 10 s, default RTT 30 ms, penalty 500 ms wearing off in 1 s.
    fn config() -> policy::PeakEwma {
        policy::PeakEwma::default()
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn a_sample_above_the_estimate_replaces_it() {
        let mut ewma = Ewma::default();
        ewma.observe(ms(10), ms(0), DECAY);
        ewma.observe(ms(200), ms(1), DECAY);
        assert_eq!(ewma.estimate_nanos(ms(1), &config(), None), 200_000_000.0);
    }

    #[test]
    fn a_lower_sample_is_blended_by_elapsed_time() {
        let mut ewma = Ewma::default();
        ewma.observe(ms(100), ms(0), DECAY);
        // After one time constant the old estimate keeps exp(-1) of its weight.
        ewma.observe(ms(0), ms(10_000), DECAY);
        let expected = 100_000_000.0 * (-1.0f64).exp();
        assert!((ewma.estimate_nanos(ms(10_000), &config(), None) - expected).abs() < 1e-3);
    }

    #[test]
    fn uses_the_default_rtt_until_the_first_sample_then_decays_toward_zero() {
        let mut ewma = Ewma::default();
        assert_eq!(
            ewma.estimate_nanos(ms(5_000), &config(), None),
            30_000_000.0
        );
        ewma.observe(ms(50), ms(0), DECAY);
        let decayed = ewma.estimate_nanos(ms(20_000), &config(), None);
        assert!((decayed - 50_000_000.0 * (-2.0f64).exp()).abs() < 1e-3);
    }

    #[test]
    fn a_failure_penalty_holds_while_failures_go_on_and_wears_off_in_seconds_after() {
        let config = config();
        let mut ewma = Ewma::default();
        ewma.observe(ms(2), ms(0), DECAY);
        // A fast error: 1 ms, but the estimate is the 500 ms penalty.
        ewma.observe(ms(1), ms(10), DECAY);
        ewma.penalize(ms(500), ms(10), config.failure_penalty_decay);
        assert_eq!(ewma.estimate_nanos(ms(10), &config, None), 500_000_000.0);
        // Failing again a second later keeps it at the penalty.
        ewma.penalize(ms(500), ms(1_010), config.failure_penalty_decay);
        assert_eq!(ewma.estimate_nanos(ms(1_010), &config, None), 500_000_000.0);
        // Five seconds after the last failure the penalty is under 4 ms: back among 2 ms
        // peers, where a latency peak of 500 ms would still be at 300 ms.
        let later = ewma.estimate_nanos(ms(6_010), &config, None);
        assert!(later < 4_000_000.0, "{later}");
    }
}
