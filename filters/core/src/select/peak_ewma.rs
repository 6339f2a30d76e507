//! Peak EWMA latency estimate and its power-of-two-choices pick.
//!
//! After tower's `load/peak_ewma.rs` (as used by Linkerd): a lower sample is blended in with
//! weight `1 - exp(-elapsed / decay)`, between samples the estimate decays toward zero the
//! same way (so an idle endpoint is eventually tried again), and a peak is taken at once (so
//! a slowing endpoint is noticed at once). Cost = estimate × (inflight + 1).
//!
//! Departures from tower, each measured on equal endpoints at one connection, where the
//! estimate alone decides every comparison (`tests/equal_shares.rs`):
//! - **every sample weighs at least 1/16** in the blend: at thousands of answers a second
//!   `1 - exp(-elapsed / decay)` is under 10⁻⁴, so the estimate stayed for tens of seconds
//!   wherever its first sample put it;
//! - **a peak needs three slow answers in a row** (the lowest of the three, when above the
//!   blended estimate) and wears off with `peak_decay`, as a floor under the blended
//!   estimate. tower takes every sample above the estimate as the estimate, decaying with
//!   `decay` (10 s): one isolated stall (a scheduler hiccup, a GC pause; on loopback 0.1 %
//!   of answers at 20× the median) then held an endpoint as fast as its peers above them
//!   for tens of seconds, and it lost every comparison meanwhile (measured on real Envoy:
//!   shares from 22 % to 40 % for four equal endpoints; two in a row still strayed ±10 %
//!   in simulation). An endpoint that really slowed answers slowly three times in a row, and
//!   from its first slow answer its blended estimate rises by a sixteenth of the excess;
//! - **a failure sets a penalty** (`failure_penalty`) so fast errors do not look fast,
//!   wearing off with `failure_penalty_decay`: folded into the estimate (as tower records
//!   failures), 500 ms took a minute to decay to a 2 ms peer's level, and a recovered
//!   endpoint that P2C shuns gets no samples to correct it;
//! - **estimates within the policy's `tolerance` compare as equal**, and so does an
//!   endpoint with no sample yet (the power-of-two-choices pick, `select::two_choices`).

use std::time::Duration;

use super::{Choice, Request, Select, candidates::Candidates, two_choices};
use crate::{policy, rng::Rng};

/// The least weight a sample gets in the blended estimate, however soon after the last one
/// it comes: at thousands of answers a second, `1 - exp(-elapsed / decay)` gives each a
/// weight under 10⁻⁴, so the estimate stayed wherever its first sample (a stall, maybe) put
/// it for tens of seconds.
const MIN_SAMPLE_WEIGHT: f64 = 1.0 / 16.0;

/// A value set at some instant that wears off exponentially from then: a peak, a penalty.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Floor {
    /// The value as last set, in nanoseconds...
    nanos: f64,
    /// ...and when (`None`: never).
    at: Option<Duration>,
}

impl Floor {
    /// What is left of it at `now`, wearing off with time constant `decay`.
    fn at(&self, now: Duration, decay: Duration) -> f64 {
        self.at.map_or(0.0, |at| {
            self.nanos * decay_weight(now.saturating_sub(at), decay)
        })
    }

    /// Sets it to `nanos` at `now` unless what is left of it is higher.
    fn raise(&mut self, nanos: f64, now: Duration, decay: Duration) {
        self.nanos = self.at(now, decay).max(nanos);
        self.at = Some(now);
    }
}

/// A time-decayed latency estimate in nanoseconds, with a peak and a failure penalty under
/// it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ewma {
    /// The blended estimate as of `updated_at`.
    estimate_nanos: f64,
    /// When the estimate was last updated; `None` before the first sample.
    updated_at: Option<Duration>,
    /// The two samples before the last one, newest first, in nanoseconds: what confirms a
    /// peak.
    last_samples_nanos: [f64; 2],
    /// The last confirmed peak, wearing off with `peak_decay`.
    peak: Floor,
    /// The failure penalty, wearing off with `failure_penalty_decay`.
    penalty: Floor,
}

impl Ewma {
    /// An estimate of `estimate`, as if just observed at `now`.
    pub fn starting_at(estimate: Duration, now: Duration) -> Self {
        let estimate_nanos = estimate.as_nanos() as f64;
        Self {
            estimate_nanos,
            updated_at: Some(now),
            last_samples_nanos: [estimate_nanos; 2],
            ..Self::default()
        }
    }

    /// Records a failure at `now`: the estimate stays at least `penalty`, wearing off with
    /// time constant `decay`.
    pub fn penalize(&mut self, penalty: Duration, now: Duration, decay: Duration) {
        self.penalty.raise(penalty.as_nanos() as f64, now, decay);
    }

    /// Records one response time observed at `now`: blended into the estimate by elapsed
    /// time (at least 1/16); and when it and the two samples before it are
    /// all above the blended estimate, the lowest of the three becomes the peak.
    pub fn observe(&mut self, rtt: Duration, now: Duration, config: &policy::PeakEwma) {
        let rtt = rtt.as_nanos() as f64;
        let confirmed_peak = rtt
            .min(self.last_samples_nanos[0])
            .min(self.last_samples_nanos[1]);
        self.last_samples_nanos = [rtt, self.last_samples_nanos[0]];
        self.estimate_nanos = match self.updated_at {
            Some(at) => {
                let weight =
                    decay_weight(now.saturating_sub(at), config.decay).min(1.0 - MIN_SAMPLE_WEIGHT);
                self.estimate_nanos * weight + rtt * (1.0 - weight)
            }
            None => rtt,
        };
        self.updated_at = Some(now);
        if confirmed_peak > self.estimate_nanos {
            self.peak.raise(confirmed_peak, now, config.peak_decay);
        }
    }

    /// The estimate at `now`, in nanoseconds: `None` before the first sample or failure;
    /// then the blended estimate decayed toward zero since the last sample, never below
    /// what is left of the peak or the failure penalty.
    pub fn estimate_nanos(&self, now: Duration, config: &policy::PeakEwma) -> Option<f64> {
        if self.updated_at.is_none() && self.penalty.at.is_none() {
            return None;
        }
        let latency = self.updated_at.map_or(0.0, |at| {
            self.estimate_nanos * decay_weight(now.saturating_sub(at), config.decay)
        });
        Some(
            latency
                .max(self.peak.at(now, config.peak_decay))
                .max(self.penalty.at(now, config.failure_penalty_decay)),
        )
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
        two_choices(
            candidates,
            request,
            config,
            |slot, now| slot.stats.ewma.estimate_nanos(now, config),
            |slot, latency| latency * (f64::from(slot.stats.inflight) + 1.0),
        )
    }

    fn latency_estimate(&self) -> policy::PeakEwma {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decay 10 s, default RTT 30 ms, penalty 500 ms wearing off in 1 s.
    fn config() -> policy::PeakEwma {
        policy::PeakEwma::default()
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn a_slowdown_becomes_the_peak_at_its_third_slow_answer() {
        let mut ewma = Ewma::default();
        for at in 0..3 {
            ewma.observe(ms(1), ms(at), &config());
        }
        ewma.observe(ms(200), ms(3), &config());
        ewma.observe(ms(150), ms(4), &config());
        let blended = ewma.estimate_nanos(ms(4), &config()).unwrap();
        assert!(blended < 40_000_000.0, "{blended}");
        ewma.observe(ms(180), ms(5), &config());
        assert_eq!(ewma.estimate_nanos(ms(5), &config()), Some(150_000_000.0));
    }

    #[test]
    fn an_isolated_stall_moves_the_estimate_a_sixteenth_of_its_excess_and_sets_no_peak() {
        let mut ewma = Ewma::default();
        ewma.observe(ms(1), ms(0), &config());
        ewma.observe(ms(1), ms(1), &config());
        ewma.observe(ms(49), ms(2), &config());
        let estimate = ewma.estimate_nanos(ms(2), &config()).unwrap();
        assert!((estimate - 4_000_000.0).abs() < 1_000.0, "{estimate}");
        for at in 3..35 {
            ewma.observe(ms(1), ms(at), &config());
        }
        let estimate = ewma.estimate_nanos(ms(34), &config()).unwrap();
        assert!(estimate < 1_400_000.0, "{estimate}");
    }

    #[test]
    fn a_peak_wears_off_in_seconds_leaving_the_blended_estimate() {
        let mut ewma = Ewma::default();
        for at in 0..3 {
            ewma.observe(ms(2), ms(at), &config());
        }
        for at in 3..6 {
            ewma.observe(ms(100), ms(at), &config());
        }
        assert_eq!(ewma.estimate_nanos(ms(5), &config()), Some(100_000_000.0));
        // Five peak time constants later the peak is under 1 ms; the blended estimate
        // (three samples of 100 ms among 2 ms ones: about 19 ms) has decayed by half a
        // `decay` only.
        let later = ewma.estimate_nanos(ms(5_005), &config()).unwrap();
        assert!((10_000_000.0..13_000_000.0).contains(&later), "{later}");
    }

    #[test]
    fn a_lower_sample_is_blended_by_elapsed_time() {
        let mut ewma = Ewma::default();
        ewma.observe(ms(100), ms(0), &config());
        // After one time constant the old estimate keeps exp(-1) of its weight.
        ewma.observe(ms(0), ms(10_000), &config());
        let expected = 100_000_000.0 * (-1.0f64).exp();
        assert!((ewma.estimate_nanos(ms(10_000), &config()).unwrap() - expected).abs() < 1e-3);
    }

    #[test]
    fn has_no_estimate_until_the_first_sample_then_decays_toward_zero() {
        let mut ewma = Ewma::default();
        assert_eq!(ewma.estimate_nanos(ms(5_000), &config()), None);
        ewma.observe(ms(50), ms(0), &config());
        let decayed = ewma.estimate_nanos(ms(20_000), &config()).unwrap();
        assert!((decayed - 50_000_000.0 * (-2.0f64).exp()).abs() < 1e-3);
    }

    #[test]
    fn a_failure_before_any_sample_is_estimated_at_its_penalty() {
        let config = config();
        let mut ewma = Ewma::default();
        ewma.penalize(ms(500), ms(10), config.failure_penalty_decay);
        assert_eq!(ewma.estimate_nanos(ms(10), &config), Some(500_000_000.0));
    }

    #[test]
    fn a_failure_penalty_holds_while_failures_go_on_and_wears_off_in_seconds_after() {
        let config = config();
        let mut ewma = Ewma::default();
        ewma.observe(ms(2), ms(0), &config);
        // A fast error: 1 ms, but the estimate is the 500 ms penalty.
        ewma.observe(ms(1), ms(10), &config);
        ewma.penalize(ms(500), ms(10), config.failure_penalty_decay);
        assert_eq!(ewma.estimate_nanos(ms(10), &config).unwrap(), 500_000_000.0);
        // Failing again a second later keeps it at the penalty.
        ewma.penalize(ms(500), ms(1_010), config.failure_penalty_decay);
        assert_eq!(
            ewma.estimate_nanos(ms(1_010), &config).unwrap(),
            500_000_000.0
        );
        // Five seconds after the last failure the penalty is under 4 ms: back among 2 ms
        // peers, where a latency peak of 500 ms would still be at 300 ms.
        let later = ewma.estimate_nanos(ms(6_010), &config).unwrap();
        assert!(later < 4_000_000.0, "{later}");
    }
}
