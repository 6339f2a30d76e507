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
        let typical = request.typical_latency;
        two_choices(candidates, request, |slot, now| {
            score(&self.0, slot, now, typical)
        })
    }
}

/// The score of one endpoint at `now`; lower is healthier.
fn score(
    config: &policy::HealthScore,
    slot: &Slot,
    now: Duration,
    typical: Option<Duration>,
) -> f64 {
    let ewma = policy::PeakEwma::default();
    let latency_ms = slot.stats.ewma.estimate_nanos(now, &ewma, typical) / 1e6;
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
