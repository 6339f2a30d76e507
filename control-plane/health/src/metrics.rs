//! `fulcrum_health_checks_total{cluster, result}`: every probe, by cluster and result.

use std::{
    collections::HashSet,
    sync::{Arc, LazyLock, Mutex},
};

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
/// registry's and the policy-driven ones) and registered by the control plane. Cluster names
/// can come from clients (a registration's service), so the first [`MAX_CLUSTER_SERIES`]
/// clusters get their own series and later ones count under [`OTHER_CLUSTERS`]: the series
/// stay bounded whatever clients register.
#[derive(Debug, Clone, Default)]
pub struct HealthMetrics {
    checks: Family<CheckLabels, Counter>,
    named: Arc<Mutex<HashSet<String>>>,
}

/// Clusters with a series of their own, at most.
pub const MAX_CLUSTER_SERIES: usize = 1_000;

/// The cluster label of checks beyond [`MAX_CLUSTER_SERIES`] clusters.
pub const OTHER_CLUSTERS: &str = "(other)";

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
        let label = self.label(cluster);
        let counter = |result: &str| {
            self.checks
                .get_or_create(&CheckLabels {
                    cluster: label.clone(),
                    result: result.to_owned(),
                })
                .clone()
        };
        (counter("success"), counter("failure"))
    }

    /// `cluster`, while fewer than [`MAX_CLUSTER_SERIES`] were named (or it was), else
    /// [`OTHER_CLUSTERS`].
    fn label(&self, cluster: &str) -> String {
        let mut named = self
            .named
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if named.contains(cluster) || named.len() < MAX_CLUSTER_SERIES {
            named.insert(cluster.to_owned());
            cluster.to_owned()
        } else {
            OTHER_CLUSTERS.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_series_stay_bounded_however_many_clusters_are_checked() {
        let metrics = HealthMetrics::default();
        for index in 0..MAX_CLUSTER_SERIES + 50 {
            let (success, _) = metrics.counters(&format!("service-{index}"));
            success.inc();
        }
        let (again, _) = metrics.counters("service-0");
        again.inc();
        assert_eq!(
            metrics
                .checks
                .get_or_create(&CheckLabels {
                    cluster: "service-0".to_owned(),
                    result: "success".to_owned(),
                })
                .get(),
            2,
            "a named cluster keeps its series"
        );
        assert_eq!(
            metrics
                .checks
                .get_or_create(&CheckLabels {
                    cluster: OTHER_CLUSTERS.to_owned(),
                    result: "success".to_owned(),
                })
                .get(),
            50
        );
        assert_eq!(
            metrics.named.lock().expect("lock").len(),
            MAX_CLUSTER_SERIES
        );
    }
}
