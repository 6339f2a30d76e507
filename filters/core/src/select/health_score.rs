//! Health score: a weighted sum of latency, inflight and recent failures; lowest wins among
//! two random candidates.
//!
//! The seed's health-aware score, made explicit and tunable: `latency × ewma_ms +
//! inflight × active + failures × failure_percent`, where `ewma_ms` is the peak EWMA latency
//! (tower's estimator, 10s decay, failures counted as at least 500ms) and `failure_percent`
//! the failure rate over the outlier-detection window. Power of two choices rather than the
//! global minimum, so concurrent pickers do not all herd onto the same endpoint.

use std::time::Duration;

use super::{Slot, power_of_choices};
use crate::{
    policy::{HealthScore, PeakEwma},
    rng::Rng,
};

/// The score of one endpoint at `now`; lower is healthier.
pub(crate) fn score(config: &HealthScore, slot: &Slot, now: Duration) -> f64 {
    let ewma = PeakEwma::default();
    let latency_ms = slot
        .stats
        .ewma
        .estimate_nanos(now, ewma.decay, ewma.default_rtt)
        / 1e6;
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

pub(crate) fn pick<R: Rng + ?Sized>(
    config: &HealthScore,
    candidates: &[u32],
    slots: &[Slot],
    now: Duration,
    rng: &mut R,
) -> usize {
    power_of_choices(candidates, 2, rng, |slot| {
        score(config, &slots[slot as usize], now)
    })
}
