//! Endpoint diagnostics from proxies (issue #17, `fulcrum endpoints`): the requests the
//! control plane has asked proxies for and the reports they sent back.
//!
//! `GET /v1/proxies/{node}/endpoints?service=S` asks ([`DiagnosticsTable::ask`]): the next
//! answer to that proxy's snapshot poll names the request in `x-fulcrum-diagnose: <id> <S>`
//! ([`DiagnosticsTable::request_for`]); the proxy's filter collects every worker's view and
//! posts it to `POST /v1/diagnostics`, which is parsed as untrusted input
//! ([`fulcrum_core::diagnostics::DiagnosticsReport::parse`]: bounded body, every field
//! checked, a report with any field out of bounds refused whole and counted) and kept only if
//! it answers a request pending for that node ([`DiagnosticsTable::record`]), so a client
//! cannot fill the table with reports nobody asked for. The handler waiting for it is woken.
//!
//! The table is bounded and forgets, like the proxy table ([`crate::proxies`]): one pending
//! request per node (a newer one replaces it), at most [`DiagnosticsLimits::max_pending`]
//! nodes with one, at most [`DiagnosticsLimits::max_reports`] reports and
//! [`DiagnosticsLimits::max_report_bytes`] of them (one per node and service, the oldest
//! evicted), and everything older than
//! [`DiagnosticsLimits::expire_after`] goes. Nothing here reads a clock: every call takes
//! `now`.
//!
//! Metrics: `fulcrum_endpoint_reports_accepted_total` and
//! `fulcrum_endpoint_reports_rejected_total{reason}` (the field out of bounds, `too_large`,
//! `malformed`, `node_id`, or `unrequested`).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use fulcrum_core::diagnostics::{DiagnosticsReport, EndpointsView, InvalidReport, aggregate};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::Notify;

/// Default of [`DiagnosticsLimits::max_reports`].
pub const DEFAULT_MAX_REPORTS: usize = 1_000;

/// Default of [`DiagnosticsLimits::max_report_bytes`]: 32 of the largest reports.
pub const DEFAULT_MAX_REPORT_BYTES: usize = 64 << 20;

/// Default of [`DiagnosticsLimits::max_pending`].
pub const DEFAULT_MAX_PENDING: usize = 1_000;

/// Default of [`DiagnosticsLimits::expire_after`].
pub const DEFAULT_EXPIRE_AFTER: Duration = Duration::from_secs(60);

/// How much the table holds and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagnosticsLimits {
    /// Most reports kept; a new one beyond evicts the oldest received.
    pub max_reports: usize,
    /// Most bytes of reports kept (as their bodies measured); a new one beyond evicts the
    /// oldest received until it fits. A report is at most
    /// [`fulcrum_core::diagnostics::MAX_REPORT_BYTES`].
    pub max_report_bytes: usize,
    /// Most nodes with a pending request; a new one beyond evicts the oldest asked.
    pub max_pending: usize,
    /// A request or report older than this is forgotten.
    pub expire_after: Duration,
}

impl Default for DiagnosticsLimits {
    fn default() -> Self {
        Self {
            max_reports: DEFAULT_MAX_REPORTS,
            max_report_bytes: DEFAULT_MAX_REPORT_BYTES,
            max_pending: DEFAULT_MAX_PENDING,
            expire_after: DEFAULT_EXPIRE_AFTER,
        }
    }
}

/// A request waiting for its proxy's next poll, or for its report.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    id: u64,
    service: String,
    asked: SystemTime,
}

/// A report as kept: what the proxy sent, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The report, checked.
    pub report: DiagnosticsReport,
    /// When it arrived.
    pub at: SystemTime,
    /// Its body's bytes, held against [`DiagnosticsLimits::max_report_bytes`].
    pub bytes: usize,
}

/// Why a report was not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The body is not a valid report.
    #[error(transparent)]
    Invalid(#[from] InvalidReport),
    /// The report names no usable node (`x-fulcrum-node-id`).
    #[error("the report names no valid node: send x-fulcrum-node-id as a poll does")]
    NodeId,
    /// No request of this node, id and service is pending: never asked, already answered,
    /// expired, or asked by another replica.
    #[error(
        "no diagnostics request of this node, id and service is pending on this replica (expired, answered, or asked by another replica)"
    )]
    Unrequested,
}

impl Refused {
    /// The label of `fulcrum_endpoint_reports_rejected_total{reason}`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Invalid(invalid) => invalid.label(),
            Self::NodeId => "node_id",
            Self::Unrequested => "unrequested",
        }
    }
}

/// The requests and reports. See the module docs.
#[derive(Debug)]
pub struct DiagnosticsTable {
    limits: DiagnosticsLimits,
    /// The next request id; started from the wall clock so a restarted control plane does not
    /// reuse the ids a proxy last answered.
    next_id: u64,
    pending: BTreeMap<String, Pending>,
    reports: BTreeMap<(String, String), Received>,
}

fn age(then: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or_default()
}

impl DiagnosticsTable {
    /// An empty table whose request ids start at `first_id`.
    pub fn new(limits: DiagnosticsLimits, first_id: u64) -> Self {
        Self {
            limits,
            next_id: first_id,
            pending: BTreeMap::new(),
            reports: BTreeMap::new(),
        }
    }

    /// Asks `node` for its diagnostics of `service` at `now`, replacing any request pending
    /// for it; the request's id.
    pub fn ask(&mut self, node: &str, service: &str, now: SystemTime) -> u64 {
        self.expire(now);
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        if !self.pending.contains_key(node)
            && self.pending.len() >= self.limits.max_pending
            && let Some(oldest) = self
                .pending
                .iter()
                .min_by_key(|(_, pending)| pending.asked)
                .map(|(node, _)| node.clone())
        {
            self.pending.remove(&oldest);
        }
        self.pending.insert(
            node.to_owned(),
            Pending {
                id,
                service: service.to_owned(),
                asked: now,
            },
        );
        id
    }

    /// The request pending for `node` at `now`, as `(id, service)`.
    pub fn request_for(&self, node: &str, now: SystemTime) -> Option<(u64, &str)> {
        self.pending
            .get(node)
            .filter(|pending| age(pending.asked, now) < self.limits.expire_after)
            .map(|pending| (pending.id, pending.service.as_str()))
    }

    /// Keeps `report` from `node` (a body of `bytes`) at `now` if it answers the request
    /// pending for that node; the request is then answered. The oldest reports received go
    /// to keep within [`DiagnosticsLimits::max_reports`] and
    /// [`DiagnosticsLimits::max_report_bytes`].
    pub fn record(
        &mut self,
        node: &str,
        report: DiagnosticsReport,
        bytes: usize,
        now: SystemTime,
    ) -> Result<(), Refused> {
        self.expire(now);
        let answers = self.pending.get(node).is_some_and(|pending| {
            pending.id == report.request && pending.service == report.service
        });
        if !answers {
            return Err(Refused::Unrequested);
        }
        self.pending.remove(node);
        let key = (node.to_owned(), report.service.clone());
        self.reports.remove(&key);
        let mut held: usize = self.reports.values().map(|received| received.bytes).sum();
        while self.reports.len() >= self.limits.max_reports
            || held + bytes > self.limits.max_report_bytes
        {
            let Some(oldest) = self
                .reports
                .iter()
                .min_by_key(|(_, received)| received.at)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            if let Some(gone) = self.reports.remove(&oldest) {
                held -= gone.bytes;
            }
        }
        self.reports.insert(
            key,
            Received {
                report,
                at: now,
                bytes,
            },
        );
        Ok(())
    }

    /// The report of `node` for `service` answering request `id`, if it arrived.
    pub fn report(&self, node: &str, service: &str, id: u64) -> Option<&Received> {
        self.reports
            .get(&(node.to_owned(), service.to_owned()))
            .filter(|received| received.report.request == id)
    }

    /// Forgets the requests and reports older than `expire_after` at `now`.
    pub fn expire(&mut self, now: SystemTime) {
        let expire_after = self.limits.expire_after;
        self.pending
            .retain(|_, pending| age(pending.asked, now) < expire_after);
        self.reports
            .retain(|_, received| age(received.at, now) < expire_after);
    }

    /// How many requests are pending and reports kept.
    pub fn len(&self) -> (usize, usize) {
        (self.pending.len(), self.reports.len())
    }
}

/// Labels of `fulcrum_endpoint_reports_rejected_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusedLabels {
    /// Why: the field out of bounds, `too_large`, `malformed`, `node_id` or `unrequested`.
    pub reason: &'static str,
}

/// The metrics of endpoint diagnostics. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct DiagnosticsMetrics {
    /// `fulcrum_endpoint_reports_accepted_total`.
    pub accepted: Counter,
    /// `fulcrum_endpoint_reports_rejected_total{reason}`.
    pub rejected: Family<RefusedLabels, Counter>,
}

impl DiagnosticsMetrics {
    /// Registers both counters under the `fulcrum` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("fulcrum");
        registry.register(
            "endpoint_reports_accepted",
            "Endpoint diagnostics reports from proxies that answered a request and were kept",
            self.accepted.clone(),
        );
        registry.register(
            "endpoint_reports_rejected",
            "Endpoint diagnostics reports from proxies refused, by reason (the field out of bounds, too_large, malformed, node_id, unrequested)",
            self.rejected.clone(),
        );
    }
}

/// The body of `GET /v1/proxies/{node}/endpoints` for `received` from `node`.
fn endpoints_view(node: &str, received: &Received) -> EndpointsView {
    EndpointsView {
        node_id: node.to_owned(),
        service: received.report.service.clone(),
        request: received.report.request,
        received_unix_ms: received
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            }),
        endpoints: aggregate(&received.report.workers),
        workers: received.report.workers.clone(),
    }
}

/// The shared table, its metrics and the wake-up of waiting handlers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    table: Arc<Mutex<DiagnosticsTable>>,
    arrived: Arc<Notify>,
    metrics: DiagnosticsMetrics,
}

impl Diagnostics {
    /// An empty table with `limits`, request ids from the wall clock, counting into
    /// `metrics`.
    pub fn new(limits: DiagnosticsLimits, metrics: DiagnosticsMetrics) -> Self {
        let first_id = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |since| u64::try_from(since.as_millis()).unwrap_or(1));
        Self {
            table: Arc::new(Mutex::new(DiagnosticsTable::new(limits, first_id))),
            arrived: Arc::new(Notify::new()),
            metrics,
        }
    }

    /// The table; every operation completes its map updates or none, so a poisoned lock is
    /// taken as is.
    pub fn table(&self) -> MutexGuard<'_, DiagnosticsTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Parses and keeps a report `body` from `node` (`None`: no valid node id) at `now`,
    /// counting the outcome and waking the handlers waiting for reports.
    pub fn receive(&self, node: Option<&str>, body: &[u8], now: SystemTime) -> Result<(), Refused> {
        let outcome = node.ok_or(Refused::NodeId).and_then(|node| {
            let report = DiagnosticsReport::parse(body)?;
            self.table().record(node, report, body.len(), now)
        });
        match &outcome {
            Ok(()) => {
                self.metrics.accepted.inc();
                self.arrived.notify_waiters();
            }
            Err(refused) => {
                self.metrics
                    .rejected
                    .get_or_create(&RefusedLabels {
                        reason: refused.label(),
                    })
                    .inc();
            }
        }
        outcome
    }

    /// Counts a report refused before it could be read (its body over the bound).
    pub fn refused_too_large(&self) {
        self.metrics
            .rejected
            .get_or_create(&RefusedLabels {
                reason: InvalidReport::TooLarge.label(),
            })
            .inc();
    }

    /// Asks `node` for `service` and waits up to `wait` for its report; the view, or `None`
    /// when none came in time.
    pub async fn ask_and_wait(
        &self,
        node: &str,
        service: &str,
        wait: Duration,
    ) -> Option<EndpointsView> {
        let id = self.table().ask(node, service, SystemTime::now());
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a report arriving in between is not missed.
            let arrived = self.arrived.notified();
            if let Some(received) = self.table().report(node, service, id) {
                return Some(endpoints_view(node, received));
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + secs)
    }

    fn report(service: &str, request: u64) -> DiagnosticsReport {
        DiagnosticsReport {
            service: service.to_owned(),
            request,
            workers: Vec::new(),
        }
    }

    fn limits() -> DiagnosticsLimits {
        DiagnosticsLimits {
            max_reports: 2,
            max_report_bytes: 1000,
            max_pending: 2,
            expire_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_request_is_named_to_its_node_until_its_report_answers_it() {
        let mut table = DiagnosticsTable::new(limits(), 100);
        let id = table.ask("web-1", "checkout", at(0));
        assert_eq!(id, 100);
        assert_eq!(table.request_for("web-1", at(1)), Some((100, "checkout")));
        assert_eq!(table.request_for("web-2", at(1)), None);
        table
            .record("web-1", report("checkout", 100), 1, at(2))
            .expect("answers the request");
        assert_eq!(table.request_for("web-1", at(3)), None, "answered");
        assert_eq!(
            table.report("web-1", "checkout", 100).map(|r| r.at),
            Some(at(2))
        );
        assert_eq!(
            table.report("web-1", "checkout", 99),
            None,
            "another request"
        );
    }

    #[test]
    fn a_report_nobody_asked_for_is_refused() {
        let mut table = DiagnosticsTable::new(limits(), 1);
        assert_eq!(
            table.record("web-1", report("checkout", 1), 1, at(0)),
            Err(Refused::Unrequested)
        );
        let id = table.ask("web-1", "checkout", at(0));
        assert_eq!(
            table.record("web-1", report("cart", id), 1, at(1)),
            Err(Refused::Unrequested),
            "another service"
        );
        assert_eq!(
            table.record("web-2", report("checkout", id), 1, at(1)),
            Err(Refused::Unrequested),
            "another node"
        );
        assert_eq!(
            table.record("web-1", report("checkout", id + 1), 1, at(1)),
            Err(Refused::Unrequested),
            "another request"
        );
        assert_eq!(table.len(), (1, 0));
    }

    #[test]
    fn a_newer_request_replaces_the_pending_one_and_requests_expire() {
        let mut table = DiagnosticsTable::new(limits(), 1);
        table.ask("web-1", "checkout", at(0));
        let id = table.ask("web-1", "cart", at(5));
        assert_eq!(table.request_for("web-1", at(6)), Some((id, "cart")));
        assert_eq!(table.request_for("web-1", at(65)), None, "expired at 60 s");
        table.expire(at(65));
        assert_eq!(table.len(), (0, 0));
    }

    #[test]
    fn pending_requests_and_reports_are_capped_evicting_the_oldest() {
        let mut table = DiagnosticsTable::new(limits(), 1);
        for (i, node) in ["a", "b", "c"].into_iter().enumerate() {
            table.ask(node, "s", at(i as u64));
        }
        assert_eq!(table.len().0, 2);
        assert_eq!(table.request_for("a", at(3)), None, "the oldest asked went");
        for (i, node) in ["b", "c"].into_iter().enumerate() {
            let (id, _) = table.request_for(node, at(3)).expect("pending");
            table
                .record(node, report("s", id), 1, at(10 + i as u64))
                .expect("kept");
        }
        let id = table.ask("d", "s", at(20));
        table.record("d", report("s", id), 1, at(21)).expect("kept");
        assert_eq!(table.len().1, 2);
        assert!(
            table.report("b", "s", 2).is_none(),
            "the oldest report went"
        );
        assert!(table.report("d", "s", id).is_some());
        table.expire(at(80));
        assert_eq!(
            table.len(),
            (0, 1),
            "only d's report, at 21 s, is younger than 60 s"
        );
    }

    #[test]
    fn reports_are_kept_within_their_byte_budget_evicting_the_oldest_received() {
        let mut table = DiagnosticsTable::new(
            DiagnosticsLimits {
                max_reports: 10,
                ..limits()
            },
            1,
        );
        let answer = |table: &mut DiagnosticsTable, node: &str, bytes, second| {
            let id = table.ask(node, "s", at(second));
            table
                .record(node, report("s", id), bytes, at(second))
                .expect("kept");
            id
        };
        let a = answer(&mut table, "a", 400, 0);
        let b = answer(&mut table, "b", 400, 1);
        assert_eq!(table.len().1, 2, "800 of 1000 bytes");
        let c = answer(&mut table, "c", 400, 2);
        assert!(table.report("a", "s", a).is_none(), "the oldest went");
        assert!(table.report("b", "s", b).is_some() && table.report("c", "s", c).is_some());
        let b_again = answer(&mut table, "b", 600, 3);
        assert!(
            table.report("c", "s", c).is_some() && table.report("b", "s", b_again).is_some(),
            "a node's new report replaces its old one's bytes: 400 + 600 fit"
        );
        let d = answer(&mut table, "d", 1000, 4);
        assert_eq!(
            table.len().1,
            1,
            "the largest report alone fills the budget"
        );
        assert!(table.report("d", "s", d).is_some());
        table.expire(at(70));
        assert_eq!(table.len(), (0, 0));
        answer(&mut table, "e", 1000, 70);
        assert_eq!(table.len().1, 1, "expired reports gave their bytes back");
    }

    #[test]
    fn a_refused_report_is_counted_by_the_field_it_broke() {
        let metrics = DiagnosticsMetrics::default();
        let diagnostics = Diagnostics::new(limits(), metrics.clone());
        let refused = |node: Option<&str>, body: &[u8]| {
            diagnostics
                .receive(node, body, at(0))
                .map_err(|refused| refused.label())
        };
        assert_eq!(refused(None, b"{}"), Err("node_id"));
        assert_eq!(refused(Some("web-1"), b"not json"), Err("malformed"));
        assert_eq!(
            refused(
                Some("web-1"),
                br#"{"service":"a b","request":1,"workers":[]}"#
            ),
            Err("service")
        );
        assert_eq!(
            refused(
                Some("web-1"),
                br#"{"service":"checkout","request":1,"workers":[]}"#
            ),
            Err("unrequested")
        );
        let count = |reason| {
            metrics
                .rejected
                .get_or_create(&RefusedLabels { reason })
                .get()
        };
        assert_eq!(
            [
                count("node_id"),
                count("malformed"),
                count("service"),
                count("unrequested")
            ],
            [1, 1, 1, 1]
        );
        assert_eq!(metrics.accepted.get(), 0);
    }

    #[tokio::test]
    async fn a_waiting_request_is_answered_when_its_report_arrives() {
        let diagnostics = Diagnostics::new(limits(), DiagnosticsMetrics::default());
        let waiting = {
            let diagnostics = diagnostics.clone();
            tokio::spawn(async move {
                diagnostics
                    .ask_and_wait("web-1", "checkout", Duration::from_secs(10))
                    .await
            })
        };
        let id = loop {
            if let Some((id, _)) = diagnostics.table().request_for("web-1", SystemTime::now()) {
                break id;
            }
            tokio::task::yield_now().await;
        };
        let body = serde_json::to_vec(&report("checkout", id)).expect("serializes");
        diagnostics
            .receive(Some("web-1"), &body, SystemTime::now())
            .expect("kept");
        let view = waiting.await.expect("joins").expect("answered");
        assert_eq!((view.request, view.service.as_str()), (id, "checkout"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_no_proxy_answers_gives_up_after_its_wait() {
        let diagnostics = Diagnostics::new(limits(), DiagnosticsMetrics::default());
        let view = diagnostics
            .ask_and_wait("web-1", "checkout", Duration::from_secs(3))
            .await;
        assert!(view.is_none());
    }
}
