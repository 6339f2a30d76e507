//! `cargo xtask` — fulcrum's project automation (the xtask pattern: plain Rust, no make).
//!
//! Every command installs what it needs first (see [`tools`]), so the README's two commands
//! work on a fresh machine and cost nothing extra the second time.

mod image;
mod oci;
mod setup;
mod tools;

use std::{
    env,
    hash::{BuildHasher, RandomState},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use setup::Purpose;
use tools::WASM_TARGET;

/// The proxy-wasm balancer filter's package and the file it compiles to.
const FILTER_PACKAGE: &str = "fulcrum-balancer";
const FILTER_WASM: &str = "fulcrum_balancer.wasm";

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  test [cargo test args]   install what is missing, build the release filter, run every test
  demo                     run the local demo (real Envoy + control plane + sample backends)
  bench-compare [--duration SECS] [--scenario NAME]  fulcrum vs Envoy's native balancers under wrk
  build-wasm               build the release filter (.wasm) and print its path and size
  fuzz [--minutes M] [--cases N]  drive the release filter with hostile requests and snapshots
                           (the untrusted-input property test), N cases per fresh seed, for M minutes
  oci [--out DIR] [--tag T] [--repository R]  pack the release filter as a Wasm OCI image for Istio
  image [--out DIR] [--tag T] [--repository R] [--source URL]  build the control plane's container image (OCI layout)
  setup                    check what the tests need (protoc with its imports, musl-gcc, etcd, Envoy 1.40,
                           Rust targets) and install what is missing; one line per capability
";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match command.as_str() {
        "test" => test(rest),
        "demo" => demo(rest),
        "bench-compare" => bench_compare(rest),
        "build-wasm" => build_wasm().map(|wasm| report_wasm(&wasm)),
        "fuzz" => fuzz(rest),
        "oci" => oci::run(rest),
        "image" => image::run(rest),
        "setup" => setup(setup::FOR_TEST).map(|_| ()),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => {
            eprint!("xtask: unknown command `{other}`\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask {command}: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Paths of the installed external tools, passed to tests through the environment.
#[derive(Debug)]
struct Tools {
    envoy: PathBuf,
}

/// Makes sure every capability of `purposes` works (see [`mod@setup`]) and returns Envoy's path.
fn setup(purposes: &[Purpose]) -> Result<Tools> {
    let root = workspace_root();
    setup::ensure(&root, purposes)?;
    let envoy = tools::installed_envoy(&root)?;
    Ok(Tools { envoy })
}

/// `cargo xtask test`: installs, builds the release filter, its test-only fault-injection
/// variant and the control plane's static image binary, runs `cargo test --workspace` with
/// `FULCRUM_ENVOY`, `FULCRUM_FILTER_WASM`, `FULCRUM_FAULT_WASM` and
/// `FULCRUM_CONTROL_PLANE_BIN` set for the tests that load them.
fn test(cargo_test_args: &[String]) -> Result<()> {
    let started = Instant::now();
    let tools = setup(setup::FOR_TEST)?;
    let mut command = cargo();
    command
        .args(["test", "--workspace"])
        .args(cargo_test_args)
        .env("FULCRUM_ENVOY", &tools.envoy);
    if filter_exists() {
        let wasm = build_wasm()?;
        report_wasm(&wasm);
        command.env("FULCRUM_FILTER_WASM", &wasm);
        command.env("FULCRUM_FAULT_WASM", build_fault_wasm()?);
    }
    command.env("FULCRUM_CONTROL_PLANE_BIN", image::build_binary()?);
    tools::run(&mut command).context("tests failed")?;
    eprintln!("xtask test: passed in {:.0?}", started.elapsed());
    Ok(())
}

/// The property test that drives the real filter with hostile input (tests/wasm-host).
const FUZZ_TEST: &str = "untrusted_input_property::hostile_requests_and_snapshots_never_trap_leak_the_override_header_or_grow_memory";

/// `cargo xtask fuzz [--minutes M] [--cases N]`: the long run of the untrusted-input property
/// test (CI runs 10,000 cases with a fixed seed): runs of N cases (default 100,000), each with
/// a fresh random seed, until M minutes (default 60) have passed. Prints each run's seed; a
/// failing run stops with the seed that reproduces it (`PROPTEST_RNG_SEED`).
fn fuzz(args: &[String]) -> Result<()> {
    let usage = "cargo xtask fuzz [--minutes M] [--cases N]";
    let (mut minutes, mut cases) = (String::from("60"), String::from("100000"));
    tools::parse_flags(
        args,
        &["--minutes", "--cases"],
        usage,
        |flag, value| match flag {
            "--minutes" => minutes = value,
            _ => cases = value,
        },
    )?;
    let minutes: u64 = minutes.parse().context("--minutes takes a whole number")?;
    let cases: u64 = cases.parse().context("--cases takes a whole number")?;
    let wasm = build_wasm()?;
    let deadline = Instant::now() + std::time::Duration::from_secs(60 * minutes);
    let (mut runs, mut total) = (0_u64, 0_u64);
    let started = Instant::now();
    while Instant::now() < deadline {
        // std's hasher keys are random per process; hashing the time varies them per run.
        let seed = RandomState::new().hash_one(std::time::SystemTime::now());
        eprintln!(
            "xtask fuzz: run {} with PROPTEST_RNG_SEED={seed}, {cases} cases",
            runs + 1
        );
        let mut command = cargo();
        command
            .args([
                "test",
                "--package",
                "fulcrum-wasm-host",
                "--test",
                "all",
                "--",
                "--exact",
            ])
            .arg(FUZZ_TEST)
            .env("FULCRUM_FILTER_WASM", &wasm)
            .env("PROPTEST_CASES", cases.to_string())
            .env("PROPTEST_RNG_SEED", seed.to_string());
        tools::run(&mut command).with_context(|| {
            format!(
                "fuzz run failed; reproduce with PROPTEST_RNG_SEED={seed} PROPTEST_CASES={cases}"
            )
        })?;
        runs += 1;
        total += cases;
    }
    eprintln!(
        "xtask fuzz: {total} cases in {runs} runs passed in {:.0?}",
        started.elapsed()
    );
    Ok(())
}

/// `cargo xtask demo [--duration SECS …]`: builds the filter (release) and the demo's
/// programs, then runs `fulcrum-demo` (examples/demo), which starts the control plane, sample
/// backends and Envoy, tells the fault story and stops everything it started.
fn demo(demo_args: &[String]) -> Result<()> {
    let tools = setup(setup::FOR_DEMO)?;
    let wasm = build_wasm()?;
    tools::run(cargo().args([
        "build",
        "--package",
        "fulcrum-control-plane",
        "--package",
        "fulcrum-example-backend",
        "--package",
        "fulcrum-demo",
    ]))
    .context("building the demo's programs failed")?;
    let bin_dir = target_dir()?.join("debug");
    tools::run(
        Command::new(bin_dir.join("fulcrum-demo"))
            .arg("--envoy")
            .arg(&tools.envoy)
            .arg("--wasm")
            .arg(&wasm)
            .arg("--bin-dir")
            .arg(&bin_dir)
            .args(demo_args),
    )
    .context("the demo failed")
}

/// `cargo xtask bench-compare [--duration SECS] [--scenario NAME …]`: builds the release filter
/// and the release `fulcrum-compare` (examples/demo), which runs fulcrum and Envoy's native
/// balancers on the same Envoy, backends and route under wrk; the table goes to stdout and
/// `bench-results/compare.md`.
fn bench_compare(compare_args: &[String]) -> Result<()> {
    let tools = setup(setup::FOR_BENCH)?;
    let wasm = build_wasm()?;
    tools::run(cargo().args([
        "build",
        "--release",
        "--package",
        "fulcrum-demo",
        "--bin",
        "fulcrum-compare",
    ]))
    .context("building fulcrum-compare failed")?;
    tools::run(
        Command::new(target_dir()?.join("release").join("fulcrum-compare"))
            .arg("--envoy")
            .arg(&tools.envoy)
            .arg("--wasm")
            .arg(&wasm)
            .arg("--out")
            .arg(workspace_root().join("bench-results").join("compare.md"))
            .args(compare_args),
    )
    .context("the comparison failed")
}

/// Builds the filter for `wasm32-wasip1` in release mode and returns the `.wasm` path.
fn build_wasm() -> Result<PathBuf> {
    tools::ensure_target(WASM_TARGET)?;
    if !filter_exists() {
        bail!("the filter crate ({FILTER_PACKAGE}) is not in this checkout yet");
    }
    tools::run(cargo().args([
        "build",
        "--release",
        "--package",
        FILTER_PACKAGE,
        "--target",
        WASM_TARGET,
    ]))
    .context("building the wasm filter failed")?;
    let wasm = target_dir()?
        .join(WASM_TARGET)
        .join("release")
        .join(FILTER_WASM);
    if !wasm.is_file() {
        bail!("the build succeeded but {} is missing", wasm.display());
    }
    Ok(wasm)
}

/// Builds the test-only variant of the filter with the `fault-injection` feature (a request
/// can make it panic, for the failure-policy tests) in a target directory of its own, so the
/// release filter is never it and neither build invalidates the other.
fn build_fault_wasm() -> Result<PathBuf> {
    let target = target_dir()?.join("fault-injection");
    tools::run(
        cargo()
            .args(["build", "--release", "--package", FILTER_PACKAGE])
            .args(["--target", WASM_TARGET, "--features", "fault-injection"])
            .arg("--target-dir")
            .arg(&target),
    )
    .context("building the fault-injection filter failed")?;
    let wasm = target.join(WASM_TARGET).join("release").join(FILTER_WASM);
    if !wasm.is_file() {
        bail!("the build succeeded but {} is missing", wasm.display());
    }
    Ok(wasm)
}

fn report_wasm(wasm: &Path) {
    let size = std::fs::metadata(wasm).map(|m| m.len()).unwrap_or(0);
    eprintln!("xtask: filter {} ({} KiB)", wasm.display(), size / 1024);
}

fn filter_exists() -> bool {
    workspace_root()
        .join("filters/balancer/Cargo.toml")
        .is_file()
}

/// The cargo that runs this xtask (so toolchain overrides carry through).
fn cargo() -> Command {
    let mut command = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The target directory cargo uses (honours `CARGO_TARGET_DIR` and config).
fn target_dir() -> Result<PathBuf> {
    let metadata = tools::output(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let metadata: serde_json::Value = serde_json::from_str(&metadata)?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}
