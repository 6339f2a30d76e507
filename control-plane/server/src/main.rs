//! `fulcrum-control-plane`: serves Envoy (ADS: CDS + EDS) and the fulcrum filters (the
//! snapshot HTTP API) from the configured endpoint sources, until SIGTERM or Ctrl-C.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use fulcrum_control_plane::{Config, ControlPlane};
use fulcrum_xds::ClusterOptions;
use tracing::error;
use tracing_subscriber::EnvFilter;

/// fulcrum's control plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// YAML endpoints file (`services: {NAME: {endpoints: [{address: IP:PORT, ...}]}}`),
    /// reloaded when it changes.
    #[arg(long, value_name = "PATH")]
    static_file: PathBuf,
    /// Address of the ADS gRPC server.
    #[arg(long, default_value = "127.0.0.1:18000")]
    xds_addr: SocketAddr,
    /// Address of the HTTP API (snapshot, health, metrics, status).
    #[arg(long, default_value = "127.0.0.1:18080")]
    http_addr: SocketAddr,
    /// Log filter (`info`, `debug`, `fulcrum_xds=debug,info`, ...); `RUST_LOG` overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Quiet period folding bursts of source updates into one push, in milliseconds.
    #[arg(long, default_value_t = 50)]
    debounce_ms: u64,
    /// How often the static file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_interval_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let config = Config {
        static_file: cli.static_file,
        poll_interval: Duration::from_millis(cli.poll_interval_ms),
        xds_address: cli.xds_addr,
        http_address: cli.http_addr,
        debounce: Duration::from_millis(cli.debounce_ms),
        cluster_options: ClusterOptions::default(),
    };
    let control_plane = match ControlPlane::start(config).await {
        Ok(control_plane) => control_plane,
        Err(error) => {
            error!(error = format!("{error:#}"), "cannot start");
            return ExitCode::FAILURE;
        }
    };
    shutdown_signal().await;
    control_plane.shutdown().await;
    ExitCode::SUCCESS
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                error!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the process");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
