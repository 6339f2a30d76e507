//! The gRPC face: `fulcrum.registry.v1.Registry` (see `proto/fulcrum/registry/v1/registry.proto`).
//!
//! Messages map field for field onto the model ([`InstanceSpec`] and friends), so both faces
//! share one validation and give the same field names in errors. Watch streams a first
//! answer (the changes after the cursor, or a reset) and then one answer per burst of
//! changes, until the client goes away.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use fulcrum_proto::registry::v1 as pb;
use tokio::sync::mpsc::Sender;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, metadata::MetadataMap};

use super::{ApiState, MAX_WATCH_WAIT};
use crate::{
    BackendError, InstanceSpec, Query, Refusal, Registry, RegistryError,
    auth::{AuthError, Identity},
    metrics::{Api, Operation, grpc_code_name},
    model::{GrpcCheckSpec, HealthCheckSpec, HttpCheckSpec, PortSpec},
    registry::{AnswerCache, record_ttl_ms},
    view::{Cursor, Entry, HealthStatus, Since},
};

/// The tonic service; wrap it with [`server`].
#[derive(Debug, Clone)]
pub struct GrpcApi {
    state: ApiState,
    /// Discover answers (without `pick`) per query and service generation: a service with
    /// thousands of instances is converted to proto once per change, not once per call.
    answers: Arc<AnswerCache<[pb::Registration]>>,
}

/// The gRPC server for `state`, ready to add to a `tonic::transport::Server`.
pub fn server(state: ApiState) -> pb::registry_server::RegistryServer<GrpcApi> {
    pb::registry_server::RegistryServer::new(GrpcApi {
        state,
        answers: Arc::default(),
    })
}

fn identify(state: &ApiState, metadata: &MetadataMap) -> Result<Identity, Status> {
    let authorization = metadata
        .get("authorization")
        .and_then(|value| value.to_str().ok());
    state
        .auth
        .identify(authorization)
        .map_err(|error: AuthError| Status::unauthenticated(error.to_string()))
}

fn status(error: RegistryError) -> Status {
    let message = error.to_string();
    match error {
        RegistryError::Invalid(_) => Status::invalid_argument(message),
        // The codes of the REST face's statuses; the message names the field.
        RegistryError::Refused(refusal) => match refusal {
            Refusal::AddressClass { .. } => {
                Status::invalid_argument(format!("invalid request: address: {message}"))
            }
            Refusal::ServiceScope { .. } | Refusal::AddressScope { .. } => {
                let field = refusal.field().unwrap_or_default();
                Status::permission_denied(format!("{field}: {message}"))
            }
            Refusal::IdentityQuota { .. } | Refusal::GlobalCap { .. } => {
                Status::resource_exhausted(message)
            }
        },
        RegistryError::AddressInUse { .. } => Status::already_exists(message),
        RegistryError::Backend(BackendError::NotFound { .. }) => Status::not_found(message),
        RegistryError::Backend(BackendError::NotOwner { .. }) => Status::permission_denied(message),
        RegistryError::Backend(BackendError::Unavailable { .. }) => Status::unavailable(message),
    }
}

/// The model spec of a proto instance (validation happens on the spec).
pub fn spec_from_proto(instance: pb::Instance) -> InstanceSpec {
    InstanceSpec {
        name: instance.name,
        id: instance.id,
        address: instance.address,
        port: instance.port,
        protocol: instance.protocol,
        weight: instance.weight,
        zone: instance.zone,
        tags: instance.tags,
        capabilities: instance.capabilities,
        metadata: instance.metadata.into_iter().collect(),
        health_check: instance.health_check.map(|check| {
            let mut spec = HealthCheckSpec {
                interval_ms: check.interval_ms,
                timeout_ms: check.timeout_ms,
                healthy_threshold: check.healthy_threshold,
                unhealthy_threshold: check.unhealthy_threshold,
                jitter_ms: check.jitter_ms,
                ..HealthCheckSpec::default()
            };
            match check.kind {
                Some(pb::health_check::Kind::Http(http)) => {
                    spec.http = Some(HttpCheckSpec {
                        path: http.path,
                        expected_statuses: http.expected_statuses,
                        port: http.port,
                    });
                }
                Some(pb::health_check::Kind::Tcp(tcp)) => {
                    spec.tcp = Some(PortSpec { port: tcp.port });
                }
                Some(pb::health_check::Kind::Grpc(grpc)) => {
                    spec.grpc = Some(GrpcCheckSpec {
                        service: grpc.service,
                        port: grpc.port,
                    });
                }
                None => {}
            }
            spec
        }),
        ttl_ms: instance.ttl_ms,
    }
}

/// The proto instance of a model spec.
pub fn spec_to_proto(spec: InstanceSpec) -> pb::Instance {
    pb::Instance {
        name: spec.name,
        id: spec.id,
        address: spec.address,
        port: spec.port,
        protocol: spec.protocol,
        weight: spec.weight,
        zone: spec.zone,
        tags: spec.tags,
        capabilities: spec.capabilities,
        metadata: spec.metadata.into_iter().collect(),
        health_check: spec.health_check.map(|check| pb::HealthCheck {
            kind: if let Some(http) = check.http {
                Some(pb::health_check::Kind::Http(pb::HttpCheck {
                    path: http.path,
                    expected_statuses: http.expected_statuses,
                    port: http.port,
                }))
            } else if let Some(grpc) = check.grpc {
                Some(pb::health_check::Kind::Grpc(pb::GrpcCheck {
                    service: grpc.service,
                    port: grpc.port,
                }))
            } else {
                check
                    .tcp
                    .map(|tcp| pb::health_check::Kind::Tcp(pb::TcpCheck { port: tcp.port }))
            },
            interval_ms: check.interval_ms,
            timeout_ms: check.timeout_ms,
            healthy_threshold: check.healthy_threshold,
            unhealthy_threshold: check.unhealthy_threshold,
            jitter_ms: check.jitter_ms,
        }),
        ttl_ms: spec.ttl_ms,
    }
}

fn health_to_proto(health: HealthStatus) -> pb::HealthStatus {
    match health {
        HealthStatus::Unknown => pb::HealthStatus::Unknown,
        HealthStatus::Healthy => pb::HealthStatus::Healthy,
        HealthStatus::Unhealthy => pb::HealthStatus::Unhealthy,
    }
}

fn registration_to_proto(entry: &Entry) -> pb::Registration {
    pb::Registration {
        instance: Some(spec_to_proto(entry.record.registration.to_spec())),
        owner: entry.record.owner.to_string(),
        health: health_to_proto(entry.health) as i32,
        registered_at_unix_ms: entry.record.registered_at_unix_ms,
        ttl_ms: record_ttl_ms(&entry.record),
    }
}

fn cursor_to_proto(cursor: Cursor) -> pb::Cursor {
    pb::Cursor {
        epoch: cursor.epoch,
        revision: cursor.revision,
    }
}

fn watch_to_proto(since: Since, cursor: Cursor) -> pb::WatchResponse {
    let (reset, changes) = match since {
        Since::Reset(entries) => (
            true,
            entries
                .iter()
                .map(|entry| pb::Change {
                    kind: pb::change::Kind::Put as i32,
                    id: entry.record.registration.id.to_string(),
                    registration: Some(registration_to_proto(entry)),
                    revision: 0,
                })
                .collect(),
        ),
        Since::Changes(changes) => (
            false,
            changes
                .into_iter()
                .map(|change| pb::Change {
                    kind: if change.entry.is_some() {
                        pb::change::Kind::Put
                    } else {
                        pb::change::Kind::Delete
                    } as i32,
                    id: change.id.to_string(),
                    registration: change.entry.as_ref().map(registration_to_proto),
                    revision: change.revision,
                })
                .collect(),
        ),
    };
    pb::WatchResponse {
        reset,
        changes,
        cursor: Some(cursor_to_proto(cursor)),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

impl GrpcApi {
    /// Runs one call and counts it (code and latency), whatever its outcome.
    async fn measured<T>(
        &self,
        operation: Operation,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let started = tokio::time::Instant::now();
        let result = call.await;
        let code = result
            .as_ref()
            .map_or_else(|status| status.code(), |_| tonic::Code::Ok);
        self.state.registry.metrics().observe(
            Api::Grpc,
            operation,
            grpc_code_name(code),
            started.elapsed(),
        );
        result
    }

    // The calls themselves, uncounted: the trait implementation below counts them.

    async fn register_call(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let identity = identify(&self.state, request.metadata())?;
        let instance = request
            .into_inner()
            .instance
            .ok_or_else(|| Status::invalid_argument("invalid request: instance: is required"))?;
        let entry = self
            .state
            .registry
            .register(&spec_from_proto(instance), &identity)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RegisterResponse {
            registration: Some(registration_to_proto(&entry)),
        }))
    }

    async fn heartbeat_call(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let owner = identify(&self.state, request.metadata())?.name;
        let ttl = self
            .state
            .registry
            .heartbeat(&request.into_inner().id, &owner)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::HeartbeatResponse {
            ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
        }))
    }

    async fn deregister_call(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let owner = identify(&self.state, request.metadata())?.name;
        self.state
            .registry
            .deregister(&request.into_inner().id, &owner)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }

    async fn discover_call(
        &self,
        request: Request<pb::DiscoverRequest>,
    ) -> Result<Response<pb::DiscoverResponse>, Status> {
        identify(&self.state, request.metadata())?;
        let request = request.into_inner();
        let mut health = std::collections::BTreeSet::new();
        for (index, value) in request.health.iter().enumerate() {
            let key = match pb::HealthStatus::try_from(*value) {
                Ok(pb::HealthStatus::Unknown) => HealthStatus::Unknown,
                Ok(pb::HealthStatus::Healthy) => HealthStatus::Healthy,
                Ok(pb::HealthStatus::Unhealthy) => HealthStatus::Unhealthy,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "invalid request: health[{index}]: {value} is not HEALTHY, UNHEALTHY or UNKNOWN"
                    )));
                }
            };
            health.insert(key);
        }
        let query = Query {
            service: request.name,
            tags: request.tags.into_iter().collect(),
            capabilities: request.capabilities.into_iter().collect(),
            metadata: request.metadata.into_iter().collect(),
            zone: (!request.zone.is_empty()).then_some(request.zone),
            health,
            pick: request.pick,
        };
        let discovery = self.state.registry.discover(&query).map_err(status)?;
        let convert = || -> Vec<pb::Registration> {
            discovery
                .entries
                .iter()
                .map(registration_to_proto)
                .collect()
        };
        let registrations = if query.pick {
            convert()
        } else {
            self.answers
                .get_or_build(&query, discovery.generation, || Arc::from(convert()))
                .to_vec()
        };
        Ok(Response::new(pb::DiscoverResponse {
            registrations,
            cursor: Some(cursor_to_proto(discovery.cursor)),
        }))
    }

    async fn watch_call(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        identify(&self.state, request.metadata())?;
        let cursor = request.into_inner().after.map(|after| Cursor {
            epoch: after.epoch,
            revision: after.revision,
        });
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        tokio::spawn(stream_watch(self.state.registry.clone(), cursor, sender));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// Sends a watch's answers to `sender`: the first at once (the changes after `cursor`, or a
/// reset), then one per burst of changes. Ends as soon as the client goes away (the stream's
/// receiver is dropped), even in the middle of a wait for changes.
async fn stream_watch(
    registry: Arc<Registry>,
    mut cursor: Option<Cursor>,
    sender: Sender<Result<pb::WatchResponse, Status>>,
) {
    let mut first = true;
    loop {
        let wait = if first {
            Duration::ZERO
        } else {
            MAX_WATCH_WAIT
        };
        let (since, now) = tokio::select! {
            answer = registry.wait_since(cursor.as_ref(), wait) => answer,
            () = sender.closed() => return,
        };
        let empty = matches!(&since, Since::Changes(changes) if changes.is_empty());
        cursor = Some(now.clone());
        if (first || !empty) && sender.send(Ok(watch_to_proto(since, now))).await.is_err() {
            return;
        }
        first = false;
    }
}

#[tonic::async_trait]
impl pb::registry_server::Registry for GrpcApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.measured(Operation::Register, self.register_call(request))
            .await
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.measured(Operation::Heartbeat, self.heartbeat_call(request))
            .await
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.measured(Operation::Deregister, self.deregister_call(request))
            .await
    }

    async fn discover(
        &self,
        request: Request<pb::DiscoverRequest>,
    ) -> Result<Response<pb::DiscoverResponse>, Status> {
        self.measured(Operation::Discover, self.discover_call(request))
            .await
    }

    type WatchStream = WatchStream;

    /// Counted once, when the stream opens (or is refused).
    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.measured(Operation::Watch, self.watch_call(request))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::loopback;

    #[tokio::test(start_paused = true)]
    async fn a_watch_whose_client_went_away_ends_without_waiting_for_changes() {
        let registry = Registry::in_memory(loopback());
        let (sender, mut receiver) = tokio::sync::mpsc::channel(4);
        let task = tokio::spawn(stream_watch(registry, None, sender));
        let first = receiver.recv().await.expect("the first answer");
        assert!(first.is_ok(), "{first:?}");
        // The task now waits up to MAX_WATCH_WAIT for changes; the client goes away. With
        // the clock paused, a task still waiting would let the timeout below fire first.
        drop(receiver);
        let ended = tokio::time::timeout(Duration::from_secs(1), task).await;
        assert!(
            matches!(ended, Ok(Ok(()))),
            "the watch task still runs after its client went away: {ended:?}"
        );
    }
}
