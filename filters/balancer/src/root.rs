//! The root context: configuration, snapshot polling and sharing, request contexts.
//!
//! `on_configure` parses and validates the plugin configuration and refuses to start with
//! every error logged. With static endpoints the snapshot is built right there. With a control
//! plane, `on_tick` (every VM) takes part in the poll lease, fetches `GET <path>` when it wins
//! (`If-None-Match` naming the published version, `Accept` taking deltas:
//! `fulcrum_core::distribution`), publishes what changed one key per service
//! (`crate::shared_snapshot`), and applies any newer published version by reading, parsing
//! and rebuilding only the services whose content changed (`fulcrum_core::mesh`); an invalid
//! or failed fetch is logged and counted and the last good snapshot stays in force, and so
//! does one whose tables exceed `max_table_bytes` and one that shared data holds corrupted
//! (counted each tick, logged once per distinct failure). Answers are taken from one
//! control-plane replica at a time (`fulcrum_core::replica`), so a proxy never alternates
//! between two replicas' views. Each
//! poll also names the proxy (its Envoy node id and cluster, read once here) and the last
//! snapshot it refused (`crate::report`), for the control plane's `GET /v1/proxies`. An
//! answer may ask for a service's endpoint diagnostics (`crate::diagnostics`): every serving
//! VM writes its own on its tick, and the VM holding the poll lease posts them together.
//!
//! Every VM ticks at least every [`EJECTION_SYNC_PERIOD`], static endpoints or not, and, once
//! it has served a request (so not Envoy's main-thread VM), applies the ejections other
//! workers shared (`crate::sync`) and flushes the picks it counted to Envoy's stats. The
//! proxy's zone and region come from its Envoy node's locality, read once in `on_configure`
//! ([`crate::input::node_locality`]); a `locality.local_zone` or `locality.local_region` in
//! the policy overrides them.
//!
//! Every request gets a context, even before (or without) a valid configuration: the SDK
//! panics when `create_http_context` returns `None`, so an unconfigured VM hands out
//! [`PassThrough`] contexts that still strip the override header.

use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use fulcrum_core::{
    ServiceEndpoints, Snapshot,
    distribution::DELTA_ACCEPT,
    replica::{self, Followed, Verdict},
    rng::{Rng, SplitMix64, vm_seed},
    select::hash::hash_bytes,
};
use proxy_wasm::{
    hostcalls,
    traits::{Context, HttpContext, RootContext},
    types::{BufferType, ContextType, MapType},
};

use crate::{
    config::{ControlPlane, DEFAULT_OVERRIDE_HEADER, FilterConfig},
    diagnostics::{DIAGNOSE_HEADER, DIAGNOSTICS_PATH, DiagnoseRequest, SharedDiagnostics},
    http::{PassThrough, Request},
    input::{self, NodeIdentity},
    log_debug, log_error, log_info, log_warn,
    metrics::Metrics,
    now,
    report::{REJECTED_HEADER, RejectionReason, rejected_value},
    shared_snapshot::{PublishError, Published, ReadError, SharedSnapshot},
    sync::SharedKeys,
    worker::Worker,
};

/// The header in which the control plane names the replica that answered.
const REPLICA_HEADER: &str = "x-fulcrum-replica";

/// The longest a VM goes without applying the ejections other workers shared: the tick
/// period, or the control plane's poll interval when that is shorter.
pub const EJECTION_SYNC_PERIOD: Duration = Duration::from_secs(1);

/// The version given to a snapshot built from the configuration's static endpoints.
const STATIC_VERSION: &str = "static";

/// One VM's root context.
#[derive(Debug)]
pub struct Root {
    /// The root context id, mixed into the random seed so VMs do not pick in lockstep.
    context_id: u32,
    /// The VM's stats, defined with the root so an unconfigured VM can count too.
    metrics: Rc<Metrics>,
    /// The override header to strip: the configured one as soon as a configuration parsed,
    /// else the default.
    override_header: Rc<str>,
    /// Set by a successful `on_configure`; `None` before (requests then pass through).
    configured: Option<Configured>,
}

impl Root {
    pub fn new(context_id: u32) -> Self {
        Self {
            context_id,
            metrics: Rc::new(Metrics::new()),
            override_header: Rc::from(DEFAULT_OVERRIDE_HEADER),
            configured: None,
        }
    }
}

#[derive(Debug)]
struct Configured {
    config: Rc<FilterConfig>,
    worker: Rc<RefCell<Worker>>,
    keys: SharedKeys,
    /// The snapshot as the plugin's VMs share it.
    snapshot: SharedSnapshot,
    /// The token of the snapshot request in flight, if this VM holds the lease.
    pending_poll: Option<u32>,
    /// The token of the endpoint-diagnostics report in flight, if this VM sent one.
    pending_report: Option<u32>,
    /// This VM's part in endpoint diagnostics: its slot, the requests it answered.
    diagnostics: SharedDiagnostics,
    /// The Envoy node's id and cluster, named in every poll; read once, with a control plane.
    identity: NodeIdentity,
    /// A hash of the last invalid-published-snapshot error logged, so that one corruption
    /// is logged once rather than on every tick (it is counted on every tick).
    invalid_read_logged: Cell<Option<u64>>,
    /// Whether this VM has handed out a request context: only then does it apply shared
    /// ejections. Envoy's main-thread VM ticks but never serves, so it stays out (and out of
    /// the circuit-open gauge, which counts the VMs that avoid an endpoint).
    serving: Cell<bool>,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(configured) = &mut self.configured else {
            return;
        };
        if configured.pending_report == Some(token) {
            configured.pending_report = None;
            configured.on_report_response(headers);
            return;
        }
        if configured.pending_poll != Some(token) {
            return;
        }
        configured.pending_poll = None;
        if let Some(control_plane) = &configured.config.control_plane {
            configured.on_snapshot_response(control_plane, headers, body_size);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _configuration_size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match FilterConfig::parse(&bytes) {
            Ok(config) => config,
            Err(error) => {
                for line in error.to_string().lines() {
                    log_error(line);
                }
                return false;
            }
        };
        self.override_header = Rc::from(config.override_header.as_str());
        let seed = vm_seed(now(), self.context_id);
        let session_keys = config.session_keys();
        if session_keys.is_public_default() && uses_sticky_sessions(&config.policy) {
            log_warn(
                "sticky sessions without session_keys: cookies use a public key, so a client can forge one for an address it guesses; set session_keys",
            );
        }
        let root_id = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .unwrap_or_default();
        let keys = SharedKeys::new(&root_id);
        let node_locality = input::node_locality(&self.metrics);
        match &node_locality.zone {
            Some(zone) => log_info(&format!(
                "node zone {}: preferred by every service whose policy names no local_zone",
                zone.escape_debug()
            )),
            None => log_info("the node has no zone: zone preference needs a policy local_zone"),
        }
        match &node_locality.region {
            Some(region) => log_info(&format!(
                "node region {}: preferred by every service whose policy names no local_region",
                region.escape_debug()
            )),
            None => {
                log_info("the node has no region: region preference needs a policy local_region")
            }
        }
        let worker = Rc::new(RefCell::new(Worker::new(
            config.policy.clone(),
            node_locality,
            session_keys,
            keys.clone(),
            config.max_table_bytes,
            seed,
            self.metrics.clone(),
        )));
        let identity = match &config.control_plane {
            Some(_) => input::node_identity(&self.metrics),
            None => NodeIdentity::default(),
        };
        let configured = Configured {
            config: Rc::new(config),
            worker,
            keys,
            snapshot: SharedSnapshot::new(&root_id),
            pending_poll: None,
            pending_report: None,
            diagnostics: SharedDiagnostics::new(&root_id, SplitMix64::new(!seed).next_u64()),
            identity,
            invalid_read_logged: Cell::new(None),
            serving: Cell::new(false),
        };
        match &configured.config.control_plane {
            None => {
                let snapshot = Snapshot {
                    version: STATIC_VERSION.to_owned(),
                    services: static_services(&configured.config),
                    policy: None,
                };
                // Validation checked the static endpoints' tables against the budget.
                if let Err(error) = configured.worker.borrow_mut().apply_whole(&snapshot) {
                    log_error(&error.to_string());
                    return false;
                }
                if hostcalls::set_tick_period(EJECTION_SYNC_PERIOD).is_err() {
                    log_warn("could not set the tick period; ejections will not be shared");
                }
                log_info(&format!(
                    "configured with static endpoints for {} service(s)",
                    snapshot.services.len()
                ));
            }
            Some(control_plane) => {
                let period = control_plane.poll_interval.min(EJECTION_SYNC_PERIOD);
                if hostcalls::set_tick_period(period).is_err() {
                    log_error("could not set the tick period; snapshots will not be polled");
                    return false;
                }
                configured.apply_published();
                log_info(&format!(
                    "configured to poll {} on cluster {} every {:?}",
                    control_plane.path, control_plane.cluster, control_plane.poll_interval
                ));
            }
        }
        self.configured = Some(configured);
        true
    }

    fn on_tick(&mut self) {
        let Some(configured) = &mut self.configured else {
            return;
        };
        let control_plane = configured.config.control_plane.clone();
        let mut lease_won = false;
        if let Some(control_plane) = &control_plane {
            lease_won = configured.poll_if_lease_won(control_plane);
            configured.apply_published();
        }
        if configured.serving.get()
            && let Ok(mut worker) = configured.worker.try_borrow_mut()
        {
            worker.adopt_shared_ejections(now());
            worker.flush_metrics();
            if control_plane.is_some() {
                configured.diagnostics.tick(&mut worker, now());
            }
        }
        if let Some(control_plane) = &control_plane
            && lease_won
        {
            configured.report_diagnostics(control_plane);
        }
    }

    /// Always a context: `None` would panic the SDK's dispatcher.
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(match &self.configured {
            Some(configured) => Box::new(configured.request(&self.metrics)),
            None => Box::new(PassThrough::new(
                self.override_header.clone(),
                self.metrics.clone(),
            )),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Configured {
    /// A request context; the VM's first also catches up with the ejections shared so far.
    fn request(&self, metrics: &Rc<Metrics>) -> Request {
        if !self.serving.replace(true)
            && let Ok(mut worker) = self.worker.try_borrow_mut()
        {
            worker.adopt_shared_ejections(now());
        }
        Request::new(self.config.clone(), self.worker.clone(), metrics.clone())
    }

    /// Polls the control plane when this VM wins the poll lease; whether it won.
    fn poll_if_lease_won(&mut self, control_plane: &ControlPlane) -> bool {
        if self.pending_poll.is_some()
            || !self
                .snapshot
                .try_take_lease(now(), control_plane.poll_interval)
        {
            return false;
        }
        // The version the proxy's shared snapshot is at, so the control plane can answer with
        // what changed since; none when keys may be ahead of the index (a whole snapshot then).
        let version = (!self.snapshot.needs_whole(now()))
            .then(|| self.snapshot.published_version())
            .flatten()
            .map(|version| format!("\"{}\"", version.escape_ascii()));
        let mut headers = vec![
            (":method", "GET"),
            (":path", control_plane.path.as_str()),
            (":authority", control_plane.authority.as_str()),
            ("accept", DELTA_ACCEPT),
        ];
        if let Some(version) = &version {
            headers.push(("if-none-match", version.as_str()));
        }
        headers.extend(self.identity.headers());
        let rejected = self.keys.last_rejection();
        if let Some(rejected) = &rejected {
            headers.push((REJECTED_HEADER, rejected.as_str()));
        }
        match hostcalls::dispatch_http_call(
            &control_plane.cluster,
            headers,
            None,
            vec![],
            control_plane.timeout,
        ) {
            Ok(token) => self.pending_poll = Some(token),
            Err(status) => {
                self.worker.borrow().metrics().snapshot_fetch_failed();
                log_warn(&format!(
                    "could not request a snapshot from cluster {}: {status:?} (is the cluster defined?)",
                    control_plane.cluster
                ));
            }
        }
        true
    }

    /// Sends the endpoint-diagnostics report due, if one is (`crate::diagnostics`): called
    /// by the VM holding the poll lease, so one VM of the proxy reports.
    fn report_diagnostics(&mut self, control_plane: &ControlPlane) {
        if self.pending_report.is_some() {
            return;
        }
        let Some(body) = self.diagnostics.collect(now()) else {
            return;
        };
        let mut headers = vec![
            (":method", "POST"),
            (":path", DIAGNOSTICS_PATH),
            (":authority", control_plane.authority.as_str()),
            ("content-type", "application/json"),
        ];
        headers.extend(self.identity.headers());
        match hostcalls::dispatch_http_call(
            &control_plane.cluster,
            headers,
            Some(&body),
            vec![],
            control_plane.timeout,
        ) {
            Ok(token) => self.pending_report = Some(token),
            Err(status) => {
                self.worker.borrow().metrics().diagnostics_report_failed();
                log_warn(&format!(
                    "could not send endpoint diagnostics to cluster {}: {status:?}",
                    control_plane.cluster
                ));
            }
        }
    }

    /// Counts the control plane's answer to a diagnostics report (headers are read only when
    /// there are some: see [`Self::on_snapshot_response`]).
    fn on_report_response(&self, headers: usize) {
        let status = if headers == 0 {
            None
        } else {
            hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
                .ok()
                .flatten()
        };
        let metrics = self.worker.borrow().metrics().clone();
        if status
            .as_deref()
            .is_some_and(|status| status.starts_with(b"2"))
        {
            metrics.diagnostics_report_sent();
        } else {
            metrics.diagnostics_report_failed();
            log_warn(&format!(
                "endpoint diagnostics report answered {}",
                describe_status(status.as_deref())
            ));
        }
    }

    /// Records the diagnostics request a snapshot answer carries, if any.
    fn note_diagnose_request(&self) {
        let Some(request) =
            hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, DIAGNOSE_HEADER)
                .ok()
                .flatten()
                .and_then(|value| DiagnoseRequest::parse_header(&value))
        else {
            return;
        };
        self.diagnostics.record(request, now());
    }

    /// Handles the answer to a snapshot request. `headers == 0` means the call was reset and
    /// there is no response: Envoy then answers `BadArgument` to any header read, which the
    /// SDK turns into a panic, so headers are read only when there are some, and as bytes.
    fn on_snapshot_response(&self, control_plane: &ControlPlane, headers: usize, body_size: usize) {
        let status = if headers == 0 {
            None
        } else {
            hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
                .ok()
                .flatten()
        };
        let metrics = self.worker.borrow().metrics().clone();
        if matches!(status.as_deref(), Some(b"200" | b"304")) {
            if !self.answered_by_followed_replica(control_plane, &metrics) {
                return;
            }
            self.note_diagnose_request();
        }
        let kept = || self.worker.borrow().version().map(str::to_owned);
        match status.as_deref() {
            Some(b"304") => {}
            Some(b"200") if body_size > control_plane.max_snapshot_bytes => {
                metrics.snapshot_rejected();
                self.record_rejection(RejectionReason::TooLarge, answer_version().as_deref());
                log_error(&format!(
                    "snapshot of {body_size} bytes exceeds control_plane.max_snapshot_bytes ({}); keeping version {:?}",
                    control_plane.max_snapshot_bytes,
                    kept()
                ));
            }
            Some(b"200") => {
                let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                let published = self.snapshot.publish(&body, now());
                // The body goes before the VM applies its own copy: wasm memory never shrinks,
                // so the whole answer held through the apply raised the VM's memory for good.
                drop(body);
                match published {
                    Ok(published) => {
                        log_debug(&format!(
                            "published snapshot version {}: {} service key(s) written",
                            published.version, published.written
                        ));
                        self.report_left_out(&published, &metrics);
                        self.apply_published();
                    }
                    Err(error @ PublishError::Malformed(_)) => {
                        metrics.snapshot_rejected();
                        self.record_rejection(
                            RejectionReason::Malformed,
                            answer_version().as_deref(),
                        );
                        log_error(&format!(
                            "rejected snapshot, keeping version {:?}: {error}",
                            kept()
                        ));
                    }
                    Err(error) => {
                        metrics.snapshot_fetch_failed();
                        log_warn(&format!(
                            "snapshot not published, keeping version {:?}: {error}; asking again next poll",
                            kept()
                        ));
                    }
                }
            }
            other => {
                metrics.snapshot_fetch_failed();
                log_warn(&format!(
                    "snapshot request to cluster {} answered {}; keeping version {:?}",
                    control_plane.cluster,
                    describe_status(other),
                    kept()
                ));
            }
        }
    }

    /// Whether to use a snapshot answer, by the replica it names (`fulcrum_core::replica`):
    /// answers from the followed replica refresh when it was last heard; another replica's
    /// are left until the followed one has been silent for `failover_after`.
    fn answered_by_followed_replica(
        &self,
        control_plane: &ControlPlane,
        metrics: &Metrics,
    ) -> bool {
        let from = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, REPLICA_HEADER)
            .ok()
            .flatten();
        let now = now();
        let followed = self.keys.followed();
        let verdict = replica::judge(
            followed.as_ref(),
            from.as_deref(),
            now,
            control_plane.failover_after,
        );
        match (verdict, from) {
            (Verdict::Ignore, _) => {
                metrics.snapshot_other_replica();
                false
            }
            (_, None) => true,
            (verdict, Some(from)) => {
                let next = Followed::new(&from, now);
                if verdict == Verdict::FailOver {
                    metrics.snapshot_replica_failover();
                    log_warn(&format!(
                        "control-plane replica {} silent for {:?} or more; following {}",
                        followed
                            .as_ref()
                            .map_or_else(String::new, |f| describe_bytes(&f.replica)),
                        control_plane.failover_after,
                        describe_bytes(&next.replica),
                    ));
                }
                if self.keys.follow(&next).is_err() {
                    log_warn("could not record the followed control-plane replica in shared data");
                }
                true
            }
        }
    }

    /// Logs and counts what publishing left out: invalid services, a refused policy, and
    /// records it for the next poll to report. Only the VM that fetched the answer does, so
    /// each is counted once per proxy.
    fn report_left_out(&self, published: &Published, metrics: &Metrics) {
        for skipped in &published.skipped {
            metrics.snapshot_service_skipped();
            log_error(&format!(
                "snapshot {}: left out service {}: {}",
                published.version, skipped.service, skipped.reason
            ));
        }
        if !published.skipped.is_empty() {
            self.record_rejection(
                RejectionReason::ServiceInvalid,
                Some(published.version.as_bytes()),
            );
        }
        if let Some(reason) = &published.policy_error {
            metrics.snapshot_policy_rejected();
            self.record_rejection(
                RejectionReason::PolicyInvalid,
                Some(published.version.as_bytes()),
            );
            log_error(&format!(
                "snapshot {}: refused its policy, keeping the one in force: {reason}",
                published.version
            ));
        }
    }

    /// Records a refused snapshot in shared data, for the next poll of any VM to report.
    fn record_rejection(&self, reason: RejectionReason, version: Option<&[u8]>) {
        if self
            .keys
            .record_rejection(&rejected_value(reason, version))
            .is_err()
        {
            log_warn("could not record a refused snapshot in shared data");
        }
    }

    /// Applies the published snapshot when its version differs from ours: only the services
    /// whose content changed are read, parsed and rebuilt (`crate::shared_snapshot`).
    fn apply_published(&self) {
        let Some(published) = self.snapshot.published_version() else {
            return;
        };
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            return;
        };
        if worker.version().map(str::as_bytes) == Some(published.as_slice())
            || worker.refused(&published)
        {
            return;
        }
        let read = self.snapshot.read_change(worker.services());
        if read.is_ok() {
            self.invalid_read_logged.set(None);
        }
        let change = match read {
            Ok(Some(change)) => change,
            Ok(None) => return,
            Err(error @ ReadError::Torn(_)) => {
                worker.metrics().snapshot_torn_read();
                log_debug(&error.to_string());
                return;
            }
            Err(error @ ReadError::Invalid(_)) => {
                worker.metrics().snapshot_invalid_read();
                let message = error.to_string();
                let seen = hash_bytes(message.as_bytes());
                if self.invalid_read_logged.replace(Some(seen)) != Some(seen) {
                    log_error(&format!(
                        "{message}; keeping version {:?} (logged once until the failure changes)",
                        worker.version()
                    ));
                }
                return;
            }
        };
        let version = change.version.clone();
        let parsed = change.upserted.len();
        match worker.apply(change) {
            Ok(_) => {
                let metrics = worker.metrics();
                metrics.snapshot_services_parsed(parsed);
                metrics.snapshot_updated();
                log_info(&format!(
                    "applied snapshot version {version} ({parsed} service(s) changed)"
                ));
            }
            Err(error) => {
                worker.metrics().snapshot_over_table_budget();
                self.record_rejection(RejectionReason::OverTableBudget, Some(version.as_bytes()));
                log_error(&format!(
                    "refused snapshot version {version}, keeping version {:?}: {error}",
                    worker.version()
                ));
            }
        }
    }
}

/// The version an answer names in its `ETag` (quotes stripped), read only when the answer is
/// refused.
fn answer_version() -> Option<Vec<u8>> {
    let etag = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, "etag")
        .ok()
        .flatten()?;
    let unquoted = etag
        .strip_prefix(b"\"")
        .and_then(|rest| rest.strip_suffix(b"\""))
        .unwrap_or(&etag);
    Some(unquoted.to_vec())
}

/// A `:status` for a log line: escaped and cut short, as it comes from the network.
fn describe_status(status: Option<&[u8]>) -> String {
    match status {
        None => "no response (reset)".to_owned(),
        Some(bytes) => format!("status \"{}\"", describe_bytes(bytes)),
    }
}

/// Bytes from the network for a log line: escaped and cut short.
fn describe_bytes(bytes: &[u8]) -> String {
    const SHOWN: usize = 64;
    let shown = bytes.get(..SHOWN).unwrap_or(bytes);
    let ellipsis = if bytes.len() > SHOWN { "…" } else { "" };
    format!("{}{ellipsis}", shown.escape_ascii())
}

/// Whether any service of `policy` keeps sticky sessions.
fn uses_sticky_sessions(policy: &fulcrum_core::Policy) -> bool {
    std::iter::once(&policy.default)
        .chain(policy.services.values())
        .any(|service| matches!(service.load_balancer, fulcrum_core::LoadBalancer::Sticky(_)))
}

fn static_services(config: &FilterConfig) -> BTreeMap<String, Arc<ServiceEndpoints>> {
    config
        .endpoints
        .iter()
        .map(|(name, endpoints)| {
            (
                name.clone(),
                Arc::new(ServiceEndpoints {
                    endpoints: endpoints.clone(),
                    protocol: None,
                }),
            )
        })
        .collect()
}
