//! Endpoint diagnostics from a proxy (issue #17, `fulcrum endpoints`): what each worker of a
//! proxy believes about each endpoint of one service, how it travels from the filter to the
//! control plane, and the aggregate over workers an operator reads.
//!
//! The flow is on demand, never continuous (serialising every endpoint of every service on
//! every worker each second would not scale to 10k endpoints): the CLI asks the control
//! plane, which names the service in its next answer to that proxy's poll; each worker VM
//! writes its [`WorkerDiagnostics`] for the service ([`crate::ServicePicker::diagnose`],
//! [`encode_worker`]) into a bounded slot of shared data, and the VM that polls next sends
//! them together ([`compose_report`]) to the control plane, which parses them as untrusted
//! input ([`DiagnosticsReport::parse`]) and answers the CLI with the [`aggregate`].
//!
//! Everything here is sized: a worker's blob is at most [`MAX_WORKER_BYTES`] (endpoints whose
//! breaker is not closed first, the rest cut and counted in `omitted`), a report carries at
//! most [`MAX_WORKERS`] workers and [`MAX_REPORT_BYTES`], and every field has a bound that
//! [`DiagnosticsReport::parse`] checks, naming the field that broke it ([`InvalidReport`]).

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{BreakerState, Health};

/// Largest blob of one worker's diagnostics, in bytes: about 400 endpoints; beyond, the
/// endpoints whose breaker is closed are cut first (counted in
/// [`WorkerDiagnostics::omitted`]).
pub const MAX_WORKER_BYTES: usize = 64 * 1024;

/// Most workers in one report: the filter's shared-data slots. Envoy's `--concurrency`
/// above this leaves the extra workers out of reports.
pub const MAX_WORKERS: usize = 32;

/// Largest report body: every worker's blob at its bound, plus the envelope.
pub const MAX_REPORT_BYTES: usize = MAX_WORKERS * (MAX_WORKER_BYTES + 1) + 1024;

/// Longest service name a request or a report may name (a DNS name's bound).
pub const MAX_SERVICE_BYTES: usize = 253;

/// Longest snapshot version a worker reports; a longer one is left out.
pub const MAX_VERSION_BYTES: usize = 256;

/// Longest ejection reason code.
pub const MAX_REASON_BYTES: usize = 32;

/// Most endpoints one worker's blob can hold (an endpoint takes well over 16 bytes).
pub const MAX_ENDPOINTS_PER_WORKER: usize = MAX_WORKER_BYTES / 16;

/// Longest latency estimate or re-admission wait believed, in ms: a day. Longer is not a
/// value the filter computes.
pub const MAX_MILLIS: u64 = 86_400_000;

/// A breaker's state kind, as reports name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerKind {
    /// Serving normally.
    Closed,
    /// Ejected until its re-admission.
    Open,
    /// Ejection over, probes admitted.
    HalfOpen,
}

impl BreakerKind {
    /// The kind of `state`.
    pub fn of(state: &BreakerState) -> Self {
        match state {
            BreakerState::Closed { .. } => Self::Closed,
            BreakerState::Open { .. } => Self::Open,
            BreakerState::HalfOpen { .. } => Self::HalfOpen,
        }
    }

    /// Its name in tables: `closed`, `open`, `half_open`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// One endpoint as one worker's picker sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointDiagnostics {
    pub address: SocketAddr,
    /// Health from the snapshot.
    pub health: Health,
    /// Weight from the snapshot.
    pub weight: u32,
    /// The breaker's state kind.
    pub breaker: BreakerKind,
    /// Why the breaker opened ([`crate::breaker::EjectionReason::code`]), while not closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The ejection count the breaker remembers (the next lasts longer).
    pub ejections: u32,
    /// How long until the breaker admits again by time alone; `None` when it admits now
    /// (or only an outcome can change it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readmit_in_ms: Option<u64>,
    /// The latency estimate the latency-aware algorithms compare; `None` before an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Requests in flight.
    pub inflight: u32,
    /// Requests picked for it since the worker's previous report.
    pub picks: u64,
    /// Failures in a row as the breaker counts them (the proxy's, when shared).
    pub consecutive_failures: u32,
    /// Requests completed over the breaker's sliding window.
    pub window_requests: u32,
    /// Those that failed.
    pub window_failures: u32,
}

/// One worker's diagnostics of one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerDiagnostics {
    /// The worker's slot in the proxy's shared data: stable while the worker lives.
    pub worker: u32,
    /// The snapshot version the worker applies, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The endpoints, not closed first (see [`crate::ServicePicker::diagnose`]).
    pub endpoints: Vec<EndpointDiagnostics>,
    /// Endpoints left out to keep the blob under [`MAX_WORKER_BYTES`].
    #[serde(default)]
    pub omitted: u32,
}

/// A proxy's report of one service: every worker that answered the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiagnosticsReport {
    /// The service diagnosed.
    pub service: String,
    /// The control plane's request this answers.
    pub request: u64,
    /// Each worker's diagnostics, by slot.
    pub workers: Vec<WorkerDiagnostics>,
}

/// Why a report was refused: the field named, for the control plane's metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReport {
    /// The body is larger than [`MAX_REPORT_BYTES`].
    #[error("the report exceeds {MAX_REPORT_BYTES} bytes")]
    TooLarge,
    /// The body is not a report.
    #[error("the report is not JSON of the expected shape: {0}")]
    Malformed(String),
    /// A field out of its bounds.
    #[error("report field {field} is out of bounds")]
    Field {
        /// The field, as the metric label names it.
        field: &'static str,
    },
}

impl InvalidReport {
    /// The label of `fulcrum_endpoint_reports_rejected_total{reason}`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed(_) => "malformed",
            Self::Field { field } => field,
        }
    }
}

/// Whether `name` is a service name a request or report may carry: 1 to
/// [`MAX_SERVICE_BYTES`] bytes of printable ASCII other than space.
pub fn valid_service(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SERVICE_BYTES
        && name.bytes().all(|byte| byte.is_ascii_graphic())
}

impl DiagnosticsReport {
    /// Parses a report from untrusted `bytes`, checking every bound: a report over
    /// [`MAX_REPORT_BYTES`], malformed, or with any field out of bounds is refused whole.
    pub fn parse(bytes: &[u8]) -> Result<Self, InvalidReport> {
        if bytes.len() > MAX_REPORT_BYTES {
            return Err(InvalidReport::TooLarge);
        }
        let report: Self = serde_json::from_slice(bytes)
            .map_err(|error| InvalidReport::Malformed(error.to_string()))?;
        report.check()?;
        Ok(report)
    }

    /// Checks every field against its bound.
    pub fn check(&self) -> Result<(), InvalidReport> {
        let field = |field| Err(InvalidReport::Field { field });
        if !valid_service(&self.service) {
            return field("service");
        }
        if self.workers.len() > MAX_WORKERS {
            return field("workers");
        }
        let mut slots = self.workers.iter().map(|w| w.worker).collect::<Vec<_>>();
        slots.sort_unstable();
        slots.dedup();
        if slots.len() != self.workers.len()
            || slots
                .last()
                .is_some_and(|last| *last as usize >= MAX_WORKERS)
        {
            return field("worker");
        }
        for worker in &self.workers {
            if worker
                .version
                .as_ref()
                .is_some_and(|version| version.len() > MAX_VERSION_BYTES || !printable(version))
            {
                return field("version");
            }
            if worker.endpoints.len() > MAX_ENDPOINTS_PER_WORKER {
                return field("endpoints");
            }
            for endpoint in &worker.endpoints {
                if endpoint.reason.as_ref().is_some_and(|reason| {
                    reason.is_empty()
                        || reason.len() > MAX_REASON_BYTES
                        || !reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                }) {
                    return field("reason");
                }
                if endpoint.readmit_in_ms.is_some_and(|ms| ms > MAX_MILLIS) {
                    return field("readmit_in_ms");
                }
                if endpoint
                    .latency_ms
                    .is_some_and(|ms| !ms.is_finite() || ms < 0.0 || ms > MAX_MILLIS as f64)
                {
                    return field("latency_ms");
                }
            }
        }
        Ok(())
    }
}

fn printable(text: &str) -> bool {
    text.bytes()
        .all(|byte| byte.is_ascii_graphic() || byte == b' ')
}

/// The diagnostics of the worker in `slot` as a JSON blob of at most `max_bytes` (at least
/// 64): endpoints are taken in order while they fit, the rest counted in `omitted`; a version
/// longer than [`MAX_VERSION_BYTES`], or that would not fit, is left out. Parses back as a [`WorkerDiagnostics`].
pub fn encode_worker(
    slot: u32,
    version: Option<&str>,
    endpoints: &[EndpointDiagnostics],
    max_bytes: usize,
) -> Vec<u8> {
    // The tail: `],"omitted":<u32>}`.
    let tail = "],\"omitted\":4294967295}".len();
    let head = |version: Option<&str>| {
        let mut head = format!("{{\"worker\":{slot}");
        if let Some(version) = version {
            // A string serializes infallibly.
            let quoted = serde_json::to_string(version).unwrap_or_default();
            let _ = write!(head, ",\"version\":{quoted}");
        }
        head.push_str(",\"endpoints\":[");
        head
    };
    let version = version.filter(|v| v.len() <= MAX_VERSION_BYTES && printable(v));
    let mut blob = head(version);
    if blob.len() + tail > max_bytes {
        blob = head(None);
    }
    let mut blob = blob.into_bytes();
    let mut taken = 0;
    for endpoint in endpoints {
        let Ok(item) = serde_json::to_vec(endpoint) else {
            break;
        };
        let comma = usize::from(taken > 0);
        if blob.len() + comma + item.len() + tail > max_bytes {
            break;
        }
        if comma == 1 {
            blob.push(b',');
        }
        blob.extend_from_slice(&item);
        taken += 1;
    }
    let omitted = u32::try_from(endpoints.len() - taken).unwrap_or(u32::MAX);
    blob.extend_from_slice(format!("],\"omitted\":{omitted}}}").as_bytes());
    blob
}

/// The body of a report of `service` answering `request`, from the workers' blobs as
/// [`encode_worker`] wrote them (not parsed again: the control plane checks the whole).
pub fn compose_report<'a>(
    service: &str,
    request: u64,
    blobs: impl IntoIterator<Item = &'a [u8]>,
) -> Vec<u8> {
    let quoted = serde_json::to_string(service).unwrap_or_default();
    let mut body =
        format!("{{\"service\":{quoted},\"request\":{request},\"workers\":[").into_bytes();
    for (i, blob) in blobs.into_iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(blob);
    }
    body.extend_from_slice(b"]}");
    body
}

/// One proxy's view of one service's endpoints, as the control plane serves it
/// (`GET /v1/proxies/{node}/endpoints`) and `fulcrum endpoints` reads it: a stable schema,
/// fields only ever added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointsView {
    /// The proxy's Envoy node id.
    pub node_id: String,
    /// The service diagnosed.
    pub service: String,
    /// The request the report answers.
    pub request: u64,
    /// When the report arrived, ms since the Unix epoch.
    pub received_unix_ms: u64,
    /// Each worker's view, by slot.
    pub workers: Vec<WorkerDiagnostics>,
    /// Each endpoint over every worker, sorted by address.
    pub endpoints: Vec<EndpointAggregate>,
}

/// One endpoint over every worker of a proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointAggregate {
    pub address: SocketAddr,
    /// Health from the snapshot (the first worker's, should workers disagree mid-update).
    pub health: Health,
    /// Weight from the snapshot (likewise).
    pub weight: u32,
    /// Workers that reported the endpoint.
    pub workers: u32,
    /// Of those, the workers whose breaker for it is open.
    pub open_on: u32,
    /// Of those, the workers whose breaker for it is half-open.
    pub half_open_on: u32,
    /// Every reason a worker gives for its breaker, sorted, each once.
    pub reasons: Vec<String>,
    /// The longest wait until a worker re-admits it by time alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readmit_in_ms: Option<u64>,
    /// The mean of the workers' latency estimates, over those that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Requests in flight, over every worker.
    pub inflight: u64,
    /// Picks since the previous report, over every worker.
    pub picks: u64,
    /// Its share of the service's picks since the previous report, 0 to 1 (0 when none).
    pub pick_share: f64,
}

impl EndpointAggregate {
    /// The state to show: `closed` when no worker ejects it, `partly_open` when only some
    /// do, else `open` (or `half_open` when a worker's breaker is probing).
    pub fn state(&self) -> &'static str {
        let ejected = self.open_on.saturating_add(self.half_open_on);
        if ejected == 0 {
            "closed"
        } else if ejected < self.workers {
            "partly_open"
        } else if self.half_open_on == 0 {
            "open"
        } else {
            "half_open"
        }
    }
}

/// Every endpoint the `workers` reported, aggregated, sorted by address.
pub fn aggregate(workers: &[WorkerDiagnostics]) -> Vec<EndpointAggregate> {
    let mut by_address: BTreeMap<SocketAddr, EndpointAggregate> = BTreeMap::new();
    let mut latency_sums: BTreeMap<SocketAddr, (f64, u32)> = BTreeMap::new();
    for endpoint in workers.iter().flat_map(|worker| &worker.endpoints) {
        let entry = by_address
            .entry(endpoint.address)
            .or_insert_with(|| EndpointAggregate {
                address: endpoint.address,
                health: endpoint.health,
                weight: endpoint.weight,
                workers: 0,
                open_on: 0,
                half_open_on: 0,
                reasons: Vec::new(),
                readmit_in_ms: None,
                latency_ms: None,
                inflight: 0,
                picks: 0,
                pick_share: 0.0,
            });
        entry.workers = entry.workers.saturating_add(1);
        match endpoint.breaker {
            BreakerKind::Closed => {}
            BreakerKind::Open => entry.open_on = entry.open_on.saturating_add(1),
            BreakerKind::HalfOpen => entry.half_open_on = entry.half_open_on.saturating_add(1),
        }
        if let Some(reason) = &endpoint.reason
            && !entry.reasons.contains(reason)
        {
            entry.reasons.push(reason.clone());
            entry.reasons.sort();
        }
        entry.readmit_in_ms = entry.readmit_in_ms.max(endpoint.readmit_in_ms);
        if let Some(latency) = endpoint.latency_ms {
            let sum = latency_sums.entry(endpoint.address).or_default();
            sum.0 += latency;
            sum.1 += 1;
        }
        entry.inflight = entry.inflight.saturating_add(u64::from(endpoint.inflight));
        entry.picks = entry.picks.saturating_add(endpoint.picks);
    }
    let total_picks = by_address
        .values()
        .fold(0u64, |sum, entry| sum.saturating_add(entry.picks));
    for (address, entry) in &mut by_address {
        if let Some((sum, count)) = latency_sums.get(address) {
            entry.latency_ms = Some(sum / f64::from(*count));
        }
        if total_picks > 0 {
            entry.pick_share = entry.picks as f64 / total_picks as f64;
        }
    }
    by_address.into_values().collect()
}

#[cfg(test)]
mod tests;
