//! `fulcrum-compare`: fulcrum against Envoy's native balancers on the same real Envoy.
//!
//! For each scenario (one of four backends slow, erroring, black-holed, flapping or
//! recovering from an outage, or all healthy) and each balancer (fulcrum's filter over an `override_host` cluster, Envoy's
//! round robin, least request, least request with outlier detection) it starts four fresh
//! in-process sample backends, one Envoy (`--concurrency 2`) from
//! [`fulcrum_test_support::Bootstrap`] with static endpoints, and drives `wrk` through it for a bounded time. Route, timeout and
//! retry policy are identical on both sides; only the listener's filter and the cluster's
//! policy differ. Prints a markdown table (latency percentiles, success rate, requests/s, the
//! faulty backend's share over the run and over its last seconds, how far the shares stray
//! from equal, and fulcrum ÷ native ratios) and optionally writes it to a file.
//! Normally run through `cargo xtask bench-compare`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use fulcrum_demo::wrk;
use fulcrum_example_backend::{Backend, Fault};
use fulcrum_test_support::{
    Bootstrap, ClusterBalancing, ClusterOptions, Endpoints, Envoy, EnvoyOptions, FailurePolicy,
    FilterSetup, Ingress, RETRY_ON_HTTP,
};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "fulcrum vs Envoy's native balancers on the same Envoy, backends and route")]
struct Args {
    /// Envoy binary (cargo xtask bench-compare passes the one it installed).
    #[arg(long, env = "FULCRUM_ENVOY")]
    envoy: PathBuf,
    /// The release filter (`fulcrum_balancer.wasm`).
    #[arg(long, env = "FULCRUM_FILTER_WASM")]
    wasm: PathBuf,
    /// The wrk load generator.
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// Seconds of load per run (scenario × balancer), 1..=120.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Only these scenarios (repeatable): slow, errors, blackhole, flapping, recovery,
    /// healthy-c1, healthy-c64.
    #[arg(long)]
    scenario: Vec<String>,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Also write the markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

const SERVICE: &str = "compare";
/// Route timeout for every setup: a black-holed request ends as a 504 after this.
const ROUTE_TIMEOUT_MS: u64 = 1000;
/// Retries on connect failure and reset for every setup.
const RETRIES: u32 = 2;
/// Connections for the fault scenarios.
const FAULT_CONNECTIONS: u32 = 16;
/// Base latency of every backend in the fault scenarios; the slow one gets ten times this.
const BASE_LATENCY_MS: u64 = 2;
/// The last seconds of a run over which "b4 last" measures the odd backend's share.
const TAIL_SECONDS: u64 = 5;

const BALANCERS: [ClusterBalancing; 4] = [
    ClusterBalancing::Fulcrum,
    ClusterBalancing::RoundRobin,
    ClusterBalancing::LeastRequest,
    ClusterBalancing::LeastRequestWithOutlierDetection,
];

/// Four backends' faults and the load on them; the fourth backend is the odd one.
#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    about: &'static str,
    connections: u32,
    faults: [Fault; 4],
    /// The odd backend's fault ends after this long, leaving it like the others.
    odd_recovers_after: Option<Duration>,
    /// The run lasts at least this many seconds, whatever `--duration` says.
    min_seconds: u64,
}

fn scenarios() -> Vec<Scenario> {
    let base = Fault {
        latency_ms: BASE_LATENCY_MS,
        ..Fault::default()
    };
    let with_odd = |odd: Fault| [base.clone(), base.clone(), base.clone(), odd];
    vec![
        Scenario {
            name: "slow",
            about: "b4 10× slower (20 ms vs 2 ms)",
            connections: FAULT_CONNECTIONS,
            faults: with_odd(Fault {
                latency_ms: BASE_LATENCY_MS * 10,
                ..Fault::default()
            }),
            odd_recovers_after: None,
            min_seconds: 0,
        },
        Scenario {
            name: "errors",
            about: "b4 answers 30 % of requests with 503",
            connections: FAULT_CONNECTIONS,
            faults: with_odd(Fault {
                error_rate: 0.3,
                ..base.clone()
            }),
            odd_recovers_after: None,
            min_seconds: 0,
        },
        Scenario {
            name: "blackhole",
            about: "b4 accepts and never answers (route timeout 1 s)",
            connections: FAULT_CONNECTIONS,
            faults: with_odd(Fault {
                blackhole: true,
                ..base.clone()
            }),
            odd_recovers_after: None,
            min_seconds: 0,
        },
        Scenario {
            name: "flapping",
            about: "b4 alternates 2 s healthy / 2 s all-503",
            connections: FAULT_CONNECTIONS,
            faults: with_odd(Fault {
                flap_period_ms: Some(2000),
                ..base.clone()
            }),
            odd_recovers_after: None,
            min_seconds: 0,
        },
        Scenario {
            name: "recovery",
            about: "b4 answers every request with 503 for 3 s, then recovers; an ejection \
                    lasts 30 s on both sides, so the run lasts 45 s and \"b4 last\" (fair: \
                    25 %) shows the share it gets back",
            connections: FAULT_CONNECTIONS,
            faults: with_odd(Fault {
                error_rate: 1.0,
                ..base.clone()
            }),
            odd_recovers_after: Some(Duration::from_secs(3)),
            min_seconds: 45,
        },
        Scenario {
            name: "healthy-c1",
            about: "all healthy, 0 ms, 1 connection (overhead)",
            connections: 1,
            faults: std::array::from_fn(|_| Fault::default()),
            odd_recovers_after: None,
            min_seconds: 0,
        },
        Scenario {
            name: "healthy-c64",
            about: "all healthy, 0 ms, 64 connections (overhead)",
            connections: 64,
            faults: std::array::from_fn(|_| Fault::default()),
            odd_recovers_after: None,
            min_seconds: 0,
        },
    ]
}

/// fulcrum's policy: peak EWMA, two retry targets, and outlier detection matching the native
/// one (5 consecutive failures, 30 s base ejection, at most 50 % ejected).
fn fulcrum_policy() -> serde_json::Value {
    json!({"default": {
        "load_balancer": {"type": "peak_ewma"},
        "retry": RETRIES,
        "outlier_detection": {
            "consecutive_failures": 5,
            "base_ejection_time": "30s",
            "max_ejection_percent": 50
        }
    }})
}

/// What one run measured.
#[derive(Debug, Clone)]
struct Measured {
    requests_per_second: f64,
    /// 2xx/3xx answers over all requests wrk finished or gave up on.
    success: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// Share of the requests the backends received that went to the odd backend (b4).
    odd_share: f64,
    /// The same over the last [`TAIL_SECONDS`] of the run.
    odd_tail_share: f64,
    /// How far the busiest or idlest backend strays from an equal share, relative to it.
    spread: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !(1..=120).contains(&args.duration) {
        bail!("--duration must be 1..=120 seconds, got {}", args.duration);
    }
    let all = scenarios();
    for name in &args.scenario {
        if !all.iter().any(|s| s.name == name) {
            let names: Vec<&str> = all.iter().map(|s| s.name).collect();
            bail!("unknown scenario `{name}`; known: {}", names.join(", "));
        }
    }
    let chosen: Vec<Scenario> = all
        .into_iter()
        .filter(|s| args.scenario.is_empty() || args.scenario.iter().any(|n| n == s.name))
        .collect();
    let dir = tempfile::Builder::new()
        .prefix("fulcrum-compare-")
        .tempdir()?;
    let script = dir.path().join("report.lua");
    std::fs::write(&script, wrk::SCRIPT)?;

    let load_before = wrk::load_average();
    let mut results: Vec<(&Scenario, ClusterBalancing, Measured)> = Vec::new();
    for scenario in &chosen {
        for balancing in BALANCERS {
            eprintln!(
                "fulcrum-compare: {} / {} ({} s)…",
                scenario.name,
                balancing.name(),
                args.duration.max(scenario.min_seconds)
            );
            let measured = run(&args, scenario, balancing.clone(), dir.path(), &script)
                .await
                .with_context(|| format!("{} with {}", scenario.name, balancing.name()))?;
            results.push((scenario, balancing, measured));
        }
    }
    let report = report(&args, &results, &load_before, &wrk::load_average());
    print!("{report}");
    if let Some(out) = &args.out {
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("fulcrum-compare: wrote {}", out.display());
    }
    Ok(())
}

/// One scenario with one balancer: fresh backends, fresh Envoy, one wrk run.
async fn run(
    args: &Args,
    scenario: &Scenario,
    balancing: ClusterBalancing,
    dir: &Path,
    script: &Path,
) -> Result<Measured> {
    let mut backends = Vec::new();
    for (index, fault) in scenario.faults.iter().enumerate() {
        let backend = Backend::bind(&format!("b{}", index + 1), 0, 0).await?;
        backend
            .set_fault(fault.clone())
            .map_err(anyhow::Error::msg)?;
        backends.push(backend);
    }
    let addresses: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let filter = (balancing == ClusterBalancing::Fulcrum).then(|| FilterSetup {
        wasm: args.wasm.clone(),
        config: json!({
            "service": {"from": "fixed", "name": SERVICE},
            "endpoints": {SERVICE: addresses
                .iter()
                .map(|a| json!({"address": a.to_string()}))
                .collect::<Vec<_>>()},
            "policy": fulcrum_policy(),
        }),
        failure_policy: FailurePolicy::default(),
    });
    let label = format!("{}-{}", scenario.name, balancing.name());
    let bootstrap = Bootstrap {
        node_id: format!("compare-{label}"),
        endpoints: Endpoints::Static(addresses),
        ingress: Some(Ingress {
            service: SERVICE.to_owned(),
            balancing: balancing.clone(),
            filter,
            route_timeout_ms: ROUTE_TIMEOUT_MS,
            retries: RETRIES,
            retry_on: RETRY_ON_HTTP,
            cluster: ClusterOptions::default(),
        }),
    };
    let options = EnvoyOptions {
        binary: Some(args.envoy.clone()),
        concurrency: args.workers,
        log_level: "warning".to_owned(),
        dir: Some(dir.to_path_buf()),
        name: format!("envoy-{label}"),
        ..EnvoyOptions::default()
    };
    let mut envoy = Envoy::start_with(&bootstrap, &options).await?;
    let listener = envoy.ingress_address().await?;

    let seconds = args.duration.max(scenario.min_seconds);
    let counts = |backends: &[Backend]| -> Vec<u64> {
        backends.iter().map(|b| b.stats().requests).collect()
    };
    // Ends the odd backend's fault on time and notes the counts when the tail starts.
    let timeline = async {
        let started = tokio::time::Instant::now();
        if let Some(after) = scenario.odd_recovers_after {
            tokio::time::sleep(after).await;
            backends[3]
                .set_fault(scenario.faults[0].clone())
                .map_err(anyhow::Error::msg)?;
        }
        tokio::time::sleep_until(
            started + Duration::from_secs(seconds.saturating_sub(TAIL_SECONDS)),
        )
        .await;
        anyhow::Ok(counts(&backends))
    };
    let url = format!("http://{listener}/");
    let load = wrk::run(&args.wrk, script, &url, scenario.connections, seconds);
    let (report, tail_start) = tokio::join!(load, timeline);
    let tail_start = tail_start?;
    envoy.check_running()?;
    // Stops the traffic before the backends are counted.
    drop(envoy);
    let report = report?;
    let field = |name: &str| report.field(name);
    let finished = field("requests");
    let attempted = finished + field("connect") + field("read") + field("write") + field("timeout");
    let end = counts(&backends);
    let received: u64 = end.iter().sum();
    let tail: Vec<u64> = end
        .iter()
        .zip(&tail_start)
        .map(|(end, start)| end.saturating_sub(*start))
        .collect();
    let equal = 1.0 / end.len() as f64;
    let spread = end
        .iter()
        .map(|&count| (count as f64 / received.max(1) as f64 - equal).abs() / equal)
        .fold(0.0, f64::max);
    Ok(Measured {
        requests_per_second: report.requests_per_second(),
        success: if attempted > 0.0 {
            (finished - field("status")) / attempted
        } else {
            0.0
        },
        p50_ms: field("p50") / 1000.0,
        p99_ms: field("p99") / 1000.0,
        p999_ms: field("p999") / 1000.0,
        odd_share: end[3] as f64 / received.max(1) as f64,
        odd_tail_share: tail[3] as f64 / tail.iter().sum::<u64>().max(1) as f64,
        spread,
    })
}

fn report(
    args: &Args,
    results: &[(&Scenario, ClusterBalancing, Measured)],
    load_before: &str,
    load_after: &str,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Envoy `{}` with `--concurrency {}`; 4 in-process backends; wrk {} s per run (at \
         least 45 s for `recovery`; {} connections in fault scenarios); route timeout {} ms, {} retries on \
         connect-failure/reset for every setup; fulcrum: peak_ewma, retry {}, outlier detection \
         5 consecutive failures / 30 s / 50 %. Load average before: {load_before}; after: \
         {load_after}. ×-columns are fulcrum ÷ this balancer (latency < 1 and req/s > 1 favour \
         fulcrum). \"to b4\" is the odd backend's share of the requests backends received, \
         \"b4 last\" the same over the run's last {TAIL_SECONDS} s; \"spread\" is how far the \
         busiest or idlest backend strays from an equal share, relative to it (the faulty \
         backend counts too).\n",
        args.envoy.display(),
        args.workers,
        args.duration,
        FAULT_CONNECTIONS,
        ROUTE_TIMEOUT_MS,
        RETRIES,
        RETRIES,
    );
    let _ = writeln!(
        out,
        "| scenario | balancer | conns | req/s | success | p50 ms | p99 ms | p999 ms | to b4 | b4 last | spread | p50 × | p99 × | p999 × | req/s × |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (scenario, balancing, m) in results {
        let fulcrum = results
            .iter()
            .find(|(s, b, _)| s.name == scenario.name && *b == ClusterBalancing::Fulcrum)
            .map(|(_, _, m)| m);
        let ratios = match (balancing, fulcrum) {
            (ClusterBalancing::Fulcrum, _) | (_, None) => "| — | — | — | — |".to_owned(),
            (_, Some(f)) => format!(
                "| {} | {} | {} | {} |",
                ratio(f.p50_ms, m.p50_ms),
                ratio(f.p99_ms, m.p99_ms),
                ratio(f.p999_ms, m.p999_ms),
                ratio(f.requests_per_second, m.requests_per_second),
            ),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.2} % | {:.2} | {:.2} | {:.2} | {:.1} % | {:.1} % | {:.0} % {ratios}",
            scenario.name,
            balancing.name(),
            scenario.connections,
            m.requests_per_second,
            m.success * 100.0,
            m.p50_ms,
            m.p99_ms,
            m.p999_ms,
            m.odd_share * 100.0,
            m.odd_tail_share * 100.0,
            m.spread * 100.0,
        );
    }
    let _ = writeln!(out, "\nScenarios:");
    let mut seen = Vec::new();
    for (scenario, _, _) in results {
        if !seen.contains(&scenario.name) {
            seen.push(scenario.name);
            let _ = writeln!(out, "- `{}`: {}", scenario.name, scenario.about);
        }
    }
    out
}

fn ratio(fulcrum: f64, native: f64) -> String {
    if native > 0.0 {
        format!("{:.2}", fulcrum / native)
    } else {
        "—".to_owned()
    }
}
