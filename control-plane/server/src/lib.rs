//! fulcrum's control plane: sources → snapshot → xDS cache → ADS server for Envoy, and the
//! snapshot HTTP API the filters poll.
//!
//! [`ControlPlane::start`] wires the pieces and serves on the configured addresses; the
//! binary (`main.rs`) only parses the command line, sets up logging and waits for a signal.
//! Tests start the same thing in-process.

pub mod http;
pub mod metrics;
pub mod snapshot;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use fulcrum_sources::{Debounce, Source, StaticFileSource};
use fulcrum_xds::{AdsServer, ClusterOptions, NodeRegistry, SnapshotCache, XdsMetrics};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::{metrics::SnapshotMetrics, snapshot::SnapshotStore};

/// How long shutdown waits for the servers to finish before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything the control plane needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The YAML endpoints file (the static file source).
    pub static_file: PathBuf,
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
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    xds_address: SocketAddr,
    http_address: SocketAddr,
    ads: AdsServer,
    stop: watch::Sender<bool>,
    pipeline: JoinHandle<()>,
    /// Taken by [`ControlPlane::shutdown`].
    servers: Option<Servers>,
}

#[derive(Debug)]
struct Servers {
    xds: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<std::io::Result<()>>,
}

impl ControlPlane {
    /// Binds both listeners, starts the sources, the ADS server and the HTTP API.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let cache = Arc::new(SnapshotCache::new(config.cluster_options.clone()));
        let nodes = NodeRegistry::default();
        let mut registry = Registry::default();
        let xds_metrics = XdsMetrics::default();
        xds_metrics.register(&mut registry);
        let snapshot_metrics = SnapshotMetrics::default();
        snapshot_metrics.register(&mut registry);
        let store = SnapshotStore::default();

        let xds_listener = TcpListener::bind(config.xds_address)
            .await
            .with_context(|| format!("cannot listen for xDS on {}", config.xds_address))?;
        let http_listener = TcpListener::bind(config.http_address)
            .await
            .with_context(|| format!("cannot listen for HTTP on {}", config.http_address))?;
        let xds_address = xds_listener.local_addr().context("xDS listener address")?;
        let http_address = http_listener
            .local_addr()
            .context("HTTP listener address")?;

        let sources: Vec<Box<dyn Source>> = vec![Box::new(
            StaticFileSource::new(&config.static_file).with_poll_interval(config.poll_interval),
        )];
        let pipeline = {
            let (cache, store, snapshot_metrics) =
                (Arc::clone(&cache), store.clone(), snapshot_metrics.clone());
            tokio::spawn(fulcrum_sources::run(
                sources,
                Debounce::new(config.debounce),
                move |snapshot| {
                    let summary = cache.set(&snapshot);
                    snapshot_metrics.observe(&snapshot);
                    info!(
                        version = %snapshot.version,
                        encoded = summary.encoded,
                        reused = summary.reused,
                        "published snapshot"
                    );
                    store.publish(snapshot);
                },
            ))
        };

        let (stop, _) = watch::channel(false);
        let ads = AdsServer::new(&cache, nodes.clone(), xds_metrics);
        let xds_server = {
            let service = ads.clone().into_service();
            let mut stopped = stop.subscribe();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        TcpListenerStream::new(xds_listener),
                        async move {
                            let _ = stopped.wait_for(|stop| *stop).await;
                        },
                    ),
            )
        };
        let http_server = {
            let router = http::router(http::AppState {
                store,
                nodes,
                registry: Arc::new(registry),
            });
            let mut stopped = stop.subscribe();
            tokio::spawn(async move {
                axum::serve(http_listener, router)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    })
                    .await
            })
        };
        info!(xds = %xds_address, http = %http_address, static_file = %config.static_file.display(), "control plane started");
        Ok(Self {
            xds_address,
            http_address,
            ads,
            stop,
            pipeline,
            servers: Some(Servers {
                xds: xds_server,
                http: http_server,
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

    /// Stops accepting, ends the xDS streams, and waits (bounded) for both servers.
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
    }

    fn stop_tasks(&self) {
        self.stop.send_replace(true);
        self.ads.close_streams();
        self.pipeline.abort();
    }
}

/// Dropping without [`ControlPlane::shutdown`] still stops every task (without waiting).
impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_tasks();
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
