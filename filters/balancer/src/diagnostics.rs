//! Endpoint diagnostics on demand (issue #17, `fulcrum endpoints`): what every worker VM of
//! the proxy believes about each endpoint of one service, sent to the control plane when it
//! asks, never continuously.
//!
//! 1. **The request.** The control plane names a service in its answer to a snapshot poll,
//!    [`DIAGNOSE_HEADER`]` = <request id> <service>` (from the followed replica only). The VM
//!    that polled writes it to `fulcrum/<root_id>/diagnostics/request` (id, when, service).
//! 2. **The answers.** Every serving VM holds one of [`MAX_WORKERS`] slots
//!    (`…/diagnostics/slot/<i>/owner`: a random token and a heartbeat, rewritten each tick).
//!    A VM claims a slot with compare-and-swap: a slot never used, or one whose owner has not
//!    heart-beaten for [`SLOT_EXPIRY`] (a VM that went: shared data cannot delete keys, so
//!    slots are reused rather than added). A VM that finds its slot taken over claims another.
//!    With every slot live, a VM has none and stays out of reports
//!    (`fulcrum_diagnostics_no_slot_total`). On its tick, a VM holding a slot that sees a
//!    request it has not answered writes its diagnostics of the service
//!    ([`fulcrum_core::ServicePicker::diagnose`]) to `…/slot/<i>/blob`: the request id, then
//!    a JSON blob of at most [`MAX_WORKER_BYTES`] ([`fulcrum_core::diagnostics::encode_worker`]).
//! 3. **The report.** The VM that next holds the poll lease collects, once every live slot has
//!    answered or [`COLLECT_AFTER`] has passed since the request, the blobs of that request,
//!    and `POST`s them ([`fulcrum_core::diagnostics::compose_report`], at most
//!    [`fulcrum_core::diagnostics::MAX_REPORT_BYTES`]) to [`DIAGNOSTICS_PATH`] on the control
//!    plane's cluster, naming the node as a poll does; `…/diagnostics/sent` records the
//!    request reported, so it is sent once.
//!
//! Everything read back from shared data is checked for length and format, and a value that
//! does not fit is ignored: another module of the plugin (during an update) may write the same
//! keys. A control plane older than this never sends the header, and one that sends it to an
//! older filter gets no report (its CLI says so).

use fulcrum_core::duration::nanos;
use std::time::Duration;

use fulcrum_core::diagnostics::{
    MAX_SERVICE_BYTES, MAX_WORKER_BYTES, MAX_WORKERS, compose_report, encode_worker, valid_service,
};
use proxy_wasm::hostcalls;

use crate::{log_warn, metrics::Metrics, worker::Worker};

/// The snapshot-answer header in which the control plane asks for a service's diagnostics.
pub const DIAGNOSE_HEADER: &str = "x-fulcrum-diagnose";

/// Where reports are posted on the control plane's cluster.
pub const DIAGNOSTICS_PATH: &str = "/v1/diagnostics";

/// A slot whose owner has not heart-beaten for this long is free: ten ticks.
pub const SLOT_EXPIRY: Duration = Duration::from_secs(10);

/// How long the reporting VM waits for every live slot to answer a request before it sends
/// what it has: two ticks.
pub const COLLECT_AFTER: Duration = Duration::from_secs(2);

/// A service's diagnostics asked for by the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagnoseRequest {
    /// The control plane's request id, echoed in the report.
    pub id: u64,
    /// The service to diagnose.
    pub service: String,
}

impl DiagnoseRequest {
    /// Parses a [`DIAGNOSE_HEADER`] value, `<id> <service>` (decimal id, service name of
    /// printable ASCII): anything else is no request.
    pub fn parse_header(value: &[u8]) -> Option<Self> {
        if value.len() > 21 + MAX_SERVICE_BYTES {
            return None;
        }
        let text = std::str::from_utf8(value).ok()?;
        let (id, service) = text.split_once(' ')?;
        let id = id.parse().ok()?;
        valid_service(service).then(|| Self {
            id,
            service: service.to_owned(),
        })
    }
}

/// The request as stored in shared data: id, when it arrived (ns since the Unix epoch),
/// service.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    request: DiagnoseRequest,
    at: Duration,
}

impl Stored {
    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(16 + self.request.service.len());
        bytes.extend_from_slice(&self.request.id.to_le_bytes());
        bytes.extend_from_slice(&nanos(self.at).to_le_bytes());
        bytes.extend_from_slice(self.request.service.as_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (id, rest) = bytes.split_first_chunk::<8>()?;
        let (at, service) = rest.split_first_chunk::<8>()?;
        let service = std::str::from_utf8(service).ok()?;
        valid_service(service).then(|| Self {
            request: DiagnoseRequest {
                id: u64::from_le_bytes(*id),
                service: service.to_owned(),
            },
            at: Duration::from_nanos(u64::from_le_bytes(*at)),
        })
    }
}

/// A slot owner: its token and last heartbeat.
fn owner(bytes: &[u8]) -> Option<(u64, Duration)> {
    let (token, heartbeat) = bytes.split_first_chunk::<8>()?;
    let heartbeat: [u8; 8] = heartbeat.try_into().ok()?;
    Some((
        u64::from_le_bytes(*token),
        Duration::from_nanos(u64::from_le_bytes(heartbeat)),
    ))
}

/// This VM's part in endpoint diagnostics (see the module docs).
#[derive(Debug)]
pub struct SharedDiagnostics {
    request: String,
    sent: String,
    /// `…/diagnostics/slot/`, to which `<i>/owner` or `<i>/blob` is appended.
    slots: String,
    /// This VM's owner token: random, so a VM that restarts is a new owner.
    token: u64,
    /// The slot this VM holds, if any.
    slot: Option<u32>,
    /// The last request this VM answered.
    answered: Option<u64>,
    /// Whether a full set of slots was logged already (logged once per VM).
    full_logged: bool,
}

impl SharedDiagnostics {
    /// The diagnostics keys of plugin `root_id`, for a VM whose owner token is `token`.
    pub fn new(root_id: &str, token: u64) -> Self {
        let prefix = format!("fulcrum/{root_id}/diagnostics/");
        Self {
            request: format!("{prefix}request"),
            sent: format!("{prefix}sent"),
            slots: format!("{prefix}slot/"),
            token,
            slot: None,
            answered: None,
            full_logged: false,
        }
    }

    fn owner_key(&self, slot: u32) -> String {
        format!("{}{slot}/owner", self.slots)
    }

    fn blob_key(&self, slot: u32) -> String {
        format!("{}{slot}/blob", self.slots)
    }

    fn stored(&self) -> Option<Stored> {
        Stored::decode(&hostcalls::get_shared_data(&self.request).ok()?.0?)
    }

    /// Records `request`, arrived at `now`, for every VM to answer; a request already
    /// recorded keeps its time.
    pub fn record(&self, request: DiagnoseRequest, now: Duration) {
        if self
            .stored()
            .is_some_and(|stored| stored.request.id == request.id)
        {
            return;
        }
        let stored = Stored { request, at: now };
        if hostcalls::set_shared_data(&self.request, Some(&stored.encode()), None).is_err() {
            log_warn("could not record the control plane's diagnostics request in shared data");
        }
    }

    /// Keeps this VM's slot (claiming one when it has none, or lost its own) and, when a
    /// request is waiting that it has not answered, writes its diagnostics of the service.
    pub fn tick(&mut self, worker: &mut Worker, now: Duration) {
        let Some(slot) = self.heartbeat(now, worker.metrics()) else {
            return;
        };
        let Some(stored) = self.stored() else {
            return;
        };
        let id = stored.request.id;
        if self.answered == Some(id) {
            return;
        }
        self.answered = Some(id);
        let endpoints = worker
            .diagnose(&stored.request.service, now)
            .unwrap_or_default();
        let mut value = id.to_le_bytes().to_vec();
        value.extend(encode_worker(
            slot,
            worker.version(),
            &endpoints,
            MAX_WORKER_BYTES,
        ));
        if hostcalls::set_shared_data(&self.blob_key(slot), Some(&value), None).is_err() {
            log_warn("could not write this worker's endpoint diagnostics to shared data");
        }
    }

    /// Renews this VM's slot, or claims one; the slot held after.
    fn heartbeat(&mut self, now: Duration, metrics: &Metrics) -> Option<u32> {
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&self.token.to_le_bytes());
        value[8..].copy_from_slice(&nanos(now).to_le_bytes());
        if let Some(slot) = self.slot {
            let key = self.owner_key(slot);
            if let Ok((Some(bytes), cas)) = hostcalls::get_shared_data(&key)
                && owner(&bytes).is_some_and(|(token, _)| token == self.token)
                && hostcalls::set_shared_data(&key, Some(&value), cas).is_ok()
            {
                return Some(slot);
            }
            // Taken over while this VM did not tick: claim another.
            self.slot = None;
            self.answered = None;
        }
        for slot in 0..MAX_WORKERS as u32 {
            let key = self.owner_key(slot);
            let Ok((bytes, cas)) = hostcalls::get_shared_data(&key) else {
                continue;
            };
            let free = bytes
                .as_deref()
                .and_then(owner)
                .is_none_or(|(_, heartbeat)| heartbeat.saturating_add(SLOT_EXPIRY) <= now);
            if free
                && hostcalls::set_shared_data(&key, Some(&value), Some(cas.unwrap_or(0))).is_ok()
            {
                self.slot = Some(slot);
                return Some(slot);
            }
        }
        metrics.diagnostics_no_slot();
        if !self.full_logged {
            self.full_logged = true;
            log_warn(&format!(
                "all {MAX_WORKERS} endpoint-diagnostics slots are held by live workers: this worker stays out of fulcrum endpoints reports"
            ));
        }
        None
    }

    /// The body of the report due at `now`, if one is: a request not yet sent, once every
    /// live slot answered it or [`COLLECT_AFTER`] passed. Marks it sent.
    pub fn collect(&self, now: Duration) -> Option<Vec<u8>> {
        let stored = self.stored()?;
        let id = stored.request.id;
        let (sent, cas) = hostcalls::get_shared_data(&self.sent).ok()?;
        if sent.as_deref() == Some(&id.to_le_bytes()[..]) {
            return None;
        }
        let waited = now.saturating_sub(stored.at) >= COLLECT_AFTER;
        let mut blobs = Vec::new();
        for slot in 0..MAX_WORKERS as u32 {
            let live = hostcalls::get_shared_data(&self.owner_key(slot))
                .ok()
                .and_then(|(bytes, _)| owner(&bytes?))
                .is_some_and(|(_, heartbeat)| heartbeat.saturating_add(SLOT_EXPIRY) > now);
            if !live {
                continue;
            }
            let blob = hostcalls::get_shared_data(&self.blob_key(slot))
                .ok()
                .and_then(|(bytes, _)| bytes)
                .filter(|bytes| bytes.len() <= 8 + MAX_WORKER_BYTES)
                .and_then(|bytes| {
                    let (answered, json) = bytes.split_first_chunk::<8>()?;
                    (u64::from_le_bytes(*answered) == id).then(|| json.to_vec())
                });
            match blob {
                Some(blob) => blobs.push(blob),
                None if waited => {}
                None => return None,
            }
        }
        hostcalls::set_shared_data(&self.sent, Some(&id.to_le_bytes()), cas).ok()?;
        Some(compose_report(
            &stored.request.service,
            id,
            blobs.iter().map(Vec::as_slice),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_header_is_an_id_and_a_service_name() {
        assert_eq!(
            DiagnoseRequest::parse_header(b"42 checkout.shop"),
            Some(DiagnoseRequest {
                id: 42,
                service: "checkout.shop".to_owned()
            })
        );
        for bad in [
            &b"checkout"[..],
            b"x checkout",
            b"42 ",
            b"42 two words",
            b"-1 checkout",
            b"42 caf\xc3\xa9",
        ] {
            assert_eq!(DiagnoseRequest::parse_header(bad), None, "{bad:?}");
        }
        let long = format!("1 {}", "s".repeat(MAX_SERVICE_BYTES + 1));
        assert_eq!(DiagnoseRequest::parse_header(long.as_bytes()), None);
    }

    #[test]
    fn a_stored_request_reads_back_and_bytes_of_another_shape_do_not() {
        let stored = Stored {
            request: DiagnoseRequest {
                id: 7,
                service: "cart".to_owned(),
            },
            at: Duration::from_secs(3),
        };
        assert_eq!(Stored::decode(&stored.encode()), Some(stored));
        assert_eq!(Stored::decode(b"short"), None);
        assert_eq!(Stored::decode(&[0; 16]), None, "no service");
    }
}
