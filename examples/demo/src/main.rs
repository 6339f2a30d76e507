//! `fulcrum-demo`: the story of fulcrum keeping traffic away from bad backends.
//!
//! Starts the stack, sends bounded load through Envoy, and midway makes one backend slow, one
//! erroring and kills one, then recovers them — showing per backend its share of traffic,
//! p50/p99 latency, errors and breaker state, live when stdout is a terminal and as plain
//! lines otherwise, then a summary per phase. Ends by itself after `--duration`; Ctrl-C or any
//! failure stops every process it started. Normally run through `cargo xtask demo`.
//!
//! `--data-plane native` balances with fulcrum's native module (the control plane generates
//! its cluster) instead of the wasm filter. The module keeps no per-endpoint stats, so the
//! breaker column and the ejection counts say so; its counters are printed instead.

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;
use fulcrum_demo::{
    load::{self, LoadConfig, Recorder, Window},
    stack::{Binaries, DataPlane, Stack, native_module_directory},
};
use fulcrum_example_backend::Fault;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    about = "fulcrum demo: real Envoy + control plane + sample backends, with faults injected midway"
)]
struct Args {
    /// Envoy binary (cargo xtask demo passes the one it installed).
    #[arg(long, env = "FULCRUM_ENVOY")]
    envoy: PathBuf,
    /// The filter (`fulcrum_balancer.wasm`); required with `--data-plane wasm`.
    #[arg(long, env = "FULCRUM_FILTER_WASM")]
    wasm: Option<PathBuf>,
    /// Which data plane balances: the proxy-wasm filter or the native module.
    #[arg(long, value_enum, default_value_t = DataPlaneArg::Wasm)]
    data_plane: DataPlaneArg,
    /// The native module (`libfulcrum_native.so`); required with `--data-plane native`.
    #[arg(long, env = "FULCRUM_NATIVE_MODULE")]
    native_module: Option<PathBuf>,
    /// Directory holding `fulcrum-control-plane` and `fulcrum-backend`.
    #[arg(long)]
    bin_dir: PathBuf,
    /// How long the story lasts, in seconds (at least 20).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Print plain lines even on a terminal.
    #[arg(long)]
    plain: bool,
}

/// `--data-plane`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DataPlaneArg {
    Wasm,
    Native,
}

/// The data plane `--data-plane` names, with the file it needs.
fn data_plane(args: &Args) -> Result<DataPlane> {
    match args.data_plane {
        DataPlaneArg::Wasm => Ok(DataPlane::Wasm {
            wasm: args.wasm.clone().context(
                "--data-plane wasm needs --wasm PATH (or FULCRUM_FILTER_WASM): build the filter with `cargo xtask build-wasm`",
            )?,
        }),
        DataPlaneArg::Native => Ok(DataPlane::Native {
            module_directory: native_module_directory(args.native_module.as_deref())?,
        }),
    }
}

const SERVICE: &str = "demo";
const BACKENDS: usize = 5;

/// One step of the story, at a fraction of the duration.
#[derive(Debug, Clone, Copy)]
enum Step {
    Slow(usize),
    Erroring(usize),
    Kill(usize),
    RecoverAll,
}

const STORY: [(f64, Step, &str); 4] = [
    (0.15, Step::Slow(1), "b2 turns slow (+250 ms per request)"),
    (
        0.30,
        Step::Erroring(2),
        "b3 starts failing every request with 503",
    ),
    (0.45, Step::Kill(3), "b4 is killed"),
    (0.65, Step::RecoverAll, "b2 and b3 recover, b4 restarts"),
];

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let duration = Duration::from_secs(args.duration.max(20));
    let data_plane = data_plane(&args)?;
    let binaries = Binaries {
        envoy: args.envoy.clone(),
        control_plane: args.bin_dir.join("fulcrum-control-plane"),
        backend: args.bin_dir.join("fulcrum-backend"),
    };
    println!(
        "starting {BACKENDS} backends, the control plane and Envoy ({} workers, {} data plane)…",
        args.workers,
        match data_plane {
            DataPlane::Wasm { .. } => "wasm filter",
            DataPlane::Native { .. } => "native module",
        }
    );
    let policy = json!({
        "load_balancer": {"type": "peak_ewma"},
        "retry": 2,
        "outlier_detection": {
            "consecutive_failures": 5,
            "base_ejection_time": "5s",
            "max_ejection_percent": 50,
            "slow_calls": {"latency_threshold": "100ms", "threshold_percent": 50, "minimum_requests": 10}
        }
    });
    let native = matches!(data_plane, DataPlane::Native { .. });
    let stack = Stack::start(
        &binaries,
        SERVICE,
        BACKENDS,
        args.workers,
        &data_plane,
        policy,
    )
    .await?;
    if native {
        println!(
            "native module: the cluster is the control plane's (CDS), the module its load-balancing policy; \
             it keeps no per-endpoint stats, so breaker state and ejections per backend are not available"
        );
    }
    println!(
        "ready: Envoy listens on http://{} (admin http://{}), logs in {}",
        stack.listener,
        stack.admin,
        stack.dir.path().display()
    );
    tokio::select! {
        result = tell_story(stack, duration, args.concurrency, args.plain || !std::io::stdout().is_terminal(), native) => result,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted: stopping every process");
            Ok(())
        }
    }
}

async fn tell_story(
    mut stack: Stack,
    duration: Duration,
    concurrency: usize,
    plain: bool,
    native: bool,
) -> Result<()> {
    let recorder = Arc::new(Recorder::default());
    let load = tokio::spawn(load::run(
        LoadConfig {
            target: stack.listener,
            host: SERVICE.to_owned(),
            concurrency,
            per_request_timeout: Duration::from_secs(2),
            duration,
            max_requests: 5_000_000,
        },
        recorder.clone(),
    ));
    let started = Instant::now();
    let mut next_step = 0;
    let mut phases: Vec<(String, Window)> = vec![("all healthy".to_owned(), Window::default())];
    let mut states: Vec<&str> = vec!["ok"; BACKENDS];
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    while started.elapsed() < duration + Duration::from_millis(500) {
        ticker.tick().await;
        stack.check_running()?;
        // Samples of the last second belong to the phase they were sent in.
        let samples = recorder.drain();
        let mut window = Window::default();
        window.add(&samples);
        if let Some((_, phase)) = phases.last_mut() {
            phase.add(&samples);
        }
        if let Some((at, step, what)) = STORY.get(next_step)
            && started.elapsed().as_secs_f64() >= at * duration.as_secs_f64()
        {
            apply(&mut stack, *step, &mut states).await?;
            phases.push((what.to_string(), Window::default()));
            if plain {
                println!("t={:>3}s  ** {what}", started.elapsed().as_secs());
            }
            next_step += 1;
        }
        let open = stack
            .endpoint_stat("circuit_open")
            .await
            .unwrap_or_default();
        render(
            &stack,
            &mut window,
            &states,
            &open,
            started.elapsed(),
            plain,
            phases.last().map(|(name, _)| name.as_str()),
        );
    }
    load.await.context("load task")??;
    summary(&stack, &mut phases, native).await
}

async fn apply(stack: &mut Stack, step: Step, states: &mut [&str]) -> Result<()> {
    match step {
        Step::Slow(index) => {
            stack.backends[index]
                .set_fault(&Fault {
                    latency_ms: 250,
                    ..Fault::default()
                })
                .await?;
            states[index] = "slow";
        }
        Step::Erroring(index) => {
            stack.backends[index]
                .set_fault(&Fault {
                    error_rate: 1.0,
                    ..Fault::default()
                })
                .await?;
            states[index] = "erroring";
        }
        Step::Kill(index) => {
            stack.backends[index].kill();
            states[index] = "killed";
        }
        Step::RecoverAll => {
            for (index, backend) in stack.backends.iter_mut().enumerate() {
                if !backend.is_running() {
                    backend.restart().await?;
                }
                backend.set_fault(&Fault::default()).await?;
                states[index] = "ok";
            }
        }
    }
    Ok(())
}

/// The breaker column: the wasm filter's breakers are per worker VM, the native module's
/// one per proxy.
fn breaker(
    open: &BTreeMap<SocketAddr, i64>,
    address: SocketAddr,
    shared_by_workers: bool,
) -> String {
    match open.get(&address).copied().unwrap_or(0) {
        0 => "closed".to_owned(),
        _ if shared_by_workers => "open".to_owned(),
        n => format!("open in {n} worker(s)"),
    }
}

fn render(
    stack: &Stack,
    window: &mut Window,
    states: &[&str],
    open: &BTreeMap<SocketAddr, i64>,
    elapsed: Duration,
    plain: bool,
    phase: Option<&str>,
) {
    let rps = window.all.requests;
    if plain {
        let mut line = format!(
            "t={:>3}s  {rps:>5} req/s  ok {:>6.2}%",
            elapsed.as_secs(),
            window.success_rate()
        );
        for (backend, state) in stack.backends.iter().zip(states) {
            let share = window.share(&backend.name);
            let p99 = window
                .backends
                .get_mut(&backend.name)
                .map_or(0.0, |b| b.quantile_ms(0.99));
            let open_mark = if open.get(&backend.addr).copied().unwrap_or(0) > 0 {
                " OPEN"
            } else {
                ""
            };
            line.push_str(&format!(
                " | {} {share:>4.1}% p99 {p99:>5.1}ms {state}{open_mark}",
                backend.name
            ));
        }
        println!("{line}");
        return;
    }
    let mut out = String::new();
    out.push_str("\x1b[H\x1b[2J");
    out.push_str(&format!(
        "fulcrum demo — t={}s — phase: {}\n{rps} req/s through Envoy, {:.2}% ok (last second)\n\n",
        elapsed.as_secs(),
        phase.unwrap_or(""),
        window.success_rate()
    ));
    out.push_str(&format!(
        "{:<8} {:<16} {:<10} {:>7} {:>9} {:>9} {:>7}  {}\n",
        "backend", "address", "state", "share", "p50 ms", "p99 ms", "errors", "breaker"
    ));
    for (backend, state) in stack.backends.iter().zip(states) {
        let share = window.share(&backend.name);
        let stats = window.backends.entry(backend.name.clone()).or_default();
        let (p50, p99, errors) = (
            stats.quantile_ms(0.5),
            stats.quantile_ms(0.99),
            stats.errors,
        );
        out.push_str(&format!(
            "{:<8} {:<16} {:<10} {:>6.1}% {:>9.1} {:>9.1} {:>7}  {}\n",
            backend.name,
            backend.addr.to_string(),
            state,
            share,
            p50,
            p99,
            errors,
            breaker(open, backend.addr, stack.native)
        ));
    }
    let local = window
        .backends
        .get(load::NO_BACKEND)
        .map_or(0, |b| b.requests);
    out.push_str(&format!(
        "\nfailed without a backend answer (timeouts, Envoy local replies): {local}\n"
    ));
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

async fn summary(stack: &Stack, phases: &mut [(String, Window)], native: bool) -> Result<()> {
    println!("\n=== summary ===");
    for (name, window) in phases.iter_mut() {
        let p99 = window.all.quantile_ms(0.99);
        let mut line = format!(
            "{name:<45} {:>7} requests, {:>6.2}% ok, p99 {p99:>6.1} ms |",
            window.all.requests,
            window.success_rate(),
        );
        for backend in &stack.backends {
            line.push_str(&format!(
                " {} {:>4.1}%",
                backend.name,
                window.share(&backend.name)
            ));
        }
        println!("{line}");
    }
    if native {
        let counters = stack.native_counters().await?;
        let shown: Vec<String> = counters
            .iter()
            .map(|(name, value)| format!("{name} {value}"))
            .collect();
        println!("native module counters: {}", shown.join(", "));
    }
    let ejections = stack
        .endpoint_stat("ejections_total")
        .await
        .unwrap_or_default();
    let ejected: Vec<String> = stack
        .backends
        .iter()
        .map(|b| {
            format!(
                "{} {}",
                b.name,
                ejections.get(&b.addr).copied().unwrap_or(0)
            )
        })
        .collect();
    println!(
        "ejections per backend ({}): {}",
        if native {
            "the proxy's shared breakers"
        } else {
            "all workers"
        },
        ejected.join(", ")
    );
    Ok(())
}
