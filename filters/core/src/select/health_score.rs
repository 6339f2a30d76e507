//! Health score: a weighted sum of latency, inflight and recent failures; lowest wins among
//! two random candidates.
//!
//! The seed's health-aware score, made explicit and tunable: `latency × ewma_ms +
//! inflight × active + failures × failure_percent`, where `ewma_ms` is the peak EWMA latency
//! (tower's estimator, 10s decay, failures counted as at least 500ms) and `failure_percent`
//! the failure rate over the outlier-detection window. Power of two choices rather than the
//! global minimum, so concurrent pickers do not all herd onto the same endpoint.

use std::time::Duration;

use super::{Choice, Request, Select, Slot, candidates::Candidates, two_choices};
use crate::{policy, rng::Rng};

/// Health score under its policy's weights.
#[derive(Debug, Clone)]
pub(crate) struct HealthScore(pub policy::HealthScore);

impl Select for HealthScore {
    fn pick<'a, R: Rng + ?Sized>(
        &'a mut self,
        candidates: &'a mut Candidates<'_>,
        request: Request<'_, R>,
    ) -> Choice<'a> {
        let (now, level) = (request.now, request.level);
        let estimate = policy::PeakEwma::default();
        two_choices(
            candidates,
            request,
            &estimate,
            |slot, now| slot.stats.ewma.estimate_nanos(now, &estimate, level),
            |slot, latency| score(&self.0, slot, latency, now),
        )
    }
}

/// The score of one endpoint at `now` with latency estimate `latency` (nanoseconds); lower is
/// healthier.
fn score(config: &policy::HealthScore, slot: &Slot, latency: f64, now: Duration) -> f64 {
    let latency_ms = latency / 1e6;
    let recent = slot.stats.breaker.recent(now);
    let failure_percent = if recent.total == 0 {
        0.0
    } else {
        f64::from(recent.failures) * 100.0 / f64::from(recent.total)
    };
    config.latency * latency_ms
        + config.inflight * f64::from(slot.stats.inflight)
        + config.failures * failure_percent
}
