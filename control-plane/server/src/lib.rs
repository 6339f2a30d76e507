//! fulcrum's control plane: the endpoint-change flow (`fulcrum-pipeline`) wired to its
//! listeners: the ADS server for Envoy, the HTTP API the filters poll, and the registry.
//!
//! [`ControlPlane::start`] builds the sources and the policy source, starts the pipeline and
//! serves on the configured addresses; the binary (`main.rs`) only parses the command line,
//! sets up logging and waits for a signal. Tests start the same thing in-process.

pub mod connections;
pub mod diagnostics;
pub mod http;
pub mod limits;
pub mod proxies;
pub mod proxy_reports;
pub mod registry;
pub mod telemetry;
pub mod tls;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use fulcrum_health::{HealthMetrics, ProbeHub};
use fulcrum_kube_source::{KubeOptions, KubeSource};
use fulcrum_pipeline::{
    DEFAULT_SNAPSHOT_BUDGET, Debounce, Pipeline, PipelineConfig, PipelineMetrics,
};
use fulcrum_policy::{DEFAULT_HISTORY, PolicyConfigMap, PolicyFile, PolicyStatus, PolicyStore};
use fulcrum_registry::TokenAuth;
use fulcrum_sources::{Source, StaticFileSource};
use fulcrum_xds::{AdsServer, ClusterOptions, NodeRegistry, SnapshotCache, XdsMetrics};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::{
    connections::ConnectionMetrics,
    limits::LimitMetrics,
    proxy_reports::{ProxyMetrics, ProxyReports},
    registry::StartedRegistry,
};
pub use crate::{
    limits::ListenerLimits,
    proxies::ProxyTableLimits,
    registry::{RegistryBackendOptions, RegistryOptions},
    tls::{Tls, TlsFiles, TlsMetrics},
};

/// What a long poll of the HTTP API may wait on top of the request deadline: the longest of
/// the registry's watch and an endpoint diagnostics ask.
const LONG_POLL_WAIT: Duration = fulcrum_registry::api::MAX_WATCH_WAIT;
const _: () = assert!(
    http::MAX_DIAGNOSTICS_WAIT_SECONDS <= LONG_POLL_WAIT.as_secs(),
    "an endpoint diagnostics ask must fit in the long polls' deadline"
);

/// How long shutdown waits for the servers to finish before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything the control plane needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The YAML endpoints file (the static file source), if any.
    pub static_file: Option<PathBuf>,
    /// How often the file is checked for changes.
    pub poll_interval: Duration,
    /// Where the ADS gRPC server listens (port 0: any free port).
    pub xds_address: SocketAddr,
    /// Where the HTTP API listens (port 0: any free port).
    pub http_address: SocketAddr,
    /// Quiet period that folds bursts of source updates into one push.
    pub debounce: Duration,
    /// Settings of the generated Envoy clusters.
    pub cluster_options: ClusterOptions,
    /// Where the admin API listens: the endpoints that change state (policy rollback).
    /// Anywhere but loopback requires `admin_token_file`.
    pub admin_address: SocketAddr,
    /// The bearer tokens the admin API requires (`IDENTITY TOKEN` per line, as the registry's
    /// token file); `None` leaves it open to whoever reaches it, which only loopback allows.
    pub admin_token_file: Option<PathBuf>,
    /// The largest snapshot published, in bytes of JSON; keep it below the filters'
    /// `control_plane.max_snapshot_bytes`. A larger one is refused and the last good stays.
    pub snapshot_budget_bytes: usize,
    /// Bounds on every listener.
    pub limits: ListenerLimits,
    /// The certificate and key every listener serves TLS with; `None`: plain TCP.
    pub tls: Option<TlsFiles>,
    /// This replica's name, sent with every snapshot (`x-fulcrum-replica`) so a filter
    /// follows one replica at a time (`fulcrum_core::replica`). Unique per replica: the pod
    /// name in Kubernetes.
    pub replica: String,
    /// How many polling proxies `GET /v1/proxies` holds and when it forgets them.
    pub proxies: ProxyTableLimits,
}

/// A name no other running control plane has: `control-plane-` and 64 random bits.
pub fn unique_replica_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("control-plane-{random:016x}")
}

impl Default for Config {
    /// Every listener on loopback at a port the kernel picks, no static file, default
    /// timings and limits.
    fn default() -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            static_file: None,
            poll_interval: Duration::from_millis(500),
            xds_address: loopback,
            http_address: loopback,
            debounce: Debounce::default().quiet,
            cluster_options: ClusterOptions::default(),
            admin_address: loopback,
            admin_token_file: None,
            snapshot_budget_bytes: DEFAULT_SNAPSHOT_BUDGET,
            limits: ListenerLimits::default(),
            tls: None,
            replica: unique_replica_name(),
            proxies: ProxyTableLimits::default(),
        }
    }
}

/// Sources beyond the static file: Kubernetes EndpointSlices, the self-registration registry
/// and the balancing policy. Default: none.
#[derive(Clone, Default)]
pub struct OptionalSources {
    /// Watch EndpointSlices and Services with these options.
    pub kubernetes: Option<KubeOptions>,
    /// Where the policy served in every snapshot comes from.
    pub policy: Option<PolicySource>,
    /// Run the self-registration registry: its REST API on the HTTP address, its gRPC API
    /// on its own, its registrations merged into the snapshot.
    pub registry: Option<RegistryOptions>,
    /// The Kubernetes client for both; `None` infers one (in-cluster service account, else
    /// kubeconfig) when a Kubernetes source is configured.
    pub kube_client: Option<kube::Client>,
}

impl std::fmt::Debug for OptionalSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OptionalSources")
            .field("kubernetes", &self.kubernetes)
            .field("policy", &self.policy)
            .field("registry", &self.registry)
            .field("kube_client", &self.kube_client.as_ref().map(|_| "given"))
            .finish()
    }
}

/// Where the policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// A YAML (or `*.json`) file, polled for changes.
    File(PathBuf),
    /// A key of a ConfigMap, watched.
    ConfigMap {
        /// The ConfigMap's namespace.
        namespace: String,
        /// The ConfigMap's name.
        name: String,
        /// The key holding the policy (YAML, or JSON when it ends in `.json`).
        key: String,
        /// The ConfigMap, in the same namespace, where the control plane records the accepted
        /// policy, its history and rollbacks for every replica and every restart.
        status: String,
    },
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    xds_address: SocketAddr,
    http_address: SocketAddr,
    admin_address: SocketAddr,
    registry_address: Option<SocketAddr>,
    ads: AdsServer,
    stop: watch::Sender<bool>,
    /// The endpoint-change flow; dropping it stops it.
    pipeline: Pipeline,
    /// The sources, the policy source and what follows the published snapshot.
    tasks: JoinHandle<()>,
    /// Taken by [`ControlPlane::shutdown`].
    servers: Option<Servers>,
}

#[derive(Debug)]
struct Servers {
    xds: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<std::io::Result<()>>,
    admin: JoinHandle<std::io::Result<()>>,
    registry: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl ControlPlane {
    /// Binds the listeners, starts the sources, the ADS server, the HTTP API and the admin API.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        Self::start_with(config, OptionalSources::default()).await
    }

    /// [`start`](Self::start) with the Kubernetes, registry and policy sources as configured.
    pub async fn start_with(config: Config, optional: OptionalSources) -> anyhow::Result<Self> {
        let nodes = NodeRegistry::default();
        let mut metrics_registry = Registry::default();
        let xds_metrics = XdsMetrics::default();
        xds_metrics.register(&mut metrics_registry);
        let pipeline_metrics = PipelineMetrics::default();
        pipeline_metrics.register(&mut metrics_registry);
        HealthMetrics::global().register(&mut metrics_registry);
        telemetry::OtlpMetrics::global().register(&mut metrics_registry);
        let limit_metrics = LimitMetrics::default();
        limit_metrics.register(&mut metrics_registry);
        let connection_metrics = ConnectionMetrics::default();
        connection_metrics.register(&mut metrics_registry);
        let snapshot_answers = http::SnapshotAnswerMetrics::default();
        snapshot_answers.register(&mut metrics_registry);
        config.proxies.check()?;
        let proxy_metrics = ProxyMetrics::default();
        proxy_metrics.register(&mut metrics_registry);
        let diagnostics_metrics = diagnostics::DiagnosticsMetrics::default();
        diagnostics_metrics.register(&mut metrics_registry);
        let admin_tokens = admin_tokens(config.admin_address, config.admin_token_file.as_deref())?;
        let tls_metrics = TlsMetrics::default();
        tls_metrics.register(&mut metrics_registry);
        let tls = config
            .tls
            .clone()
            .map(|files| Tls::start(files, tls::RELOAD_EVERY, tls_metrics))
            .transpose()?;

        let xds_listener = TcpListener::bind(config.xds_address)
            .await
            .with_context(|| format!("cannot listen for xDS on {}", config.xds_address))?;
        let http_listener = TcpListener::bind(config.http_address)
            .await
            .with_context(|| format!("cannot listen for HTTP on {}", config.http_address))?;
        let admin_listener = TcpListener::bind(config.admin_address)
            .await
            .with_context(|| {
                format!(
                    "cannot listen for the admin API on {}",
                    config.admin_address
                )
            })?;
        let xds_address = xds_listener.local_addr().context("xDS listener address")?;
        let http_address = http_listener
            .local_addr()
            .context("HTTP listener address")?;
        let admin_address = admin_listener
            .local_addr()
            .context("admin listener address")?;

        let mut sources: Vec<Box<dyn Source>> = Vec::new();
        if let Some(static_file) = &config.static_file {
            let source =
                StaticFileSource::new(static_file).with_poll_interval(config.poll_interval);
            source.metrics().register(&mut metrics_registry);
            sources.push(Box::new(source));
        }
        let needs_kube = optional.kubernetes.is_some()
            || matches!(optional.policy, Some(PolicySource::ConfigMap { .. }));
        let kube_client = match (optional.kube_client, needs_kube) {
            (Some(client), _) => Some(client),
            (None, true) => Some(kube::Client::try_default().await.context(
                "cannot configure a Kubernetes client (run in a pod with a service account, or set KUBECONFIG)",
            )?),
            (None, false) => None,
        };
        let policies = match (&optional.policy, &kube_client) {
            (
                Some(PolicySource::ConfigMap {
                    namespace, status, ..
                }),
                Some(client),
            ) => PolicyStore::shared_through(
                PolicyStatus::new(client.clone(), namespace, status),
                DEFAULT_HISTORY,
            ),
            _ => PolicyStore::default(),
        };
        policies.metrics().register(&mut metrics_registry);
        if let (Some(options), Some(client)) = (optional.kubernetes, &kube_client) {
            let source = KubeSource::new(client.clone(), options);
            source.metrics().register(&mut metrics_registry);
            sources.push(Box::new(source));
        }
        let registry = match optional.registry {
            Some(options) => Some(StartedRegistry::start(options).await?),
            None => None,
        };
        if let Some(registry) = &registry {
            sources.push(Box::new(registry.source()));
            registry.register_metrics(&mut metrics_registry);
        }

        let pipeline = Pipeline::start(
            sources,
            policies.subscribe(),
            PipelineConfig {
                debounce: Debounce::new(config.debounce),
                cluster_options: config.cluster_options.clone(),
                snapshot_budget_bytes: config.snapshot_budget_bytes,
                require_policy: optional.policy.is_some(),
            },
            pipeline_metrics,
            ProbeHub::global().clone(),
        );
        let registry_policy: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            match &registry {
                Some(registry) => Box::pin(crate::registry::follow_policy(
                    registry.registry.clone(),
                    pipeline.published(),
                )),
                None => Box::pin(std::future::ready(())),
            };
        let policy_source = policy_task(optional.policy, kube_client, policies.clone());
        let tasks = tokio::spawn(async move {
            tokio::join!(policy_source, registry_policy);
        });

        let (stop, _) = watch::channel(false);
        let limits = &config.limits;
        let ads = AdsServer::with_max_streams(
            pipeline.cache(),
            nodes.clone(),
            xds_metrics,
            limits.xds_max_streams,
        );
        let xds_server =
            {
                let service = ads
                    .clone()
                    .into_service()
                    .max_decoding_message_size(limits.grpc_max_message_bytes);
                let mut stopped = stop.subscribe();
                let stopped = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                let server = limits.grpc_server().add_service(service);
                match &tls {
                    Some(tls) => tokio::spawn(server.serve_with_incoming_shutdown(
                        tls.accept(xds_listener, GRPC_ALPN).into_stream(),
                        stopped,
                    )),
                    None => tokio::spawn(server.serve_with_incoming_shutdown(
                        TcpListenerStream::new(xds_listener),
                        stopped,
                    )),
                }
            };
        let (registry_address, registry_server, registry_routes) = match registry {
            Some(started) => (
                Some(started.grpc_address),
                Some(tokio::spawn(crate::registry::serve_grpc(
                    started.api.clone(),
                    started.grpc_listener,
                    tls.clone(),
                    limits.clone(),
                    stop.subscribe(),
                ))),
                fulcrum_registry::api::rest::router(started.api),
            ),
            None => (None, None, axum::Router::new()),
        };
        let state = http::AppState {
            store: pipeline.store().clone(),
            dropped: pipeline.dropped(),
            refused: pipeline.refused(),
            policies,
            nodes,
            registry: Arc::new(metrics_registry),
            snapshot_answers,
            proxies: ProxyReports::new(config.proxies, proxy_metrics),
            diagnostics: diagnostics::Diagnostics::new(
                diagnostics::DiagnosticsLimits::default(),
                diagnostics_metrics,
            ),
            replica: axum::http::HeaderValue::from_str(&config.replica).with_context(|| {
                format!(
                    "the replica name {:?} is not a valid header value",
                    config.replica
                )
            })?,
        };
        let http_server = serve_http(
            http_listener,
            tls.as_ref(),
            limits.bound_http(
                http::router(state.clone()).merge(registry_routes),
                &[
                    fulcrum_registry::api::rest::LONG_POLL_PATHS,
                    http::LONG_POLL_ROUTES,
                ]
                .concat(),
                LONG_POLL_WAIT,
                http::LARGE_BODY_ROUTES,
                &limit_metrics,
            ),
            limits,
            &connection_metrics,
            stop.subscribe(),
        );
        let admin_server = serve_http(
            admin_listener,
            tls.as_ref(),
            limits.bound_http(
                http::admin_router(state, admin_tokens),
                &[],
                Duration::ZERO,
                &[],
                &limit_metrics,
            ),
            limits,
            &connection_metrics,
            stop.subscribe(),
        );
        info!(
            xds = %xds_address,
            http = %http_address,
            admin = %admin_address,
            registry = ?registry_address,
            static_file = ?config.static_file,
            "control plane started"
        );
        Ok(Self {
            xds_address,
            http_address,
            admin_address,
            registry_address,
            ads,
            stop,
            pipeline,
            tasks,
            servers: Some(Servers {
                xds: xds_server,
                http: http_server,
                admin: admin_server,
                registry: registry_server,
            }),
        })
    }

    /// The bound ADS address.
    pub fn xds_address(&self) -> SocketAddr {
        self.xds_address
    }

    /// The bound HTTP address.
    pub fn http_address(&self) -> SocketAddr {
        self.http_address
    }

    /// The bound admin API address.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address
    }

    /// The xDS cache the ADS server streams from, as the pipeline last published it.
    pub fn xds_cache(&self) -> &Arc<SnapshotCache> {
        self.pipeline.cache()
    }

    /// The bound address of the registry's gRPC API, when the registry runs.
    pub fn registry_address(&self) -> Option<SocketAddr> {
        self.registry_address
    }

    /// Stops accepting, ends the xDS streams, and waits (bounded) for every server.
    pub async fn shutdown(mut self) {
        info!("shutting down");
        self.stop_tasks();
        let Some(servers) = self.servers.take() else {
            return;
        };
        let xds = tokio::time::timeout(SHUTDOWN_GRACE, servers.xds).await;
        report_stop(
            "xds",
            xds.map(|joined| joined.map(|served| served.map_err(|e| e.to_string()))),
        );
        let http = tokio::time::timeout(SHUTDOWN_GRACE, servers.http).await;
        report_stop(
            "http",
            http.map(|joined| joined.map(|served| served.map_err(|e| e.to_string()))),
        );
        let admin = tokio::time::timeout(SHUTDOWN_GRACE, servers.admin).await;
        report_stop(
            "admin",
            admin.map(|joined| joined.map(|served| served.map_err(|e| e.to_string()))),
        );
        if let Some(registry) = servers.registry {
            let registry = tokio::time::timeout(SHUTDOWN_GRACE, registry).await;
            report_stop(
                "registry",
                registry.map(|joined| joined.map(|served| served.map_err(|e| e.to_string()))),
            );
        }
    }

    fn stop_tasks(&self) {
        self.stop.send_replace(true);
        self.ads.close_streams();
        self.pipeline.stop();
        self.tasks.abort();
    }
}

/// Dropping without [`ControlPlane::shutdown`] still stops every task (without waiting).
impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

/// Serves `router` on `listener` until `stopped` turns true.
/// ALPN of the gRPC listeners.
const GRPC_ALPN: &[&[u8]] = &[b"h2"];

/// ALPN of the HTTP listeners.
const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

fn serve_http(
    listener: TcpListener,
    tls: Option<&Tls>,
    router: axum::Router,
    limits: &ListenerLimits,
    metrics: &ConnectionMetrics,
    stopped: watch::Receiver<bool>,
) -> JoinHandle<std::io::Result<()>> {
    match tls {
        Some(tls) => connections::serve(
            tls.accept(listener, HTTP_ALPN),
            router,
            limits,
            metrics.clone(),
            stopped,
        ),
        None => connections::serve(listener, router, limits, metrics.clone(), stopped),
    }
}

/// The admin API's tokens: read from `token_file`, or none, which only a loopback
/// `address` allows.
fn admin_tokens(
    address: SocketAddr,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<Option<Arc<TokenAuth>>> {
    let Some(path) = token_file else {
        anyhow::ensure!(
            address.ip().is_loopback(),
            "the admin API (policy rollback) would listen on {address} without credentials: \
             bind it to loopback (--admin-addr 127.0.0.1:PORT) or give --admin-token-file"
        );
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the admin token file {}", path.display()))?;
    let tokens = TokenAuth::parse(&text)
        .map_err(|error| anyhow::anyhow!("admin token file {}: {error}", path.display()))?;
    Ok(Some(Arc::new(tokens)))
}

/// Runs the configured policy source; never ends when there is none.
fn policy_task(
    source: Option<PolicySource>,
    client: Option<kube::Client>,
    policies: PolicyStore,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    match (source, client) {
        (Some(PolicySource::File(path)), _) => Box::pin(PolicyFile::new(path).run(policies)),
        (
            Some(PolicySource::ConfigMap {
                namespace,
                name,
                key,
                status,
            }),
            Some(client),
        ) => {
            let status = PolicyStatus::new(client.clone(), &namespace, status);
            let source = PolicyConfigMap::new(client, namespace, name, key);
            Box::pin(async move {
                tokio::join!(source.run(policies.clone()), status.follow(policies));
            })
        }
        _ => Box::pin(std::future::pending()),
    }
}

type StopResult =
    Result<Result<Result<(), String>, tokio::task::JoinError>, tokio::time::error::Elapsed>;

fn report_stop(server: &str, result: StopResult) {
    match result {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => warn!(server, %error, "server ended with an error"),
        Ok(Err(error)) => warn!(server, %error, "server task failed"),
        Err(_) => warn!(server, grace = ?SHUTDOWN_GRACE, "server did not stop in time"),
    }
}
