//! Prometheus metrics of the ADS server, registered by the binary into its registry.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of per-type metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TypeLabels {
    /// `cds` or `eds`.
    pub resource_type: &'static str,
    /// `sotw` or `delta`.
    pub stream: &'static str,
}

/// Labels of per-stream-kind metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StreamLabels {
    /// `sotw` or `delta`.
    pub stream: &'static str,
}

/// Labels of [`XdsMetrics::streams_refused`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `max_streams` (a new stream, refused because the server held its maximum) or
    /// `subscriptions` (a delta stream, ended because it subscribed to more names the
    /// snapshot does not serve than a stream may hold).
    pub reason: &'static str,
}

fn push_latency_histogram() -> Histogram {
    // 100 µs to ~3 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 16,
    ))
}

/// Counters, gauges and histograms of the ADS server. Cheap to clone (shared handles).
#[derive(Debug, Clone)]
pub struct XdsMetrics {
    /// `fulcrum_xds_pushes_total`: responses sent.
    pub pushes: Family<TypeLabels, Counter>,
    /// `fulcrum_xds_push_latency_seconds`: from a snapshot's publication to its response
    /// being queued on a stream.
    pub push_latency: Family<TypeLabels, Histogram, fn() -> Histogram>,
    /// `fulcrum_xds_nacks_total`: responses Envoy rejected.
    pub nacks: Family<TypeLabels, Counter>,
    /// `fulcrum_xds_connected_proxies`: open ADS streams.
    pub connected: Family<StreamLabels, Gauge>,
    /// `fulcrum_xds_streams_refused_total{reason}`: streams refused because the server held
    /// its maximum, or ended because they subscribed to more names than a stream may hold.
    pub streams_refused: Family<RefusalLabels, Counter>,
}

impl Default for XdsMetrics {
    fn default() -> Self {
        Self {
            pushes: Family::default(),
            push_latency: Family::new_with_constructor(push_latency_histogram),
            nacks: Family::default(),
            connected: Family::default(),
            streams_refused: Family::default(),
        }
    }
}

impl XdsMetrics {
    /// Registers every metric under the `fulcrum_xds` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let xds = registry.sub_registry_with_prefix("fulcrum_xds");
        xds.register("pushes", "xDS responses sent to Envoy", self.pushes.clone());
        xds.register(
            "push_latency_seconds",
            "Time from a snapshot's publication to its xDS response being queued",
            self.push_latency.clone(),
        );
        xds.register(
            "nacks",
            "xDS responses rejected by Envoy (NACK)",
            self.nacks.clone(),
        );
        xds.register(
            "connected_proxies",
            "Open ADS streams",
            self.connected.clone(),
        );
        xds.register(
            "streams_refused",
            "ADS streams refused because the server held its maximum, or ended because they subscribed to more names than a stream may hold",
            self.streams_refused.clone(),
        );
    }
}
