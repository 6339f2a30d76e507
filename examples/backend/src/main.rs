//! `fulcrum-backend`: runs one sample backend (see the library docs) until SIGTERM or Ctrl-C.
//!
//! Prints one line `ready name=<name> addr=<ip:port> admin=<ip:port>` once both ports are
//! bound, so a parent process that passed port 0 learns the ports it got.

use anyhow::{Context, Result};
use clap::Parser;
use fulcrum_example_backend::{Backend, Fault};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(about = "A sample backend whose latency and failures can be changed at run time")]
struct Args {
    /// Name reported in every response (`x-backend`).
    #[arg(long)]
    name: String,
    /// Traffic port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Admin port on 127.0.0.1 (`GET`/`PUT /fault`, `GET /stats`; 0 = any free port).
    #[arg(long, default_value_t = 0)]
    admin_port: u16,
    /// Initial added latency in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Initial fraction of requests answered with 503.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let backend = Backend::bind(&args.name, args.port, args.admin_port)
        .await
        .context("binding the backend's ports on 127.0.0.1")?;
    backend
        .set_fault(Fault {
            latency_ms: args.latency_ms,
            error_rate: args.error_rate,
            ..Fault::default()
        })
        .map_err(anyhow::Error::msg)?;
    println!(
        "ready name={} addr={} admin={}",
        backend.name, backend.addr, backend.admin_addr
    );
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    backend.stop();
    Ok(())
}
