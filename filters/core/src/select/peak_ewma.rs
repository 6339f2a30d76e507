//! Peak EWMA latency estimate and its power-of-two-choices pick.
//!
//! After tower's `load/peak_ewma.rs` (as used by Linkerd): a lower sample is blended in with
//! weight `1 - exp(-elapsed / decay)`, between samples the estimate decays (so an idle
//! endpoint is eventually tried again), and a peak is taken at once (so a slowing endpoint
//! is noticed at once). Cost = estimate × (inflight + 1).
//!
//! Departures from tower, each measured on equal endpoints at one connection, where the
//! estimates alone decide every comparison (`tests/equal_shares.rs`, and bench-compare's
//! `healthy-c1` on real Envoy, where tower's rules gave one endpoint of four 40 % and
//! another 9 %):
//! - **estimates are kept relative to the service's level** ([`Level`]: every answer of
//!   every endpoint, blended over [`LEVEL_DECAY`]): an endpoint's estimate is the level plus
//!   its blended excess over the level at the time of each of its answers. A busy machine or
//!   a slow network slows every endpoint at once; kept absolutely, it was charged to
//!   whichever endpoints happened to answer then, which were shunned after it for seconds
//!   while the others took their traffic. An idle endpoint's excess decays toward none
//!   (like its peers) rather than its estimate toward zero;
//! - **every answer weighs at least 1/16** in the blend: at thousands of answers a second
//!   `1 - exp(-elapsed / decay)` is under 10⁻⁴, so an estimate stayed for tens of seconds
//!   wherever its first sample put it;
//! - **a peak needs three slow answers in a row** (the least excess of the three) and wears
//!   off with `peak_decay`: taken from every answer, as tower does, one isolated stall (a
//!   scheduler hiccup, a GC pause; on loopback 0.1 % of answers at 20× the median) held an
//!   endpoint as fast as its peers above them for tens of seconds. An endpoint that really
//!   slowed answers slowly three times in a row, and from its first slow answer its
//!   blended excess rises by a sixteenth of the difference;
//! - **a failure sets a penalty** (`failure_penalty`, an absolute latency) so fast errors do
//!   not look fast, wearing off with `failure_penalty_decay`: folded into the estimate (as
//!   tower records failures), 500 ms took a minute to decay to a 2 ms peer's level, and a
//!   recovered endpoint that P2C shuns gets no samples to correct it;
//! - **estimates within the policy's `tolerance` compare as equal**, and an endpoint with no
//!   sample yet is taken as typical and wins a tie (the power-of-two-choices pick,
//!   `select::two_choices`);
//! - **the service's first answer is measured against the level that follows**, not against
//!   itself: a level only its own answer made estimated a slow endpoint like its peers.

use std::time::Duration;

use super::{Choice, Request, Select, candidates::Candidates, two_choices};
use crate::{duration, policy, rng::Rng};

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

/// The service's latency level: every answer of every endpoint, blended with time constant
/// [`LEVEL_DECAY`]. An endpoint's estimate is kept as its excess over the level at the time
/// of each answer, so what slows every endpoint at once (a busy machine, a slow network)
/// moves the level, not one endpoint's estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Level {
    nanos: f64,
    at: Option<Duration>,
}

/// The time constant of the service's latency level: short, so the level follows what
/// every endpoint sees now, and an answer is compared with what its peers answered just
/// before.
pub const LEVEL_DECAY: Duration = Duration::from_millis(10);

impl Level {
    /// Folds in one answer at `now` and returns the level it is measured against: the level
    /// before it, `None` for the service's first answer.
    pub fn observe(&mut self, rtt: Duration, now: Duration) -> Option<f64> {
        let rtt = duration::nanos_f64(rtt);
        let before = self.at.map(|at| {
            let before = self.nanos;
            let weight = decay_weight(now.saturating_sub(at), LEVEL_DECAY);
            self.nanos = before * weight + rtt * (1.0 - weight);
            before
        });
        if before.is_none() {
            self.nanos = rtt;
        }
        self.at = Some(now);
        before
    }

    /// The level in nanoseconds (0 before any answer).
    pub fn nanos(&self) -> f64 {
        self.nanos
    }
}

/// An endpoint's latency estimate: its time-blended excess over the service's [`Level`],
/// with a peak excess and a failure penalty under it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ewma {
    /// The blended excess over the level as of `updated_at`, in nanoseconds (negative when
    /// faster than the level); while `unleveled`, the answer itself.
    excess_nanos: f64,
    /// Whether the one sample so far was the service's first answer, which had no level to
    /// be measured against: it is measured against the level of the moment until the next.
    /// Measured against itself it was estimated like its peers, however slow.
    unleveled: bool,
    /// When the excess was last updated; `None` before the first sample.
    updated_at: Option<Duration>,
    /// The excesses of the two answers before the last one, newest first: what confirms a
    /// peak.
    last_excesses_nanos: [f64; 2],
    /// The last confirmed peak excess, wearing off with `peak_decay`.
    peak: Floor,
    /// The failure penalty (an absolute latency), wearing off with `failure_penalty_decay`.
    penalty: Floor,
}

impl Ewma {
    /// An endpoint estimated like its peers (no excess), as if just observed at `now`.
    pub fn like_peers(now: Duration) -> Self {
        Self {
            updated_at: Some(now),
            ..Self::default()
        }
    }

    /// Records a failure at `now`: the estimate stays at least `penalty`, wearing off with
    /// time constant `decay`.
    pub fn penalize(&mut self, penalty: Duration, now: Duration, decay: Duration) {
        self.penalty.raise(duration::nanos_f64(penalty), now, decay);
    }

    /// Records one response time observed at `now` against the service's `level` (the
    /// level before this answer, as [`Level::observe`] returns it; `None` for the service's
    /// first answer): its excess over the level is blended in by elapsed time (weight at
    /// least 1/16); and when it and the two answers before it all exceed the level by more
    /// than the blended excess, the lowest of the three excesses becomes the peak.
    pub fn observe(
        &mut self,
        rtt: Duration,
        level: Option<f64>,
        now: Duration,
        config: &policy::PeakEwma,
    ) {
        let Some(level) = level else {
            self.excess_nanos = duration::nanos_f64(rtt);
            self.updated_at = Some(now);
            self.unleveled = true;
            return;
        };
        if std::mem::take(&mut self.unleveled) {
            self.excess_nanos -= level;
        }
        let excess = duration::nanos_f64(rtt) - level;
        let confirmed_peak = excess
            .min(self.last_excesses_nanos[0])
            .min(self.last_excesses_nanos[1]);
        self.last_excesses_nanos = [excess, self.last_excesses_nanos[0]];
        self.excess_nanos = match self.updated_at {
            Some(at) => {
                let weight =
                    decay_weight(now.saturating_sub(at), config.decay).min(1.0 - MIN_SAMPLE_WEIGHT);
                self.excess_nanos * weight + excess * (1.0 - weight)
            }
            None => excess,
        };
        self.updated_at = Some(now);
        if confirmed_peak > self.excess_nanos.max(0.0) {
            self.peak.raise(confirmed_peak, now, config.peak_decay);
        }
    }

    /// The estimate at `now` in nanoseconds, the service's level being `level`: `None`
    /// before the first sample or failure; then the level plus the blended excess, which
    /// decays toward none (like its peers) while the endpoint gets no answers, or plus what
    /// is left of the peak excess if more; never below what is left of the failure penalty.
    pub fn estimate_nanos(
        &self,
        now: Duration,
        config: &policy::PeakEwma,
        level: f64,
    ) -> Option<f64> {
        if self.updated_at.is_none() && self.penalty.at.is_none() {
            return None;
        }
        let excess_then = if self.unleveled {
            self.excess_nanos - level
        } else {
            self.excess_nanos
        };
        let excess = self.updated_at.map_or(0.0, |at| {
            excess_then * decay_weight(now.saturating_sub(at), config.decay)
        });
        let excess = match self.peak.at {
            Some(_) => excess.max(self.peak.at(now, config.peak_decay)),
            None => excess,
        };
        Some(
            (level + excess)
                .max(self.penalty.at(now, config.failure_penalty_decay))
                .max(0.0),
        )
    }
}

/// `exp(-elapsed / decay)`: the weight the old estimate keeps after `elapsed`.
fn decay_weight(elapsed: Duration, decay: Duration) -> f64 {
    let decay = duration::nanos_f64(decay);
    if decay <= 0.0 {
        return 0.0;
    }
    (-duration::nanos_f64(elapsed) / decay).exp()
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
        let level = request.level;
        two_choices(
            candidates,
            request,
            config,
            |slot, now| slot.stats.ewma.estimate_nanos(now, config, level),
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
            ewma.observe(ms(1), Some(0.0), ms(at), &config());
        }
        ewma.observe(ms(200), Some(0.0), ms(3), &config());
        ewma.observe(ms(150), Some(0.0), ms(4), &config());
        let blended = ewma.estimate_nanos(ms(4), &config(), 0.0).unwrap();
        assert!(blended < 40_000_000.0, "{blended}");
        ewma.observe(ms(180), Some(0.0), ms(5), &config());
        assert_eq!(
            ewma.estimate_nanos(ms(5), &config(), 0.0),
            Some(150_000_000.0)
        );
    }

    #[test]
    fn an_isolated_stall_moves_the_estimate_a_sixteenth_of_its_excess_and_sets_no_peak() {
        let mut ewma = Ewma::default();
        ewma.observe(ms(1), Some(0.0), ms(0), &config());
        ewma.observe(ms(1), Some(0.0), ms(1), &config());
        ewma.observe(ms(49), Some(0.0), ms(2), &config());
        let estimate = ewma.estimate_nanos(ms(2), &config(), 0.0).unwrap();
        assert!((estimate - 4_000_000.0).abs() < 1_000.0, "{estimate}");
        for at in 3..35 {
            ewma.observe(ms(1), Some(0.0), ms(at), &config());
        }
        let estimate = ewma.estimate_nanos(ms(34), &config(), 0.0).unwrap();
        assert!(estimate < 1_400_000.0, "{estimate}");
    }

    #[test]
    fn a_peak_wears_off_in_seconds_leaving_the_blended_estimate() {
        let mut ewma = Ewma::default();
        for at in 0..3 {
            ewma.observe(ms(2), Some(0.0), ms(at), &config());
        }
        for at in 3..6 {
            ewma.observe(ms(100), Some(0.0), ms(at), &config());
        }
        assert_eq!(
            ewma.estimate_nanos(ms(5), &config(), 0.0),
            Some(100_000_000.0)
        );
        // Five peak time constants later the peak is under 1 ms; the blended estimate
        // (three samples of 100 ms among 2 ms ones: about 19 ms) has decayed by half a
        // `decay` only.
        let later = ewma.estimate_nanos(ms(5_005), &config(), 0.0).unwrap();
        assert!((10_000_000.0..13_000_000.0).contains(&later), "{later}");
    }

    #[test]
    fn a_lower_sample_is_blended_by_elapsed_time() {
        let mut ewma = Ewma::default();
        ewma.observe(ms(100), Some(0.0), ms(0), &config());
        // After one time constant the old estimate keeps exp(-1) of its weight.
        ewma.observe(ms(0), Some(0.0), ms(10_000), &config());
        let expected = 100_000_000.0 * (-1.0f64).exp();
        assert!((ewma.estimate_nanos(ms(10_000), &config(), 0.0).unwrap() - expected).abs() < 1e-3);
    }

    #[test]
    fn has_no_estimate_until_the_first_sample_then_decays_toward_zero() {
        let mut ewma = Ewma::default();
        assert_eq!(ewma.estimate_nanos(ms(5_000), &config(), 0.0), None);
        ewma.observe(ms(50), Some(0.0), ms(0), &config());
        let decayed = ewma.estimate_nanos(ms(20_000), &config(), 0.0).unwrap();
        assert!((decayed - 50_000_000.0 * (-2.0f64).exp()).abs() < 1e-3);
    }

    #[test]
    fn a_failure_before_any_sample_is_estimated_at_its_penalty() {
        let config = config();
        let mut ewma = Ewma::default();
        ewma.penalize(ms(500), ms(10), config.failure_penalty_decay);
        assert_eq!(
            ewma.estimate_nanos(ms(10), &config, 0.0),
            Some(500_000_000.0)
        );
    }

    #[test]
    fn a_failure_penalty_holds_while_failures_go_on_and_wears_off_in_seconds_after() {
        let config = config();
        let mut ewma = Ewma::default();
        ewma.observe(ms(2), Some(0.0), ms(0), &config);
        // A fast error: 1 ms, but the estimate is the 500 ms penalty.
        ewma.observe(ms(1), Some(0.0), ms(10), &config);
        ewma.penalize(ms(500), ms(10), config.failure_penalty_decay);
        assert_eq!(
            ewma.estimate_nanos(ms(10), &config, 0.0).unwrap(),
            500_000_000.0
        );
        // Failing again a second later keeps it at the penalty.
        ewma.penalize(ms(500), ms(1_010), config.failure_penalty_decay);
        assert_eq!(
            ewma.estimate_nanos(ms(1_010), &config, 0.0).unwrap(),
            500_000_000.0
        );
        // Five seconds after the last failure the penalty is under 4 ms: back among 2 ms
        // peers, where a latency peak of 500 ms would still be at 300 ms.
        let later = ewma.estimate_nanos(ms(6_010), &config, 0.0).unwrap();
        assert!(later < 4_000_000.0, "{later}");
    }

    /// Answers alternating between two endpoints, `rtt(i)` for the `i`th, one after the
    /// other; returns both estimates after the last.
    fn alternate(answers: usize, rtt: impl Fn(usize) -> u64) -> (f64, f64) {
        let config = config();
        let (mut level, mut endpoints) = (Level::default(), [Ewma::default(); 2]);
        let mut now = ms(0);
        for i in 0..answers {
            let answer = ms(rtt(i));
            now += answer;
            let before = level.observe(answer, now);
            endpoints[i % 2].observe(answer, before, now, &config);
        }
        let estimate = |ewma: &Ewma| ewma.estimate_nanos(now, &config, level.nanos()).unwrap();
        (estimate(&endpoints[0]), estimate(&endpoints[1]))
    }

    #[test]
    fn the_services_first_answer_is_measured_against_the_level_that_follows_not_itself() {
        let config = config();
        let mut level = Level::default();
        let (mut slow, mut fast) = (Ewma::default(), Ewma::default());
        let before = level.observe(ms(150), ms(150));
        assert_eq!(before, None, "no level before the service's first answer");
        slow.observe(ms(150), before, ms(150), &config);
        let estimate =
            |ewma: &Ewma, now, level: &Level| ewma.estimate_nanos(now, &config, level.nanos());
        assert_eq!(estimate(&slow, ms(150), &level), Some(150_000_000.0));
        let mut now = ms(150);
        for _ in 0..50 {
            now += ms(1);
            let before = level.observe(ms(1), now);
            fast.observe(ms(1), before, now, &config);
        }
        let (slow, fast) = (
            estimate(&slow, now, &level).unwrap(),
            estimate(&fast, now, &level).unwrap(),
        );
        assert!(
            slow > 140_000_000.0 && fast < 2_000_000.0,
            "the slow endpoint stays 150 ms slow as the level falls to its peers' 1 ms: \
             {slow} vs {fast}"
        );
    }

    #[test]
    fn what_slows_every_endpoint_at_once_moves_the_level_and_leaves_them_equal() {
        // 1 ms answers, then 40 answers of 5 ms to whichever endpoint, then 1 ms again.
        let (a, b) = alternate(100, |i| if (40..80).contains(&i) { 5 } else { 1 });
        assert!(config().tolerance.equal(a, b), "{a} vs {b}");
        assert!((a - b).abs() < 300_000.0, "{a} vs {b}");
    }

    #[test]
    fn an_endpoint_slower_than_its_peers_at_the_same_time_is_estimated_that_much_slower() {
        // Settled: the first answers, measured against a level one or two answers made,
        // overstate the difference (11 ms after 40 answers) until the blend wears them off.
        let (fast, slow) = alternate(400, |i| if i % 2 == 1 { 10 } else { 1 });
        let apart = slow - fast;
        assert!(
            (8_000_000.0..10_000_000.0).contains(&apart),
            "{fast} vs {slow}"
        );
    }
}
