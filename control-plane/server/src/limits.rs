//! Bounds on what clients can make the control plane hold or do, on every listener.
//!
//! Every pod of a mesh can reach the control plane, so no client may make it hold unbounded
//! state or wait forever: HTTP requests have a deadline, a body cap and a cap on how many are
//! served at once (the rest get a prompt `503`; long polls, and requests whose bodies have a
//! larger bound of their own, have shares of their own, and the kubelet's probes are never
//! refused); the answers being sent hold at most [`ListenerLimits::http_max_answer_bytes`]
//! (each its own bytes, none for the snapshot that every proxy's answer shares, plus a
//! stream's overhead), handed to the connection a frame at a time, so clients that stop
//! reading cannot pile up answers or streams; gRPC (xDS and the registry) caps streams per
//! connection and message sizes, and keeps connections alive only while the peer answers;
//! the ADS server caps its streams in total (`fulcrum_xds::AdsServer::with_max_streams`).
//! The connections themselves are [`crate::connections`]'. Each refusal is counted, so an
//! alert sees a control plane at its limits.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::Request,
    http::{StatusCode, header::CONTENT_LENGTH},
    middleware::Next,
    response::IntoResponse,
};
use http_body::{Frame, SizeHint};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The bounds. The defaults suit a control plane serving a few thousand proxies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Longest an HTTP request may take before it is answered `503`. The registry's
    /// long-polling watch gets its own wait cap on top of it.
    pub http_request_timeout: Duration,
    /// HTTP requests served at once on one listener; more are refused with `503` at once.
    pub http_max_in_flight: usize,
    /// Largest HTTP request body, in bytes; a larger one is refused with `413`.
    pub http_max_body_bytes: usize,
    /// Bytes of answers held at once while they are sent: each its own bytes (none for the
    /// snapshot, whose answers share one copy) plus [`ANSWER_OVERHEAD_BYTES`]; an answer
    /// beyond gets `503`.
    pub http_max_answer_bytes: usize,
    /// HTTP connections one listener holds at once; one more is closed as it is accepted.
    pub http_max_connections: usize,
    /// How long an HTTP/1 request's head may take to arrive, counted from when the
    /// connection waits for it: also how long a keep-alive connection may sit idle.
    pub http_header_read_timeout: Duration,
    /// How long a connection may wait on its peer with no byte moving either way (a client
    /// that stopped reading, a body that stopped coming); longer than a long poll's silence.
    pub http_idle_timeout: Duration,
    /// Concurrent streams on one HTTP/2 connection to the HTTP listeners.
    pub http2_max_streams_per_connection: u32,
    /// xDS streams served at once; more are refused with `RESOURCE_EXHAUSTED`.
    pub xds_max_streams: usize,
    /// Concurrent gRPC streams on one HTTP/2 connection (xDS and the registry).
    pub grpc_max_streams_per_connection: u32,
    /// Largest gRPC message accepted, in bytes.
    pub grpc_max_message_bytes: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            http_request_timeout: Duration::from_secs(10),
            http_max_in_flight: 1024,
            http_max_body_bytes: 64 << 10,
            http_max_answer_bytes: 64 << 20,
            http_max_connections: 8192,
            http_header_read_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(120),
            http2_max_streams_per_connection: 64,
            xds_max_streams: fulcrum_xds::DEFAULT_MAX_STREAMS,
            grpc_max_streams_per_connection: 64,
            grpc_max_message_bytes: 4 << 20,
        }
    }
}

/// The kubelet's probes: constant-time answers that take no in-flight slot.
pub const PROBE_PATHS: &[&str] = &["/healthz", "/readyz"];

/// How long an idle HTTP/2 connection may go without answering a keepalive ping.
const GRPC_KEEPALIVE: Duration = Duration::from_secs(30);

/// Labels of [`LimitMetrics::limited`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LimitLabels {
    /// `in_flight` (refused at the in-flight cap), `long_poll` (refused at the long polls'
    /// share of it), `large_body` (refused at the large-body routes' slots), `timeout` (cut
    /// at the deadline), `answer_bytes` (an answer refused, the answers being sent holding
    /// the whole budget) or `body_too_large` (a request body over its bound, answered
    /// `413`).
    pub reason: &'static str,
}

/// What the limits refused. Cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct LimitMetrics {
    /// `fulcrum_http_requests_limited_total{reason}`.
    pub limited: Family<LimitLabels, Counter>,
}

impl LimitMetrics {
    /// Registers the counter under the `fulcrum` prefix.
    pub fn register(&self, registry: &mut Registry) {
        registry.sub_registry_with_prefix("fulcrum").register(
            "http_requests_limited",
            "HTTP requests refused at the in-flight cap, the answer budget or the body bound, or cut at the request deadline",
            self.limited.clone(),
        );
    }
}

/// What every answer being sent is charged against [`ListenerLimits::http_max_answer_bytes`]
/// on top of its own bytes: a stream's and a connection's state for it. A shared answer
/// ([`SharedAnswer`]) is charged this alone.
pub const ANSWER_OVERHEAD_BYTES: u64 = 4 << 10;

/// The frames an answer's body is handed to the connection in: the connection asks for the
/// next only once it has room (its socket or its HTTP/2 window took the last), so an answer
/// a client does not read stays in the body, charged, not in the connection's buffers.
pub const ANSWER_FRAME_BYTES: usize = 16 << 10;

/// Most requests with a body of their own bound (`large_bodies`) served at once, from slots
/// of their own: clients trickling large bodies hold these, not the snapshot polls' slots,
/// and at most this many such bodies are read at once.
pub const LARGE_BODY_SLOTS: usize = 64;

/// Marks an answer whose body is shared with other answers (the snapshot's, one copy for
/// every proxy), so only [`ANSWER_OVERHEAD_BYTES`] of it are held against
/// [`ListenerLimits::http_max_answer_bytes`].
#[derive(Debug, Clone, Copy)]
pub struct SharedAnswer;

/// Whether `path` is one of `route`'s (axum's syntax: a `{name}` segment matches any one
/// segment).
pub fn route_matches(route: &str, path: &str) -> bool {
    let (mut route, mut path) = (route.split('/'), path.split('/'));
    loop {
        match (route.next(), path.next()) {
            (None, None) => return true,
            (Some(expected), Some(segment))
                if expected == segment
                    || (expected.starts_with('{')
                        && expected.ends_with('}')
                        && !segment.is_empty()) => {}
            _ => return false,
        }
    }
}

/// The KiB (rounded up, at least one) `bytes` take from the answer budget.
fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

impl ListenerLimits {
    /// `router`, serving one listener, within the HTTP limits: at most
    /// [`http_max_in_flight`](Self::http_max_in_flight) requests at once (the rest get `503`
    /// at once), bodies up to [`http_max_body_bytes`](Self::http_max_body_bytes) or, on
    /// `large_bodies`' routes, their own bound (`413`, counted as `body_too_large`), a
    /// deadline of [`http_request_timeout`](Self::http_request_timeout) (`503` then), plus
    /// `long_poll` on top for requests to `long_poll_routes` (a watch that waits by design),
    /// and every answer (but the probes') held against
    /// [`http_max_answer_bytes`](Self::http_max_answer_bytes), its bytes (none when marked
    /// [`SharedAnswer`]) and [`ANSWER_OVERHEAD_BYTES`], until its body is sent or dropped,
    /// handed over in [`ANSWER_FRAME_BYTES`] frames (`503` when the budget is spent).
    ///
    /// Requests to `long_poll_routes` ([`route_matches`]) are served from slots of their
    /// own, a quarter of the cap (at least one), so clients that wait by design cannot take
    /// the slots of snapshot polls; refusals there are counted as `long_poll`. So are
    /// requests to `large_bodies`' routes ([`LARGE_BODY_SLOTS`], refusals counted as
    /// `large_body`). The kubelet's probes ([`PROBE_PATHS`]) take no slot and no answer
    /// bytes: a listener full of slow clients must not get the replica restarted by its
    /// liveness probe. An answer refused for its bytes comes after its handler ran: a
    /// registry write it answered took effect (the writes are idempotent; retry).
    pub fn bound_http(
        &self,
        router: Router,
        long_poll_routes: &[&'static str],
        long_poll: Duration,
        large_bodies: &[(&'static str, usize)],
        metrics: &LimitMetrics,
    ) -> Router {
        // One semaphore for the listener: `Router::layer` wraps every route on its own, so
        // the cap lives in the closure every route shares.
        let slots = Arc::new(Semaphore::new(self.http_max_in_flight));
        let long_poll_slots = Arc::new(Semaphore::new((self.http_max_in_flight / 4).max(1)));
        let large_body_slots = Arc::new(Semaphore::new(LARGE_BODY_SLOTS));
        let answer_budget = kib(u64::try_from(self.http_max_answer_bytes).unwrap_or(u64::MAX));
        let answer_bytes = Arc::new(Semaphore::new(answer_budget as usize));
        let long_poll_routes: Arc<[&'static str]> = long_poll_routes.into();
        let large_bodies: Arc<[(&'static str, usize)]> = large_bodies.into();
        let limited = metrics.limited.clone();
        let timeout = self.http_request_timeout;
        let max_body = self.http_max_body_bytes;
        router.layer(axum::middleware::from_fn(
            move |request: Request, next: Next| {
                let path = request.uri().path();
                let large_body = large_bodies
                    .iter()
                    .find(|(route, _)| route_matches(route, path))
                    .map(|&(_, limit)| limit);
                let body_limit = large_body.unwrap_or(max_body);
                let declared = request
                    .headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|length| length.to_str().ok()?.parse::<u64>().ok());
                let probe = PROBE_PATHS.contains(&path);
                let (slot, deadline, full) = if probe {
                    (None, timeout, "in_flight")
                } else if large_body.is_some() {
                    let slot = Arc::clone(&large_body_slots).try_acquire_owned();
                    (Some(slot), timeout, "large_body")
                } else if long_poll_routes
                    .iter()
                    .any(|route| route_matches(route, path))
                {
                    let slot = Arc::clone(&long_poll_slots).try_acquire_owned();
                    (Some(slot), timeout + long_poll, "long_poll")
                } else {
                    let slot = Arc::clone(&slots).try_acquire_owned();
                    (Some(slot), timeout, "in_flight")
                };
                let (limited, answer_bytes) = (limited.clone(), Arc::clone(&answer_bytes));
                async move {
                    let count = |reason| limited.get_or_create(&LimitLabels { reason }).inc();
                    let refuse = |reason, message| {
                        count(reason);
                        (StatusCode::SERVICE_UNAVAILABLE, message).into_response()
                    };
                    if declared.is_some_and(|length| length > body_limit as u64) {
                        count("body_too_large");
                        return (
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("the request body is over {body_limit} bytes\n"),
                        )
                            .into_response();
                    }
                    // A body without a length (chunked) is cut at the bound as it is read,
                    // and its handler answers `413`.
                    let request = request
                        .map(|body| Body::new(http_body_util::Limited::new(body, body_limit)));
                    let _slot = match slot {
                        None => None,
                        Some(Ok(slot)) => Some(slot),
                        Some(Err(_)) => {
                            return refuse(
                                full,
                                "the control plane is serving as many requests as it may; retry\n",
                            );
                        }
                    };
                    let Ok(response) = tokio::time::timeout(deadline, next.run(request)).await
                    else {
                        return refuse("timeout", "the request ran out of time; retry\n");
                    };
                    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        count("body_too_large");
                    }
                    if probe {
                        return response;
                    }
                    let own = if response.extensions().get::<SharedAnswer>().is_some() {
                        0
                    } else {
                        http_body::Body::size_hint(response.body()).lower()
                    };
                    let charge = kib(own.saturating_add(ANSWER_OVERHEAD_BYTES));
                    if charge > answer_budget {
                        return refuse(
                            "answer_bytes",
                            "the answer is larger than the control plane's --http-max-answer-bytes; raise it\n",
                        );
                    }
                    let Ok(held) = answer_bytes.try_acquire_many_owned(charge) else {
                        return refuse(
                            "answer_bytes",
                            "the control plane is sending as many answers as it may; retry\n",
                        );
                    };
                    response.map(|body| {
                        Body::new(Held {
                            body,
                            rest: Bytes::new(),
                            _held: held,
                        })
                    })
                }
            },
        ))
    }

    /// A gRPC server builder with these bounds.
    pub fn grpc_server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(self.grpc_max_streams_per_connection))
            .http2_keepalive_interval(Some(GRPC_KEEPALIVE))
            .http2_keepalive_timeout(Some(GRPC_KEEPALIVE))
            .tcp_keepalive(Some(GRPC_KEEPALIVE))
    }
}

/// An answer's body holding its share of [`ListenerLimits::http_max_answer_bytes`] until it
/// is sent or dropped (the stream reset, the connection closed), handed over in frames of at
/// most [`ANSWER_FRAME_BYTES`]: a body of one large chunk would be taken whole into the
/// connection's buffers at once, end, and give its share back while a client that does not
/// read still holds every byte.
struct Held {
    body: Body,
    /// What is left of the last frame the body gave.
    rest: Bytes,
    _held: OwnedSemaphorePermit,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.rest.is_empty() {
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                other => return other,
            };
            match frame.into_data() {
                Ok(data) => self.rest = data,
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            }
        }
        let take = self.rest.len().min(ANSWER_FRAME_BYTES);
        Poll::Ready(Some(Ok(Frame::data(self.rest.split_to(take)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.len() as u64;
        let body = self.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(body.lower().saturating_add(rest));
        if let Some(upper) = body.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::route_matches;

    #[test]
    fn a_route_matches_its_paths_with_any_one_segment_for_each_parameter() {
        let route = "/v1/proxies/{node}/endpoints";
        assert!(route_matches(
            route,
            "/v1/proxies/sidecar~10.0.0.1~a.ns/endpoints"
        ));
        assert!(route_matches("/v1/registry/watch", "/v1/registry/watch"));
        for other in [
            "/v1/proxies//endpoints",
            "/v1/proxies/a/b/endpoints",
            "/v1/proxies/a/endpoints/",
            "/v1/proxies/a",
            "/v1/proxies",
            "/v1/snapshot",
        ] {
            assert!(!route_matches(route, other), "{other}");
        }
    }
}
