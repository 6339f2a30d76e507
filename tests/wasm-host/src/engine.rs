//! One wasmtime `Engine` per process and one compiled `Module` per `.wasm` path.
//!
//! Cranelift compiling a ~500 KiB filter takes seconds in a debug build; every test and
//! every worker reuses the same compiled module.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
};

use anyhow::Context as _;
use wasmtime::{Config, Engine, Module, ProfilingStrategy};

/// The process-wide engine: fuel metering on, so a looping guest fails instead of hanging.
/// With `FULCRUM_WASM_PERFMAP=1` wasmtime also writes `/tmp/perf-<pid>.map`, so that
/// `perf report` names the guest's functions (how BENCHMARKS.md profiles the filter).
pub(crate) fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.consume_fuel(true);
        if std::env::var_os("FULCRUM_WASM_PERFMAP").is_some_and(|value| value == "1") {
            config.profiler(ProfilingStrategy::PerfMap);
        }
        Engine::new(&config).unwrap_or_else(|error| panic!("wasmtime engine: {error}"))
    })
}

/// The module at `path`, compiled once per process. Tests running in parallel wait for the
/// first compilation instead of each compiling the same module.
pub(crate) fn module_from_file(path: &Path) -> anyhow::Result<Module> {
    type Slot = Arc<Mutex<Option<Module>>>;
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Slot>>> = OnceLock::new();
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let slot = lock(MODULES.get_or_init(Default::default))
        .entry(key)
        .or_default()
        .clone();
    let mut slot = lock(&slot);
    if let Some(module) = slot.as_ref() {
        return Ok(module.clone());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let module = Module::new(engine(), bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("compiling {}", path.display()))?;
    *slot = Some(module.clone());
    Ok(module)
}

/// A module from bytes: a `.wasm` binary or WAT text (used by the host's own ABI tests).
pub(crate) fn module_from_bytes(bytes: &[u8]) -> anyhow::Result<Module> {
    Module::new(engine(), bytes)
        .map_err(anyhow::Error::from)
        .context("compiling the guest module")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map only ever gains complete entries; a panic elsewhere leaves it consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
