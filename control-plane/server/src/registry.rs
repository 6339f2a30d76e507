//! The self-registration registry inside the control plane: its backend (memory or etcd),
//! its bearer tokens, its gRPC server, and the REST routes mounted on the HTTP API.
//!
//! The registry is one more endpoint source ([`fulcrum_registry::RegistrySource`]), merged
//! into the snapshot like the static file and Kubernetes. Picks (`pick=true`) follow the
//! policy of the published snapshot, the one the filters balance with.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use fulcrum_core::Snapshot;
/// What the registry admits, the type of [`RegistryOptions::limits`].
pub use fulcrum_registry::Limits;
use fulcrum_registry::{
    EtcdConfig, Registry, RegistrySource, TokenAuth, api::ApiState, auth::TokenFileError,
};
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::server::TcpIncoming;
use tracing::info;

use crate::{limits::ListenerLimits, tls::Tls};

/// Where registrations and leases live.
#[derive(Debug, Clone)]
pub enum RegistryBackendOptions {
    /// In this process; nothing survives a restart, replicas do not share registrations.
    Memory,
    /// In etcd, shared by every replica pointed at the same endpoints and prefix.
    Etcd(EtcdConfig),
}

/// How to run the registry.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// The backend.
    pub backend: RegistryBackendOptions,
    /// The accepted bearer tokens: one per line, `IDENTITY TOKEN` or `TOKEN`, each optionally
    /// scoped (`services=`, `addresses=`, `max=`).
    pub token_file: PathBuf,
    /// What the registry admits: allowed address ranges, its cap of live registrations.
    /// With etcd, the records other replicas wrote are admitted with the same address ranges.
    pub limits: Limits,
    /// Where the registry's gRPC API listens (port 0: any free port).
    pub grpc_address: SocketAddr,
}

/// A registry ready to serve: its source, its REST routes and its bound gRPC listener.
pub(crate) struct StartedRegistry {
    pub registry: Arc<Registry>,
    pub api: ApiState,
    pub grpc_listener: TcpListener,
    pub grpc_address: SocketAddr,
}

impl StartedRegistry {
    /// Reads the tokens, connects the backend and binds the gRPC listener; fails on an
    /// unreadable or bad token file, an unreachable etcd or a busy address.
    pub async fn start(options: RegistryOptions) -> anyhow::Result<Self> {
        let auth = TokenAuth::from_file(&options.token_file).map_err(|error| match error {
            // Names the file and the IO error already.
            TokenFileError::Read { .. } => anyhow::anyhow!("{error}"),
            _ => anyhow::anyhow!(
                "registry token file {}: {error}",
                options.token_file.display()
            ),
        })?;
        let registry = match options.backend {
            RegistryBackendOptions::Memory => Registry::in_memory(options.limits),
            RegistryBackendOptions::Etcd(config) => {
                let endpoints = config.endpoints.join(",");
                Registry::on_etcd(config, options.limits)
                    .await
                    .with_context(|| {
                        format!("cannot connect the registry to etcd at {endpoints}")
                    })?
            }
        };
        let grpc_listener = TcpListener::bind(options.grpc_address)
            .await
            .with_context(|| {
                format!(
                    "cannot listen for the registry's gRPC API on {}",
                    options.grpc_address
                )
            })?;
        let grpc_address = grpc_listener
            .local_addr()
            .context("registry gRPC listener address")?;
        info!(backend = registry.backend_kind(), grpc = %grpc_address, "registry ready");
        Ok(Self {
            api: ApiState {
                registry: registry.clone(),
                auth: Arc::new(auth),
            },
            registry,
            grpc_listener,
            grpc_address,
        })
    }

    /// The registry as an endpoint source.
    pub fn source(&self) -> RegistrySource {
        self.registry.source()
    }

    /// Registers the registry's metrics (`fulcrum_registry_*`: calls per face, operation and
    /// code, their latency, live instances per service and health) into `metrics`.
    pub fn register_metrics(&self, metrics: &mut prometheus_client::registry::Registry) {
        self.registry.metrics().register(metrics);
    }
}

/// Serves the registry's gRPC API until `stopped` turns true, within `limits`, over TLS when
/// configured. Small answers are not held back for delayed ACKs (`TCP_NODELAY`, as Envoy does).
/// A message is capped like a REST body (`http_max_body_bytes`, when below
/// `grpc_max_message_bytes`): neither face reads a larger request than the other.
pub(crate) async fn serve_grpc(
    api: ApiState,
    listener: TcpListener,
    tls: Option<Tls>,
    limits: ListenerLimits,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let service = fulcrum_registry::api::grpc::server(api).max_decoding_message_size(
        limits
            .grpc_max_message_bytes
            .min(limits.http_max_body_bytes),
    );
    let server = limits.grpc_server().add_service(service);
    let stopped = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    match tls {
        Some(tls) => {
            server
                .serve_with_incoming_shutdown(
                    tls.accept(listener, crate::GRPC_ALPN).into_stream(),
                    stopped,
                )
                .await
        }
        None => {
            server
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    stopped,
                )
                .await
        }
    }
}

/// Keeps the registry's picks on the policy of the published snapshot; ends when the
/// pipeline stops.
pub(crate) async fn follow_policy(
    registry: Arc<Registry>,
    mut published: watch::Receiver<Option<Arc<Snapshot>>>,
) {
    let mut current = None;
    loop {
        let policy = published
            .borrow_and_update()
            .as_ref()
            .and_then(|snapshot| snapshot.policy.clone());
        if let Some(policy) = policy
            && current.as_ref() != Some(&policy)
        {
            registry.set_policy(policy.clone());
            current = Some(policy);
        }
        if published.changed().await.is_err() {
            return;
        }
    }
}
