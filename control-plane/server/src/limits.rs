//! Bounds on what clients can make the control plane hold or do, on every listener.
//!
//! Every pod of a mesh can reach the control plane, so no client may make it hold unbounded
//! state or wait forever: HTTP requests have a deadline, a body cap and a cap on how many are
//! served at once (the rest get a prompt `503`; long polls have a share of their own and the
//! kubelet's probes are never refused); gRPC (xDS and the registry) caps streams per
//! connection and message sizes, and keeps connections alive only while the peer answers;
//! the ADS server caps its streams in total (`fulcrum_xds::AdsServer::with_max_streams`).
//! Each refusal is counted, so an alert sees a control plane at its limits.

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::Request, http::StatusCode, middleware::Next, response::IntoResponse};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::Semaphore;
use tower_http::limit::RequestBodyLimitLayer;

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
    /// share of it) or `timeout` (cut at the deadline).
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
            "HTTP requests refused at the in-flight cap or cut at the request deadline",
            self.limited.clone(),
        );
    }
}

impl ListenerLimits {
    /// `router`, serving one listener, within the HTTP limits: at most
    /// [`http_max_in_flight`](Self::http_max_in_flight) requests at once (the rest get `503`
    /// at once), bodies up to [`http_max_body_bytes`](Self::http_max_body_bytes) (`413`), and a
    /// deadline of [`http_request_timeout`](Self::http_request_timeout) (`503` then), plus
    /// `long_poll` on top for requests to `long_poll_paths` (a watch that waits by design).
    ///
    /// Requests to `long_poll_paths` are served from slots of their own, a quarter of the
    /// cap (at least one), so clients that wait by design cannot take the slots of snapshot
    /// polls; refusals there are counted as `long_poll`. The kubelet's probes
    /// ([`PROBE_PATHS`]) take no slot: a listener full of slow clients must not get the
    /// replica restarted by its liveness probe.
    pub fn bound_http(
        &self,
        router: Router,
        long_poll_paths: &'static [&'static str],
        long_poll: Duration,
        metrics: &LimitMetrics,
    ) -> Router {
        // One semaphore for the listener: `Router::layer` wraps every route on its own, so
        // the cap lives in the closure every route shares.
        let slots = Arc::new(Semaphore::new(self.http_max_in_flight));
        let long_poll_slots = Arc::new(Semaphore::new((self.http_max_in_flight / 4).max(1)));
        let limited = metrics.limited.clone();
        let timeout = self.http_request_timeout;
        router
            .layer(axum::middleware::from_fn(
                move |request: Request, next: Next| {
                    let path = request.uri().path();
                    let (slot, deadline, full) = if PROBE_PATHS.contains(&path) {
                        (None, timeout, "in_flight")
                    } else if long_poll_paths.contains(&path) {
                        let slot = Arc::clone(&long_poll_slots).try_acquire_owned();
                        (Some(slot), timeout + long_poll, "long_poll")
                    } else {
                        let slot = Arc::clone(&slots).try_acquire_owned();
                        (Some(slot), timeout, "in_flight")
                    };
                    let limited = limited.clone();
                    async move {
                        let refuse = |reason, message| {
                            limited.get_or_create(&LimitLabels { reason }).inc();
                            (StatusCode::SERVICE_UNAVAILABLE, message).into_response()
                        };
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
                        match tokio::time::timeout(deadline, next.run(request)).await {
                            Ok(response) => response,
                            Err(_) => refuse("timeout", "the request ran out of time; retry\n"),
                        }
                    }
                },
            ))
            .layer(RequestBodyLimitLayer::new(self.http_max_body_bytes))
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
