//! Consecutive probe results and the health they add up to.

/// Health as active checks see it: the one model of a check's result, for the registry (its
/// API's `health`) and the pipeline's health stage. What Envoy and the filters are served is
/// [`fulcrum_core::Health`], which [`endpoint_health`](Self::endpoint_health) maps onto: a
/// check never upgrades what a source says, and `Unknown` serves as the source says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum HealthStatus {
    /// No threshold reached yet: the target is served as its source says.
    #[default]
    Unknown,
    /// `healthy_threshold` consecutive probes passed.
    Healthy,
    /// `unhealthy_threshold` consecutive probes failed.
    Unhealthy,
}

impl HealthStatus {
    /// The name used in logs and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s names.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "unknown" => Some(Self::Unknown),
            "healthy" => Some(Self::Healthy),
            "unhealthy" => Some(Self::Unhealthy),
            _ => None,
        }
    }

    /// The endpoint health served for a target with this status and no other information.
    pub fn endpoint_health(self) -> fulcrum_core::Health {
        match self {
            Self::Unknown | Self::Healthy => fulcrum_core::Health::Healthy,
            Self::Unhealthy => fulcrum_core::Health::Unhealthy,
        }
    }
}

/// Consecutive probe results of one target and the [`HealthStatus`] they add up to.
///
/// Invariant: at most one of `passes` and `failures` is non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checker {
    status: HealthStatus,
    /// Consecutive passes (reset by a failure).
    passes: u32,
    /// Consecutive failures (reset by a pass).
    failures: u32,
}

impl Checker {
    /// The status so far.
    pub fn status(&self) -> HealthStatus {
        self.status
    }

    /// Records one probe result; returns the new status when it changed (never `Unknown`).
    ///
    /// From `Unknown` or `Unhealthy`, `healthy_threshold` consecutive passes make it
    /// `Healthy`; from `Unknown` or `Healthy`, `unhealthy_threshold` consecutive failures make
    /// it `Unhealthy`. A threshold of 0 acts as 1.
    pub fn observe(
        &mut self,
        passed: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<HealthStatus> {
        if passed {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
        }
        let next = match self.status {
            HealthStatus::Unknown | HealthStatus::Unhealthy
                if self.passes >= healthy_threshold.max(1) =>
            {
                HealthStatus::Healthy
            }
            HealthStatus::Unknown | HealthStatus::Healthy
                if self.failures >= unhealthy_threshold.max(1) =>
            {
                HealthStatus::Unhealthy
            }
            unchanged => unchanged,
        };
        (next != self.status).then(|| {
            self.status = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(checker: &mut Checker, results: &[bool]) -> Vec<Option<HealthStatus>> {
        results
            .iter()
            .map(|passed| checker.observe(*passed, 2, 3))
            .collect()
    }

    #[test]
    fn healthy_after_two_consecutive_passes() {
        let mut checker = Checker::default();
        assert_eq!(
            run(&mut checker, &[true, false, true, true]),
            [None, None, None, Some(HealthStatus::Healthy)]
        );
    }

    #[test]
    fn unhealthy_after_three_consecutive_failures_and_back_after_two_passes() {
        let mut checker = Checker::default();
        run(&mut checker, &[true, true]);
        assert_eq!(
            run(&mut checker, &[false, false, true, false, false, false]),
            [None, None, None, None, None, Some(HealthStatus::Unhealthy)]
        );
        assert_eq!(
            run(&mut checker, &[true, true]),
            [None, Some(HealthStatus::Healthy)]
        );
        assert_eq!(checker.status(), HealthStatus::Healthy);
    }

    #[test]
    fn a_threshold_of_zero_acts_as_one() {
        let mut checker = Checker::default();
        assert_eq!(checker.observe(false, 0, 0), Some(HealthStatus::Unhealthy));
    }
}
