//! `fulcrum-compare`: fulcrum against Envoy's native balancers on the same real Envoy.
//!
//! For each scenario (one of four backends slow, erroring, black-holed, flapping, recovering
//! from an outage, dead, joining mid-run, or failing gRPC calls, or all healthy), each Envoy
//! worker count and each balancer (fulcrum's filter over an `override_host` cluster, Envoy's
//! round robin, least request, least request with outlier detection; the newer scenarios run
//! fulcrum against the last only) it starts four fresh in-process backends, one Envoy from
//! [`fulcrum_test_support::Bootstrap`] with static endpoints, and drives bounded load through
//! it: `wrk` for HTTP ([`http`]), a fixed set of tonic clients for gRPC ([`grpc`]). Route,
//! timeout and retry policy are identical on both sides; only the listener's filter and the
//! cluster's policy differ. Prints a markdown table (latency percentiles, success rate,
//! requests/s, the odd backend's share over the run and over its last seconds, how far the
//! shares stray from equal, and fulcrum ÷ native ratios) and what some scenarios measure beyond
//! it (connect failures, the joining backend's ramp), and optionally writes it to a file.
//! Normally run through `cargo xtask bench-compare`.

#[path = "compare/grpc.rs"]
mod grpc;
#[path = "compare/http.rs"]
mod http;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use fulcrum_demo::wrk;
use fulcrum_example_backend::Fault;
use fulcrum_test_support::{
    Bootstrap, ClusterBalancing, ClusterOptions, Endpoints, Envoy, EnvoyOptions, FilterSetup,
    Ingress, NodeLocality,
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
    /// The control plane (`fulcrum-control-plane`): fulcrum learns from it that b4 joined in
    /// `warm-up`, which needs it.
    #[arg(long, env = "FULCRUM_CONTROL_PLANE")]
    control_plane: Option<PathBuf>,
    /// The wrk load generator.
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// Seconds of load per run (scenario × workers × balancer), 1..=120.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Only these scenarios (repeatable): slow, healthy, errors, blackhole, flapping, recovery,
    /// healthy-c1, healthy-c64, dead, warm-up, grpc-errors.
    #[arg(long)]
    scenario: Vec<String>,
    /// Envoy worker threads, 1..=8: a list (`1,2`, or repeated) gives every scenario one set
    /// of rows per count (`dead` runs at 1 and 2 whatever this says).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2])]
    workers: Vec<u32>,
    /// Only these balancers (repeatable): fulcrum, round_robin, least_request,
    /// least_request+outlier_detection; default: each scenario's own set.
    #[arg(long)]
    balancer: Vec<String>,
    /// Also write the markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

const SERVICE: &str = "compare";
/// Route timeout for every setup: a black-holed request ends as a 504 after this.
const ROUTE_TIMEOUT_MS: u64 = 1000;
/// Retries on connect failure and reset (and gRPC `UNAVAILABLE`) for every setup.
const RETRIES: u32 = 2;
/// Connections for the fault scenarios.
const FAULT_CONNECTIONS: u32 = 16;
/// Base latency of every backend in the HTTP fault scenarios; the slow one gets ten times this.
const BASE_LATENCY_MS: u64 = 2;
/// The last seconds of a run over which "b4 last" measures the odd backend's share.
const TAIL_SECONDS: u64 = 5;
/// When b4 starts listening in `warm-up`.
const JOINS_AFTER: Duration = Duration::from_secs(3);
/// The slow-start window of `warm-up`, the same on both sides.
const SLOW_START_WINDOW: Duration = Duration::from_secs(10);
/// How long an ejection lasts on both sides, in every scenario but `recovery`.
const EJECTION: Duration = Duration::from_secs(30);
/// How long an ejection lasts in `recovery`: short, so b4 comes back within the run and the
/// run measures how fast it gets its share back.
const RECOVERY_EJECTION: Duration = Duration::from_secs(5);
/// `recovery`'s run: 3 s failing, the ejection, and 10 s more, rounded up.
const RECOVERY_SECONDS: u64 = 20;
/// A joining (or recovered) backend counts as warmed up from the first second its share reaches this fraction
/// of a fair share.
const WARM_SHARE_OF_FAIR: f64 = 0.8;

const ALL_BALANCERS: &[ClusterBalancing] = &[
    ClusterBalancing::Fulcrum,
    ClusterBalancing::RoundRobin,
    ClusterBalancing::LeastRequest,
    ClusterBalancing::LeastRequestWithOutlierDetection,
];
/// The newer scenarios set fulcrum against Envoy's strongest native setup only.
const AGAINST_OUTLIER_DETECTION: &[ClusterBalancing] = &[
    ClusterBalancing::Fulcrum,
    ClusterBalancing::LeastRequestWithOutlierDetection,
];

/// Four backends and the load on them; the fourth backend (b4) is the odd one.
#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    about: &'static str,
    connections: u32,
    /// What b1–b3 do (HTTP scenarios).
    base: Fault,
    /// What b4 does.
    odd: Odd,
    /// The run lasts at least this many seconds, whatever `--duration` says.
    min_seconds: u64,
    /// The balancers compared.
    balancers: &'static [ClusterBalancing],
    /// Also run at these Envoy worker counts, whatever `--workers` says.
    also_workers: &'static [u32],
    /// How long an ejection lasts on both sides: fulcrum's `base_ejection_time`, Envoy's
    /// outlier detection's.
    ejection: Duration,
    /// The details give b4's share in each second of the run, and the p99 against the same
    /// balancer's in `healthy`.
    slow_detail: bool,
}

/// What the odd backend, b4, does.
#[derive(Debug, Clone)]
enum Odd {
    /// Serves HTTP with this fault, which ends after `recovers_after` when set.
    Faulty {
        fault: Fault,
        recovers_after: Option<Duration>,
    },
    /// Nothing listens on its port: every connection to it is refused.
    Refused,
    /// Refused until [`JOINS_AFTER`], then serves like the others: a new instance joining.
    Joins,
    /// All four serve gRPC; b4 fails this share of its calls with `UNAVAILABLE`, which gRPC
    /// sends inside an HTTP 200.
    GrpcUnavailable { percent: u64 },
}

fn scenarios() -> Vec<Scenario> {
    let base = Fault {
        latency_ms: BASE_LATENCY_MS,
        ..Fault::default()
    };
    let fault = |fault: Fault| Odd::Faulty {
        fault,
        recovers_after: None,
    };
    let scenario = |name, about, odd| Scenario {
        name,
        about,
        connections: FAULT_CONNECTIONS,
        base: base.clone(),
        odd,
        min_seconds: 0,
        balancers: ALL_BALANCERS,
        also_workers: &[],
        ejection: EJECTION,
        slow_detail: false,
    };
    let healthy = |name, about, connections| Scenario {
        connections,
        base: Fault::default(),
        ..scenario(name, about, fault(Fault::default()))
    };
    vec![
        Scenario {
            slow_detail: true,
            ..scenario(
                "slow",
                "b4 10× slower (20 ms vs 2 ms); the details give b4's share in each second \
                 and the run's p99 against the same balancer's in `healthy`",
                fault(Fault {
                    latency_ms: BASE_LATENCY_MS * 10,
                    ..Fault::default()
                }),
            )
        },
        scenario(
            "healthy",
            "all four healthy at 2 ms: the fault scenarios' load without a fault, the p99 `slow` \
             is held to",
            fault(base.clone()),
        ),
        scenario(
            "errors",
            "b4 answers 30 % of requests with 503",
            fault(Fault {
                error_rate: 0.3,
                ..base.clone()
            }),
        ),
        scenario(
            "blackhole",
            "b4 accepts and never answers (route timeout 1 s)",
            fault(Fault {
                blackhole: true,
                ..base.clone()
            }),
        ),
        scenario(
            "flapping",
            "b4 alternates 2 s healthy / 2 s all-503",
            fault(Fault {
                flap_period_ms: Some(2000),
                ..base.clone()
            }),
        ),
        Scenario {
            min_seconds: RECOVERY_SECONDS,
            ejection: RECOVERY_EJECTION,
            ..scenario(
                "recovery",
                "b4 answers every request with 503 for 3 s, then recovers; an ejection \
                 lasts 5 s on both sides, so b4 returns about 2 s after it recovered (Envoy: \
                 at its next sweep once the ejection ended, every 5 s); the run lasts 20 s, the details give b4's \
                 share in each second after it recovered and the first second it reached \
                 80 % of a fair share",
                Odd::Faulty {
                    fault: Fault {
                        error_rate: 1.0,
                        ..base.clone()
                    },
                    recovers_after: Some(Duration::from_secs(3)),
                },
            )
        },
        healthy(
            "healthy-c1",
            "all healthy, 0 ms, 1 connection (overhead)",
            1,
        ),
        healthy(
            "healthy-c64",
            "all healthy, 0 ms, 64 connections (overhead)",
            64,
        ),
        Scenario {
            balancers: AGAINST_OUTLIER_DETECTION,
            also_workers: &[1, 2],
            ..scenario(
                "dead",
                "nothing listens on b4's port, every connection to it is refused; run at 1 \
                 and 2 Envoy workers; the details count Envoy's connect failures to the \
                 cluster (`upstream_cx_connect_fail`, all of them b4's) and fulcrum's picks \
                 of b4",
                Odd::Refused,
            )
        },
        Scenario {
            balancers: AGAINST_OUTLIER_DETECTION,
            min_seconds: JOINS_AFTER.as_secs() + SLOW_START_WINDOW.as_secs() + TAIL_SECONDS,
            ..scenario(
                "warm-up",
                "b4 is refused for 3 s, then starts listening: a new instance joining; slow \
                 start with a 10 s window (aggression 1, minimum weight 10 %) on both sides. \
                 fulcrum learns of b4 from its control plane, whose endpoints file gets b4 \
                 when it starts listening (file polled every 100 ms, filter polls every \
                 100 ms); native least request has every backend in its static cluster and \
                 learns it from Envoy's active health check (`GET /healthz` every 250 ms, \
                 one pass makes it healthy), which starts its slow start. The run lasts 18 s; \
                 the details give b4's share in each second after it started listening",
                Odd::Joins,
            )
        },
        Scenario {
            balancers: AGAINST_OUTLIER_DETECTION,
            ..scenario(
                "grpc-errors",
                "four gRPC (tonic) backends answering at once, b4 fails 30 % of its calls \
                 with UNAVAILABLE (in an HTTP 200, evenly spread, never 5 in a row); the \
                 route retries connect-failure, reset and unavailable on both sides over \
                 an HTTP/2 cluster; load: 16 connections, one call at a time each, from \
                 in-process tonic clients (latencies without wrk's coordinated-omission \
                 correction); success = gRPC OK at the client",
                Odd::GrpcUnavailable { percent: 30 },
            )
        },
    ]
}

/// fulcrum's policy: peak EWMA, two retry targets, and outlier detection matching the native
/// one (5 consecutive failures, the scenario's base ejection, at most 50 % ejected).
fn fulcrum_policy(scenario: &Scenario) -> serde_json::Value {
    json!({"default": {
        "load_balancer": {"type": "peak_ewma"},
        "retry": RETRIES,
        "outlier_detection": {
            "consecutive_failures": 5,
            "base_ejection_time": format!("{}s", scenario.ejection.as_secs()),
            "max_ejection_percent": 50
        }
    }})
}

/// One run: a scenario with one balancer on an Envoy with so many workers.
#[derive(Debug, Clone, Copy)]
struct Run<'a> {
    args: &'a Args,
    scenario: &'a Scenario,
    balancing: &'a ClusterBalancing,
    workers: u32,
    /// Where Envoy's (and the control plane's) files go.
    dir: &'a Path,
}

impl Run<'_> {
    fn label(&self) -> String {
        format!(
            "{}-w{}-{}",
            self.scenario.name,
            self.workers,
            self.balancing.name()
        )
    }

    fn seconds(&self) -> u64 {
        self.args.duration.max(self.scenario.min_seconds)
    }

    /// Starts this run's Envoy: the listener and route every setup shares, `cluster`'s options,
    /// `filter` in front for fulcrum.
    async fn start_envoy(
        &self,
        endpoints: Endpoints,
        filter: Option<FilterSetup>,
        retry_on: &'static str,
        cluster: ClusterOptions,
    ) -> Result<Envoy> {
        let label = self.label();
        let bootstrap = Bootstrap {
            node_id: format!("compare-{label}"),
            endpoints,
            ingress: Some(Ingress {
                service: SERVICE.to_owned(),
                balancing: self.balancing.clone(),
                filter,
                route_timeout_ms: ROUTE_TIMEOUT_MS,
                retries: RETRIES,
                retry_on,
                cluster,
            }),
            locality: NodeLocality::default(),
        };
        let options = EnvoyOptions {
            binary: Some(self.args.envoy.clone()),
            concurrency: self.workers,
            log_level: "warning".to_owned(),
            dir: Some(self.dir.to_path_buf()),
            name: format!("envoy-{label}"),
            ..EnvoyOptions::default()
        };
        Ok(Envoy::start_with(&bootstrap, &options).await?)
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
struct Measured {
    requests_per_second: f64,
    /// Successful answers (2xx/3xx, gRPC OK) over all requests finished or given up on.
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
    /// What the scenario measures beyond the table's columns.
    detail: Option<String>,
}

/// b4's share, its share since `tail_start`, and the spread, from what each backend received
/// by the end of the run (`end`) and by the start of its tail.
fn shares(end: &[u64], tail_start: &[u64]) -> (f64, f64, f64) {
    let received: u64 = end.iter().sum();
    let tail: Vec<u64> = end
        .iter()
        .zip(tail_start)
        .map(|(end, start)| end.saturating_sub(*start))
        .collect();
    let equal = 1.0 / end.len() as f64;
    let spread = end
        .iter()
        .map(|&count| (count as f64 / received.max(1) as f64 - equal).abs() / equal)
        .fold(0.0, f64::max);
    let odd = end.len() - 1;
    (
        end[odd] as f64 / received.max(1) as f64,
        tail[odd] as f64 / tail.iter().sum::<u64>().max(1) as f64,
        spread,
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !(1..=120).contains(&args.duration) {
        bail!("--duration must be 1..=120 seconds, got {}", args.duration);
    }
    if let Some(bad) = args.workers.iter().find(|w| !(1..=8).contains(*w)) {
        bail!("--workers must be 1..=8, got {bad}");
    }
    let all = scenarios();
    for name in &args.scenario {
        if !all.iter().any(|s| s.name == name) {
            let names: Vec<&str> = all.iter().map(|s| s.name).collect();
            bail!("unknown scenario `{name}`; known: {}", names.join(", "));
        }
    }
    if let Some(unknown) = args
        .balancer
        .iter()
        .find(|name| !ALL_BALANCERS.iter().any(|b| b.name() == name.as_str()))
    {
        bail!(
            "unknown balancer `{unknown}`; known: fulcrum, round_robin, least_request, \
             least_request+outlier_detection"
        );
    }
    let chosen: Vec<Scenario> = all
        .into_iter()
        .filter(|s| args.scenario.is_empty() || args.scenario.iter().any(|n| n == s.name))
        .collect();
    if args.control_plane.is_none() && chosen.iter().any(|s| matches!(s.odd, Odd::Joins)) {
        bail!(
            "warm-up needs the control plane: pass --control-plane PATH (or FULCRUM_CONTROL_PLANE), \
             built by `cargo build --release -p fulcrum-control-plane`"
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("fulcrum-compare-")
        .tempdir()?;
    let script = dir.path().join("report.lua");
    std::fs::write(&script, wrk::SCRIPT)?;

    let load_before = wrk::load_average();
    let mut results: Vec<Row> = Vec::new();
    for scenario in &chosen {
        let mut workers: Vec<u32> = args
            .workers
            .iter()
            .chain(scenario.also_workers)
            .copied()
            .collect();
        workers.sort_unstable();
        workers.dedup();
        for workers in workers {
            for balancing in scenario.balancers.iter().filter(|balancing| {
                args.balancer.is_empty() || args.balancer.iter().any(|b| b == balancing.name())
            }) {
                let run = Run {
                    args: &args,
                    scenario,
                    balancing,
                    workers,
                    dir: dir.path(),
                };
                eprintln!(
                    "fulcrum-compare: {} / {workers} worker(s) / {} ({} s)…",
                    scenario.name,
                    balancing.name(),
                    run.seconds()
                );
                let measured = match scenario.odd {
                    Odd::GrpcUnavailable { percent } => grpc::run(run, percent).await,
                    _ => http::run(run, &script).await,
                }
                .with_context(|| {
                    format!(
                        "{} with {} at {workers} worker(s)",
                        scenario.name,
                        balancing.name()
                    )
                })?;
                results.push(Row {
                    scenario,
                    workers,
                    balancing: balancing.clone(),
                    measured,
                });
            }
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

/// One row of the report.
#[derive(Debug)]
struct Row<'a> {
    scenario: &'a Scenario,
    workers: u32,
    balancing: ClusterBalancing,
    measured: Measured,
}

fn report(args: &Args, results: &[Row<'_>], load_before: &str, load_after: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Envoy `{}` with `--concurrency` as the workers column says; 4 in-process backends; {} s \
         of load per run (at least 20 s for `recovery`, 18 s for `warm-up`; {} connections in \
         fault scenarios; wrk for HTTP, tonic clients for gRPC); route timeout {} ms, {} retries \
         on connect-failure/reset (and unavailable for gRPC) for every setup; fulcrum: \
         peak_ewma, retry {}, outlier detection 5 consecutive failures / 30 s (5 s in `recovery`, on both sides) / \
         50 %. Load \
         average before: {load_before}; after: {load_after}. ×-columns are fulcrum ÷ this \
         balancer at the same workers (latency < 1 and req/s > 1 favour fulcrum). \"to b4\" is \
         the odd backend's share of the requests backends received, \"b4 last\" the same over \
         the run's last {TAIL_SECONDS} s; \"spread\" is how far the busiest or idlest backend \
         strays from an equal share, relative to it (the odd backend counts too).\n",
        args.envoy.display(),
        args.duration,
        FAULT_CONNECTIONS,
        ROUTE_TIMEOUT_MS,
        RETRIES,
        RETRIES,
    );
    let _ = writeln!(
        out,
        "| scenario | workers | balancer | conns | req/s | success | p50 ms | p99 ms | p999 ms | to b4 | b4 last | spread | p50 × | p99 × | p999 × | req/s × |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for row in results {
        let m = &row.measured;
        let fulcrum = results
            .iter()
            .find(|other| {
                other.scenario.name == row.scenario.name
                    && other.workers == row.workers
                    && other.balancing == ClusterBalancing::Fulcrum
            })
            .map(|other| &other.measured);
        let ratios = match (&row.balancing, fulcrum) {
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
            "| {} | {} | {} | {} | {:.0} | {:.2} % | {:.2} | {:.2} | {:.2} | {:.1} % | {:.1} % | {:.0} % {ratios}",
            row.scenario.name,
            row.workers,
            row.balancing.name(),
            row.scenario.connections,
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
    let details: Vec<(&Row<'_>, String)> = results
        .iter()
        .filter_map(|row| {
            let against_healthy = against_healthy(row, results);
            let detail = match (&row.measured.detail, against_healthy) {
                (Some(detail), Some(healthy)) => format!("{healthy}; {detail}"),
                (Some(detail), None) => detail.clone(),
                (None, Some(healthy)) => healthy,
                (None, None) => return None,
            };
            Some((row, detail))
        })
        .collect();
    if !details.is_empty() {
        let _ = writeln!(
            out,
            "\n| scenario | workers | balancer | beyond the table |\n| --- | --- | --- | --- |"
        );
        for (row, detail) in details {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {detail} |",
                row.scenario.name,
                row.workers,
                row.balancing.name(),
            );
        }
    }
    let _ = writeln!(out, "\nScenarios:");
    let mut seen = Vec::new();
    for row in results {
        if !seen.contains(&row.scenario.name) {
            seen.push(row.scenario.name);
            let _ = writeln!(out, "- `{}`: {}", row.scenario.name, row.scenario.about);
        }
    }
    out
}

/// For a `slow` row: its p99 against the same balancer's at the same workers in `healthy`
/// (the same load without the slow backend), when both ran.
fn against_healthy(row: &Row<'_>, results: &[Row<'_>]) -> Option<String> {
    if !row.scenario.slow_detail {
        return None;
    }
    let healthy = results.iter().find(|other| {
        other.scenario.name == "healthy"
            && other.workers == row.workers
            && other.balancing == row.balancing
    })?;
    Some(format!(
        "p99 {:.2} ms = {} × `healthy`'s {:.2} ms",
        row.measured.p99_ms,
        ratio(row.measured.p99_ms, healthy.measured.p99_ms),
        healthy.measured.p99_ms,
    ))
}

fn ratio(fulcrum: f64, native: f64) -> String {
    if native > 0.0 {
        format!("{:.2}", fulcrum / native)
    } else {
        "—".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_count_the_odd_backend_over_the_run_and_its_tail() {
        let (odd, tail, spread) = shares(&[100, 100, 100, 100], &[50, 50, 50, 90]);
        assert_eq!(odd, 0.25);
        assert_eq!(tail, 10.0 / 160.0);
        assert_eq!(spread, 0.0);
        let (odd, _, spread) = shares(&[150, 150, 100, 0], &[0, 0, 0, 0]);
        assert_eq!(odd, 0.0);
        assert_eq!(spread, 1.0, "the idle backend strays by a whole share");
    }

    #[test]
    fn workers_take_a_list_and_scenario_names_are_unique() {
        let args = Args::parse_from([
            "fulcrum-compare",
            "--envoy",
            "envoy",
            "--wasm",
            "f.wasm",
            "--workers",
            "1,2",
        ]);
        assert_eq!(args.workers, [1, 2]);
        let mut names: Vec<&str> = scenarios().iter().map(|s| s.name).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count);
    }
}
