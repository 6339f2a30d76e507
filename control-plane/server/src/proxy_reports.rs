//! The proxy table ([`crate::proxies`]) as the HTTP API shares it: fed by every
//! `GET /v1/snapshot`, read by `GET /v1/proxies`, and exported as Prometheus metrics.
//!
//! - `fulcrum_proxies{state="current|behind|stale"}`: proxies in each state, computed when
//!   `/metrics` is scraped (states age without any poll arriving);
//! - `fulcrum_proxies_evicted_total`: proxies forgotten at the cap to admit a new one;
//! - `fulcrum_proxy_reports_rejected_total{reason}`: poll headers ignored as invalid
//!   (`node_id`, `node_cluster`, `version`, `rejected`).
//!
//! The table sits behind a `std` mutex held for a map operation at a time, never across an
//! await.

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::SystemTime,
};

use axum::http::HeaderMap;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::debug;

use crate::proxies::{ProxyState, ProxyTable, ProxyTableLimits, ProxyView, RawReport, Report};

/// The header naming the polling proxy's Envoy node id.
pub const NODE_ID_HEADER: &str = "x-fulcrum-node-id";
/// The header naming the polling proxy's Envoy node cluster.
pub const NODE_CLUSTER_HEADER: &str = "x-fulcrum-node-cluster";
/// The header naming the last snapshot the polling proxy refused.
pub const REJECTED_HEADER: &str = "x-fulcrum-rejected";

/// Labels of `fulcrum_proxies`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StateLabels {
    /// `current`, `behind` or `stale`.
    pub state: &'static str,
}

/// Labels of `fulcrum_proxy_reports_rejected_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The header ignored: `node_id`, `node_cluster`, `version` or `rejected`.
    pub reason: &'static str,
}

/// The metrics of the proxy table. Cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct ProxyMetrics {
    /// `fulcrum_proxies{state}`.
    pub proxies: Family<StateLabels, Gauge>,
    /// `fulcrum_proxies_evicted_total`.
    pub evicted: Counter,
    /// `fulcrum_proxy_reports_rejected_total{reason}`.
    pub rejected: Family<ReasonLabels, Counter>,
}

impl ProxyMetrics {
    /// Registers every metric under the `fulcrum` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("fulcrum");
        registry.register(
            "proxies",
            "Proxies whose filters poll this replica, by state against its snapshot (current, behind, stale)",
            self.proxies.clone(),
        );
        registry.register(
            "proxies_evicted",
            "Proxies forgotten because the proxy table was full (--max-proxies)",
            self.evicted.clone(),
        );
        registry.register(
            "proxy_reports_rejected",
            "Snapshot poll headers identifying a proxy that were ignored as invalid, by header",
            self.rejected.clone(),
        );
    }
}

/// The shared proxy table and its metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProxyReports {
    table: Arc<Mutex<ProxyTable>>,
    metrics: ProxyMetrics,
}

impl ProxyReports {
    /// An empty table with `limits`, counting into `metrics`.
    pub fn new(limits: ProxyTableLimits, metrics: ProxyMetrics) -> Self {
        Self {
            table: Arc::new(Mutex::new(ProxyTable::new(limits))),
            metrics,
        }
    }

    /// The table's limits.
    pub fn limits(&self) -> ProxyTableLimits {
        self.table().limits()
    }

    /// Records what a snapshot poll's headers say about its proxy at `now`; `version` is
    /// the first version its `If-None-Match` names.
    pub fn record_poll(&self, headers: &HeaderMap, version: Option<&str>, now: SystemTime) {
        let single = |name: &str| {
            let mut values = headers.get_all(name).iter();
            let first = values.next()?;
            // A repeated header is ambiguous: read as an invalid value.
            Some(if values.next().is_some() {
                &[][..]
            } else {
                first.as_bytes()
            })
        };
        let parsed = Report::parse(RawReport {
            node_id: single(NODE_ID_HEADER),
            node_cluster: single(NODE_CLUSTER_HEADER),
            version: version.map(str::as_bytes),
            rejected: single(REJECTED_HEADER),
        });
        for field in &parsed.invalid {
            self.metrics
                .rejected
                .get_or_create(&ReasonLabels {
                    reason: field.label(),
                })
                .inc();
            debug!(
                reason = field.label(),
                "ignored an invalid proxy report header"
            );
        }
        let Some(report) = parsed.report else {
            return;
        };
        let evicted = self.table().record(report, now);
        if evicted > 0 {
            self.metrics.evicted.inc_by(evicted as u64);
            debug!(
                evicted,
                "proxy table full: evicted the least recently seen proxy"
            );
        }
    }

    /// Whether `node_id` polled this replica and is not forgotten at `now`.
    pub fn knows(&self, node_id: &str, now: SystemTime) -> bool {
        let mut table = self.table();
        table.expire(now);
        table.knows(node_id)
    }

    /// The node id a request names in `x-fulcrum-node-id`, when it is one the table would
    /// record (a single printable value within bounds).
    pub fn node_id(headers: &HeaderMap) -> Option<String> {
        let mut values = headers.get_all(NODE_ID_HEADER).iter();
        let first = values.next()?;
        if values.next().is_some() {
            return None;
        }
        Report::parse(RawReport {
            node_id: Some(first.as_bytes()),
            ..RawReport::default()
        })
        .report
        .map(|report| report.node_id)
    }

    /// Every proxy at `now` against the `served` version, sorted by node id, only those in
    /// state `only` when given. Forgets the expired first.
    pub fn view(
        &self,
        now: SystemTime,
        served: Option<&str>,
        only: Option<ProxyState>,
    ) -> Vec<ProxyView> {
        let mut table = self.table();
        table.expire(now);
        table.view(now, served, only)
    }

    /// Sets `fulcrum_proxies{state}` to the counts at `now` against the `served` version,
    /// forgetting the expired first.
    pub fn refresh_gauges(&self, now: SystemTime, served: Option<&str>) {
        let counts = {
            let mut table = self.table();
            table.expire(now);
            table.counts(now, served)
        };
        for state in ProxyState::ALL {
            self.metrics
                .proxies
                .get_or_create(&StateLabels {
                    state: state.label(),
                })
                .set(i64::try_from(counts.get(state)).unwrap_or(i64::MAX));
        }
    }

    /// The table; a panic elsewhere while holding it leaves it consistent (every operation
    /// completes its map updates or none), so a poisoned lock is taken as is.
    fn table(&self) -> MutexGuard<'_, ProxyTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
