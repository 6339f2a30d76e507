//! One worker VM: a wasmtime `Store` and instance of the plugin with its root context, and
//! the host → guest callbacks (`proxy_on_*`) called the way Envoy calls them.
//!
//! Every callback runs with a fresh fuel budget, so a looping guest fails the test with an
//! "out of fuel" error instead of hanging it. A trap is reported with the callback's name,
//! the guest's stderr (where Rust panics go) and its latest log lines.

use std::{collections::BTreeMap, sync::Arc};

use anyhow::{Context as _, anyhow};
use rand::SeedableRng as _;
use wasmtime::{
    CallHook, Instance, Linker, Module, Store, Trap, TypedFunc, WasmParams, WasmResults,
};
use wasmtime_wasi::{
    WasiCtxBuilder,
    p2::{OutputStream, pipe::MemoryOutputPipe},
};

use crate::{
    abi::{Action, LogLevel, Status},
    context::{DeliveredCall, HostState, StreamContext},
    hostcalls,
    http_call::Outcome,
    shared::{LogEntry, Shared},
};

/// Everything a worker VM is created from.
#[derive(Debug, Clone)]
pub(crate) struct VmConfig {
    pub(crate) vm_id: String,
    pub(crate) plugin_configuration: Vec<u8>,
    pub(crate) vm_configuration: Vec<u8>,
    pub(crate) plugin_properties: BTreeMap<Vec<u8>, Vec<u8>>,
    pub(crate) log_level: LogLevel,
    pub(crate) clusters: Arc<std::collections::HashSet<String>>,
    pub(crate) fuel_per_callback: u64,
    pub(crate) random_seed: u64,
}

/// A guest export, shared: cloning a `TypedFunc` clones its `FuncType` through wasmtime's
/// type registry (about 6 % of a request in the filter bench when every callback did), an
/// `Arc` only counts a reference.
pub(crate) type Export<P, R> = Arc<TypedFunc<P, R>>;
type Callback1 = Export<i32, ()>;
type Callback2 = Export<(i32, i32), ()>;
type Stream3 = Export<(i32, i32, i32), i32>;
type Stream2 = Export<(i32, i32), i32>;
type HttpCallResponse = Export<(i32, i32, i32, i32, i32), ()>;

/// The callbacks the module exports; the spec makes every one optional.
struct Exports {
    context_create: Option<Callback2>,
    vm_start: Option<Export<(i32, i32), i32>>,
    configure: Option<Export<(i32, i32), i32>>,
    tick: Option<Callback1>,
    request_headers: Option<Stream3>,
    request_body: Option<Stream3>,
    response_headers: Option<Stream3>,
    response_body: Option<Stream3>,
    response_trailers: Option<Stream2>,
    log: Option<Callback1>,
    done: Option<Export<i32, i32>>,
    delete: Option<Callback1>,
    http_call_response: Option<HttpCallResponse>,
    queue_ready: Option<Callback2>,
}

fn export<P: WasmParams, R: WasmResults>(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &str,
) -> anyhow::Result<Option<Export<P, R>>> {
    match instance.get_func(&mut *store, name) {
        None => Ok(None),
        Some(func) => func
            .typed::<P, R>(&*store)
            .map(|typed| Some(Arc::new(typed)))
            .map_err(anyhow::Error::from)
            .with_context(|| format!("the guest's export `{name}` has the wrong signature")),
    }
}

pub(crate) struct Vm {
    store: Store<HostState>,
    exports: Exports,
    fuel_per_callback: u64,
    /// Fuel the guest has burnt in its callbacks since the VM started.
    fuel_used: u64,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
    stdout_seen: usize,
    stderr_seen: usize,
    next_context: u32,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("worker", &self.store.data().worker)
            .field("root_context", &self.store.data().root_context)
            .finish_non_exhaustive()
    }
}

/// Guest output pipes hold at most this much; more traps the guest ("write beyond capacity").
const PIPE_CAPACITY: usize = 4 << 20;

impl Vm {
    /// Calls the guest has made into the host so far.
    pub(crate) fn host_calls(&self) -> u64 {
        self.store.data().host_calls
    }

    /// Fuel the guest has burnt in its callbacks since the VM started: wasmtime charges one
    /// unit per WebAssembly operator executed (none for `nop`, `drop` and block markers), so
    /// this counts the guest's own instructions, host calls excluded, the same on every
    /// machine and run.
    pub(crate) fn guest_fuel(&self) -> u64 {
        self.fuel_used
    }

    /// Instantiates `module` for `worker` and runs `_initialize` (or `_start`). The root
    /// context is not created yet: see [`Vm::start`].
    pub(crate) fn instantiate(
        module: &Module,
        shared: Shared,
        worker: usize,
        config: &VmConfig,
    ) -> anyhow::Result<Self> {
        let stdout = MemoryOutputPipe::new(PIPE_CAPACITY);
        let stderr = MemoryOutputPipe::new(PIPE_CAPACITY);
        let seed = config.random_seed.wrapping_add(worker as u64);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(shared.clock.clone())
            .monotonic_clock(shared.clock.clone())
            .secure_random(rand::rngs::StdRng::seed_from_u64(seed))
            .insecure_random(rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed))
            .build_p1();
        let state = HostState {
            wasi,
            shared,
            worker,
            vm_id: config.vm_id.clone(),
            root_context: 1,
            plugin_configuration: config.plugin_configuration.clone(),
            vm_configuration: config.vm_configuration.clone(),
            plugin_properties: config.plugin_properties.clone(),
            log_level: config.log_level,
            clusters: config.clusters.clone(),
            effective: 0,
            streams: BTreeMap::new(),
            tick_period: std::time::Duration::ZERO,
            delivering: None,
            pending_calls: Vec::new(),
            next_token: 1,
            last_status: (0, String::new()),
            awaiting_done: Default::default(),
            ready_to_finalize: Vec::new(),
            memory: None,
            allocate: None,
            host_calls: 0,
        };
        let mut store = Store::new(module.engine(), state);
        store.call_hook(|mut store, hook| {
            if matches!(hook, CallHook::CallingHost) {
                store.data_mut().host_calls += 1;
            }
            Ok(())
        });
        let mut linker: Linker<HostState> = Linker::new(module.engine());
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |state: &mut HostState| &mut state.wasi)
            .map_err(anyhow::Error::from)?;
        hostcalls::link(&mut linker).map_err(anyhow::Error::from)?;
        hostcalls::link_unimplemented_as_traps(&mut linker, module, &mut store)
            .map_err(anyhow::Error::from)?;
        let instance = linker
            .instantiate(&mut store, module)
            .map_err(anyhow::Error::from)
            .context("instantiating the guest")?;

        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| anyhow!("the guest exports no `memory`"))?;
        let allocate = match export::<i32, i32>(&instance, &mut store, "proxy_on_memory_allocate")?
        {
            Some(allocate) => Some(allocate),
            None => export::<i32, i32>(&instance, &mut store, "malloc")?,
        };
        store.data_mut().memory = Some(memory);
        store.data_mut().allocate = allocate;

        let exports = Exports {
            context_create: export(&instance, &mut store, "proxy_on_context_create")?,
            vm_start: export(&instance, &mut store, "proxy_on_vm_start")?,
            configure: export(&instance, &mut store, "proxy_on_configure")?,
            tick: export(&instance, &mut store, "proxy_on_tick")?,
            request_headers: export(&instance, &mut store, "proxy_on_request_headers")?,
            request_body: export(&instance, &mut store, "proxy_on_request_body")?,
            response_headers: export(&instance, &mut store, "proxy_on_response_headers")?,
            response_body: export(&instance, &mut store, "proxy_on_response_body")?,
            response_trailers: export(&instance, &mut store, "proxy_on_response_trailers")?,
            log: export(&instance, &mut store, "proxy_on_log")?,
            done: export(&instance, &mut store, "proxy_on_done")?,
            delete: export(&instance, &mut store, "proxy_on_delete")?,
            http_call_response: export(&instance, &mut store, "proxy_on_http_call_response")?,
            queue_ready: export(&instance, &mut store, "proxy_on_queue_ready")?,
        };
        let initialize = match export::<(), ()>(&instance, &mut store, "_initialize")? {
            Some(initialize) => Some(("_initialize", initialize)),
            None => export::<(), ()>(&instance, &mut store, "_start")?.map(|f| ("_start", f)),
        };
        let mut vm = Self {
            store,
            exports,
            fuel_per_callback: config.fuel_per_callback,
            fuel_used: 0,
            stdout,
            stderr,
            stdout_seen: 0,
            stderr_seen: 0,
            next_context: 2,
        };
        if let Some((name, initialize)) = initialize {
            vm.call(name, 0, &initialize, ())?;
        }
        Ok(vm)
    }

    pub(crate) fn worker(&self) -> usize {
        self.store.data().worker
    }

    pub(crate) fn root_context(&self) -> u32 {
        self.store.data().root_context
    }

    /// Creates the root context and runs `proxy_on_vm_start` then `proxy_on_configure` on it,
    /// as Envoy does when a worker loads the plugin. Fails if either returns false.
    pub(crate) fn start(&mut self) -> anyhow::Result<()> {
        let root = self.root_context();
        if let Some(create) = self.exports.context_create.clone() {
            self.call("proxy_on_context_create", root, &create, (root as i32, 0))?;
        }
        let vm_config_len = self.store.data().vm_configuration.len() as i32;
        if let Some(vm_start) = self.exports.vm_start.clone()
            && self.call(
                "proxy_on_vm_start",
                root,
                &vm_start,
                (root as i32, vm_config_len),
            )? == 0
        {
            anyhow::bail!("proxy_on_vm_start returned false");
        }
        let config_len = self.store.data().plugin_configuration.len() as i32;
        if let Some(configure) = self.exports.configure.clone()
            && self.call(
                "proxy_on_configure",
                root,
                &configure,
                (root as i32, config_len),
            )? == 0
        {
            anyhow::bail!(
                "proxy_on_configure returned false (the plugin refused its configuration)"
            );
        }
        Ok(())
    }

    /// Creates a stream context holding `stream` (`proxy_on_context_create(id, root)`).
    pub(crate) fn create_stream(&mut self, stream: StreamContext) -> anyhow::Result<u32> {
        let id = self.next_context;
        self.next_context += 1;
        self.store.data_mut().streams.insert(id, stream);
        let root = self.root_context();
        if let Some(create) = self.exports.context_create.clone() {
            self.call(
                "proxy_on_context_create",
                id,
                &create,
                (id as i32, root as i32),
            )?;
        }
        Ok(id)
    }

    pub(crate) fn stream(&self, id: u32) -> Option<&StreamContext> {
        self.store.data().streams.get(&id)
    }

    pub(crate) fn stream_mut(&mut self, id: u32) -> Option<&mut StreamContext> {
        self.store.data_mut().streams.get_mut(&id)
    }

    /// `proxy_on_request_headers`; a module without it continues.
    pub(crate) fn on_request_headers(
        &mut self,
        id: u32,
        end_of_stream: bool,
    ) -> anyhow::Result<Action> {
        let count = self.stream(id).map_or(0, |s| s.request_headers.len());
        self.stream_callback(
            "proxy_on_request_headers",
            self.exports.request_headers.clone(),
            id,
            count,
            end_of_stream,
        )
    }

    pub(crate) fn on_request_body(
        &mut self,
        id: u32,
        end_of_stream: bool,
    ) -> anyhow::Result<Action> {
        let size = self.stream(id).map_or(0, |s| s.request_body.len());
        self.stream_callback(
            "proxy_on_request_body",
            self.exports.request_body.clone(),
            id,
            size,
            end_of_stream,
        )
    }

    pub(crate) fn on_response_headers(
        &mut self,
        id: u32,
        end_of_stream: bool,
    ) -> anyhow::Result<Action> {
        let count = self.stream(id).map_or(0, |s| s.response_headers.len());
        self.stream_callback(
            "proxy_on_response_headers",
            self.exports.response_headers.clone(),
            id,
            count,
            end_of_stream,
        )
    }

    pub(crate) fn on_response_body(
        &mut self,
        id: u32,
        end_of_stream: bool,
    ) -> anyhow::Result<Action> {
        let size = self.stream(id).map_or(0, |s| s.response_body.len());
        self.stream_callback(
            "proxy_on_response_body",
            self.exports.response_body.clone(),
            id,
            size,
            end_of_stream,
        )
    }

    pub(crate) fn on_response_trailers(&mut self, id: u32) -> anyhow::Result<Action> {
        let Some(callback) = self.exports.response_trailers.clone() else {
            return Ok(Action::Continue);
        };
        let count = self.stream(id).map_or(0, |s| s.response_trailers.len());
        let action = self.call(
            "proxy_on_response_trailers",
            id,
            &callback,
            (id as i32, abi_len(count)),
        )?;
        Action::from_guest(action)
            .with_context(|| format!("proxy_on_response_trailers on context {id}"))
    }

    fn stream_callback(
        &mut self,
        name: &'static str,
        callback: Option<Stream3>,
        id: u32,
        size: usize,
        end_of_stream: bool,
    ) -> anyhow::Result<Action> {
        let Some(callback) = callback else {
            return Ok(Action::Continue);
        };
        let params = (id as i32, abi_len(size), i32::from(end_of_stream));
        let action = self.call(name, id, &callback, params)?;
        Action::from_guest(action).with_context(|| format!("{name} on context {id}"))
    }

    /// Ends a stream as Envoy does: `proxy_on_done`; if it returns true, `proxy_on_log` and
    /// `proxy_on_delete`; if false, those wait until the guest calls `proxy_done`.
    /// Returns the released stream's final state, or `None` while it waits for `proxy_done`.
    pub(crate) fn end_stream(&mut self, id: u32) -> anyhow::Result<Option<StreamContext>> {
        let completed = match self.exports.done.clone() {
            Some(done) => self.call("proxy_on_done", id, &done, id as i32)? != 0,
            None => true,
        };
        if completed {
            self.finalize(id).map(Some)
        } else {
            self.store.data_mut().awaiting_done.insert(id);
            Ok(None)
        }
    }

    /// `proxy_on_log` then `proxy_on_delete`, then the stream's state is released.
    fn finalize(&mut self, id: u32) -> anyhow::Result<StreamContext> {
        if let Some(log) = self.exports.log.clone() {
            self.call("proxy_on_log", id, &log, id as i32)?;
        }
        if let Some(delete) = self.exports.delete.clone() {
            self.call("proxy_on_delete", id, &delete, id as i32)?;
        }
        Ok(self
            .store
            .data_mut()
            .streams
            .remove(&id)
            .unwrap_or_default())
    }

    /// Whether a stream is still alive (not yet deleted).
    pub(crate) fn has_stream(&self, id: u32) -> bool {
        self.store.data().streams.contains_key(&id)
    }

    /// `proxy_on_tick` on the root context if the guest set a tick period; returns whether it
    /// ran.
    pub(crate) fn tick(&mut self) -> anyhow::Result<bool> {
        if self.store.data().tick_period.is_zero() {
            return Ok(false);
        }
        let Some(tick) = self.exports.tick.clone() else {
            return Ok(false);
        };
        let root = self.root_context();
        self.call("proxy_on_tick", root, &tick, root as i32)?;
        Ok(true)
    }

    pub(crate) fn tick_period(&self) -> std::time::Duration {
        self.store.data().tick_period
    }

    /// The size of the guest's linear memory in bytes (it only ever grows).
    pub(crate) fn memory_bytes(&self) -> usize {
        self.store
            .data()
            .memory
            .map_or(0, |memory| memory.data_size(&self.store))
    }

    /// Delivers, on this turn, every http call answered (or timed out on the clock) before it,
    /// and finalizes contexts that called `proxy_done`. Returns how many events ran. Calls
    /// dispatched during delivery wait for the next turn.
    pub(crate) fn deliver_pending(&mut self) -> anyhow::Result<usize> {
        let mut delivered = 0;
        let pending = std::mem::take(&mut self.store.data_mut().pending_calls);
        let now = self.store.data().shared.clock.now_nanos();
        let responder = self.store.data().shared.responder.clone();
        let mut waiting = Vec::new();
        let mut ready = Vec::new();
        for call in pending {
            let deadline = call
                .dispatched_at_nanos
                .saturating_add(u64::try_from(call.call.timeout.as_nanos()).unwrap_or(u64::MAX));
            match responder.answer(&call.call) {
                Some(outcome) => ready.push((call, outcome)),
                None if now >= deadline && !call.call.timeout.is_zero() => {
                    ready.push((call, Outcome::Timeout))
                }
                None => waiting.push(call),
            }
        }
        self.store.data_mut().pending_calls = waiting;
        for (call, outcome) in ready {
            self.deliver_http_call(call.context, call.token, outcome)?;
            delivered += 1;
        }
        let finalize = std::mem::take(&mut self.store.data_mut().ready_to_finalize);
        for id in finalize {
            if self.has_stream(id) {
                self.finalize(id)?;
                delivered += 1;
            }
        }
        Ok(delivered)
    }

    fn deliver_http_call(
        &mut self,
        context: u32,
        token: u32,
        outcome: Outcome,
    ) -> anyhow::Result<()> {
        let response = outcome.into_response();
        let (headers, body, trailers) = response.as_ref().map_or((0, 0, 0), |r| {
            (r.headers.len(), r.body.len(), r.trailers.len())
        });
        let state = self.store.data_mut();
        state.last_status = match response {
            Some(_) => (Status::Ok.code() as u32, String::new()),
            None => (Status::BrokenConnection.code() as u32, "reset".to_string()),
        };
        state.delivering = Some(DeliveredCall { response });
        let result = match self.exports.http_call_response.clone() {
            Some(callback) => {
                let params = (
                    context as i32,
                    token as i32,
                    abi_len(headers),
                    abi_len(body),
                    abi_len(trailers),
                );
                self.call("proxy_on_http_call_response", context, &callback, params)
            }
            None => Ok(()),
        };
        self.store.data_mut().delivering = None;
        result
    }

    /// `proxy_on_queue_ready` on `context`.
    pub(crate) fn queue_ready(&mut self, context: u32, queue_id: u32) -> anyhow::Result<()> {
        if let Some(callback) = self.exports.queue_ready.clone() {
            self.call(
                "proxy_on_queue_ready",
                context,
                &callback,
                (context as i32, queue_id as i32),
            )?;
        }
        Ok(())
    }

    /// Whether this worker has http calls dispatched and not yet delivered.
    pub(crate) fn pending_http_calls(&self) -> usize {
        self.store.data().pending_calls.len()
    }

    /// Calls into the guest with `context` effective and a fresh fuel budget.
    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        name: &str,
        context: u32,
        func: &TypedFunc<P, R>,
        params: P,
    ) -> anyhow::Result<R> {
        self.store
            .set_fuel(self.fuel_per_callback)
            .map_err(anyhow::Error::from)?;
        self.store.data_mut().effective = context;
        let calls_before = self.host_calls();
        let result = func.call(&mut self.store, params);
        self.fuel_used += self
            .fuel_per_callback
            .saturating_sub(self.store.get_fuel().unwrap_or(0));
        // Output is written through `fd_write`, a host call: a callback that made none wrote
        // nothing.
        if self.host_calls() != calls_before {
            self.collect_output();
        }
        result.map_err(|error| self.failure(name, context, error))
    }

    /// Moves what the guest wrote to stdout (Info) and stderr (Error) into the logs, as the
    /// spec says hosts log `fd_write`.
    fn collect_output(&mut self) {
        let worker = self.worker();
        let mut entries = Vec::new();
        for (pipe, seen, level) in [
            (&self.stdout, &mut self.stdout_seen, LogLevel::Info),
            (&self.stderr, &mut self.stderr_seen, LogLevel::Error),
        ] {
            // What the pipe holds, without copying it: `contents` clones the whole output,
            // which made every callback O(all output so far).
            let written = match OutputStream::check_write(&mut pipe.clone()) {
                Ok(room) => PIPE_CAPACITY - room,
                Err(_) => PIPE_CAPACITY,
            };
            if written <= *seen {
                continue;
            }
            let contents = pipe.contents();
            if contents.len() > *seen {
                let text = String::from_utf8_lossy(&contents[*seen..]).into_owned();
                *seen = contents.len();
                entries.extend(text.lines().filter(|l| !l.is_empty()).map(|line| LogEntry {
                    worker,
                    level,
                    message: line.to_string(),
                }));
            }
        }
        if !entries.is_empty() {
            self.store.data().shared.lock().logs.extend(entries);
        }
    }

    fn failure(&self, name: &str, context: u32, error: wasmtime::Error) -> anyhow::Error {
        let worker = self.worker();
        let cause = match error.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => format!(
                "the guest used up its fuel ({} units per callback): it probably loops",
                self.fuel_per_callback
            ),
            _ => format!("{error:?}"),
        };
        let logs = self.store.data().shared.lock().logs.clone();
        let mine: Vec<String> = logs
            .iter()
            .filter(|entry| entry.worker == worker)
            .map(|entry| format!("  [{:?}] {}", entry.level, entry.message))
            .collect();
        let recent = &mine[mine.len().saturating_sub(20)..];
        anyhow!(
            "{name} (worker {worker}, context {context}) failed: {cause}\nlatest guest logs of this worker:\n{}",
            if recent.is_empty() {
                "  (none)".to_string()
            } else {
                recent.join("\n")
            }
        )
    }
}

/// A size argument as the guest's `size_t` (wasm32).
fn abi_len(len: usize) -> i32 {
    crate::abi::len_u32(len) as i32
}
