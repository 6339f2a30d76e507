//! The filter's Envoy stats, defined through proxy-wasm `define_metric`.
//!
//! proxy-wasm metrics have no labels, so labels are encoded in the stat name the way Envoy's
//! tag extraction expects (`stats_config.stats_tags`, as Istio does): `<name>.service.<svc>`,
//! `<name>.service.<svc>.endpoint.<ip:port>`, `<name>.reason.<reason>` and
//! `<name>.input.<input>`. With the tag regexes of `docs/filter.md` in the bootstrap,
//! `/stats/prometheus` shows
//! `fulcrum_endpoint_picks_total{service="checkout",endpoint="10.0.0.1:8080"}`; without them
//! the labels stay part of the (sanitised) name. Envoy stats are process-wide: every worker VM
//! defining the same name shares one counter, so counters and the gauge below aggregate
//! across workers.
//!
//! Picks are the one stat a request moves: `fulcrum_endpoint_picks_total` is added up in the
//! VM and flushed to Envoy on the root context's tick (every second, [`ServiceMetrics::flush`])
//! and when an endpoint leaves the snapshot, so a request costs no `increment_metric` host
//! call; the stat lags by at most a tick, far below any scrape interval. Everything else
//! (fail-opens, ejections, rejections) is rare and counted at once.
//!
//! Per-endpoint stats are defined lazily on first use, released when the endpoint leaves the
//! snapshot, and capped at [`MAX_ENDPOINT_METRICS`] current endpoints per service and VM, so
//! churning endpoints cannot grow the VM's memory without bound; past the cap
//! `fulcrum_endpoint_metrics_dropped_total` counts what was not recorded. They are kept in a
//! vector sorted by address, grown towards the service's endpoint count rather than doubled,
//! and not in a hash table: a proxy that talks to every endpoint of a 10,000-endpoint mesh
//! holds one entry each, and a table's empty slots (up to half of them after it grows) cost
//! as much as the entries. A pick's lookup is a binary search; an endpoint's first pick and
//! its release shift the entries after it.

use std::net::SocketAddr;

use fulcrum_core::{BreakerState, Rejection, Transition};
use proxy_wasm::{hostcalls, types::MetricType};

use crate::input::Input;

/// Most per-endpoint stat sets one VM defines for one service.
pub const MAX_ENDPOINT_METRICS: usize = 16_384;

/// A defined Envoy stat; `None` when the host refused to define it (logged once).
type MetricId = Option<u32>;

fn define(kind: MetricType, name: &str) -> MetricId {
    match hostcalls::define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(status) => {
            crate::log_warn(&format!("could not define metric {name}: {status:?}"));
            None
        }
    }
}

fn add(metric: MetricId, delta: i64) {
    if let Some(id) = metric {
        // A failed increment only loses a sample; nothing to recover on the request path.
        let _ = hostcalls::increment_metric(id, delta);
    }
}

/// Stats of one endpoint of one service.
#[derive(Debug, Clone, Copy)]
struct EndpointMetrics {
    /// `fulcrum_endpoint_picks_total`: requests sent to the endpoint.
    picks: MetricId,
    /// Picks counted in the VM since the last [`ServiceMetrics::flush`].
    unflushed_picks: u64,
    /// `fulcrum_endpoint_ejections_total`: transitions of its breaker to open.
    ejections: MetricId,
    /// `fulcrum_endpoint_circuit_open`: how many worker VMs currently hold its circuit open
    /// or half-open (each VM adds 1 when it leaves closed and removes 1 when it returns).
    circuit_open: MetricId,
}

/// Why a request went on to Envoy's fallback policy without a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOpen {
    /// No endpoint snapshot has arrived yet.
    NoSnapshot,
    /// The request's service has no endpoints in the snapshot.
    UnknownService,
    /// The request carries no service name (no `:authority` or service header).
    NoService,
    /// The policy's `fail_open` applied to a rejection.
    Rejected(Rejection),
    /// The filter's own state was unavailable (should not happen; counted to be seen).
    Internal,
    /// The service is not in the configuration's `only_services`.
    NotListed,
    /// The request's service name (from `:authority` or a header) is not the cluster Envoy
    /// routed it to, so the pick could not be honoured.
    ServiceMismatch,
    /// The service name is not the routed cluster's (it comes from `:authority`, a header or
    /// the configuration) and Envoy names no routed cluster (`xds.cluster_name` absent, or
    /// unusable and counted as such), so the name could not be checked against it.
    NoRoute,
    /// The plugin has no valid configuration on this VM (`on_configure` failed or has not
    /// run); the request passes through with only the override header stripped.
    NotConfigured,
}

/// The VM-wide stats. Methods never fail: a stat that cannot be recorded is skipped.
#[derive(Debug)]
pub struct Metrics {
    fail_open_no_snapshot: MetricId,
    fail_open_unknown_service: MetricId,
    fail_open_no_service: MetricId,
    fail_open_no_endpoints: MetricId,
    fail_open_all_ejected: MetricId,
    fail_open_internal: MetricId,
    fail_open_not_configured: MetricId,
    fail_open_not_listed: MetricId,
    fail_open_service_mismatch: MetricId,
    fail_open_no_route: MetricId,
    override_header_stripped: MetricId,
    /// `fulcrum_request_input_invalid_total.input.<input>`, indexed by `Input as usize`.
    input_invalid: [MetricId; Input::ALL.len()],
    snapshot_updates: MetricId,
    snapshot_rejected: MetricId,
    snapshot_services_skipped: MetricId,
    snapshot_policy_rejected: MetricId,
    snapshot_fetch_failures: MetricId,
    snapshot_other_replica: MetricId,
    snapshot_replica_failovers: MetricId,
    snapshot_services_parsed: MetricId,
    snapshot_torn_reads: MetricId,
    snapshot_invalid_reads: MetricId,
    snapshot_over_table_budget: MetricId,
    endpoint_metrics_dropped: MetricId,
    shared_ejections_invalid: MetricId,
    shared_ejections_write_failures: MetricId,
    diagnostics_reports_sent: MetricId,
    diagnostics_reports_failed: MetricId,
    diagnostics_no_slot: MetricId,
}

impl Metrics {
    /// Defines the VM-wide stats.
    pub fn new() -> Self {
        let counter = |name: &str| define(MetricType::Counter, name);
        Self {
            fail_open_no_snapshot: counter("fulcrum_fail_open_total.reason.no_snapshot"),
            fail_open_unknown_service: counter("fulcrum_fail_open_total.reason.unknown_service"),
            fail_open_no_service: counter("fulcrum_fail_open_total.reason.no_service"),
            fail_open_no_endpoints: counter("fulcrum_fail_open_total.reason.no_endpoints"),
            fail_open_all_ejected: counter("fulcrum_fail_open_total.reason.all_ejected"),
            fail_open_internal: counter("fulcrum_fail_open_total.reason.internal"),
            fail_open_not_configured: counter("fulcrum_fail_open_total.reason.not_configured"),
            fail_open_not_listed: counter("fulcrum_fail_open_total.reason.not_listed"),
            fail_open_service_mismatch: counter("fulcrum_fail_open_total.reason.service_mismatch"),
            fail_open_no_route: counter("fulcrum_fail_open_total.reason.no_route"),
            override_header_stripped: counter("fulcrum_override_header_stripped_total"),
            input_invalid: Input::ALL.map(|input| {
                counter(&format!(
                    "fulcrum_request_input_invalid_total.input.{}",
                    input.label()
                ))
            }),
            snapshot_updates: counter("fulcrum_snapshot_updates_total"),
            snapshot_rejected: counter("fulcrum_snapshot_rejected_total"),
            snapshot_services_skipped: counter("fulcrum_snapshot_services_skipped_total"),
            snapshot_policy_rejected: counter("fulcrum_snapshot_policy_rejected_total"),
            snapshot_fetch_failures: counter("fulcrum_snapshot_fetch_failures_total"),
            snapshot_other_replica: counter("fulcrum_snapshot_other_replica_total"),
            snapshot_replica_failovers: counter("fulcrum_snapshot_replica_failovers_total"),
            snapshot_services_parsed: counter("fulcrum_snapshot_services_parsed_total"),
            snapshot_torn_reads: counter("fulcrum_snapshot_torn_reads_total"),
            snapshot_invalid_reads: counter("fulcrum_snapshot_invalid_reads_total"),
            snapshot_over_table_budget: counter("fulcrum_snapshot_over_table_budget_total"),
            endpoint_metrics_dropped: counter("fulcrum_endpoint_metrics_dropped_total"),
            shared_ejections_invalid: counter("fulcrum_shared_ejections_invalid_total"),
            shared_ejections_write_failures: counter(
                "fulcrum_shared_ejections_write_failures_total",
            ),
            diagnostics_reports_sent: counter("fulcrum_diagnostics_reports_sent_total"),
            diagnostics_reports_failed: counter("fulcrum_diagnostics_reports_failed_total"),
            diagnostics_no_slot: counter("fulcrum_diagnostics_no_slot_total"),
        }
    }

    pub fn fail_open(&self, why: FailOpen) {
        let metric = match why {
            FailOpen::NoSnapshot => self.fail_open_no_snapshot,
            FailOpen::UnknownService => self.fail_open_unknown_service,
            FailOpen::NoService => self.fail_open_no_service,
            FailOpen::Rejected(Rejection::AllEjected { .. }) => self.fail_open_all_ejected,
            FailOpen::Rejected(_) => self.fail_open_no_endpoints,
            FailOpen::Internal => self.fail_open_internal,
            FailOpen::NotConfigured => self.fail_open_not_configured,
            FailOpen::NotListed => self.fail_open_not_listed,
            FailOpen::ServiceMismatch => self.fail_open_service_mismatch,
            FailOpen::NoRoute => self.fail_open_no_route,
        };
        add(metric, 1);
    }

    pub fn override_header_stripped(&self) {
        add(self.override_header_stripped, 1);
    }

    /// A request input was not UTF-8, too long or unusable, and was treated as absent.
    pub fn input_invalid(&self, input: Input) {
        // `Input::ALL` lists the inputs in declaration order, so the index is always in range.
        add(self.input_invalid.get(input as usize).copied().flatten(), 1);
    }

    pub fn snapshot_updated(&self) {
        add(self.snapshot_updates, 1);
    }

    pub fn snapshot_rejected(&self) {
        add(self.snapshot_rejected, 1);
    }

    /// A service of a fetched snapshot was left out as invalid.
    pub fn snapshot_service_skipped(&self) {
        add(self.snapshot_services_skipped, 1);
    }

    /// A fetched snapshot's policy was refused; the policy in force stays.
    pub fn snapshot_policy_rejected(&self) {
        add(self.snapshot_policy_rejected, 1);
    }

    pub fn snapshot_fetch_failed(&self) {
        add(self.snapshot_fetch_failures, 1);
    }

    /// A VM parsed `count` services out of shared data to apply a change: only those whose
    /// content changed, so over a proxy's VMs this grows by (VMs × services changed).
    pub fn snapshot_services_parsed(&self, count: usize) {
        add(
            self.snapshot_services_parsed,
            i64::try_from(count).unwrap_or(i64::MAX),
        );
    }

    /// A VM found a service key newer than the published index (a publish under way) and
    /// left the change for its next tick.
    pub fn snapshot_torn_read(&self) {
        add(self.snapshot_torn_reads, 1);
    }

    /// A VM found the published snapshot invalid in shared data (corrupted: what the publisher
    /// validated does not parse) and applied nothing; counted on each tick until the next
    /// publication writes it over.
    pub fn snapshot_invalid_read(&self) {
        add(self.snapshot_invalid_reads, 1);
    }

    /// A VM refused a published snapshot whose tables exceed `max_table_bytes`.
    pub fn snapshot_over_table_budget(&self) {
        add(self.snapshot_over_table_budget, 1);
    }

    /// A snapshot answer came from a control-plane replica other than the one followed, and
    /// was left.
    pub fn snapshot_other_replica(&self) {
        add(self.snapshot_other_replica, 1);
    }

    /// The followed control-plane replica fell silent and the proxy moved to another.
    pub fn snapshot_replica_failover(&self) {
        add(self.snapshot_replica_failovers, 1);
    }

    /// A service's shared ejection record held bytes that are not a record.
    pub fn shared_ejections_invalid(&self) {
        add(self.shared_ejections_invalid, 1);
    }

    /// A breaker's ejection, its end, or an endpoint's failure count could not be written to
    /// shared data (contention, a full record or a host error): the other workers learn an
    /// ejection only by their own failures, and a count not written is this worker's alone.
    pub fn shared_ejections_write_failed(&self) {
        add(self.shared_ejections_write_failures, 1);
    }

    /// An endpoint-diagnostics report reached the control plane (answered 2xx).
    pub fn diagnostics_report_sent(&self) {
        add(self.diagnostics_reports_sent, 1);
    }

    /// An endpoint-diagnostics report could not be sent or the control plane refused it.
    pub fn diagnostics_report_failed(&self) {
        add(self.diagnostics_reports_failed, 1);
    }

    /// A worker VM found every diagnostics slot held by a live VM, and stays out of reports.
    pub fn diagnostics_no_slot(&self) {
        add(self.diagnostics_no_slot, 1);
    }
}

/// Stats of one service and its endpoints, kept with the service's picker so the request
/// path looks endpoints up by address alone.
#[derive(Debug)]
pub struct ServiceMetrics {
    /// `<name>.service.<svc>`, the suffix of every stat of this service.
    suffix: String,
    /// `fulcrum_fail_fast_total`: requests answered 503 because no endpoint was admissible.
    fail_fast: MetricId,
    /// `fulcrum_rate_limited_total`: requests answered 429.
    rate_limited: MetricId,
    /// `fulcrum_override_ignored_total`: responses from a host Envoy chose instead of the
    /// pick (the pick is not an endpoint of the routed cluster).
    override_ignored: MetricId,
    /// `fulcrum_ejections_adopted_total`: ejections another worker judged that this VM's
    /// breakers took on.
    ejections_adopted: MetricId,
    /// `fulcrum_ejections_ended_elsewhere_total`: breakers this VM closed because another
    /// worker's probes closed the endpoint.
    ejections_ended_elsewhere: MetricId,
    /// Copied from [`Metrics`] so the request path needs only this struct.
    endpoint_metrics_dropped: MetricId,
    /// The endpoints' stats, sorted by address: defined at first use.
    endpoints: Vec<(SocketAddr, EndpointMetrics)>,
    /// How many endpoints the service has, as its last endpoint set said: how far the
    /// vector grows at once, so it ends exactly as long as needed when every endpoint is
    /// picked.
    service_endpoints: usize,
    /// Whether some endpoint has unflushed picks, so an idle service's flush is free.
    unflushed: bool,
}

impl ServiceMetrics {
    /// The stats of `service`, which has `endpoints` endpoints.
    pub fn new(service: &str, endpoints: usize, vm: &Metrics) -> Self {
        let suffix = format!("service.{service}");
        Self {
            fail_fast: define(
                MetricType::Counter,
                &format!("fulcrum_fail_fast_total.{suffix}"),
            ),
            rate_limited: define(
                MetricType::Counter,
                &format!("fulcrum_rate_limited_total.{suffix}"),
            ),
            override_ignored: define(
                MetricType::Counter,
                &format!("fulcrum_override_ignored_total.{suffix}"),
            ),
            ejections_adopted: define(
                MetricType::Counter,
                &format!("fulcrum_ejections_adopted_total.{suffix}"),
            ),
            ejections_ended_elsewhere: define(
                MetricType::Counter,
                &format!("fulcrum_ejections_ended_elsewhere_total.{suffix}"),
            ),
            endpoint_metrics_dropped: vm.endpoint_metrics_dropped,
            suffix,
            endpoints: Vec::new(),
            service_endpoints: endpoints,
            unflushed: false,
        }
    }

    pub fn fail_fast(&self) {
        add(self.fail_fast, 1);
    }

    pub fn rate_limited(&self) {
        add(self.rate_limited, 1);
    }

    pub fn override_ignored(&self) {
        add(self.override_ignored, 1);
    }

    /// Counts a pick in the VM; Envoy sees it at the next [`ServiceMetrics::flush`].
    pub fn picked(&mut self, endpoint: SocketAddr) {
        // One lookup on the request path; only an endpoint's first pick defines its stats.
        if let Ok(found) = self.position(endpoint) {
            self.endpoints[found].1.unflushed_picks += 1;
            self.unflushed = true;
        } else if self.endpoint(endpoint).is_some() {
            self.picked(endpoint);
        }
    }

    /// Hands the picks counted since the last flush to Envoy: one host call per endpoint
    /// picked meanwhile, none when the service was idle.
    pub fn flush(&mut self) {
        if !std::mem::take(&mut self.unflushed) {
            return;
        }
        for (_, metrics) in &mut self.endpoints {
            flush_picks(metrics);
        }
    }

    /// Records a breaker transition this VM judged on one of this service's endpoints.
    pub fn transition(&mut self, transition: &Transition) {
        if matches!(transition.to, BreakerState::Open { .. })
            && let Some(metrics) = self.endpoint(transition.endpoint)
        {
            add(metrics.ejections, 1);
        }
        self.circuit_changed(transition);
    }

    /// Records a breaker transition taken on from another worker
    /// ([`fulcrum_core::ServicePicker::apply_shared_ejections`]): counted as adopted or ended
    /// elsewhere, not in `fulcrum_endpoint_ejections_total`, which counts judgements.
    pub fn shared_transition(&mut self, transition: &Transition) {
        match transition.to {
            BreakerState::Open { .. } => add(self.ejections_adopted, 1),
            BreakerState::Closed { .. } => add(self.ejections_ended_elsewhere, 1),
            BreakerState::HalfOpen { .. } => {}
        }
        self.circuit_changed(transition);
    }

    /// Moves this VM's share of the circuit-open gauge.
    fn circuit_changed(&mut self, transition: &Transition) {
        let was_closed = matches!(transition.from, BreakerState::Closed { .. });
        let is_closed = matches!(transition.to, BreakerState::Closed { .. });
        let Some(metrics) = self.endpoint(transition.endpoint) else {
            return;
        };
        match (was_closed, is_closed) {
            (true, false) => add(metrics.circuit_open, 1),
            (false, true) => add(metrics.circuit_open, -1),
            _ => {}
        }
    }

    /// An endpoint left the snapshot: if its circuit was not closed in this VM, this VM's
    /// share of the circuit-open gauge goes; its stat handles are forgotten (Envoy keeps the
    /// stats themselves; an endpoint that returns gets the same ones back by name).
    pub fn release(&mut self, endpoint: SocketAddr, circuit_open: bool) {
        if let Ok(found) = self.position(endpoint) {
            let (_, mut metrics) = self.endpoints.remove(found);
            flush_picks(&mut metrics);
            if circuit_open {
                add(metrics.circuit_open, -1);
            }
        }
    }

    /// The service now has `endpoints` endpoints (called before an endpoint-set change).
    pub fn set_service_endpoints(&mut self, endpoints: usize) {
        self.service_endpoints = endpoints;
    }

    /// Where `endpoint`'s stats are, or where they would go.
    fn position(&self, endpoint: SocketAddr) -> Result<usize, usize> {
        self.endpoints.binary_search_by(|(address, _)| {
            fulcrum_core::endpoint::address_cmp(address, &endpoint)
        })
    }

    fn endpoint(&mut self, endpoint: SocketAddr) -> Option<EndpointMetrics> {
        let position = match self.position(endpoint) {
            Ok(found) => return Some(self.endpoints[found].1),
            Err(position) => position,
        };
        if self.endpoints.len() >= MAX_ENDPOINT_METRICS {
            add(self.endpoint_metrics_dropped, 1);
            return None;
        }
        let suffix = format!("{}.endpoint.{endpoint}", self.suffix);
        let metrics = EndpointMetrics {
            picks: define(
                MetricType::Counter,
                &format!("fulcrum_endpoint_picks_total.{suffix}"),
            ),
            unflushed_picks: 0,
            ejections: define(
                MetricType::Counter,
                &format!("fulcrum_endpoint_ejections_total.{suffix}"),
            ),
            circuit_open: define(
                MetricType::Gauge,
                &format!("fulcrum_endpoint_circuit_open.{suffix}"),
            ),
        };
        if self.endpoints.len() == self.endpoints.capacity() {
            // Doubling, but never past the service's endpoint count unless it is out of date.
            let len = self.endpoints.len();
            let wanted = (2 * len).max(4).min(self.service_endpoints.max(len + 1));
            self.endpoints
                .reserve_exact(wanted.min(MAX_ENDPOINT_METRICS) - len);
        }
        self.endpoints.insert(position, (endpoint, metrics));
        Some(metrics)
    }
}

/// Adds an endpoint's unflushed picks to its Envoy counter.
fn flush_picks(metrics: &mut EndpointMetrics) {
    let picks = std::mem::take(&mut metrics.unflushed_picks);
    if picks > 0 {
        add(metrics.picks, i64::try_from(picks).unwrap_or(i64::MAX));
    }
}
