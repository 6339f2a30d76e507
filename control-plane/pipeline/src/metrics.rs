//! The pipeline's Prometheus metrics: endpoints per cluster and health and the version of the
//! published snapshot, what validation left out of it, and services whose sources disagree
//! on the protocol.

use fulcrum_core::{Health, Snapshot};
use fulcrum_health::metrics::{MAX_CLUSTER_SERIES, OTHER_CLUSTERS};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::validate::Dropped;

/// Labels naming one cluster and one endpoint health.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClusterHealthLabels {
    /// The cluster (service) name.
    pub cluster: String,
    /// `healthy`, `draining` or `unhealthy`, as in the snapshot.
    pub health: &'static str,
}

/// Every endpoint health, in the order the gauges are written.
const HEALTHS: [Health; 3] = [Health::Healthy, Health::Draining, Health::Unhealthy];

/// The label value of `health`: its name in the snapshot's JSON.
fn health_label(health: Health) -> &'static str {
    match health {
        Health::Healthy => "healthy",
        Health::Draining => "draining",
        Health::Unhealthy => "unhealthy",
    }
}

/// Labels carrying the snapshot version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct VersionLabels {
    /// The snapshot version.
    pub version: String,
}

/// Labels naming what validation left out: `endpoint` or `service`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DroppedLabels {
    /// `endpoint` or `service`.
    pub kind: &'static str,
}

/// Gauges describing the published snapshot. Cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct PipelineMetrics {
    /// `fulcrum_cluster_endpoints{cluster, health}`: endpoints per cluster and health in the
    /// current snapshot; every health of a known cluster has a series, 0 included, so
    /// `fulcrum_cluster_endpoints{health="healthy"} < 2` alerts. Clusters past the first
    /// [`MAX_CLUSTER_SERIES`] by name are summed under `cluster="(other)"`.
    pub endpoints: Family<ClusterHealthLabels, Gauge>,
    /// `fulcrum_snapshot_info{version}`: 1 for the current version only.
    pub info: Family<VersionLabels, Gauge>,
    /// `fulcrum_snapshots_published_total`: snapshots published. Not `snapshot_updates`: the
    /// filters count the snapshots they apply under that name, and one Prometheus holds both.
    pub published: Counter,
    /// `fulcrum_snapshot_dropped{kind}`: endpoints and services the last validation left out
    /// of the published snapshot; above 0, a source publishes something Envoy or the filters
    /// would refuse (`/v1/status` names it).
    pub dropped: Family<DroppedLabels, Gauge>,
    /// `fulcrum_service_protocol_conflicts`: services whose sources name different protocols
    /// in the latest merge (the earliest source's is used); above 0, some endpoints are
    /// spoken to in a protocol they may not speak.
    pub protocol_conflicts: Gauge,
    /// `fulcrum_snapshot_over_budget`: 1 while the latest snapshot is refused for exceeding
    /// the budget (Envoy and the filters keep the last good one), else 0.
    pub over_budget: Gauge,
}

impl PipelineMetrics {
    /// Registers every metric under the `fulcrum` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let fulcrum = registry.sub_registry_with_prefix("fulcrum");
        fulcrum.register(
            "cluster_endpoints",
            "Endpoints per cluster and health in the current snapshot",
            self.endpoints.clone(),
        );
        fulcrum.register(
            "snapshot_info",
            "The current snapshot version (value is always 1)",
            self.info.clone(),
        );
        fulcrum.register(
            "snapshots_published",
            "Snapshots published",
            self.published.clone(),
        );
        fulcrum.register(
            "snapshot_over_budget",
            "1 while the latest snapshot is refused for exceeding the budget, else 0",
            self.over_budget.clone(),
        );
        fulcrum.register(
            "service_protocol_conflicts",
            "Services whose sources name different protocols (the earliest source's is used)",
            self.protocol_conflicts.clone(),
        );
        fulcrum.register(
            "snapshot_dropped",
            "Endpoints and services left out of the published snapshot as invalid",
            self.dropped.clone(),
        );
    }

    /// Sets `cluster`'s endpoint gauges to `counts`, in [`HEALTHS`] order.
    fn set_endpoints(&self, cluster: &str, counts: [usize; HEALTHS.len()]) {
        for (health, count) in HEALTHS.into_iter().zip(counts) {
            self.endpoints
                .get_or_create(&ClusterHealthLabels {
                    cluster: cluster.to_owned(),
                    health: health_label(health),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Sets the protocol conflicts gauge from the latest merge.
    pub fn observe_protocol_conflicts(&self, services: usize) {
        self.protocol_conflicts
            .set(i64::try_from(services).unwrap_or(i64::MAX));
    }

    /// Sets the over-budget gauge.
    pub fn observe_over_budget(&self, over: bool) {
        self.over_budget.set(i64::from(over));
    }

    /// Sets the dropped gauges from the last validation.
    pub fn observe_dropped(&self, dropped: &Dropped) {
        for (kind, count) in [
            ("endpoint", dropped.endpoints),
            ("service", dropped.services),
        ] {
            self.dropped
                .get_or_create(&DroppedLabels { kind })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Replaces the gauges with `snapshot`'s values: the first [`MAX_CLUSTER_SERIES`]
    /// clusters by name have series of their own, the rest are summed under
    /// [`OTHER_CLUSTERS`] (cluster names come from registrants and sources, and every one
    /// would be three series on every scrape).
    pub fn observe(&self, snapshot: &Snapshot) {
        self.endpoints.clear();
        let mut others = [0_usize; HEALTHS.len()];
        for (position, (name, service)) in snapshot.services.iter().enumerate() {
            let mut counts = [0_usize; HEALTHS.len()];
            for endpoint in &service.endpoints {
                if let Some(slot) = HEALTHS.iter().position(|health| *health == endpoint.health) {
                    counts[slot] += 1;
                }
            }
            if position < MAX_CLUSTER_SERIES {
                self.set_endpoints(name, counts);
            } else {
                for (other, count) in others.iter_mut().zip(counts) {
                    *other += count;
                }
            }
        }
        if snapshot.services.len() > MAX_CLUSTER_SERIES {
            self.set_endpoints(OTHER_CLUSTERS, others);
        }
        self.info.clear();
        self.info
            .get_or_create(&VersionLabels {
                version: snapshot.version.clone(),
            })
            .set(1);
        self.published.inc();
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use fulcrum_core::{Endpoint, ServiceEndpoints};
    use prometheus_client::encoding::text::encode;

    use super::*;

    fn scraped(metrics: &PipelineMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encodes");
        text
    }

    #[test]
    fn clusters_past_the_series_cap_are_summed_under_other_and_the_first_keep_their_own() {
        let service = |health| {
            Arc::new(ServiceEndpoints {
                endpoints: vec![
                    Endpoint::new("10.0.0.1:80".parse().expect("address")).with_health(health),
                ],
                protocol: None,
            })
        };
        let extra = 5;
        let services: BTreeMap<String, Arc<ServiceEndpoints>> = (0..MAX_CLUSTER_SERIES + extra)
            .map(|index| {
                let health = if index < MAX_CLUSTER_SERIES {
                    Health::Healthy
                } else {
                    Health::Unhealthy
                };
                (format!("svc-{index:05}"), service(health))
            })
            .collect();
        let metrics = PipelineMetrics::default();

        metrics.observe(&Snapshot {
            version: "v1".to_owned(),
            services,
            policy: None,
        });

        let text = scraped(&metrics);
        let series = text
            .lines()
            .filter(|line| line.starts_with("fulcrum_cluster_endpoints{"))
            .count();
        assert_eq!(
            series,
            3 * (MAX_CLUSTER_SERIES + 1),
            "three healths a cluster"
        );
        assert!(
            text.contains("fulcrum_cluster_endpoints{cluster=\"svc-00000\",health=\"healthy\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fulcrum_cluster_endpoints{cluster=\"(other)\",health=\"unhealthy\"} 5"),
            "the five past the cap, summed"
        );
        assert!(!text.contains(&format!("svc-{MAX_CLUSTER_SERIES:05}")));
    }
}
