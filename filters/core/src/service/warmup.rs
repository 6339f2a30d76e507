//! Slow start: an endpoint that joins the service, turns healthy, or closes after an ejection
//! gets a share of the traffic that grows over the policy's `slow_start.window`, instead of
//! its full share at once (Envoy's `slow_start_config`, the most requested balancing feature
//! in Istio's and Envoy's trackers: JVMs and caches need to warm up).
//!
//! Done by rejection, in front of any algorithm: when the algorithm picks an endpoint that is
//! warming up, the pick stands with probability [`SlowStart::factor`] and otherwise the
//! algorithm picks again (at most [`MAX_REDRAWS`] times), so the endpoint's share is its
//! algorithm's share × the factor, and what it does not take is spread the way the algorithm
//! spreads everything, not onto one neighbour. Consistent hashing (`ring_hash`, `maglev`)
//! is left alone: its point is that a key keeps its endpoint.
//!
//! The ramp starts at the endpoint's first pick after the event (an endpoint nobody picks is
//! not warming up), so an endpoint-set change needs no clock.

use std::time::Duration;

use crate::{policy::SlowStart, rng::Rng};

/// How many times a pick that lands on a warming endpoint is drawn again at most; after that
/// the last draw stands (every candidate may be warming up).
pub(super) const MAX_REDRAWS: u32 = 3;

/// Where an endpoint stands in its warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Warmup {
    /// At full share.
    #[default]
    Warm,
    /// It joined, turned healthy or was re-admitted; the ramp starts at its next pick.
    Pending,
    /// Ramping since this time.
    Since(Duration),
}

impl Warmup {
    /// The share of its full share it gets at `now` under `slow_start`.
    pub fn factor(self, slow_start: Option<&SlowStart>, now: Duration) -> f64 {
        match (self, slow_start) {
            (Self::Warm, _) | (_, None) => 1.0,
            (Self::Pending, Some(slow_start)) => slow_start.factor(Duration::ZERO),
            (Self::Since(since), Some(slow_start)) => slow_start.factor(now.saturating_sub(since)),
        }
    }

    /// Whether a pick of this endpoint at `now` stands: always at full share, else with
    /// probability [`factor`](Self::factor).
    pub fn keeps_pick<R: Rng + ?Sized>(
        self,
        slow_start: Option<&SlowStart>,
        now: Duration,
        rng: &mut R,
    ) -> bool {
        let factor = self.factor(slow_start, now);
        factor >= 1.0 || rng.unit() < factor
    }

    /// The state after a request was sent at `now`: a pending ramp starts, a finished one
    /// ends.
    pub fn admitted(self, slow_start: Option<&SlowStart>, now: Duration) -> Self {
        match self {
            Self::Pending => Self::Since(now),
            Self::Since(_) if self.factor(slow_start, now) >= 1.0 => Self::Warm,
            other => other,
        }
    }
}
