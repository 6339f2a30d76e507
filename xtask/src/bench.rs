//! `cargo xtask bench`: runs every benchmark and rewrites BENCHMARKS.md's generated tables.
//!
//! Each benchmark ([`BENCHES`]) produces a markdown fragment: the load-driving ones
//! (`fulcrum-datapath`, `fulcrum-compare`, the registry's) write theirs to a file, the
//! criterion ones are turned into tables from criterion's own `estimates.json` files. Each
//! fragment goes between its markers in BENCHMARKS.md, `<!-- bench:NAME -->` and
//! `<!-- /bench:NAME -->`, under a line saying when, at which commit, on what machine (cores,
//! memory, load average before the run) and with which command it was made; the prose around
//! the markers is the humans'. Fragments also land in `bench-results/NAME.md`.
//!
//! On a virtual machine the host can take CPU away (steal time): a run during which it took
//! more than `--max-steal-percent` measured the neighbours, not fulcrum, so its table is not
//! written to BENCHMARKS.md (only to `bench-results/`, with the steal in its header line) and
//! the command fails naming it. Every table's header line says how much was stolen.
//!
//! A host can also be slower with no steal to show for it (a lower clock, a busy sibling
//! hyperthread, memory bandwidth taken by neighbours): on 2026-12-03 the core's picks took
//! twice as long as the day before with 0 % steal. So each benchmark is bracketed by a fixed
//! piece of single-threaded work ([`reference_ms`]), its time is in the header line, and a
//! run whose machine was more than `--max-slowdown` times slower than the one that made
//! BENCHMARKS.md's table (read from that table's header), or than itself at the run's other
//! end, is kept out of BENCHMARKS.md the same way: a regression could not be told from the
//! machine.
//!
//! One benchmark counts instead of timing: `instructions` runs the data path's Envoys under
//! valgrind's callgrind and reports instructions per request, which neither steal nor a slower
//! machine changes, so its runs are never refused for them.
//!
//! Benchmarks run one after another, never beside a build, and each is bounded in time; a
//! failing benchmark does not stop the others, and the command fails at the end naming it,
//! with every table that did run already written. `--quick` runs each in its smoke mode (short
//! runs, one repeat) to check that the whole chain works; its numbers are not for BENCHMARKS.md
//! and are written to `bench-results/` only.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    FILTER_WASM, build_wasm, cargo, setup, setup::Purpose, target_dir, tools, workspace_root,
};

/// What `cargo xtask bench` needs: the build, the filter, Envoy, etcd (the registry bench's
/// three members) and wrk.
const NEEDS: &[Purpose] = &[
    Purpose::Build,
    Purpose::Filter,
    Purpose::Envoy,
    Purpose::Test,
    Purpose::Bench,
];

/// `cargo xtask bench` options.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Smoke mode: every benchmark briefly, results to bench-results/ only
    #[arg(long)]
    quick: bool,
    /// Only these benchmarks (repeatable): core, wasm, datapath, instructions, compare,
    /// registry, xds, snapshot
    #[arg(long, value_name = "NAME")]
    only: Vec<String>,
    /// Keep BENCHMARKS.md's table when the host stole more than this share of the CPU
    /// during a benchmark (virtual machines; `/proc/stat`'s steal time). Low: with both
    /// cores loaded, 1.9 % stolen already halved the data path's throughput here
    #[arg(long, value_name = "PERCENT", default_value_t = 1.0)]
    max_steal_percent: f64,
    /// Keep BENCHMARKS.md's table when this machine did a fixed piece of reference work
    /// more than this many times slower than when that table was made (its header line
    /// records the time), or than at the other end of the same run
    #[arg(long, value_name = "RATIO", default_value_t = 1.25)]
    max_slowdown: f64,
}

/// One benchmark: its name (the markers' and the file's), and how to run it.
struct Bench {
    name: &'static str,
    run: fn(&Run) -> Result<Fragment>,
    /// It counts (instructions), it does not time: a machine that is slow or loses CPU to
    /// its host changes nothing it reports, so such a run is not refused.
    counts: bool,
}

/// The benchmarks, in the order they run (cheap and deterministic first).
const BENCHES: [Bench; 8] = [
    Bench {
        name: "core",
        run: core,
        counts: false,
    },
    Bench {
        name: "wasm",
        run: wasm,
        counts: false,
    },
    Bench {
        name: "datapath",
        run: datapath,
        counts: false,
    },
    Bench {
        name: "instructions",
        run: instructions,
        counts: true,
    },
    Bench {
        name: "compare",
        run: compare,
        counts: false,
    },
    Bench {
        name: "registry",
        run: registry,
        counts: false,
    },
    Bench {
        name: "xds",
        run: xds,
        counts: false,
    },
    Bench {
        name: "snapshot",
        run: snapshot,
        counts: false,
    },
];

/// What every benchmark of one run may use.
struct Run {
    quick: bool,
    envoy: PathBuf,
    wasm: PathBuf,
    target: PathBuf,
    results: PathBuf,
}

/// A benchmark's output: the command that reproduces it and its markdown.
struct Fragment {
    command: String,
    markdown: String,
}

pub fn run(options: &Options) -> Result<()> {
    for name in &options.only {
        if !BENCHES.iter().any(|bench| bench.name == name) {
            let names: Vec<&str> = BENCHES.iter().map(|bench| bench.name).collect();
            bail!("unknown benchmark `{name}`; known: {}", names.join(", "));
        }
    }
    let tools = setup(NEEDS)?;
    let context = Run {
        quick: options.quick,
        envoy: tools.envoy,
        wasm: build_wasm()?,
        target: target_dir()?,
        results: workspace_root().join("bench-results"),
    };
    fs::create_dir_all(&context.results)?;
    let machine = machine();
    let commit = tools::output(Command::new("git").args(["rev-parse", "--short", "HEAD"]))
        .map(|commit| commit.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let mut failed = Vec::new();
    let mut stolen = Vec::new();
    let mut slower = Vec::new();
    let mut reference_work = vec![0_u64; REFERENCE_WORDS];
    for bench in BENCHES
        .iter()
        .filter(|bench| options.only.is_empty() || options.only.iter().any(|n| n == bench.name))
    {
        let load = load_average();
        let cpu_before = cpu_times();
        let reference_before = reference_ms(&mut reference_work);
        let started = Instant::now();
        eprintln!("xtask bench: {}…", bench.name);
        let fragment = match (bench.run)(&context) {
            Ok(fragment) => fragment,
            Err(error) => {
                eprintln!("xtask bench: {} failed: {error:#}", bench.name);
                failed.push(bench.name);
                continue;
            }
        };
        let elapsed = started.elapsed();
        let steal = cpu_before
            .zip(cpu_times())
            .and_then(|(before, after)| before.steal_percent_until(after));
        let reference_after = reference_ms(&mut reference_work);
        let generated = format!(
            "_Generated by `cargo xtask bench{}` ({:.0} s): `{}`; {} UTC, commit {commit}, {machine}, \
             load average before {load}, CPU stolen by the host {}, {REFERENCE} {reference_before:.1} / \
             {reference_after:.1} ms before / after._\n\n{}",
            if options.quick { " --quick" } else { "" },
            elapsed.as_secs_f64(),
            fragment.command,
            utc_now(),
            steal.map_or_else(|| "unknown".to_owned(), |steal| format!("{steal:.1} %")),
            fragment.markdown.trim_end(),
        );
        let benchmarks = workspace_root().join("BENCHMARKS.md");
        let text = fs::read_to_string(&benchmarks)?;
        // Slower than when the table was made, or than itself at the other end of the run
        // (its speed changed under the benchmark: on 2026-12-04 the reference work took 12.8
        // ms before the wasm bench and 58.5 after it, and the table read 4.5-8.2 µs for 4.4-5.2).
        let slowdown = recorded_reference_ms(&text, bench.name)
            .map_or(1.0, |recorded| {
                reference_before.max(reference_after) / recorded
            })
            .max(speed_change(reference_before, reference_after));
        let file = context.results.join(format!("{}.md", bench.name));
        fs::write(&file, format!("{generated}\n"))
            .with_context(|| format!("writing {}", file.display()))?;
        if let Some(steal) =
            steal.filter(|steal| *steal > options.max_steal_percent && !bench.counts)
        {
            eprintln!(
                "xtask bench: {}: the host stole {steal:.1} % of the CPU during the run (more \
                 than --max-steal-percent {}); BENCHMARKS.md keeps its table, this run is in {}",
                bench.name,
                options.max_steal_percent,
                file.display()
            );
            stolen.push(bench.name);
        } else if slowdown > options.max_slowdown && !bench.counts {
            eprintln!(
                "xtask bench: {}: this machine did the {REFERENCE} {slowdown:.2}× slower than when \
                 BENCHMARKS.md's table was made or than at the other end of this run (more \
                 than --max-slowdown {}); BENCHMARKS.md keeps its table, this run is in {}",
                bench.name,
                options.max_slowdown,
                file.display()
            );
            slower.push(bench.name);
        } else if !options.quick {
            fs::write(&benchmarks, splice(&text, bench.name, &generated)?)?;
            eprintln!("xtask bench: {} written to BENCHMARKS.md", bench.name);
        }
    }
    if !failed.is_empty() {
        bail!("these benchmarks failed: {}", failed.join(", "));
    }
    if !stolen.is_empty() && !options.quick {
        bail!(
            "the host stole too much CPU during these benchmarks, whose tables were not \
             rewritten: {}; rerun them on a quieter machine (--only NAME)",
            stolen.join(", ")
        );
    }
    if !slower.is_empty() && !options.quick {
        bail!(
            "this machine ran slower than when BENCHMARKS.md's tables were made during these \
             benchmarks, whose tables were not rewritten: {}; rerun them when it is back to \
             speed (--only NAME), or accept the slower machine with --max-slowdown",
            slower.join(", ")
        );
    }
    Ok(())
}

/// How the header line names the reference work's time.
const REFERENCE: &str = "reference work";

/// The reference work's table: 8 MiB of 64-bit words, more than this machine's caches.
const REFERENCE_WORDS: usize = 1 << 20;

/// How long this machine takes, in milliseconds, for a fixed piece of single-threaded work:
/// half a million dependent reads at pseudo-random places of `table` (one of
/// [`REFERENCE_WORDS`] words, filled here) with integer arithmetic between them, so that a
/// slower clock, a busy sibling hyperthread and a memory bus shared with neighbours all
/// show. The best of five runs: a moment's interruption does not count.
fn reference_ms(table: &mut [u64]) -> f64 {
    const STEPS: usize = 500_000;
    const MIX: u64 = 0x2545_F491_4F6C_DD1D;
    let mask = table.len().next_power_of_two() - 1;
    for (index, word) in (0_u64..).zip(table.iter_mut()) {
        *word = index.wrapping_mul(MIX).rotate_left(29);
    }
    (0..5)
        .map(|_| {
            let started = Instant::now();
            let mut x = MIX;
            for _ in 0..STEPS {
                x ^= table[(x as usize & mask) % table.len()];
                x = x.rotate_left(23).wrapping_mul(MIX);
            }
            std::hint::black_box(x);
            started.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// How many times slower the machine was at the slower end of a run than at the faster one.
fn speed_change(before_ms: f64, after_ms: f64) -> f64 {
    let (slow, fast) = (before_ms.max(after_ms), before_ms.min(after_ms));
    if fast > 0.0 && slow.is_finite() {
        slow / fast
    } else {
        1.0
    }
}

/// The reference work's time recorded in the header line of BENCHMARKS.md's `name` table
/// (the slower of before and after), if that table has one.
fn recorded_reference_ms(text: &str, name: &str) -> Option<f64> {
    let open = format!("<!-- bench:{name} -->");
    let close = format!("<!-- /bench:{name} -->");
    let start = text.find(&open)? + open.len();
    let end = start + text[start..].find(&close)?;
    let header = text[start..end].trim_start().lines().next()?;
    let times = &header[header.find(REFERENCE)? + REFERENCE.len()..];
    let times = &times[..times.find(" ms")?];
    let (before, after) = times.split_once(" / ")?;
    let (before, after) = (
        before.trim().parse::<f64>().ok()?,
        after.trim().parse::<f64>().ok()?,
    );
    Some(before.max(after)).filter(|time| time.is_finite() && *time > 0.0)
}

/// `text` with what stands between the markers of `name` replaced by `generated`.
fn splice(text: &str, name: &str, generated: &str) -> Result<String> {
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let (Some(start), Some(end)) = (text.find(&open), text.find(&close)) else {
        bail!(
            "BENCHMARKS.md has no `{open}` … `{close}` markers: add them where the `{name}` \
             table belongs"
        );
    };
    if end < start {
        bail!("BENCHMARKS.md has `{close}` before `{open}`");
    }
    let inner = start + open.len();
    Ok(format!(
        "{}\n{}\n{}",
        &text[..inner],
        generated.trim_end(),
        &text[end..]
    ))
}

/// The core's pick + complete per algorithm and fleet size (criterion).
fn core(context: &Run) -> Result<Fragment> {
    let since = SystemTime::now();
    let timing = criterion_timing(context.quick);
    let mut command = cargo();
    command
        .args([
            "bench",
            "--package",
            "fulcrum-core",
            "--bench",
            "pick",
            "--",
        ])
        .args(&timing);
    tools::run(&mut command).context("the core's pick bench failed")?;
    let results = criterion_results(&context.target, since)?;
    let mut markdown = String::from("Median time of one `pick` + `complete`, weights 1–3.\n\n");
    markdown += &criterion_table(&results, "pick_complete/", "algorithm");
    markdown += "\nAt 10,000 endpoints with every tenth endpoint's breaker open:\n\n";
    markdown += &criterion_table(&results, "pick_complete_tenth_ejected/", "algorithm");
    Ok(Fragment {
        command: format!(
            "cargo bench -p fulcrum-core --bench pick -- {}",
            timing.join(" ")
        ),
        markdown,
    })
}

/// One request through the real `.wasm` in wasmtime beside the native core (criterion).
fn wasm(context: &Run) -> Result<Fragment> {
    let floor = build_floor_wasm()?;
    let since = SystemTime::now();
    let timing = criterion_timing(context.quick);
    let mut command = cargo();
    command
        .args([
            "bench",
            "--package",
            "fulcrum-wasm-host",
            "--bench",
            "filter",
            "--",
        ])
        .args(&timing)
        .env("FULCRUM_FILTER_WASM", &context.wasm)
        .env("FULCRUM_FLOOR_WASM", &floor);
    tools::run(&mut command).context("the wasmtime filter bench failed")?;
    let results = criterion_results(&context.target, since)?;
    Ok(Fragment {
        command: format!(
            "FULCRUM_FILTER_WASM=…/{FILTER_WASM} FULCRUM_FLOOR_WASM=…/fulcrum_floor_filter.wasm cargo bench -p fulcrum-wasm-host --bench filter -- {}",
            timing.join(" ")
        ),
        markdown: criterion_table(&results, "request_through_filter/", "where"),
    })
}

/// Envoy's round robin and least request, the do-nothing wasm floor, fulcrum's wasm filter and
/// fulcrum's native module, an Envoy each (wrk).
fn datapath(context: &Run) -> Result<Fragment> {
    let arguments: &[&str] = if context.quick { &["--quick"] } else { &[] };
    run_datapath(context, "datapath", arguments)
}

/// The data path's setups again, each Envoy under valgrind's callgrind: instructions per
/// request, which the machine's speed and neighbours do not move.
fn instructions(context: &Run) -> Result<Fragment> {
    let arguments: &[&str] = if context.quick {
        &[
            "--count-instructions",
            "--quick",
            "--workers",
            "1",
            "--connections",
            "64",
        ]
    } else {
        &[
            "--count-instructions",
            "--workers",
            "1",
            "--workers",
            "2",
            "--connections",
            "64",
            "--repeats",
            "3",
            "--duration",
            "5",
            "--warmup",
            "5",
        ]
    };
    run_datapath(context, "instructions", arguments)
}

/// `fulcrum-datapath` with the filters and the native module built, its report written to
/// `bench-results/<name>.raw.md`, and `arguments` after the paths.
fn run_datapath(context: &Run, name: &str, arguments: &[&str]) -> Result<Fragment> {
    let floor = build_floor_wasm()?;
    let native_module = crate::build_native()?;
    let binary = release_binary("fulcrum-datapath")?;
    let out = context.results.join(format!("{name}.raw.md"));
    tools::run(
        Command::new(&binary)
            .arg("--envoy")
            .arg(&context.envoy)
            .arg("--wasm")
            .arg(&context.wasm)
            .arg("--floor-wasm")
            .arg(&floor)
            .arg("--native-module")
            .arg(&native_module)
            .arg("--out")
            .arg(&out)
            .args(arguments),
    )
    .with_context(|| format!("fulcrum-datapath {} failed", arguments.join(" ")))?;
    Ok(Fragment {
        command: format!("fulcrum-datapath {}", arguments.join(" "))
            .trim()
            .to_owned(),
        markdown: fs::read_to_string(&out)?,
    })
}

/// fulcrum against Envoy's native balancers under faults (wrk).
fn compare(context: &Run) -> Result<Fragment> {
    let binary = release_binary("fulcrum-compare")?;
    let control_plane = release_control_plane()?;
    let out = context.results.join("compare.raw.md");
    let quick: &[&str] = if context.quick {
        &[
            "--duration",
            "1",
            "--scenario",
            "slow",
            "--scenario",
            "healthy-c64",
        ]
    } else {
        &[]
    };
    tools::run(
        Command::new(&binary)
            .arg("--envoy")
            .arg(&context.envoy)
            .arg("--wasm")
            .arg(&context.wasm)
            .arg("--control-plane")
            .arg(&control_plane)
            .arg("--out")
            .arg(&out)
            .args(quick),
    )
    .context("fulcrum-compare failed")?;
    Ok(Fragment {
        command: format!("fulcrum-compare {}", quick.join(" "))
            .trim()
            .to_owned(),
        markdown: fs::read_to_string(&out)?,
    })
}

/// The registry's gRPC API at 10,000 endpoints, in memory and on a 3-member etcd.
fn registry(context: &Run) -> Result<Fragment> {
    let quick: &[&str] = if context.quick {
        &["--memory-only"]
    } else {
        &[]
    };
    bench_writing_its_table(context, "fulcrum-registry", "registry", quick, false)
}

/// The control plane's xDS at 10,000 endpoints and 100 ADS clients, SotW and delta.
fn xds(context: &Run) -> Result<Fragment> {
    let quick: &[&str] = if context.quick { &["--quick"] } else { &[] };
    bench_writing_its_table(context, "fulcrum-control-plane", "xds_scale", quick, false)
}

/// What one snapshot change costs a proxy's VMs (the real filter in wasmtime, criterion
/// plus a table of bytes, apply times and VM memory).
fn snapshot(context: &Run) -> Result<Fragment> {
    let timing = criterion_timing(context.quick);
    let timing: Vec<&str> = timing.iter().map(String::as_str).collect();
    bench_writing_its_table(context, "fulcrum-wasm-host", "snapshot", &timing, true)
}

/// `cargo bench -p PACKAGE --bench BENCH -- ARGS` for a bench that writes its own markdown
/// table to `FULCRUM_BENCH_OUT`; with `filter`, the release filter's path goes along in
/// `FULCRUM_FILTER_WASM`.
fn bench_writing_its_table(
    context: &Run,
    package: &str,
    bench: &str,
    args: &[&str],
    filter: bool,
) -> Result<Fragment> {
    let out = context.results.join(format!("{bench}.raw.md"));
    let mut command = cargo();
    command
        .args(["bench", "--package", package, "--bench", bench, "--"])
        .args(args)
        .env("FULCRUM_BENCH_OUT", &out);
    let mut shown = format!(
        "cargo bench -p {package} --bench {bench} -- {}",
        args.join(" ")
    );
    if filter {
        command.env("FULCRUM_FILTER_WASM", &context.wasm);
        shown = format!("FULCRUM_FILTER_WASM=…/{FILTER_WASM} {shown}");
    }
    tools::run(&mut command).with_context(|| format!("the {bench} bench failed"))?;
    Ok(Fragment {
        command: shown.trim().to_owned(),
        markdown: fs::read_to_string(&out)?,
    })
}

/// Criterion's timing flags: short but stable, or its own `--quick` mode.
fn criterion_timing(quick: bool) -> Vec<String> {
    let flags: &[&str] = if quick {
        &["--quick", "--noplot"]
    } else {
        &["--warm-up-time", "1", "--measurement-time", "2", "--noplot"]
    };
    flags.iter().map(|flag| (*flag).to_owned()).collect()
}

/// One criterion benchmark's id and median.
#[derive(Debug, Clone, PartialEq)]
struct Measured {
    /// `group/function/value` as criterion reports it.
    full_id: String,
    median_ns: f64,
}

/// Every criterion result under `<target>/criterion` written since `since`.
fn criterion_results(target: &Path, since: SystemTime) -> Result<Vec<Measured>> {
    let mut found = Vec::new();
    let mut pending = vec![target.join("criterion")];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.file_name().is_none_or(|name| name != "estimates.json")
                || path
                    .parent()
                    .and_then(Path::file_name)
                    .is_none_or(|dir| dir != "new")
                || fs::metadata(&path)?.modified()? < since
            {
                continue;
            }
            let benchmark = path.with_file_name("benchmark.json");
            let read = |path: &Path| -> Result<Value> {
                let text = fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
            };
            let (estimates, benchmark) = (read(&path)?, read(&benchmark)?);
            found.push(Measured {
                full_id: benchmark["full_id"]
                    .as_str()
                    .context("benchmark.json has no full_id")?
                    .to_owned(),
                median_ns: estimates["median"]["point_estimate"]
                    .as_f64()
                    .context("estimates.json has no median")?,
            });
        }
    }
    Ok(found)
}

/// A table of the results whose id starts with `prefix`: one row per the id's next segment,
/// one column per its last (the parameter), in first-seen order sorted numerically.
fn criterion_table(results: &[Measured], prefix: &str, row_label: &str) -> String {
    let mut rows: BTreeMap<String, BTreeMap<u64, f64>> = BTreeMap::new();
    for result in results {
        let Some(rest) = result.full_id.strip_prefix(prefix) else {
            continue;
        };
        let Some((row, column)) = rest.rsplit_once('/') else {
            continue;
        };
        let Ok(column) = column.parse::<u64>() else {
            continue;
        };
        rows.entry(row.to_owned())
            .or_default()
            .insert(column, result.median_ns);
    }
    let mut columns: Vec<u64> = rows.values().flat_map(|row| row.keys().copied()).collect();
    columns.sort_unstable();
    columns.dedup();
    let mut table = format!("| {row_label} |");
    for column in &columns {
        table += &format!(" {} |", thousands(*column));
    }
    table += "\n| --- |";
    table += &" --- |".repeat(columns.len());
    table += "\n";
    for (row, cells) in &rows {
        table += &format!("| {row} |");
        for column in &columns {
            match cells.get(column) {
                Some(nanos) => table += &format!(" {} |", duration(*nanos)),
                None => table += " — |",
            }
        }
        table += "\n";
    }
    table
}

/// `10000` as `10,000`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Nanoseconds as `184 ns`, `2.34 µs` or `1.20 ms`.
fn duration(nanos: f64) -> String {
    if nanos < 1_000.0 {
        format!("{nanos:.0} ns")
    } else if nanos < 1_000_000.0 {
        format!("{:.2} µs", nanos / 1_000.0)
    } else {
        format!("{:.2} ms", nanos / 1_000_000.0)
    }
}

/// Builds the do-nothing filter the data-path bench compares fulcrum with.
fn build_floor_wasm() -> Result<PathBuf> {
    tools::run(cargo().args([
        "build",
        "--release",
        "--package",
        "fulcrum-floor-filter",
        "--target",
        tools::WASM_TARGET,
    ]))
    .context("building the floor filter failed")?;
    Ok(target_dir()?
        .join(tools::WASM_TARGET)
        .join("release")
        .join("fulcrum_floor_filter.wasm"))
}

/// Builds the release binary `name` of examples/demo and returns its path.
fn release_binary(name: &str) -> Result<PathBuf> {
    tools::run(cargo().args([
        "build",
        "--release",
        "--package",
        "fulcrum-demo",
        "--bin",
        name,
    ]))
    .with_context(|| format!("building {name} failed"))?;
    Ok(target_dir()?.join("release").join(name))
}

/// Builds the release control plane, which `fulcrum-compare`'s `warm-up` runs for fulcrum,
/// and returns its path.
pub(crate) fn release_control_plane() -> Result<PathBuf> {
    let name = "fulcrum-control-plane";
    tools::run(cargo().args(["build", "--release", "--package", name, "--bin", name]))
        .with_context(|| format!("building {name} failed"))?;
    Ok(target_dir()?.join("release").join(name))
}

/// Cores and memory of this machine, e.g. `2 cores, 24 GiB`.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |cores| cores.get());
    let memory = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or_else(
            || "unknown memory".to_owned(),
            |kib| format!("{} GiB", (kib + (1 << 19)) >> 20),
        );
    format!("{cores} cores, {memory}")
}

/// `/proc/loadavg`'s three load averages.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The machine's CPU time so far, in `/proc/stat`'s ticks: all of it, and what the host
/// stole (time this virtual machine was ready to run and the hypervisor ran something else).
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuTimes {
    total: u64,
    steal: u64,
}

impl CpuTimes {
    /// Parses `/proc/stat`'s aggregate `cpu` line: user, nice, system, idle, iowait, irq,
    /// softirq, steal (guest time is already counted in user and nice).
    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|line| line.starts_with("cpu "))?;
        let fields = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|field| field.parse::<u64>().ok())
            .collect::<Option<Vec<_>>>()?;
        let &[_user, _nice, _system, _idle, _iowait, _irq, _softirq, steal] = &fields[..] else {
            return None;
        };
        Some(Self {
            total: fields.iter().sum(),
            steal,
        })
    }

    /// The share of the CPU time between `self` and `later` that the host stole, in percent;
    /// `None` when no time passed.
    fn steal_percent_until(self, later: Self) -> Option<f64> {
        let total = later.total.checked_sub(self.total)?;
        let steal = later.steal.checked_sub(self.steal)?;
        (total > 0).then(|| steal as f64 * 100.0 / total as f64)
    }
}

/// This machine's [`CpuTimes`] now, if `/proc/stat` says.
fn cpu_times() -> Option<CpuTimes> {
    CpuTimes::parse(&fs::read_to_string("/proc/stat").ok()?)
}

/// The time now as `2026-12-01 22:30`, from `date` (std has no calendar).
fn utc_now() -> String {
    tools::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M"]))
        .map(|date| date.trim().to_owned())
        .unwrap_or_else(|_| "unknown date".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fragment_replaces_what_stood_between_its_markers_and_nothing_else() {
        let text = "intro\n<!-- bench:core -->\nold table\n<!-- /bench:core -->\nreading\n\
                    <!-- bench:wasm -->\nwasm\n<!-- /bench:wasm -->\n";
        let spliced = splice(text, "core", "new table\n").unwrap();
        assert_eq!(
            spliced,
            "intro\n<!-- bench:core -->\nnew table\n<!-- /bench:core -->\nreading\n\
             <!-- bench:wasm -->\nwasm\n<!-- /bench:wasm -->\n"
        );
        assert_eq!(splice(&spliced, "core", "new table").unwrap(), spliced);
    }

    #[test]
    fn steal_is_the_share_of_all_cpu_time_the_host_took_between_two_readings() {
        let stat = |user: u64, idle: u64, steal: u64| {
            format!(
                "cpu  {user} 0 10 {idle} 0 0 0 {steal} 5 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1 2\n"
            )
        };
        let before = CpuTimes::parse(&stat(100, 1000, 50)).unwrap();
        assert_eq!(
            before,
            CpuTimes {
                total: 1160,
                steal: 50
            }
        );
        let after = CpuTimes::parse(&stat(160, 1000, 90)).unwrap();
        assert_eq!(before.steal_percent_until(after), Some(40.0));
        assert_eq!(before.steal_percent_until(before), None, "no time passed");
        assert_eq!(
            after.steal_percent_until(before),
            None,
            "counters went back"
        );
    }

    #[test]
    fn a_proc_stat_without_an_aggregate_cpu_line_or_with_short_fields_gives_nothing() {
        assert_eq!(CpuTimes::parse("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 3 4\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 3 4 5 6 7 x\n"), None);
    }

    #[test]
    fn a_run_whose_machine_changed_speed_counts_as_slower_by_the_change() {
        assert_eq!(speed_change(12.8, 58.5), 58.5 / 12.8);
        assert_eq!(speed_change(58.5, 12.8), 58.5 / 12.8);
        assert_eq!(speed_change(40.0, 40.0), 1.0);
        assert_eq!(
            speed_change(0.0, 40.0),
            1.0,
            "an unmeasured end cannot tell"
        );
    }

    #[test]
    fn the_reference_time_is_read_from_the_named_tables_header_the_slower_of_its_two() {
        let text = "<!-- bench:core -->\n_Generated by `cargo xtask bench` (3 s): `x`; 2026-12-03 \
                    09:00 UTC, commit abc, 2 cores, load average before 1 1 1, CPU stolen by the \
                    host 0.1 %, reference work 41.5 / 44.0 ms before / after._\n\n| a |\n\
                    <!-- /bench:core -->\n<!-- bench:wasm -->\n_Generated by `cargo xtask bench` \
                    (3 s): `x`; CPU stolen by the host 0.0 %._\n<!-- /bench:wasm -->\n";
        assert_eq!(recorded_reference_ms(text, "core"), Some(44.0));
        assert_eq!(
            recorded_reference_ms(text, "wasm"),
            None,
            "a table made before the reference work was recorded"
        );
        assert_eq!(recorded_reference_ms(text, "xds"), None, "no such table");
        let garbled = text.replace("41.5 / 44.0", "41.5 / fast");
        assert_eq!(recorded_reference_ms(&garbled, "core"), None);
    }

    #[test]
    fn the_reference_work_takes_time_and_fills_its_whole_table() {
        let mut table = vec![0_u64; 1024];
        let time = reference_ms(&mut table);
        assert!(time.is_finite() && time > 0.0, "{time}");
        assert!(
            table.iter().skip(1).all(|word| *word != 0),
            "every word is set"
        );
    }

    #[test]
    fn missing_or_reversed_markers_are_an_error_naming_them() {
        let error = splice("no markers", "core", "x").unwrap_err().to_string();
        assert!(error.contains("<!-- bench:core -->"), "{error}");
        let reversed = "<!-- /bench:core -->\n<!-- bench:core -->";
        assert!(splice(reversed, "core", "x").is_err());
    }

    #[test]
    fn criterion_results_become_rows_by_name_and_columns_by_parameter() {
        let result = |id: &str, median_ns| Measured {
            full_id: id.to_owned(),
            median_ns,
        };
        let results = [
            result("pick_complete/round_robin/10000", 364.0),
            result("pick_complete/round_robin/10", 184.0),
            result("pick_complete/maglev/10", 2_340.0),
            result("pick_complete_tenth_ejected/maglev/10000", 1.0),
        ];
        assert_eq!(
            criterion_table(&results, "pick_complete/", "algorithm"),
            "| algorithm | 10 | 10,000 |\n| --- | --- | --- |\n\
             | maglev | 2.34 µs | — |\n| round_robin | 184 ns | 364 ns |\n"
        );
    }

    #[test]
    fn numbers_read_the_way_the_tables_print_them() {
        assert_eq!(thousands(10), "10");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(duration(999.4), "999 ns");
        assert_eq!(duration(29_200.0), "29.20 µs");
        assert_eq!(duration(1_500_000.0), "1.50 ms");
    }
}
