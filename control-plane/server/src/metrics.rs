//! Snapshot-level Prometheus metrics: endpoints per cluster and the current version.

use fulcrum_core::Snapshot;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Labels naming one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClusterLabels {
    /// The cluster (service) name.
    pub cluster: String,
}

/// Labels carrying the snapshot version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct VersionLabels {
    /// The snapshot version.
    pub version: String,
}

/// Gauges describing the current snapshot. Cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct SnapshotMetrics {
    /// `fulcrum_cluster_endpoints{cluster}`: endpoints per cluster in the current snapshot.
    pub endpoints: Family<ClusterLabels, Gauge>,
    /// `fulcrum_snapshot_info{version}`: 1 for the current version only.
    pub info: Family<VersionLabels, Gauge>,
    /// `fulcrum_snapshot_updates_total`: snapshots published.
    pub updates: Counter,
}

impl SnapshotMetrics {
    /// Registers every metric under the `fulcrum` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let fulcrum = registry.sub_registry_with_prefix("fulcrum");
        fulcrum.register(
            "cluster_endpoints",
            "Endpoints per cluster in the current snapshot",
            self.endpoints.clone(),
        );
        fulcrum.register(
            "snapshot_info",
            "The current snapshot version (value is always 1)",
            self.info.clone(),
        );
        fulcrum.register(
            "snapshot_updates",
            "Snapshots published",
            self.updates.clone(),
        );
    }

    /// Replaces the gauges with `snapshot`'s values.
    pub fn observe(&self, snapshot: &Snapshot) {
        self.endpoints.clear();
        for (name, service) in &snapshot.services {
            let count = i64::try_from(service.endpoints.len()).unwrap_or(i64::MAX);
            self.endpoints
                .get_or_create(&ClusterLabels {
                    cluster: name.clone(),
                })
                .set(count);
        }
        self.info.clear();
        self.info
            .get_or_create(&VersionLabels {
                version: snapshot.version.clone(),
            })
            .set(1);
        self.updates.inc();
    }
}
