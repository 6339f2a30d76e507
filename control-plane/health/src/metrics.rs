//! `fulcrum_health_checks_total{cluster, result}`: every probe, by cluster and result.

use std::sync::LazyLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

/// Labels of one probe count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CheckLabels {
    /// The cluster (service) the probed endpoint belongs to.
    pub cluster: String,
    /// `success` or `failure`.
    pub result: String,
}

/// The health-check counters. Cheap to clone (shared handles).
///
/// One process-wide instance, [`HealthMetrics::global`], is counted by every check (the
/// registry's and the policy-driven ones) and registered by the control plane; its series
/// grow with the number of clusters only.
#[derive(Debug, Clone, Default)]
pub struct HealthMetrics {
    checks: Family<CheckLabels, Counter>,
}

static GLOBAL: LazyLock<HealthMetrics> = LazyLock::new(HealthMetrics::default);

impl HealthMetrics {
    /// The process-wide counters.
    pub fn global() -> &'static HealthMetrics {
        &GLOBAL
    }

    /// Registers `fulcrum_health_checks_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.sub_registry_with_prefix("fulcrum").register(
            "health_checks",
            "Active health check probes, by cluster and result (success or failure)",
            self.checks.clone(),
        );
    }

    /// The (success, failure) counters of `cluster`, to hold for the life of a check.
    pub(crate) fn counters(&self, cluster: &str) -> (Counter, Counter) {
        let counter = |result: &str| {
            self.checks
                .get_or_create(&CheckLabels {
                    cluster: cluster.to_owned(),
                    result: result.to_owned(),
                })
                .clone()
        };
        (counter("success"), counter("failure"))
    }
}
