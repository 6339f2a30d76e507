//! The scenario API: load a plugin, start it on several workers, send requests, move the
//! clock, answer http calls and read metrics, logs and shared data.
//!
//! Like Envoy, each worker is its own VM (here a wasmtime `Store` and instance) with its own
//! root context, and all workers of a plugin share one shared-data store, one queue
//! registry and one set of metrics. Nothing runs in the background: the test drives every
//! turn (`deliver_pending`, `tick_all`), so scenarios are deterministic.

use std::{
    cell::{RefCell, RefMut},
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use wasmtime::Module;

use crate::{
    abi::{LogLevel, MetricType},
    engine,
    http_call::{HttpCall, Outcome},
    property::{Property, path_key},
    request::RequestBuilder,
    shared::{DEFAULT_CLOCK_START_NANOS, LogEntry, Shared, SharedDataCalls},
    vm::{Vm, VmConfig},
};

/// Fuel per callback by default: ample for configuring thousands of endpoints, small enough
/// that an endless loop fails within seconds.
pub const DEFAULT_FUEL_PER_CALLBACK: u64 = 2_000_000_000;

/// How to build a [`Plugin`]; from [`Plugin::load`], [`Plugin::load_filter`] or
/// [`Plugin::from_wat`].
#[derive(Debug, Clone)]
pub struct PluginBuilder {
    module: Module,
    workers: usize,
    plugin_name: String,
    root_id: String,
    vm_id: String,
    plugin_configuration: Vec<u8>,
    vm_configuration: Vec<u8>,
    clusters: HashSet<String>,
    log_level: LogLevel,
    fuel_per_callback: u64,
    random_seed: u64,
    /// Where the clock starts, in nanoseconds since the Unix epoch.
    clock_start: u64,
    /// Plugin-wide properties the test set, by dotted path.
    properties: Vec<(String, Property)>,
}

/// A started plugin: its workers and the state they share.
#[derive(Debug)]
pub struct Plugin {
    shared: Shared,
    workers: Vec<RefCell<Vm>>,
}

/// One worker of a [`Plugin`], the unit requests are sent to.
#[derive(Debug, Clone, Copy)]
pub struct Worker<'p> {
    plugin: &'p Plugin,
    index: usize,
}

/// Where `cargo xtask test` puts the release filter: `$FULCRUM_FILTER_WASM`, else
/// `<target dir>/wasm32-wasip1/release/fulcrum_balancer.wasm` (the target dir being
/// `$CARGO_TARGET_DIR` or the workspace's `target/`).
pub fn filter_wasm_path() -> PathBuf {
    if let Some(path) = std::env::var_os("FULCRUM_FILTER_WASM") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target
        .join("wasm32-wasip1")
        .join("release")
        .join("fulcrum_balancer.wasm")
}

impl Plugin {
    /// Loads (compiling once per process) the `.wasm` at `path`.
    pub fn load(path: impl AsRef<Path>) -> anyhow::Result<PluginBuilder> {
        let path = path.as_ref();
        if !path.is_file() {
            bail!(
                "the filter module {} does not exist: run `cargo xtask test` (it builds the \
                 release filter and sets FULCRUM_FILTER_WASM), or build it with `cargo build \
                 --release -p fulcrum-balancer --target wasm32-wasip1`",
                path.display()
            );
        }
        Ok(PluginBuilder::new(engine::module_from_file(path)?))
    }

    /// Loads the fulcrum balancer filter from [`filter_wasm_path`].
    pub fn load_filter() -> anyhow::Result<PluginBuilder> {
        Self::load(filter_wasm_path())
    }

    /// A plugin from WAT text or wasm bytes (the host's own ABI tests).
    pub fn from_wat(text: impl AsRef<[u8]>) -> anyhow::Result<PluginBuilder> {
        Ok(PluginBuilder::new(engine::module_from_bytes(
            text.as_ref(),
        )?))
    }

    /// The worker `index`. Panics when there is no such worker (a test bug).
    pub fn worker(&self, index: usize) -> Worker<'_> {
        assert!(
            index < self.workers.len(),
            "worker {index} does not exist: the plugin has {} workers",
            self.workers.len()
        );
        Worker {
            plugin: self,
            index,
        }
    }

    /// How many workers run the plugin.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    pub(crate) fn vm(&self, index: usize) -> RefMut<'_, Vm> {
        self.workers[index].borrow_mut()
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Moves the clock every worker reads (`proxy_get_current_time_nanoseconds`, WASI clocks).
    pub fn advance_clock(&self, by: Duration) {
        self.shared.clock.advance(by);
    }

    /// The current time of the plugin's clock.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.shared.clock.now_nanos())
    }

    /// One turn of every worker's event loop: delivers what is pending (see
    /// [`Plugin::deliver_pending`]), then runs `proxy_on_tick` in every root context that set
    /// a tick period. Returns how many ticks ran.
    pub fn tick_all(&self) -> anyhow::Result<usize> {
        self.deliver_pending()?;
        let mut ticks = 0;
        for index in 0..self.workers.len() {
            if self.vm(index).tick()? {
                ticks += 1;
            }
        }
        Ok(ticks)
    }

    /// Delivers, on every worker, http call responses available now (answered by the test or
    /// past their timeout), queue-ready notifications and deferred context finalization.
    /// Events caused by the delivery itself wait for the next turn. Returns how many ran.
    pub fn deliver_pending(&self) -> anyhow::Result<usize> {
        let mut delivered = 0;
        for index in 0..self.workers.len() {
            delivered += self.vm(index).deliver_pending()?;
        }
        let ready = std::mem::take(&mut self.shared.lock().queue_ready);
        for event in ready {
            self.vm(event.worker)
                .queue_ready(event.context, event.queue_id)?;
            delivered += 1;
        }
        Ok(delivered)
    }

    /// The value of counter or gauge `name`, whichever worker defined it.
    pub fn metric(&self, name: &str) -> anyhow::Result<u64> {
        let shared = self.shared.lock();
        let metric = shared
            .metrics
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| {
                let defined: Vec<&str> = shared.metrics.iter().map(|m| m.name.as_str()).collect();
                anyhow!("no metric named `{name}`; the guest defined: {defined:?}")
            })?;
        if metric.kind == MetricType::Histogram {
            bail!("`{name}` is a histogram: read it with Plugin::histogram");
        }
        Ok(metric.value as u64)
    }

    /// Every value recorded into histogram `name`.
    pub fn histogram(&self, name: &str) -> anyhow::Result<Vec<u64>> {
        let shared = self.shared.lock();
        let metric = shared
            .metrics
            .iter()
            .find(|m| m.name == name && m.kind == MetricType::Histogram)
            .ok_or_else(|| anyhow!("no histogram named `{name}`"))?;
        Ok(metric.samples.clone())
    }

    /// The names of every metric defined so far.
    pub fn metric_names(&self) -> Vec<String> {
        self.shared
            .lock()
            .metrics
            .iter()
            .map(|m| m.name.clone())
            .collect()
    }

    /// Every captured guest log line (all workers, in order).
    pub fn logs(&self) -> Vec<LogEntry> {
        self.shared.lock().logs.clone()
    }

    /// Whether any guest log line at `level` or above contains `needle`.
    pub fn logged(&self, level: LogLevel, needle: &str) -> bool {
        self.shared
            .lock()
            .logs
            .iter()
            .any(|entry| entry.level >= level && entry.message.contains(needle))
    }

    /// The logs as text, one `[worker level] message` per line (for assertion messages).
    pub fn logs_text(&self) -> String {
        format_logs(&self.logs())
    }

    /// A shared-data value and its CAS version.
    pub fn shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared.lock().data.get(key).cloned()
    }

    /// How many shared-data reads and writes every worker made so far (the test's own
    /// [`set_shared_data`](Self::set_shared_data) not included).
    pub fn shared_data_calls(&self) -> SharedDataCalls {
        self.shared.lock().shared_data_calls
    }

    /// The shared-data keys that start with `prefix`, sorted.
    pub fn shared_data_keys(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = (self.shared.lock().data.keys())
            .filter(|key| key.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// Writes shared data as another plugin on the same VM id would (CAS 0: unconditional).
    pub fn set_shared_data(&self, key: &str, value: impl Into<Vec<u8>>) {
        self.shared.lock().set_data(key, value.into(), 0);
    }

    /// Every http call any worker dispatched so far, in order.
    pub fn http_calls(&self) -> Vec<HttpCall> {
        self.shared.lock().http_calls.clone()
    }

    /// Answers every later http call with `serve` (after scripted answers, see
    /// [`Plugin::script_http_call`]). Answers arrive on the next turn.
    pub fn serve_http_calls<F, O>(&self, mut serve: F)
    where
        F: FnMut(&HttpCall) -> O + Send + 'static,
        O: Into<Outcome>,
    {
        self.shared
            .responder
            .serve(Box::new(move |call| Some(serve(call).into())));
    }

    /// Queues `outcome` as the answer to the next call to `cluster`.
    pub fn script_http_call(&self, cluster: &str, outcome: impl Into<Outcome>) {
        self.shared.responder.script(cluster, outcome.into());
    }
}

pub(crate) fn format_logs(logs: &[LogEntry]) -> String {
    logs.iter()
        .map(|e| format!("[worker {} {:?}] {}", e.worker, e.level, e.message))
        .collect::<Vec<_>>()
        .join("\n")
}

impl PluginBuilder {
    fn new(module: Module) -> Self {
        Self {
            module,
            workers: 1,
            plugin_name: "fulcrum".to_string(),
            root_id: String::new(),
            vm_id: String::new(),
            plugin_configuration: Vec::new(),
            vm_configuration: Vec::new(),
            clusters: HashSet::new(),
            log_level: LogLevel::Trace,
            fuel_per_callback: DEFAULT_FUEL_PER_CALLBACK,
            random_seed: 0x00f0_1c00,
            clock_start: DEFAULT_CLOCK_START_NANOS,
            properties: Vec::new(),
        }
    }

    /// The plugin configuration (`proxy_on_configure`'s buffer), e.g. the WasmPlugin's JSON.
    pub fn configure(mut self, configuration: impl Into<Vec<u8>>) -> Self {
        self.plugin_configuration = configuration.into();
        self
    }

    /// The VM configuration (`proxy_on_vm_start`'s buffer).
    pub fn vm_configuration(mut self, configuration: impl Into<Vec<u8>>) -> Self {
        self.vm_configuration = configuration.into();
        self
    }

    /// How many worker VMs run the plugin (default 1).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Declares an upstream cluster `proxy_http_call` may target (Envoy refuses unknown ones).
    pub fn cluster(mut self, name: &str) -> Self {
        self.clusters.insert(name.to_string());
        self
    }

    /// The `plugin_name` property (default `fulcrum`).
    pub fn plugin_name(mut self, name: &str) -> Self {
        self.plugin_name = name.to_string();
        self
    }

    /// The `plugin_root_id` property (default empty, as in Envoy).
    pub fn root_id(mut self, root_id: &str) -> Self {
        self.root_id = root_id.to_string();
        self
    }

    /// A property every context of every worker reads (a stream property of the same path
    /// wins), e.g. `xds.node.locality.zone`, as Envoy serves the node's fields.
    pub fn property(mut self, dotted_path: &str, value: Property) -> Self {
        self.properties.push((dotted_path.to_string(), value));
        self
    }

    /// The VM id shared data and queues are scoped to (default empty).
    pub fn vm_id(mut self, vm_id: &str) -> Self {
        self.vm_id = vm_id.to_string();
        self
    }

    /// The host's log level: lower guest logs are dropped (default `Trace`: keep all).
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }

    /// The fuel each callback gets (default [`DEFAULT_FUEL_PER_CALLBACK`]).
    pub fn fuel_per_callback(mut self, fuel: u64) -> Self {
        self.fuel_per_callback = fuel;
        self
    }

    /// Seeds the WASI random source of worker `i` with `seed + i` (default fixed), so
    /// guest randomness is reproducible.
    pub fn random_seed(mut self, seed: u64) -> Self {
        self.random_seed = seed;
        self
    }

    /// Starts the clock at `start` instead of 2025-01-01T00:00:00Z. The filter seeds each
    /// worker's generator from the clock when it is configured (`fulcrum_core::rng::vm_seed`
    /// of the time and the worker's [root context id](Worker::root_context_id)), so a start
    /// is also a choice of seeds. A start before the Unix epoch reads as the epoch.
    pub fn clock_start(mut self, start: SystemTime) -> Self {
        self.clock_start = start.duration_since(UNIX_EPOCH).map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        });
        self
    }

    /// Instantiates every worker and runs `proxy_on_vm_start` and `proxy_on_configure` in
    /// each root context. Fails, with the guest's logs, if the plugin refuses its
    /// configuration or traps.
    pub fn start(self) -> anyhow::Result<Plugin> {
        let shared = Shared::new(self.clock_start);
        let mut plugin_properties = BTreeMap::new();
        for (path, value) in [
            ("plugin_name", Property::string(&self.plugin_name)),
            ("plugin_root_id", Property::string(&self.root_id)),
            ("plugin_vm_id", Property::string(&self.vm_id)),
        ] {
            plugin_properties.insert(path_key(path), value.0);
        }
        for (path, value) in &self.properties {
            plugin_properties.insert(path_key(path), value.0.clone());
        }
        let config = VmConfig {
            vm_id: self.vm_id.clone(),
            plugin_configuration: self.plugin_configuration.clone(),
            vm_configuration: self.vm_configuration.clone(),
            plugin_properties,
            log_level: self.log_level,
            clusters: Arc::new(self.clusters.clone()),
            fuel_per_callback: self.fuel_per_callback,
            random_seed: self.random_seed,
        };
        let mut workers = Vec::with_capacity(self.workers);
        for worker in 0..self.workers {
            let started = Vm::instantiate(&self.module, shared.clone(), worker, &config)
                .and_then(|mut vm| vm.start().map(|()| vm));
            match started {
                Ok(vm) => workers.push(RefCell::new(vm)),
                Err(error) => {
                    let logs = format_logs(&shared.lock().logs);
                    return Err(error).with_context(|| {
                        format!("starting the plugin on worker {worker}; guest logs:\n{logs}")
                    });
                }
            }
        }
        Ok(Plugin { shared, workers })
    }
}

impl<'p> Worker<'p> {
    /// Starts describing a request to this worker.
    pub fn request(self) -> RequestBuilder<'p> {
        RequestBuilder::new(self.plugin, self.index)
    }

    /// This worker's index.
    pub fn index(self) -> usize {
        self.index
    }

    /// Calls this worker's VM has made into the host (proxy-wasm and WASI imports) since it
    /// started. Every one crosses the wasm boundary, which in Envoy's V8 costs far more than
    /// the filter's own work; the difference across a request is what the request cost.
    pub fn host_calls(self) -> u64 {
        self.plugin.vm(self.index).host_calls()
    }

    /// WebAssembly operators this worker's VM has executed in its callbacks since it started
    /// (wasmtime's fuel; host calls excluded). Unlike time it does not move with the
    /// machine's load: the difference across a request is the guest's own work for it.
    pub fn guest_fuel(self) -> u64 {
        self.plugin.vm(self.index).guest_fuel()
    }

    /// The id of this worker's root context (1, as Envoy numbers a VM's first context).
    pub fn root_context_id(self) -> u32 {
        self.plugin.vm(self.index).root_context()
    }

    /// Runs `proxy_on_tick` in this worker's root context if it set a tick period.
    pub fn tick(self) -> anyhow::Result<bool> {
        self.plugin.vm(self.index).tick()
    }

    /// The tick period the guest set (zero: none).
    pub fn tick_period(self) -> Duration {
        self.plugin.vm(self.index).tick_period()
    }

    /// Http calls this worker dispatched that have not been delivered yet.
    pub fn pending_http_calls(self) -> usize {
        self.plugin.vm(self.index).pending_http_calls()
    }

    /// The size of this worker's guest memory in bytes. Wasm memory never shrinks, so this is
    /// the high-water mark of what the guest ever needed: compare it before and after a run to
    /// bound what the guest allocates.
    pub fn memory_bytes(self) -> usize {
        self.plugin.vm(self.index).memory_bytes()
    }
}
