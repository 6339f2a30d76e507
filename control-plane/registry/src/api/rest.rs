//! The REST/JSON face, mounted under `/v1/registry`:
//!
//! - `POST /v1/registry/instances` — register; body: an [`InstanceSpec`]; 200 with the
//!   registration.
//! - `PUT /v1/registry/instances/{id}/heartbeat` — renew; 200 `{"ttl_ms": N}`.
//! - `DELETE /v1/registry/instances/{id}` — deregister; 204.
//! - `GET /v1/registry/services/{name}/instances?tags=a,b&capabilities=x&zone=z&health=healthy,unknown&metadata.KEY=VALUE&pick=true`
//!   — discover; 200 `{"registrations": [...], "cursor": {...}}`.
//! - `GET /v1/registry/watch?epoch=E&revision=R&wait_ms=30000` — long-poll: answers at once
//!   when something changed after the cursor (or with a reset when the cursor is unknown),
//!   else when the first change arrives or after `wait_ms` (at most 60000) with no changes.
//!
//! Long-polling rather than SSE: it passes every proxy and load balancer unchanged, needs no
//! client library, and the cursor makes reconnects lossless.
//! Errors are `{"error": "invalid_argument", "message": "...", "fields": [...]}`.

use std::{future::Future, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, Query as QueryParams, State, rejection::JsonRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use fulcrum_core::ValidationError;
use serde::{Deserialize, Serialize};

use super::{ApiState, MAX_WATCH_WAIT};
use crate::{
    BackendError, InstanceSpec, Query, RegistryError,
    admission::Refusal,
    auth::{AuthError, Identity},
    metrics::{Api, Operation},
    model::FieldErrors,
    registry::record_ttl_ms,
    view::{Cursor, Entry, HealthStatus, Since},
};

/// A registration as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationJson {
    /// What was registered, defaults written out.
    pub instance: InstanceSpec,
    /// The registering token's identity.
    pub owner: String,
    /// `unknown`, `healthy` or `unhealthy`.
    pub health: String,
    /// First registration, ms since the Unix epoch.
    pub registered_at_unix_ms: u64,
    /// Effective TTL, ms.
    pub ttl_ms: u32,
}

impl From<&Entry> for RegistrationJson {
    fn from(entry: &Entry) -> Self {
        Self {
            instance: entry.record.registration.to_spec(),
            owner: entry.record.owner.to_string(),
            health: entry.health.as_str().to_owned(),
            registered_at_unix_ms: entry.record.registered_at_unix_ms,
            ttl_ms: record_ttl_ms(&entry.record),
        }
    }
}

/// A cursor in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorJson {
    /// The replica run.
    pub epoch: String,
    /// Changes seen up to here.
    pub revision: u64,
}

impl From<Cursor> for CursorJson {
    fn from(cursor: Cursor) -> Self {
        Self {
            epoch: cursor.epoch,
            revision: cursor.revision,
        }
    }
}

/// `POST /v1/registry/instances` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterJson {
    /// The stored registration.
    pub registration: RegistrationJson,
}

/// `PUT .../heartbeat` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatJson {
    /// The lease's TTL, ms.
    pub ttl_ms: u32,
}

/// Discover answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiscoverJson {
    /// Matches sorted by id, or the one picked.
    pub registrations: Vec<RegistrationJson>,
    /// Watch from here.
    pub cursor: CursorJson,
}

/// One change in a watch answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeJson {
    /// `put` or `delete`.
    pub kind: String,
    /// Instance id.
    pub id: String,
    /// After a put.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<RegistrationJson>,
    /// The view revision of the change (0 in a reset).
    pub revision: u64,
}

/// Watch answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatchJson {
    /// `changes` replaces everything the client knew.
    pub reset: bool,
    /// Changes, oldest first.
    pub changes: Vec<ChangeJson>,
    /// Poll again from here.
    pub cursor: CursorJson,
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorJson {
    /// gRPC-style code name in snake case, e.g. `invalid_argument`.
    pub error: String,
    /// What went wrong and how to fix it.
    pub message: String,
    /// The bad fields, for `invalid_argument`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldErrorJson>,
}

/// One bad field.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FieldErrorJson {
    /// Field path.
    pub field: String,
    /// Reason.
    pub reason: String,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    /// The gRPC code name the HTTP status stands for; equals `body.error`.
    code: &'static str,
    body: ErrorJson,
}

impl ApiError {
    fn new(
        status: StatusCode,
        code: &'static str,
        message: String,
        fields: &[ValidationError],
    ) -> Self {
        Self {
            status,
            code,
            body: ErrorJson {
                error: code.to_owned(),
                message,
                fields: fields
                    .iter()
                    .map(|f| FieldErrorJson {
                        field: f.path.clone(),
                        reason: f.message.clone(),
                    })
                    .collect(),
            },
        }
    }

    fn invalid(errors: FieldErrors) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("invalid request: {errors}"),
            &errors.0,
        )
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            error.to_string(),
            &[],
        )
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        let message = error.to_string();
        match error {
            RegistryError::Invalid(errors) => Self::invalid(errors),
            RegistryError::Refused(refusal) => {
                let (status, code) = refusal_status(&refusal);
                let fields: Vec<ValidationError> = refusal
                    .field()
                    .map(|field| ValidationError {
                        path: field.to_owned(),
                        message: message.clone(),
                    })
                    .into_iter()
                    .collect();
                Self::new(status, code, message, &fields)
            }
            RegistryError::AddressInUse { .. } => {
                Self::new(StatusCode::CONFLICT, "already_exists", message, &[])
            }
            RegistryError::Backend(BackendError::NotFound { .. }) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", message, &[])
            }
            RegistryError::Backend(BackendError::NotOwner { .. }) => {
                Self::new(StatusCode::FORBIDDEN, "permission_denied", message, &[])
            }
            RegistryError::Backend(BackendError::Unavailable { .. }) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message, &[])
            }
        }
    }
}

/// The HTTP status and code of a refusal: an address never admitted is a bad field (400);
/// a name or address outside the identity's scope is not this token's to register (403); a
/// quota or the cap is full (429).
fn refusal_status(refusal: &Refusal) -> (StatusCode, &'static str) {
    match refusal {
        Refusal::AddressClass { .. } => (StatusCode::BAD_REQUEST, "invalid_argument"),
        Refusal::ServiceScope { .. } | Refusal::AddressScope { .. } => {
            (StatusCode::FORBIDDEN, "permission_denied")
        }
        Refusal::IdentityQuota { .. } | Refusal::GlobalCap { .. } => {
            (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted")
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"fulcrum-registry\""),
            );
        }
        response
    }
}

/// Where the watch long-polls: it may hold a request for up to [`super::MAX_WATCH_WAIT`].
const WATCH_PATH: &str = "/v1/registry/watch";

/// The routes that wait by design, for a server's request deadline to add
/// [`super::MAX_WATCH_WAIT`] to.
pub const LONG_POLL_PATHS: &[&str] = &[WATCH_PATH];

/// The router for the paths above.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/registry/instances", post(register))
        .route("/v1/registry/instances/{id}/heartbeat", put(heartbeat))
        .route(
            "/v1/registry/instances/{id}",
            axum::routing::delete(deregister),
        )
        .route("/v1/registry/services/{name}/instances", get(discover))
        .route(WATCH_PATH, get(watch))
        .with_state(state)
}

fn identify(state: &ApiState, headers: &HeaderMap) -> Result<Identity, ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    Ok(state.auth.identify(authorization)?)
}

/// Runs one handler's work and counts it (code and latency), whatever its outcome.
async fn measured<T>(
    state: &ApiState,
    operation: Operation,
    call: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let started = tokio::time::Instant::now();
    let result = call.await;
    let code = result.as_ref().map_or_else(|error| error.code, |_| "ok");
    state
        .registry
        .metrics()
        .observe(Api::Rest, operation, code, started.elapsed());
    result
}

async fn register(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<InstanceSpec>, JsonRejection>,
) -> Result<Json<RegisterJson>, ApiError> {
    measured(&state, Operation::Register, async {
        let identity = identify(&state, &headers)?;
        let Json(spec) = body.map_err(|rejection| {
            ApiError::invalid(FieldErrors::one("body", rejection.body_text()))
        })?;
        let entry = state.registry.register(&spec, &identity).await?;
        Ok(Json(RegisterJson {
            registration: RegistrationJson::from(&entry),
        }))
    })
    .await
}

async fn heartbeat(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<HeartbeatJson>, ApiError> {
    measured(&state, Operation::Heartbeat, async {
        let owner = identify(&state, &headers)?.name;
        let ttl = state.registry.heartbeat(&id, &owner).await?;
        Ok(Json(HeartbeatJson {
            ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
        }))
    })
    .await
}

async fn deregister(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    measured(&state, Operation::Deregister, async {
        let owner = identify(&state, &headers)?.name;
        state.registry.deregister(&id, &owner).await?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

fn split(value: &str) -> impl Iterator<Item = String> + '_ {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
}

/// Parses discover query parameters into a [`Query`] for `service`.
pub fn parse_query(service: String, params: &[(String, String)]) -> Result<Query, FieldErrors> {
    let mut query = Query {
        service,
        ..Query::default()
    };
    let mut errors = Vec::new();
    for (key, value) in params {
        match key.as_str() {
            "tags" => query.tags.extend(split(value)),
            "capabilities" => query.capabilities.extend(split(value)),
            "zone" => query.zone = Some(value.clone()),
            "pick" => match value.as_str() {
                "true" | "1" | "" => query.pick = true,
                "false" | "0" => query.pick = false,
                other => errors.push(ValidationError {
                    path: "pick".into(),
                    message: format!("`{other}` is not true or false"),
                }),
            },
            "health" => {
                for item in split(value) {
                    match HealthStatus::parse(&item) {
                        Some(health) => {
                            query.health.insert(health);
                        }
                        None => errors.push(ValidationError {
                            path: "health".into(),
                            message: format!("`{item}` is not healthy, unhealthy or unknown"),
                        }),
                    }
                }
            }
            other => match other.strip_prefix("metadata.") {
                Some(meta) if !meta.is_empty() => {
                    query.metadata.insert(meta.to_owned(), value.clone());
                }
                _ => errors.push(ValidationError {
                    path: other.to_owned(),
                    message: "unknown parameter; expected tags, capabilities, zone, health, pick or metadata.KEY".into(),
                }),
            },
        }
    }
    if errors.is_empty() {
        Ok(query)
    } else {
        Err(FieldErrors(errors))
    }
}

async fn discover(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    QueryParams(params): QueryParams<Vec<(String, String)>>,
) -> Result<Json<DiscoverJson>, ApiError> {
    measured(&state, Operation::Discover, async {
        identify(&state, &headers)?;
        let query = parse_query(name, &params).map_err(ApiError::invalid)?;
        let discovery = state.registry.discover(&query)?;
        Ok(Json(DiscoverJson {
            registrations: discovery
                .entries
                .iter()
                .map(RegistrationJson::from)
                .collect(),
            cursor: discovery.cursor.into(),
        }))
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchParams {
    epoch: Option<String>,
    revision: Option<u64>,
    wait_ms: Option<u64>,
}

/// Turns what changed into the JSON answer.
pub fn watch_json(since: Since, cursor: Cursor) -> WatchJson {
    let (reset, changes) = match since {
        Since::Reset(entries) => (
            true,
            entries
                .iter()
                .map(|entry| ChangeJson {
                    kind: "put".into(),
                    id: entry.record.registration.id.to_string(),
                    registration: Some(entry.into()),
                    revision: 0,
                })
                .collect(),
        ),
        Since::Changes(changes) => (
            false,
            changes
                .into_iter()
                .map(|change| ChangeJson {
                    kind: if change.entry.is_some() {
                        "put"
                    } else {
                        "delete"
                    }
                    .into(),
                    id: change.id.to_string(),
                    registration: change.entry.as_ref().map(RegistrationJson::from),
                    revision: change.revision,
                })
                .collect(),
        ),
    };
    WatchJson {
        reset,
        changes,
        cursor: cursor.into(),
    }
}

/// Counted once per long poll; its latency includes the wait for a change.
async fn watch(
    State(state): State<ApiState>,
    headers: HeaderMap,
    params: Result<QueryParams<WatchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<WatchJson>, ApiError> {
    measured(&state, Operation::Watch, async {
        identify(&state, &headers)?;
        let QueryParams(params) = params.map_err(|rejection| {
            ApiError::invalid(FieldErrors::one("query", rejection.body_text()))
        })?;
        let cursor = match (params.epoch, params.revision) {
            (Some(epoch), Some(revision)) => Some(Cursor { epoch, revision }),
            (None, None) => None,
            _ => {
                return Err(ApiError::invalid(FieldErrors::one(
                    "epoch",
                    "give both epoch and revision (from a previous answer's cursor), or neither",
                )));
            }
        };
        let wait = Duration::from_millis(params.wait_ms.unwrap_or(30_000)).min(MAX_WATCH_WAIT);
        let (since, now) = state.registry.wait_since(cursor.as_ref(), wait).await;
        Ok(Json(watch_json(since, now)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn query_parameters_map_onto_the_discovery_filter() {
        let query = parse_query(
            "svc".into(),
            &params(&[
                ("tags", "a,b"),
                ("tags", "c"),
                ("capabilities", "llm.chat"),
                ("zone", "z1"),
                ("health", "healthy,unhealthy"),
                ("metadata.version", "v2"),
                ("pick", "true"),
            ]),
        )
        .expect("valid");
        assert_eq!(
            query.tags,
            BTreeSet::from(["a".into(), "b".into(), "c".into()])
        );
        assert_eq!(
            query.metadata,
            BTreeMap::from([("version".into(), "v2".into())])
        );
        assert_eq!(query.zone.as_deref(), Some("z1"));
        assert!(query.pick);
        assert_eq!(query.health.len(), 2);
    }

    #[test]
    fn unknown_parameters_and_values_are_named() {
        let error = parse_query("svc".into(), &params(&[("tag", "a"), ("health", "sick")]))
            .expect_err("invalid");
        let fields: Vec<&str> = error.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(fields, ["tag", "health"]);
    }
}
