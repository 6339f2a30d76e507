//! The Aggregated Discovery Service: CDS and EDS over one gRPC stream per Envoy, in both
//! the state of the world (`StreamAggregatedResources`) and the incremental
//! (`DeltaAggregatedResources`) variants.
//!
//! Follows go-control-plane's `pkg/server/v3`: the server reads snapshots the cache
//! published and never builds a resource. Each stream runs one task that owns its protocol
//! state (the `sotw` and `delta` modules, both pure) and reacts to two inputs: Envoy's
//! requests and new snapshots. ACKs, NACKs and pushes are recorded in the [`NodeRegistry`] and the
//! [`XdsMetrics`].
//!
//! Each response is an `xds_push` span (node, resource type, version, nonce, resource count)
//! and Envoy's answer to it an `xds_ack` or `xds_nack` span, its child. A push a new snapshot
//! caused is a child of the span that published it ([`XdsSnapshot::trace`]), so one change's
//! trace reaches every proxy that took it. A response to a request (a stream's first
//! subscription, a reconnect) is caused by the proxy, not by the change, and may come hours
//! after it: it starts a trace of its own with a span link to the change that made the version
//! sent, rather than growing an old trace without end. Spans are per response, never per
//! resource or endpoint; a stream keeps the context of its last push per type only.
//!
//! Any pod can open a stream, so what one holds is bounded whatever its client sends: the
//! strings it chose are cut and a delta stream's subscriptions capped
//! ([`AdsServer::with_max_streams`] says how), and a NACK repeated with the same nonce is
//! logged once.

#[cfg(test)]
mod convergence_tests;
mod delta;
mod held;
mod names;
mod sotw;
#[cfg(test)]
mod stream_tests;
#[cfg(test)]
mod test_support;
mod wire;

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest},
};
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::{
    Status, Streaming,
    body::Body,
    codec::BufferSettings,
    codegen::{BoxFuture, Context, Poll, Service, StdError, http},
    server::NamedService,
};
use tonic_prost::ProstDecoder;
use tracing::{debug, info, info_span, warn};

use self::wire::{Outgoing, Push, PushBody};

use crate::{
    cache::{PerType, ResourceType, SnapshotCache, XdsSnapshot},
    metrics::{RefusalLabels, StreamLabels, TypeLabels, XdsMetrics},
    status::{Nack, NodeRegistry, StreamKind, StreamStatus, unix_ms_now},
    trace::ChangeTrace,
};

/// Responses queued per stream before the stream task waits for Envoy to read.
const RESPONSE_QUEUE: usize = 16;
/// The first size of a stream's buffer for Envoy's requests: most are a few hundred bytes
/// (an ACK, a subscription change); the buffer grows for a larger one (the first, with the
/// node's metadata) in steps of this size and keeps the largest. tonic's default, 8 KiB,
/// was 8 KiB per Envoy for the connection's life.
const REQUEST_BUFFER: usize = 1024;

/// Longest `node.id` and `node.cluster` a stream keeps (for its logs and `/v1/status`), in
/// bytes: Envoy's are a pod's name and namespace, tens of bytes; a longer one is cut and
/// marked (see [`bounded`]), so a client's 4 MiB node id costs the server 256 bytes. An
/// unknown type URL is logged cut as well.
const MAX_NODE_FIELD_BYTES: usize = 256;
/// Longest NACK reason (`error_detail.message`) a stream keeps and logs, in bytes: Envoy's
/// name the resource and the field it refused in a line or two; a longer one is cut and
/// marked.
const MAX_NACK_MESSAGE_BYTES: usize = 1024;

/// Streams one server holds at most, by default: far more Envoys than one control plane
/// serves, few enough that their state (a task, a queue, the resource versions sent) stays
/// in tens of MiB.
pub const DEFAULT_MAX_STREAMS: usize = 10_000;

/// How a request relates to what the stream sent before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RequestOutcome {
    /// No nonce: the first request for a type, or a subscription change before any response.
    Initial,
    /// Envoy applied the response with the echoed nonce.
    Ack {
        /// The version it now runs with: the one sent with the nonce. `None` when the request
        /// named another version (SotW `version_info`): what it runs with is then unknown,
        /// and nothing the client made up is kept.
        version: Option<String>,
    },
    /// Envoy refused the response with the echoed nonce and keeps its previous version.
    Nack {
        /// The version it refused.
        rejected_version: String,
        /// The refused response's nonce.
        nonce: String,
        /// `error_detail.code`.
        code: i32,
        /// `error_detail.message`, cut to [`MAX_NACK_MESSAGE_BYTES`] (see [`bounded`]).
        message: String,
    },
    /// The nonce is not the latest sent: a newer response is on its way; ignored.
    Stale,
}

/// The ADS gRPC service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdsServer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// One permit per open stream; a stream that finds none is refused.
    streams: Arc<Semaphore>,
    max_streams: usize,
    snapshots: watch::Receiver<Option<Arc<XdsSnapshot>>>,
    /// Set to `true` to end every stream (shutdown); gRPC streams never end by themselves.
    closing: watch::Sender<bool>,
    registry: NodeRegistry,
    metrics: XdsMetrics,
    next_stream_id: AtomicU64,
}

impl AdsServer {
    /// A server streaming what `cache` publishes, recording streams in `registry` and
    /// counting in `metrics`, serving at most [`DEFAULT_MAX_STREAMS`] streams at once.
    pub fn new(cache: &SnapshotCache, registry: NodeRegistry, metrics: XdsMetrics) -> Self {
        Self::with_max_streams(cache, registry, metrics, DEFAULT_MAX_STREAMS)
    }

    /// [`new`](Self::new) serving at most `max_streams` streams at once: a stream beyond it
    /// is refused with `RESOURCE_EXHAUSTED` (Envoy retries with backoff) and counted in
    /// `fulcrum_xds_streams_refused_total{reason="max_streams"}`, so no number of clients can
    /// make the server hold unbounded state. What one stream holds is bounded too: the
    /// strings its client chose are cut (node id and cluster to 256 bytes, NACK reasons to
    /// 1 KiB), and a delta stream subscribing to more names the snapshot does not serve than
    /// it may hold is ended, `RESOURCE_EXHAUSTED`, counted with `reason="subscriptions"`.
    pub fn with_max_streams(
        cache: &SnapshotCache,
        registry: NodeRegistry,
        metrics: XdsMetrics,
        max_streams: usize,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                streams: Arc::new(Semaphore::new(max_streams)),
                max_streams,
                snapshots: cache.subscribe(),
                closing: watch::Sender::new(false),
                registry,
                metrics,
                next_stream_id: AtomicU64::new(1),
            }),
        }
    }

    /// Ends every open stream and every stream opened later (for shutdown: a gRPC server's
    /// graceful shutdown waits for streams, and ADS streams never end by themselves).
    pub fn close_streams(&self) {
        self.shared.closing.send_replace(true);
    }

    /// The tonic service to add to a `tonic::transport::Server`, accepting request
    /// messages up to 4 MiB (tonic's default) until
    /// [`max_decoding_message_size`](AdsService::max_decoding_message_size) says otherwise.
    pub fn into_service(self) -> AdsService {
        AdsService {
            server: self,
            max_decoding_message_size: None,
        }
    }

    /// Starts the driver of a new stream reading `requests`; the body streams its responses.
    fn spawn<P: Protocol>(&self, requests: Streaming<P::Request>) -> Result<PushBody, Status> {
        let Ok(permit) = Arc::clone(&self.shared.streams).try_acquire_owned() else {
            self.shared
                .metrics
                .streams_refused
                .get_or_create(&RefusalLabels {
                    reason: "max_streams",
                })
                .inc();
            warn!(
                max_streams = self.shared.max_streams,
                "refused an xDS stream: the server holds as many as it may"
            );
            return Err(Status::resource_exhausted(format!(
                "this control plane serves at most {} xDS streams; retry later or add replicas",
                self.shared.max_streams
            )));
        };
        let (responses, receiver) = mpsc::channel(RESPONSE_QUEUE);
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            drive::<P>(shared, requests, responses).await;
            drop(permit);
        });
        Ok(PushBody::new(P::KIND, receiver))
    }
}

/// The gRPC path of the state of the world stream.
const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
/// The gRPC path of the incremental stream.
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// The ADS as a tonic service: both streaming methods of
/// `envoy.service.discovery.v3.AggregatedDiscoveryService`, requests decoded by prost,
/// responses framed from the cache's shared bytes (module `server::wire`) rather than
/// encoded per stream as the generated `AggregatedDiscoveryServiceServer` would. Compression
/// is not offered, as the generated server did not by default: a request in any
/// `grpc-encoding` but `identity` is answered `UNIMPLEMENTED`.
#[derive(Debug, Clone)]
pub struct AdsService {
    server: AdsServer,
    max_decoding_message_size: Option<usize>,
}

impl AdsService {
    /// Refuses request messages larger than `limit` bytes (tonic's default: 4 MiB).
    #[must_use]
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }

    fn open<P, B>(&self, request: http::Request<B>) -> http::Response<Body>
    where
        P: Protocol,
        B: tonic::codegen::Body + Send + 'static,
        B::Error: Into<StdError> + Send,
    {
        let compressed = request
            .headers()
            .get("grpc-encoding")
            .is_some_and(|encoding| encoding != "identity");
        if compressed {
            return Status::unimplemented(
                "this ADS server does not accept compressed requests; send them uncompressed",
            )
            .into_http();
        }
        let requests = Streaming::new_request(
            // The second setting, the yield threshold, is an encoder's: tonic's default.
            ProstDecoder::<P::Request>::new(BufferSettings::new(REQUEST_BUFFER, 32 * 1024)),
            request.into_body(),
            None,
            self.max_decoding_message_size,
        );
        match self.server.spawn::<P>(requests) {
            Ok(body) => {
                let mut response = http::Response::new(Body::new(body));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/grpc"),
                );
                response
            }
            Err(status) => status.into_http(),
        }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl<B> Service<http::Request<B>> for AdsService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = match request.uri().path() {
            SOTW_PATH => self.open::<sotw::SotwState, B>(request),
            DELTA_PATH => self.open::<delta::DeltaState, B>(request),
            _ => Status::unimplemented("no such method in the Aggregated Discovery Service")
                .into_http(),
        };
        Box::pin(std::future::ready(Ok(response)))
    }
}

/// What the stream driver needs from one protocol variant.
trait Protocol: Default + Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    const KIND: StreamKind;

    fn type_url(request: &Self::Request) -> &str;
    fn node(request: &Self::Request) -> Option<&Node>;
    /// The outcome and response of a request, or why the stream must end.
    fn on_request(
        &mut self,
        ty: ResourceType,
        request: &Self::Request,
        snapshot: Option<&XdsSnapshot>,
    ) -> Result<(RequestOutcome, Option<Push>), delta::TooManyNames>;
    fn on_snapshot(&mut self, snapshot: &XdsSnapshot) -> Vec<Push>;
}

impl Protocol for sotw::SotwState {
    type Request = DiscoveryRequest;
    const KIND: StreamKind = StreamKind::Sotw;

    fn type_url(request: &DiscoveryRequest) -> &str {
        &request.type_url
    }
    fn node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }
    fn on_request(
        &mut self,
        ty: ResourceType,
        request: &DiscoveryRequest,
        snapshot: Option<&XdsSnapshot>,
    ) -> Result<(RequestOutcome, Option<Push>), delta::TooManyNames> {
        // A SotW subscription is replaced by each request: one request's names at most.
        Ok(sotw::SotwState::on_request(self, ty, request, snapshot))
    }
    fn on_snapshot(&mut self, snapshot: &XdsSnapshot) -> Vec<Push> {
        sotw::SotwState::on_snapshot(self, snapshot)
    }
}

impl Protocol for delta::DeltaState {
    type Request = DeltaDiscoveryRequest;
    const KIND: StreamKind = StreamKind::Delta;

    fn type_url(request: &DeltaDiscoveryRequest) -> &str {
        &request.type_url
    }
    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }
    fn on_request(
        &mut self,
        ty: ResourceType,
        request: &DeltaDiscoveryRequest,
        snapshot: Option<&XdsSnapshot>,
    ) -> Result<(RequestOutcome, Option<Push>), delta::TooManyNames> {
        delta::DeltaState::on_request(self, ty, request, snapshot)
    }
    fn on_snapshot(&mut self, snapshot: &XdsSnapshot) -> Vec<Push> {
        delta::DeltaState::on_snapshot(self, snapshot)
    }
}

/// The nonce this server sent that `echoed` names: the decimal number it wrote, nothing else
/// (`+7` or `07` is no nonce of ours). A stream keeps its nonces as numbers, not strings.
fn sent_nonce(echoed: &str) -> Option<u64> {
    let canonical = echoed.bytes().all(|byte| byte.is_ascii_digit())
        && (echoed == "0" || !echoed.starts_with('0'));
    echoed.parse().ok().filter(|_| canonical)
}

/// `name` as the allocation `snapshot` shares with every stream when it holds a resource of
/// type `ty` by that name, else a new one: what a stream remembers per resource (the names
/// subscribed to, what was sent) then costs it no string, whatever the number of Envoys.
fn shared_name(snapshot: Option<&XdsSnapshot>, ty: ResourceType, name: &str) -> Arc<str> {
    snapshot
        .and_then(|snapshot| snapshot.resources(ty).get(name))
        .map_or_else(|| Arc::from(name), |resource| Arc::clone(&resource.name))
}

/// `text` cut to at most `max` bytes on a character boundary, ending in `…` when cut: what a
/// stream keeps of a string its client chose, so that no client decides how much the
/// server holds (or logs) for it.
fn bounded(text: &str, max: usize) -> String {
    const MARK: &str = "…";
    if text.len() <= max {
        return text.to_owned();
    }
    let kept = text.floor_char_boundary(max.saturating_sub(MARK.len()));
    let mut cut = String::with_capacity(kept + MARK.len());
    cut.push_str(&text[..kept]);
    cut.push_str(MARK);
    cut
}

/// Removes the stream from the registry and the gauge however the task ends.
struct OpenStream {
    shared: Arc<Shared>,
    stream_id: u64,
    kind: StreamKind,
    node_id: String,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.shared.registry.close(self.stream_id);
        self.shared
            .metrics
            .connected
            .get_or_create(&StreamLabels {
                stream: self.kind.as_str(),
            })
            .dec();
        info!(stream_id = self.stream_id, node = %self.node_id, kind = self.kind.as_str(), "xDS stream closed");
    }
}

/// Runs one stream until Envoy or the server closes it.
async fn drive<P: Protocol>(
    shared: Arc<Shared>,
    mut requests: Streaming<P::Request>,
    responses: mpsc::Sender<Outgoing>,
) {
    let stream_id = shared.next_stream_id.fetch_add(1, Ordering::Relaxed);
    let mut snapshots = shared.snapshots.clone();
    let mut closing = shared.closing.subscribe();
    let mut state = P::default();
    let mut open: Option<OpenStream> = None;
    // The last push of each type, whose ACK or NACK is traced as its child.
    let mut pushes: PerType<Option<ChangeTrace>> = PerType::default();
    // The nonce of the last NACK of each type: Envoy repeats a NACK with every request until
    // it accepts a response, and it is logged once.
    let mut nacked: PerType<Option<String>> = PerType::default();
    loop {
        if *closing.borrow_and_update() {
            break;
        }
        let outgoing: Vec<(Push, Cause)> = tokio::select! {
            _ = closing.changed() => continue,
            message = requests.message() => {
                let request = match message {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(status) => {
                        debug!(stream_id, %status, "xDS stream ended with an error");
                        // Envoy logs the status it is closed with: say why.
                        let _ = responses.send(Err(Box::new(status))).await;
                        break;
                    }
                };
                if open.is_none() {
                    open = Some(register::<P>(&shared, stream_id, P::node(&request)));
                }
                let Some(ty) = ResourceType::from_type_url(P::type_url(&request)) else {
                    let type_url = bounded(P::type_url(&request), MAX_NODE_FIELD_BYTES);
                    warn!(stream_id, type_url, "ignoring a request for a type this server does not serve");
                    continue;
                };
                let snapshot = snapshots.borrow().clone();
                let (outcome, response) = match state.on_request(ty, &request, snapshot.as_deref()) {
                    Ok(answer) => answer,
                    Err(limit) => {
                        refuse_subscriptions(&shared, stream_id, open.as_ref(), &limit);
                        let _ = responses
                            .send(Err(Box::new(Status::resource_exhausted(limit.to_string()))))
                            .await;
                        break;
                    }
                };
                record_outcome::<P>(&shared, open.as_ref(), ty, outcome, &mut pushes, &mut nacked);
                response
                    .into_iter()
                    .map(|response| (response, Cause::Request(snapshot.clone())))
                    .collect()
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                match snapshot {
                    Some(snapshot) => state
                        .on_snapshot(&snapshot)
                        .into_iter()
                        .map(|response| (response, Cause::Snapshot(Arc::clone(&snapshot))))
                        .collect(),
                    None => Vec::new(),
                }
            }
        };
        for (response, cause) in outgoing {
            record_push::<P>(&shared, open.as_ref(), &response, &cause, &mut pushes);
            if responses.send(Ok(Box::new(response))).await.is_err() {
                return;
            }
        }
    }
}

/// Counts and logs a stream ended for holding more names than it may.
fn refuse_subscriptions(
    shared: &Shared,
    stream_id: u64,
    open: Option<&OpenStream>,
    limit: &delta::TooManyNames,
) {
    shared
        .metrics
        .streams_refused
        .get_or_create(&RefusalLabels {
            reason: "subscriptions",
        })
        .inc();
    let node = open.map_or("", |open| open.node_id.as_str());
    warn!(stream_id, node, error = %limit, "ended an xDS stream: it subscribed to more names than a stream may hold");
}

fn register<P: Protocol>(shared: &Arc<Shared>, stream_id: u64, node: Option<&Node>) -> OpenStream {
    let node_id = node.map_or_else(String::new, |node| bounded(&node.id, MAX_NODE_FIELD_BYTES));
    let node_cluster = node.map_or_else(String::new, |node| {
        bounded(&node.cluster, MAX_NODE_FIELD_BYTES)
    });
    info!(stream_id, node = %node_id, node_cluster = %node_cluster, kind = P::KIND.as_str(), "xDS stream opened");
    shared.registry.open(StreamStatus {
        stream_id,
        node_id: node_id.clone(),
        node_cluster,
        kind: P::KIND,
        connected_at_unix_ms: unix_ms_now(),
        types: Default::default(),
    });
    shared
        .metrics
        .connected
        .get_or_create(&StreamLabels {
            stream: P::KIND.as_str(),
        })
        .inc();
    OpenStream {
        shared: Arc::clone(shared),
        stream_id,
        kind: P::KIND,
        node_id,
    }
}

/// Why a response is sent.
enum Cause {
    /// A new snapshot: the push continues the trace of the change that made it.
    Snapshot(Arc<XdsSnapshot>),
    /// Envoy's request (first subscription, changed names), answered from the current
    /// snapshot if any: a trace of its own, linked to the change that made that version.
    Request(Option<Arc<XdsSnapshot>>),
}

fn record_outcome<P: Protocol>(
    shared: &Shared,
    open: Option<&OpenStream>,
    ty: ResourceType,
    outcome: RequestOutcome,
    pushes: &mut PerType<Option<ChangeTrace>>,
    nacked: &mut PerType<Option<String>>,
) {
    let Some(open) = open else { return };
    if matches!(
        outcome,
        RequestOutcome::Ack { .. } | RequestOutcome::Nack { .. }
    ) && let Some(push) = pushes.get_mut(ty).take()
    {
        trace_answer(open, ty, &outcome, &push);
    }
    let labels = TypeLabels {
        resource_type: ty.short_name(),
        stream: P::KIND.as_str(),
    };
    match outcome {
        RequestOutcome::Initial | RequestOutcome::Stale => {}
        RequestOutcome::Ack { version } => {
            debug!(stream_id = open.stream_id, node = %open.node_id, resource_type = ty.short_name(), version = version.as_deref().unwrap_or(""), "ACK");
            if let Some(version) = version {
                shared.registry.update(open.stream_id, ty, |status| {
                    status.last_acked_version = Some(version);
                });
            }
        }
        RequestOutcome::Nack {
            rejected_version,
            nonce,
            code,
            message,
        } => {
            if nacked.get(ty).as_ref() == Some(&nonce) {
                debug!(stream_id = open.stream_id, node = %open.node_id, resource_type = ty.short_name(), nonce = %nonce, "NACK repeated");
            } else {
                warn!(
                    stream_id = open.stream_id,
                    node = %open.node_id,
                    resource_type = ty.short_name(),
                    rejected_version = %rejected_version,
                    nonce = %nonce,
                    code,
                    error = %message,
                    "Envoy rejected an xDS response (NACK); it keeps its last accepted version"
                );
                *nacked.get_mut(ty) = Some(nonce.clone());
            }
            shared.metrics.nacks.get_or_create(&labels).inc();
            shared.registry.update(open.stream_id, ty, |status| {
                status.nacks += 1;
                status.last_nack = Some(Nack {
                    rejected_version,
                    nonce,
                    code,
                    message,
                    at_unix_ms: unix_ms_now(),
                });
            });
        }
    }
}

/// Records Envoy's ACK or NACK of the push traced as `push`, as that push's child.
fn trace_answer(open: &OpenStream, ty: ResourceType, outcome: &RequestOutcome, push: &ChangeTrace) {
    let span = match outcome {
        RequestOutcome::Ack { version } => info_span!(
            parent: None,
            "xds_ack",
            node = %open.node_id,
            stream_id = open.stream_id,
            resource_type = ty.short_name(),
            version = version.as_deref().unwrap_or(""),
        ),
        RequestOutcome::Nack {
            rejected_version,
            code,
            message,
            ..
        } => info_span!(
            parent: None,
            "xds_nack",
            node = %open.node_id,
            stream_id = open.stream_id,
            resource_type = ty.short_name(),
            version = %rejected_version,
            code,
            error = %message,
            otel.status_code = "ERROR",
        ),
        RequestOutcome::Initial | RequestOutcome::Stale => return,
    };
    push.adopt(&span);
}

/// The `xds_push` span of one response: a child of the change that made the snapshot, or a
/// root linked to it for a response to a request.
fn push_span(
    open: &OpenStream,
    ty: ResourceType,
    (version, nonce, resources): (&str, &str, usize),
    cause: &Cause,
) -> ChangeTrace {
    let span = info_span!(
        parent: None,
        "xds_push",
        node = %open.node_id,
        stream_id = open.stream_id,
        resource_type = ty.short_name(),
        version,
        nonce,
        resources,
        cause = match cause {
            Cause::Snapshot(_) => "snapshot",
            Cause::Request(_) => "request",
        },
    );
    match cause {
        Cause::Snapshot(snapshot) => snapshot.trace.adopt(&span),
        Cause::Request(snapshot) => {
            if let Some(snapshot) = snapshot {
                snapshot.trace.link(&span);
            }
        }
    }
    ChangeTrace::of(&span)
}

fn record_push<P: Protocol>(
    shared: &Shared,
    open: Option<&OpenStream>,
    response: &Push,
    cause: &Cause,
    pushes: &mut PerType<Option<ChangeTrace>>,
) {
    let (ty, version, nonce) = (response.ty, &*response.version, response.nonce.as_str());
    let resources = response.resources.len() + response.removed.len();
    let published_at = match cause {
        Cause::Snapshot(snapshot) => Some(snapshot.published_at),
        Cause::Request(_) => None,
    };
    let labels = TypeLabels {
        resource_type: ty.short_name(),
        stream: P::KIND.as_str(),
    };
    shared.metrics.pushes.get_or_create(&labels).inc();
    if let Some(published_at) = published_at {
        shared
            .metrics
            .push_latency
            .get_or_create(&labels)
            .observe(published_at.elapsed().as_secs_f64());
    }
    if let Some(open) = open {
        let push = push_span(open, ty, (version, nonce, resources), cause);
        if push.is_traced() {
            *pushes.get_mut(ty) = Some(push);
        }
        debug!(stream_id = open.stream_id, node = %open.node_id, resource_type = ty.short_name(), version, nonce, resources, "pushed");
        let version = version.to_owned();
        shared.registry.update(open.stream_id, ty, |status| {
            status.responses_sent += 1;
            status.last_sent_version = Some(version);
        });
    }
}
