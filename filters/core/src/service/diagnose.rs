//! What this picker believes about each endpoint ([`ServicePicker::diagnose`]): the
//! per-endpoint view behind `fulcrum endpoints` (issue #17), read from the picker's own
//! state, so an operator sees what the balancer acts on rather than a model of it.

use std::time::Duration;

use super::ServicePicker;
use crate::diagnostics::{BreakerKind, EndpointDiagnostics};

impl ServicePicker {
    /// Every endpoint as this picker sees it at `now`: health and weight from the snapshot,
    /// breaker state, why it opened and when it admits again, latency estimate, in flight,
    /// and the picks since the previous call (which this call restarts from zero, so
    /// successive reports each count their own picks). Endpoints whose breaker is not closed
    /// come first, then by address: what an operator looks for survives a report cut to its
    /// size bound. O(endpoints); allocates the list.
    pub fn diagnose(&mut self, now: Duration) -> Vec<EndpointDiagnostics> {
        let level = self.slots.level();
        let outlier_detection = &self.policy.outlier_detection;
        let mut endpoints: Vec<EndpointDiagnostics> = self
            .slots
            .iter()
            .map(|slot| {
                let stats = &slot.stats;
                let breaker = &stats.breaker;
                let state = breaker.state();
                let recent = breaker.recent(now);
                EndpointDiagnostics {
                    address: slot.endpoint.address,
                    health: slot.endpoint.health,
                    weight: slot.endpoint.weight,
                    breaker: BreakerKind::of(&state),
                    reason: breaker.reason().map(|reason| reason.code().to_owned()),
                    ejections: match state {
                        crate::BreakerState::Closed { ejections, .. }
                        | crate::BreakerState::Open { ejections, .. }
                        | crate::BreakerState::HalfOpen { ejections, .. } => ejections,
                    },
                    readmit_in_ms: breaker
                        .admits_from(outlier_detection, now)
                        .map(|at| duration_ms(at.saturating_sub(now))),
                    latency_ms: stats
                        .ewma
                        .estimate_nanos(now, &self.latency_estimate, level)
                        .filter(|nanos| nanos.is_finite() && *nanos >= 0.0)
                        .map(|nanos| nanos / 1e6),
                    inflight: stats.inflight,
                    picks: stats.picks,
                    consecutive_failures: breaker.consecutive().failures,
                    window_requests: recent.total,
                    window_failures: recent.failures,
                }
            })
            .collect();
        endpoints
            .sort_by_key(|endpoint| (endpoint.breaker == BreakerKind::Closed, endpoint.address));
        for slot in 0..self.slots.len() {
            self.slots.reset_picks(slot);
        }
        endpoints
    }
}

/// `duration` in whole milliseconds, rounded up so a wait under a millisecond is not 0.
fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}
