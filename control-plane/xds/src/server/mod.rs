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

#[cfg(test)]
mod convergence_tests;
mod delta;
mod sotw;
#[cfg(test)]
mod test_support;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    },
};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, info_span, warn};

use crate::{
    cache::{ResourceType, SnapshotCache, XdsSnapshot},
    metrics::{StreamLabels, TypeLabels, XdsMetrics},
    status::{Nack, NodeRegistry, StreamKind, StreamStatus, unix_ms_now},
    trace::ChangeTrace,
};

/// Responses queued per stream before the stream task waits for Envoy to read.
const RESPONSE_QUEUE: usize = 16;

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
        /// The version it now runs with.
        version: String,
    },
    /// Envoy refused the response with the echoed nonce and keeps its previous version.
    Nack {
        /// The version it refused.
        rejected_version: String,
        /// The refused response's nonce.
        nonce: String,
        /// `error_detail.code`.
        code: i32,
        /// `error_detail.message`.
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
    /// `fulcrum_xds_streams_refused_total`, so no number of clients can make the server hold
    /// unbounded state.
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

    /// The tonic service to add to a `tonic::transport::Server`.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }

    fn spawn<P: Protocol>(
        &self,
        requests: Streaming<P::Request>,
    ) -> Result<ReceiverStream<Result<P::Response, Status>>, Status> {
        let Ok(permit) = Arc::clone(&self.shared.streams).try_acquire_owned() else {
            self.shared.metrics.streams_refused.inc();
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
        Ok(ReceiverStream::new(receiver))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(
            self.spawn::<sotw::SotwState>(request.into_inner())?,
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(
            self.spawn::<delta::DeltaState>(request.into_inner())?,
        ))
    }
}

/// What the stream driver needs from one protocol variant.
trait Protocol: Default + Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    const KIND: StreamKind;

    fn type_url(request: &Self::Request) -> &str;
    fn node(request: &Self::Request) -> Option<&Node>;
    fn on_request(
        &mut self,
        ty: ResourceType,
        request: &Self::Request,
        snapshot: Option<&XdsSnapshot>,
    ) -> (RequestOutcome, Option<Self::Response>);
    fn on_snapshot(&mut self, snapshot: &XdsSnapshot) -> Vec<Self::Response>;
    /// (type URL, version, nonce, resources) of a response, for records and logs.
    fn describe(response: &Self::Response) -> (&str, &str, &str, usize);
}

impl Protocol for sotw::SotwState {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
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
    ) -> (RequestOutcome, Option<DiscoveryResponse>) {
        sotw::SotwState::on_request(self, ty, request, snapshot)
    }
    fn on_snapshot(&mut self, snapshot: &XdsSnapshot) -> Vec<DiscoveryResponse> {
        sotw::SotwState::on_snapshot(self, snapshot)
    }
    fn describe(response: &DiscoveryResponse) -> (&str, &str, &str, usize) {
        (
            &response.type_url,
            &response.version_info,
            &response.nonce,
            response.resources.len(),
        )
    }
}

impl Protocol for delta::DeltaState {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
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
    ) -> (RequestOutcome, Option<DeltaDiscoveryResponse>) {
        delta::DeltaState::on_request(self, ty, request, snapshot)
    }
    fn on_snapshot(&mut self, snapshot: &XdsSnapshot) -> Vec<DeltaDiscoveryResponse> {
        delta::DeltaState::on_snapshot(self, snapshot)
    }
    fn describe(response: &DeltaDiscoveryResponse) -> (&str, &str, &str, usize) {
        (
            &response.type_url,
            &response.system_version_info,
            &response.nonce,
            response.resources.len() + response.removed_resources.len(),
        )
    }
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
    responses: mpsc::Sender<Result<P::Response, Status>>,
) {
    let stream_id = shared.next_stream_id.fetch_add(1, Ordering::Relaxed);
    let mut snapshots = shared.snapshots.clone();
    let mut closing = shared.closing.subscribe();
    let mut state = P::default();
    let mut open: Option<OpenStream> = None;
    // The last push of each type, whose ACK or NACK is traced as its child.
    let mut pushes: BTreeMap<ResourceType, ChangeTrace> = BTreeMap::new();
    loop {
        if *closing.borrow_and_update() {
            break;
        }
        let outgoing: Vec<(P::Response, Cause)> = tokio::select! {
            _ = closing.changed() => continue,
            message = requests.message() => {
                let request = match message {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(status) => {
                        debug!(stream_id, %status, "xDS stream ended with an error");
                        break;
                    }
                };
                if open.is_none() {
                    open = Some(register::<P>(&shared, stream_id, P::node(&request)));
                }
                let Some(ty) = ResourceType::from_type_url(P::type_url(&request)) else {
                    warn!(stream_id, type_url = P::type_url(&request), "ignoring a request for a type this server does not serve");
                    continue;
                };
                let snapshot = snapshots.borrow().clone();
                let (outcome, response) = state.on_request(ty, &request, snapshot.as_deref());
                record_outcome::<P>(&shared, open.as_ref(), ty, outcome, &mut pushes);
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
            if responses.send(Ok(response)).await.is_err() {
                return;
            }
        }
    }
}

fn register<P: Protocol>(shared: &Arc<Shared>, stream_id: u64, node: Option<&Node>) -> OpenStream {
    let node_id = node.map(|node| node.id.clone()).unwrap_or_default();
    let node_cluster = node.map(|node| node.cluster.clone()).unwrap_or_default();
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
    pushes: &mut BTreeMap<ResourceType, ChangeTrace>,
) {
    let Some(open) = open else { return };
    if matches!(
        outcome,
        RequestOutcome::Ack { .. } | RequestOutcome::Nack { .. }
    ) && let Some(push) = pushes.remove(&ty)
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
            debug!(stream_id = open.stream_id, node = %open.node_id, resource_type = ty.short_name(), version = %version, "ACK");
            shared.registry.update(open.stream_id, ty, |status| {
                status.last_acked_version = Some(version)
            });
        }
        RequestOutcome::Nack {
            rejected_version,
            nonce,
            code,
            message,
        } => {
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
            version = %version,
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
    response: &P::Response,
    cause: &Cause,
    pushes: &mut BTreeMap<ResourceType, ChangeTrace>,
) {
    let (type_url, version, nonce, resources) = P::describe(response);
    let Some(ty) = ResourceType::from_type_url(type_url) else {
        return;
    };
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
            pushes.insert(ty, push);
        }
        debug!(stream_id = open.stream_id, node = %open.node_id, resource_type = ty.short_name(), version, nonce, resources, "pushed");
        let version = version.to_owned();
        shared.registry.update(open.stream_id, ty, |status| {
            status.responses_sent += 1;
            status.last_sent_version = Some(version);
        });
    }
}
