//! `cargo xtask` — fulcrum's project automation (the xtask pattern: plain Rust, no make).
//!
//! Every command installs what it needs first (see [`tools`]), so the README's two commands
//! work on a fresh machine and cost nothing extra the second time. The commands and their
//! flags are [`Task`] (clap derive); each answers `--help`.

mod bench;
mod image;
mod oci;
mod setup;
mod tools;

use std::{
    env,
    ffi::{OsStr, OsString},
    hash::{BuildHasher, RandomState},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use setup::Purpose;
use tools::WASM_TARGET;

/// The proxy-wasm balancer filter's package and the file it compiles to.
const FILTER_PACKAGE: &str = "fulcrum-balancer";
const FILTER_WASM: &str = "fulcrum_balancer.wasm";

/// fulcrum's project automation: every command first installs what it needs.
#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    arg_required_else_help = true,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// The commands of `cargo xtask`.
#[derive(Debug, Subcommand)]
enum Task {
    /// Install what is missing, build the release filter, run every test
    ///
    /// Also builds the test-only fault-injection filter, the native module
    /// (libfulcrum_native.so) and the control plane's static binary, then runs `cargo test
    /// --workspace` with FULCRUM_ENVOY, FULCRUM_FILTER_WASM, FULCRUM_FAULT_WASM,
    /// FULCRUM_NATIVE_MODULE and FULCRUM_CONTROL_PLANE_BIN set.
    Test {
        /// Arguments for `cargo test --workspace`, passed on as given
        /// (e.g. `-p fulcrum-core -- --nocapture`)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// Run the local demo (real Envoy + control plane + sample backends, faults midway)
    Demo {
        /// Arguments for fulcrum-demo, passed on as given
        /// (--duration SECS, --concurrency N, --workers N, --plain)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        demo_args: Vec<String>,
    },
    /// Compare fulcrum with Envoy's native balancers under faults (wrk, gRPC clients)
    ///
    /// The table goes to stdout and bench-results/compare.md.
    BenchCompare {
        /// Arguments for fulcrum-compare, passed on as given
        /// (--duration SECS, --scenario NAME (repeatable), --workers N[,N…])
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        compare_args: Vec<String>,
    },
    /// Run every benchmark and rewrite BENCHMARKS.md's generated tables
    ///
    /// The core's and the wasmtime filter's criterion benches, the data path (Envoy's round
    /// robin and least request vs a do-nothing wasm filter vs fulcrum's wasm filter and native
    /// module, an Envoy each), the comparison with
    /// Envoy's balancers under faults, the registry's API and xDS at 10,000 endpoints, one
    /// after another (about 25 minutes). Each table goes between its `<!-- bench:NAME -->` markers in BENCHMARKS.md
    /// and to bench-results/NAME.md, stamped with date, commit, machine and load.
    Bench(bench::Options),
    /// Build the release filter (.wasm) and print its path and size
    BuildWasm,
    /// Drive both data planes with hostile input for M minutes
    ///
    /// The long run of the untrusted-input property tests: the release filter under hostile
    /// requests and snapshots (tests/wasm-host), and the native module's adapter under hostile
    /// requests, responses, host sets and callback orders (filters/native). Runs of N cases
    /// of each, every run with a fresh random seed, until M minutes have passed. A failing
    /// run stops with the seed that reproduces it (PROPTEST_RNG_SEED).
    Fuzz {
        /// Start runs until this many minutes have passed
        #[arg(long, value_name = "M", default_value_t = 60)]
        minutes: u64,
        /// Cases per run
        #[arg(long, value_name = "N", default_value_t = 100_000)]
        cases: u64,
    },
    /// Pack the release filter as a Wasm OCI image for Istio
    ///
    /// Writes an OCI layout and the WasmPlugin and TrafficExtension manifests rendered with
    /// the image's digest; pushing is left to skopeo, oras or crane.
    Oci(oci::Options),
    /// Build the control plane's container image (OCI layout)
    ///
    /// A static musl binary in an OCI layout, no Docker needed; pushing is left to skopeo,
    /// oras or crane.
    Image(image::Options),
    /// Check what the tests need and install what is missing
    ///
    /// Checks protoc with its imports, musl-gcc, etcd, python3-venv, Envoy 1.40 and the Rust
    /// targets by using each, and installs what fails; one line per capability.
    Setup,
}

/// Reads the command line (`argv` starts with the program): the command's name, for error
/// messages, and the command.
fn parse(argv: Vec<OsString>) -> Result<(String, Task), clap::Error> {
    let matches = Cli::command().try_get_matches_from(&argv)?;
    let Cli { mut task } = Cli::from_arg_matches(&matches)?;
    let name = matches.subcommand_name().unwrap_or_default().to_owned();
    // clap takes a `--` right after the command (`argv[1]`: xtask has no options of its own)
    // as the end of xtask's arguments and drops it; for `test` it is cargo test's `--`
    // (what follows goes to the test binaries), so it goes back.
    if let Task::Test { cargo_test_args } = &mut task
        && argv.get(2).is_some_and(|arg| arg == "--")
    {
        cargo_test_args.insert(0, "--".to_owned());
    }
    Ok((name, task))
}

fn main() -> ExitCode {
    let (name, task) = parse(env::args_os().collect()).unwrap_or_else(|error| error.exit());
    let result = match task {
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Demo { demo_args } => demo(&demo_args),
        Task::BenchCompare { compare_args } => bench_compare(&compare_args),
        Task::Bench(options) => bench::run(&options),
        Task::BuildWasm => build_wasm().map(|wasm| report_wasm(&wasm)),
        Task::Fuzz { minutes, cases } => fuzz(minutes, cases),
        Task::Oci(options) => oci::run(&options),
        Task::Image(options) => image::run(&options),
        Task::Setup => setup(setup::FOR_TEST).map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask {name}: error: {error:#}");
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
/// variant, the native module and the control plane's static image binary, runs `cargo test
/// --workspace` with `FULCRUM_ENVOY`, `FULCRUM_FILTER_WASM`, `FULCRUM_FAULT_WASM`,
/// `FULCRUM_NATIVE_MODULE` and `FULCRUM_CONTROL_PLANE_BIN` set for the tests that load them.
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
    if native_exists() {
        command.env("FULCRUM_NATIVE_MODULE", build_native()?);
    }
    command.env("FULCRUM_CONTROL_PLANE_BIN", image::build_binary()?);
    tools::run(&mut command).context("tests failed")?;
    eprintln!("xtask test: passed in {:.0?}", started.elapsed());
    Ok(())
}

/// A property test that drives a data plane with hostile input: its package and its name in
/// the package's `all` test binary.
struct FuzzTest {
    package: &'static str,
    name: &'static str,
}

/// The real filter under hostile requests and snapshots (tests/wasm-host, given the release
/// `.wasm`), and the native module's safe adapter under hostile requests, responses, host
/// sets and callback orders (filters/native).
const FUZZ_TESTS: [FuzzTest; 2] = [
    FuzzTest {
        package: "fulcrum-wasm-host",
        name: "untrusted_input_property::hostile_requests_and_snapshots_never_trap_leak_the_override_header_or_grow_memory",
    },
    FuzzTest {
        package: "fulcrum-native",
        name: "untrusted_input_property::hostile_requests_responses_and_host_sets_never_panic_misroute_or_leak_picks",
    },
];

/// `cargo xtask fuzz [--minutes M] [--cases N]`: the long run of the untrusted-input property
/// tests (CI runs 10,000 cases of the filter's and 1,000 of the native module's with fixed
/// seeds): runs of N cases (default 100,000) of each, every run with a fresh random seed,
/// until M minutes (default 60) have passed. Prints each run's seed; a failing run stops with
/// the test and the seed that reproduce it (`PROPTEST_RNG_SEED`).
fn fuzz(minutes: u64, cases: u64) -> Result<()> {
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
        for test in &FUZZ_TESTS {
            let mut command = cargo();
            command
                .args(["test", "--package", test.package, "--test", "all"])
                .args(["--", "--exact", test.name])
                .env("FULCRUM_FILTER_WASM", &wasm)
                .env("PROPTEST_CASES", cases.to_string())
                .env("PROPTEST_RNG_SEED", seed.to_string());
            tools::run(&mut command).with_context(|| {
                format!(
                    "fuzz run of {} failed; reproduce with PROPTEST_RNG_SEED={seed} \
                     PROPTEST_CASES={cases} cargo test -p {} --test all -- --exact {}",
                    test.package, test.package, test.name
                )
            })?;
        }
        runs += 1;
        total += cases;
    }
    eprintln!(
        "xtask fuzz: {total} cases of each property in {runs} runs passed in {:.0?}",
        started.elapsed()
    );
    Ok(())
}

/// `cargo xtask demo [--duration SECS …]`: builds the filter (release) and the demo's
/// programs, then runs `fulcrum-demo` (examples/demo), which starts the control plane, sample
/// backends and Envoy, tells the fault story and stops everything it started. With
/// `--data-plane native` it builds the native module too and passes it on.
fn demo(demo_args: &[String]) -> Result<()> {
    let tools = setup(setup::FOR_DEMO)?;
    let wasm = build_wasm()?;
    let native_module = if wants_native_data_plane(demo_args) {
        Some(build_native()?)
    } else {
        None
    };
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
            .args(
                native_module
                    .iter()
                    .flat_map(|module| [OsStr::new("--native-module"), module.as_os_str()]),
            )
            .args(demo_args),
    )
    .context("the demo failed")
}

/// Whether the demo's arguments choose the native data plane (`--data-plane native` or
/// `--data-plane=native`; the last one given wins, as clap takes it).
fn wants_native_data_plane(demo_args: &[String]) -> bool {
    let mut chosen = None;
    let mut args = demo_args.iter();
    while let Some(arg) = args.next() {
        if arg == "--data-plane" {
            chosen = args.next().map(String::as_str);
        } else if let Some(value) = arg.strip_prefix("--data-plane=") {
            chosen = Some(value);
        }
    }
    chosen == Some("native")
}

/// `cargo xtask bench-compare [--duration SECS] [--scenario NAME …] [--workers 1,2]`: builds the
/// release filter, control plane and `fulcrum-compare` (examples/demo), which runs fulcrum and
/// Envoy's native balancers on the same Envoy, backends and route under bounded load; the table
/// goes to stdout and `bench-results/compare.md`.
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
    let control_plane = bench::release_control_plane()?;
    tools::run(
        Command::new(target_dir()?.join("release").join("fulcrum-compare"))
            .arg("--envoy")
            .arg(&tools.envoy)
            .arg("--wasm")
            .arg(&wasm)
            .arg("--control-plane")
            .arg(&control_plane)
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

/// The native module's package and the shared object Envoy loads by module name.
const NATIVE_PACKAGE: &str = "fulcrum-native";
const NATIVE_MODULE: &str = "libfulcrum_native.so";

/// Builds the native module (release, host target) and returns the `.so` path; its
/// directory is what `ENVOY_DYNAMIC_MODULES_SEARCH_PATH` names.
pub(crate) fn build_native() -> Result<PathBuf> {
    tools::run(cargo().args(["build", "--release", "--package", NATIVE_PACKAGE]))
        .context("building the native module failed")?;
    let module = target_dir()?.join("release").join(NATIVE_MODULE);
    if !module.is_file() {
        bail!("the build succeeded but {} is missing", module.display());
    }
    let size = std::fs::metadata(&module).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "xtask: native module {} ({} KiB)",
        module.display(),
        size / 1024
    );
    Ok(module)
}

fn native_exists() -> bool {
    workspace_root().join("filters/native/Cargo.toml").is_file()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> (String, Task) {
        let argv = std::iter::once("xtask").chain(args.iter().copied());
        parse(argv.map(OsString::from).collect()).expect("parses")
    }

    fn refused(args: &[&str]) -> clap::error::ErrorKind {
        let argv = std::iter::once("xtask").chain(args.iter().copied());
        parse(argv.map(OsString::from).collect())
            .expect_err("refused")
            .kind()
    }

    #[test]
    fn the_command_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_every_argument_on_as_given() {
        for args in [
            &["-p", "fulcrum-core", "--", "--nocapture"][..],
            &["--", "--nocapture"],
            &["--", "--help"],
            &["--release"],
            &[],
        ] {
            let (name, task) = parsed(&[&["test"][..], args].concat());
            assert_eq!(name, "test");
            let Task::Test { cargo_test_args } = task else {
                panic!("not test: {task:?}");
            };
            assert_eq!(cargo_test_args, args);
        }
    }

    #[test]
    fn the_demo_builds_the_native_module_only_when_its_data_plane_is_chosen() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(wants_native_data_plane(&args(&["--data-plane", "native"])));
        assert!(wants_native_data_plane(&args(&[
            "--duration",
            "30",
            "--data-plane=native"
        ])));
        assert!(!wants_native_data_plane(&args(&["--data-plane", "wasm"])));
        assert!(!wants_native_data_plane(&args(&[
            "--data-plane",
            "native",
            "--data-plane",
            "wasm"
        ])));
        assert!(!wants_native_data_plane(&args(&["--duration", "30"])));
    }

    #[test]
    fn demo_and_bench_compare_pass_their_arguments_on() {
        let args = ["--duration", "30", "--plain"];
        let (name, task) = parsed(&[&["demo"][..], &args].concat());
        assert_eq!(name, "demo");
        assert!(matches!(task, Task::Demo { demo_args } if demo_args == args));
        let args = ["--scenario", "slow", "--scenario", "errors"];
        let (name, task) = parsed(&[&["bench-compare"][..], &args].concat());
        assert_eq!(name, "bench-compare");
        assert!(matches!(task, Task::BenchCompare { compare_args } if compare_args == args));
    }

    #[test]
    fn fuzz_defaults_to_an_hour_of_100_000_case_runs_and_the_last_flag_wins() {
        assert!(matches!(
            parsed(&["fuzz"]).1,
            Task::Fuzz {
                minutes: 60,
                cases: 100_000
            }
        ));
        assert!(matches!(
            parsed(&["fuzz", "--cases", "9", "--minutes=0", "--cases", "5"]).1,
            Task::Fuzz {
                minutes: 0,
                cases: 5
            }
        ));
        assert_eq!(
            refused(&["fuzz", "--minutes", "soon"]),
            clap::error::ErrorKind::ValueValidation
        );
    }

    #[test]
    fn oci_and_image_take_their_flags_with_the_version_and_workspace_as_defaults() {
        let (name, task) = parsed(&["oci"]);
        assert_eq!(name, "oci");
        let rendered = format!("{task:?}");
        assert!(rendered.contains(env!("CARGO_PKG_VERSION")), "{rendered}");
        assert!(
            rendered.contains("target-oci/fulcrum-balancer"),
            "{rendered}"
        );
        let (_, task) = parsed(&[
            "image",
            "--tag",
            "0.0.1",
            "--source",
            "https://example.com/x",
            "--tag",
            "1.2.3",
        ]);
        let rendered = format!("{task:?}");
        assert!(
            rendered.contains("\"1.2.3\""),
            "the last --tag wins: {rendered}"
        );
        assert!(rendered.contains("https://example.com/x"), "{rendered}");
        assert!(
            rendered.contains("target-oci/fulcrum-control-plane"),
            "{rendered}"
        );
    }

    #[test]
    fn unknown_commands_and_flags_and_missing_values_are_usage_errors() {
        use clap::error::ErrorKind;
        assert_eq!(refused(&["bogus"]), ErrorKind::InvalidSubcommand);
        assert_eq!(
            refused(&["oci", "--bogus", "x"]),
            ErrorKind::UnknownArgument
        );
        assert_eq!(refused(&["oci", "--tag"]), ErrorKind::InvalidValue);
        assert_eq!(
            refused(&["build-wasm", "extra"]),
            ErrorKind::UnknownArgument
        );
        assert_eq!(
            refused(&[]),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
    }

    #[test]
    fn every_command_answers_help() {
        for command in Cli::command().get_subcommands() {
            let name = command.get_name();
            assert_eq!(
                refused(&[name, "--help"]),
                clap::error::ErrorKind::DisplayHelp
            );
        }
    }
}
