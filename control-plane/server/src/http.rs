//! The HTTP API: the snapshot the filters poll, health, readiness, metrics and xDS status.
//!
//! - `GET /v1/snapshot`: the current [`fulcrum_core::Snapshot`] as JSON with
//!   `ETag: "<version>"`; `If-None-Match` naming the current version gets `304 Not Modified`
//!   with no body. A client whose `Accept` names
//!   [`DELTA_MEDIA_TYPE`] and whose `If-None-Match` names one of the last
//!   [`fulcrum_pipeline::DELTA_HISTORY`] versions gets only what changed since (a delta,
//!   `fulcrum_core::distribution`); any other request, whatever its headers hold, gets the
//!   whole snapshot exactly as before deltas existed. `503` before the first snapshot. Every
//!   answer names the replica that answered in `x-fulcrum-replica`, so a filter follows one
//!   replica at a time (`fulcrum_core::replica`). A filter's poll also names its proxy
//!   (`x-fulcrum-node-id`, `x-fulcrum-node-cluster`, `x-fulcrum-rejected`), recorded in the
//!   proxy table ([`crate::proxy_reports`]); a poll without them is answered all the same.
//! - `GET /v1/proxies[?state=current|behind|stale]`: the proxies whose filters poll this
//!   replica, sorted by node id ([`Proxies`]); `400` for another `state`.
//! - `GET /v1/proxies/{node}/endpoints?service=S[&wait=SECONDS]`: what proxy `node`'s
//!   workers believe about each endpoint of `S` ([`fulcrum_core::diagnostics::EndpointsView`]).
//!   The request is named to the proxy in `x-fulcrum-diagnose: <id> <S>` on its next poll
//!   answer; the handler waits up to `wait` seconds (default 10, at most 30) for the report.
//!   `400` for an invalid service or wait, `404` when the node has not polled this replica,
//!   `504` when no report came in time (a filter predating diagnostics, or a proxy that
//!   stopped polling).
//! - `POST /v1/diagnostics`: a proxy's report (`x-fulcrum-node-id`, a JSON
//!   [`fulcrum_core::diagnostics::DiagnosticsReport`] of at most
//!   [`fulcrum_core::diagnostics::MAX_REPORT_BYTES`]); kept only when it answers a request
//!   pending for that node. `204` kept, `400` invalid, `409` unrequested, `413` too large.
//! - `GET /healthz`: `200` while the process serves.
//! - `GET /readyz`: `200` once the first snapshot is built, `503` before.
//! - `GET /metrics`: Prometheus (OpenMetrics text).
//! - `GET /v1/status`: the snapshot version, what validation left out of it and, per
//!   connected Envoy stream, its kind, the versions sent and acknowledged per type and its
//!   last NACK.
//! - `GET /v1/policy/history`: the kept policy versions, oldest first, the last current.
//!
//! The **admin API** ([`admin_router`], on its own listener, loopback by default) holds what
//! changes state, behind bearer tokens when configured:
//!
//! - `POST /v1/policy/rollback?version=N`: makes kept version `N` current again (as a new
//!   version); `404` with the kept versions when `N` is not kept.
//! - `GET /v1/policy/history`, as above.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Extension, Json, Router,
    body::Body,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use fulcrum_core::{
    diagnostics::{MAX_REPORT_BYTES, valid_service},
    distribution::DELTA_MEDIA_TYPE,
};
use fulcrum_pipeline::{Dropped, Refused, SnapshotStore};
use fulcrum_policy::{AppliedPolicy, PolicyStore, RollbackError};
use fulcrum_registry::TokenAuth;
use fulcrum_xds::{NodeRegistry, StreamStatus};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::limits::SharedAnswer;
use tracing::{debug, info, warn};

use crate::{
    diagnostics::{Diagnostics, Refused as ReportRefused},
    proxies::{ProxyState, ProxyView},
    proxy_reports::ProxyReports,
};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The latest snapshot.
    pub store: SnapshotStore,
    /// What validation left out of it.
    pub dropped: watch::Receiver<Arc<Dropped>>,
    /// The snapshot refused for exceeding the budget, if the latest one was.
    pub refused: watch::Receiver<Option<Arc<Refused>>>,
    /// The policy versions.
    pub policies: PolicyStore,
    /// Connected Envoy streams.
    pub nodes: NodeRegistry,
    /// Every metric.
    pub registry: Arc<Registry>,
    /// This replica's name, sent as `x-fulcrum-replica` with every snapshot answer.
    pub replica: HeaderValue,
    /// What the snapshot answers were.
    pub snapshot_answers: SnapshotAnswerMetrics,
    /// The proxies whose filters poll this replica.
    pub proxies: ProxyReports,
    /// Endpoint diagnostics asked of proxies and their reports.
    pub diagnostics: Diagnostics,
}

/// Labels of [`SnapshotAnswerMetrics`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AnswerLabels {
    /// `not_modified` (the poller is current), `delta` (what changed since its version) or
    /// `full` (the whole snapshot: a first poll, an old filter, or a base version no longer
    /// kept).
    pub kind: &'static str,
}

/// The snapshot answers by kind, and the body bytes they carried: how much the delta
/// distribution saves, and a sign of pollers that keep needing the whole snapshot (filters
/// too old for deltas, or falling more than [`fulcrum_pipeline::DELTA_HISTORY`] versions
/// behind). Cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct SnapshotAnswerMetrics {
    /// `fulcrum_snapshot_answers_total{kind}`.
    pub answers: Family<AnswerLabels, Counter>,
    /// `fulcrum_snapshot_answer_bytes_total{kind}`.
    pub bytes: Family<AnswerLabels, Counter>,
}

impl SnapshotAnswerMetrics {
    /// Registers both counters under the `fulcrum` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("fulcrum");
        registry.register(
            "snapshot_answers",
            "Answers to GET /v1/snapshot, by kind (not_modified, delta, full)",
            self.answers.clone(),
        );
        registry.register(
            "snapshot_answer_bytes",
            "Body bytes of the answers to GET /v1/snapshot, by kind",
            self.bytes.clone(),
        );
    }

    fn answered(&self, kind: &'static str, bytes: usize) {
        let labels = AnswerLabels { kind };
        self.answers.get_or_create(&labels).inc();
        self.bytes.get_or_create(&labels).inc_by(bytes as u64);
    }
}

/// The header naming the replica that answered a snapshot request.
pub const REPLICA_HEADER: &str = "x-fulcrum-replica";

/// The snapshot-answer header asking the polling proxy for a service's endpoint diagnostics:
/// `<request id> <service>`.
pub const DIAGNOSE_HEADER: &str = "x-fulcrum-diagnose";

/// Default of the `wait` of `GET /v1/proxies/{node}/endpoints`, in seconds.
pub const DEFAULT_DIAGNOSTICS_WAIT_SECONDS: u64 = 10;

/// Longest `wait` of `GET /v1/proxies/{node}/endpoints`, in seconds.
pub const MAX_DIAGNOSTICS_WAIT_SECONDS: u64 = 30;

/// Routes that wait by design (an endpoint diagnostics ask waits for the proxy's report):
/// served from the long polls' share of the in-flight cap, with their deadline.
pub const LONG_POLL_ROUTES: &[&str] = &["/v1/proxies/{node}/endpoints"];

/// Routes whose request bodies have a bound of their own, above the listener's: a proxy's
/// endpoint diagnostics report (every worker's view, up to [`MAX_REPORT_BYTES`]).
pub const LARGE_BODY_ROUTES: &[(&str, usize)] = &[("/v1/diagnostics", MAX_REPORT_BYTES)];

/// The API's routes: read-only.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/snapshot", get(snapshot))
        .route("/v1/status", get(status))
        .route("/v1/proxies", get(proxies))
        .route("/v1/proxies/{node}/endpoints", get(endpoints))
        .route("/v1/diagnostics", post(receive_diagnostics))
        .route("/v1/policy/history", get(policy_history))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The admin API's routes, each requiring one of `tokens` when given.
pub fn admin_router(state: AppState, tokens: Option<Arc<TokenAuth>>) -> Router {
    Router::new()
        .route("/v1/policy/history", get(policy_history))
        .route("/v1/policy/rollback", post(policy_rollback))
        .with_state(state)
        .layer(axum::middleware::from_fn(
            move |request: Request, next: Next| {
                let tokens = tokens.clone();
                async move { authorize(tokens.as_deref(), request, next).await }
            },
        ))
}

/// Lets `request` through when no tokens are configured or it bears one of them; `401`
/// otherwise. Every admin request is logged with who made it.
async fn authorize(tokens: Option<&TokenAuth>, request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let identity = match tokens {
        None => "unauthenticated (loopback)".to_owned(),
        Some(tokens) => {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok());
            match tokens.identify(presented) {
                Ok(identity) => identity.name,
                Err(error) => {
                    warn!(%method, %path, %error, "refused an admin request");
                    return (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer")],
                        format!("{error}\n"),
                    )
                        .into_response();
                }
            }
        }
    };
    info!(%method, %path, %identity, "admin request");
    next.run(request).await
}

/// Whether `If-None-Match` names `etag` (or is `*`).
fn matches_etag(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|candidate| candidate.trim().trim_start_matches("W/"))
        .any(|candidate| candidate == etag || candidate == "*")
}

/// Most `If-None-Match` entries looked up for a delta base: a filter sends one; anything
/// longer is a client to answer with the whole snapshot, not to search for.
const MAX_DELTA_BASES: usize = 4;

/// The versions an `If-None-Match` names (quotes and weak markers stripped), at most
/// [`MAX_DELTA_BASES`].
fn named_versions(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|candidate| candidate.trim().trim_start_matches("W/").trim_matches('"'))
        .filter(|version| !version.is_empty())
        .take(MAX_DELTA_BASES)
}

/// Whether the client takes delta answers: its `Accept` names [`DELTA_MEDIA_TYPE`].
fn accepts_delta(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| range.split(';').next().map(str::trim) == Some(DELTA_MEDIA_TYPE))
}

async fn snapshot(State(state): State<AppState>, headers: HeaderMap) -> Response {
    state
        .proxies
        .record_poll(&headers, named_versions(&headers).next(), SystemTime::now());
    let Some(served) = state.store.current_for_proxy() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no snapshot yet\n").into_response();
    };
    let etag = HeaderValue::from_str(&served.etag)
        .unwrap_or_else(|_| HeaderValue::from_static("\"invalid\""));
    let mut diagnose = HeaderMap::new();
    if let Some(node) = ProxyReports::node_id(&headers)
        && let Some((id, service)) = state
            .diagnostics
            .table()
            .request_for(&node, SystemTime::now())
        && let Ok(value) = HeaderValue::from_str(&format!("{id} {service}"))
    {
        diagnose.insert(HeaderName::from_static(DIAGNOSE_HEADER), value);
    }
    let replica = (HeaderName::from_static(REPLICA_HEADER), state.replica);
    let vary = (
        header::VARY,
        HeaderValue::from_static("accept, if-none-match"),
    );
    if matches_etag(&headers, &served.etag) {
        state.snapshot_answers.answered("not_modified", 0);
        return (
            StatusCode::NOT_MODIFIED,
            diagnose,
            [(header::ETAG, etag), replica, vary],
        )
            .into_response();
    }
    let delta = accepts_delta(&headers)
        .then(|| named_versions(&headers).find_map(|base| state.store.delta(&served, base)))
        .flatten();
    let (kind, content_type, body) = match delta {
        Some(delta) => ("delta", HeaderValue::from_static(DELTA_MEDIA_TYPE), delta),
        None => (
            "full",
            HeaderValue::from_static("application/json"),
            served.body.clone(),
        ),
    };
    state.snapshot_answers.answered(kind, body.len());
    (
        diagnose,
        [
            (header::ETAG, etag),
            (header::CONTENT_TYPE, content_type),
            replica,
            vary,
        ],
        // One copy of the snapshot (and of each delta) backs every proxy's answer.
        Extension(SharedAnswer),
        body,
    )
        .into_response()
}

async fn ready(State(state): State<AppState>) -> Response {
    match state.store.current() {
        Some(_) => (StatusCode::OK, "ready\n").into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first snapshot\n",
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let served = state.store.current();
    state.proxies.refresh_gauges(
        SystemTime::now(),
        served
            .as_ref()
            .map(|served| served.snapshot.version.as_str()),
    );
    let mut body = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {error}\n"),
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

/// The body of `/v1/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The current snapshot version, if any.
    pub snapshot_version: Option<String>,
    /// Endpoints and services left out of it as invalid, with the first problems.
    pub dropped: Dropped,
    /// The newer snapshot refused for exceeding the budget, while the served one stays.
    pub refused: Option<Refused>,
    /// Every open xDS stream.
    pub streams: Vec<StreamStatus>,
}

async fn status(State(state): State<AppState>) -> Json<Status> {
    Json(Status {
        snapshot_version: state
            .store
            .current()
            .map(|served| served.snapshot.version.clone()),
        dropped: Dropped::clone(&state.dropped.borrow()),
        refused: state.refused.borrow().as_deref().cloned(),
        streams: state.nodes.snapshot(),
    })
}

/// The body of `/v1/proxies`: a stable schema, fields only ever added.
#[derive(Debug, Serialize)]
pub struct Proxies {
    /// The snapshot version this replica serves, which `current` is judged against.
    pub snapshot_version: Option<String>,
    /// This replica's name: each replica lists only the proxies that polled it.
    pub replica: String,
    /// A proxy unheard for this long is `stale`.
    pub stale_after_seconds: f64,
    /// A proxy unheard for this long is no longer listed.
    pub expire_after_seconds: f64,
    /// Every proxy, sorted by node id.
    pub proxies: Vec<ProxyView>,
}

/// The query of `GET /v1/proxies`.
#[derive(Debug, Deserialize)]
pub struct ProxiesQuery {
    /// Only the proxies in this state: `current`, `behind` or `stale`.
    pub state: Option<String>,
}

async fn proxies(State(state): State<AppState>, Query(query): Query<ProxiesQuery>) -> Response {
    let only = match query
        .state
        .as_deref()
        .map(|label| (label, ProxyState::from_label(label)))
    {
        None => None,
        Some((_, Some(only))) => Some(only),
        Some((label, None)) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("unknown state {label:?}: expected current, behind or stale\n"),
            )
                .into_response();
        }
    };
    let served = state
        .store
        .current()
        .map(|served| served.snapshot.version.clone());
    let limits = state.proxies.limits();
    Json(Proxies {
        proxies: state
            .proxies
            .view(SystemTime::now(), served.as_deref(), only),
        snapshot_version: served,
        replica: String::from_utf8_lossy(state.replica.as_bytes()).into_owned(),
        stale_after_seconds: limits.stale_after.as_secs_f64(),
        expire_after_seconds: limits.expire_after.as_secs_f64(),
    })
    .into_response()
}

/// The query of `GET /v1/proxies/{node}/endpoints`.
#[derive(Debug, Deserialize)]
pub struct EndpointsQuery {
    /// The service to diagnose.
    pub service: String,
    /// How long to wait for the proxy's report, in seconds.
    pub wait: Option<u64>,
}

async fn endpoints(
    State(state): State<AppState>,
    Path(node): Path<String>,
    Query(query): Query<EndpointsQuery>,
) -> Response {
    if !valid_service(&query.service) {
        return (
            StatusCode::BAD_REQUEST,
            "service must be 1 to 253 bytes of printable ASCII without spaces\n",
        )
            .into_response();
    }
    let wait = query.wait.unwrap_or(DEFAULT_DIAGNOSTICS_WAIT_SECONDS);
    if !(1..=MAX_DIAGNOSTICS_WAIT_SECONDS).contains(&wait) {
        return (
            StatusCode::BAD_REQUEST,
            format!("wait must be 1 to {MAX_DIAGNOSTICS_WAIT_SECONDS} seconds\n"),
        )
            .into_response();
    }
    if !state.proxies.knows(&node, SystemTime::now()) {
        return (
            StatusCode::NOT_FOUND,
            format!(
                "proxy {node:?} has not polled this replica recently: see GET /v1/proxies (each replica knows only the proxies that poll it)\n"
            ),
        )
            .into_response();
    }
    match state
        .diagnostics
        .ask_and_wait(&node, &query.service, Duration::from_secs(wait))
        .await
    {
        Some(view) => Json(view).into_response(),
        None => (
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "proxy {node:?} sent no endpoint diagnostics within {wait} s: its filter may predate endpoint diagnostics, it may have stopped polling, or its report went to another replica\n"
            ),
        )
            .into_response(),
    }
}

async fn receive_diagnostics(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Ok(body) = axum::body::to_bytes(body, MAX_REPORT_BYTES).await else {
        state.diagnostics.refused_too_large();
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a diagnostics report is at most {MAX_REPORT_BYTES} bytes\n"),
        )
            .into_response();
    };
    let node = ProxyReports::node_id(&headers);
    match state
        .diagnostics
        .receive(node.as_deref(), &body, SystemTime::now())
    {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(refused) => {
            debug!(
                reason = refused.label(),
                "refused an endpoint diagnostics report"
            );
            let status = match refused {
                ReportRefused::Unrequested => StatusCode::CONFLICT,
                ReportRefused::Invalid(_) | ReportRefused::NodeId => StatusCode::BAD_REQUEST,
            };
            (status, format!("{refused}\n")).into_response()
        }
    }
}

async fn policy_history(State(state): State<AppState>) -> Json<Vec<AppliedPolicy>> {
    Json(
        state
            .policies
            .history()
            .iter()
            .map(|applied| AppliedPolicy::clone(applied))
            .collect(),
    )
}

/// The query of `POST /v1/policy/rollback`.
#[derive(Debug, Deserialize)]
pub struct RollbackQuery {
    /// The kept version to make current again.
    pub version: u64,
}

async fn policy_rollback(
    State(state): State<AppState>,
    Query(query): Query<RollbackQuery>,
) -> Response {
    match state.policies.rollback(query.version).await {
        Ok(applied) => Json(AppliedPolicy::clone(&applied)).into_response(),
        Err(error @ RollbackError::UnknownVersion { .. }) => {
            (StatusCode::NOT_FOUND, format!("{error}\n")).into_response()
        }
        Err(error @ RollbackError::NotRecorded(_)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(value).expect("header"),
        );
        headers
    }

    #[test]
    fn if_none_match_accepts_lists_weak_tags_and_star() {
        assert!(matches_etag(&headers("\"v1\""), "\"v1\""));
        assert!(matches_etag(&headers("\"v0\", W/\"v1\""), "\"v1\""));
        assert!(matches_etag(&headers("*"), "\"v1\""));
        assert!(!matches_etag(&headers("\"v0\""), "\"v1\""));
        assert!(!matches_etag(&HeaderMap::new(), "\"v1\""));
    }
}
