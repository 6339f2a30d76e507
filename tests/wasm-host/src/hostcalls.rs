//! The host side of the proxy-wasm ABI 0.2.1 (`env.proxy_*`), linked into every worker VM.
//!
//! Each function follows the spec's status codes and, where the spec leaves room, Envoy's
//! behaviour (proxy-wasm-cpp-host `exports.cc` and Envoy's `context.cc`). Any other `env`
//! import the module declares is linked by [`link_unimplemented_as_traps`] to a trap that
//! names it, so a missing host call fails the test loudly instead of returning a silent zero.

use std::time::Duration;

use wasmtime::{Caller, Linker, Module, bail};

use crate::{
    abi::{
        BufferType, LogLevel, MapType, MetricType, Status, StreamType, decode_map, encode_map,
        len_u32,
    },
    context::{HostState, LocalResponse, PendingCall},
    headers::{self, HeaderMap},
    http_call::HttpCall,
    shared::{LogEntry, QueueReady},
};

type Ctx<'a> = Caller<'a, HostState>;
type HostResult = wasmtime::Result<i32>;

fn ok(status: Status) -> HostResult {
    Ok(status.code())
}

// ---- guest memory -------------------------------------------------------------------------

fn range(ptr: i32, len: i32) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(ptr as u32).ok()?;
    let len = usize::try_from(len as u32).ok()?;
    Some(start..start.checked_add(len)?)
}

fn read(caller: &Ctx<'_>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let memory = caller.data().memory?;
    memory
        .data(caller)
        .get(range(ptr, len)?)
        .map(<[u8]>::to_vec)
}

fn read_string(caller: &Ctx<'_>, ptr: i32, len: i32) -> Option<String> {
    String::from_utf8(read(caller, ptr, len)?).ok()
}

fn write(caller: &mut Ctx<'_>, ptr: i32, bytes: &[u8]) -> bool {
    let Some(memory) = caller.data().memory else {
        return false;
    };
    let Some(range) = range(ptr, len_u32(bytes.len()) as i32) else {
        return false;
    };
    match memory.data_mut(caller).get_mut(range) {
        Some(target) => {
            target.copy_from_slice(bytes);
            true
        }
        None => false,
    }
}

fn write_u32(caller: &mut Ctx<'_>, ptr: i32, value: u32) -> bool {
    write(caller, ptr, &value.to_le_bytes())
}

/// Copies `bytes` into memory the guest allocates and writes its address and size to the
/// return pointers. Like proxy-wasm-cpp-host, an empty value returns a null pointer (the SDK
/// reads it as `None`) without calling the allocator.
fn return_bytes(caller: &mut Ctx<'_>, bytes: &[u8], ptr_ptr: i32, size_ptr: i32) -> HostResult {
    let mut address = 0i32;
    if !bytes.is_empty() {
        let Some(allocate) = caller.data().allocate.clone() else {
            bail!("the guest exports neither proxy_on_memory_allocate nor malloc");
        };
        let size = len_u32(bytes.len()) as i32;
        address = allocate.call(&mut *caller, size)?;
        if address == 0 {
            bail!("the guest's allocator returned 0 for {} bytes", bytes.len());
        }
        if !write(caller, address, bytes) {
            bail!("the guest's allocator returned {address:#x}, outside its memory");
        }
    }
    if write_u32(caller, size_ptr, len_u32(bytes.len()))
        && write_u32(caller, ptr_ptr, address as u32)
    {
        ok(Status::Ok)
    } else {
        ok(Status::InvalidMemoryAccess)
    }
}

macro_rules! guest {
    ($value:expr) => {
        match $value {
            Some(value) => value,
            None => return ok(Status::InvalidMemoryAccess),
        }
    };
}

macro_rules! argument {
    ($value:expr) => {
        match $value {
            Some(value) => value,
            None => return ok(Status::BadArgument),
        }
    };
}

// ---- linking ------------------------------------------------------------------------------

/// Links every `env.proxy_*` host call this host implements.
pub(crate) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    link_logging_and_time(linker)?;
    link_buffers(linker)?;
    link_header_maps(linker)?;
    link_properties(linker)?;
    link_shared_data_and_queues(linker)?;
    link_metrics(linker)?;
    link_http_and_streams(linker)?;
    link_contexts(linker)?;
    Ok(())
}

/// Links a trap naming the import for every function import of `module` that nothing else
/// provides. Calling it fails the callback with "`env.proxy_grpc_call` is not implemented".
pub(crate) fn link_unimplemented_as_traps(
    linker: &mut Linker<HostState>,
    module: &Module,
    store: impl wasmtime::AsContextMut<Data = HostState>,
) -> wasmtime::Result<Vec<String>> {
    let mut store = store;
    let mut missing = Vec::new();
    for import in module.imports() {
        let wasmtime::ExternType::Func(ty) = import.ty() else {
            continue;
        };
        if linker
            .get(&mut store, import.module(), import.name())
            .is_ok()
        {
            continue;
        }
        let name = format!("{}.{}", import.module(), import.name());
        missing.push(name.clone());
        linker.func_new(import.module(), import.name(), ty, move |_, _, _| {
            bail!(
                "the guest called `{name}`, which the fulcrum wasm host does not implement \
                 (add it to tests/wasm-host/src/hostcalls.rs with Envoy's semantics)"
            )
        })?;
    }
    Ok(missing)
}

fn link_logging_and_time(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |caller: Ctx<'_>, level: i32, ptr: i32, len: i32| -> HostResult {
            let level = argument!(LogLevel::from_guest(level));
            let message = guest!(read(&caller, ptr, len));
            let state = caller.data();
            if level >= state.log_level {
                state.shared.lock().logs.push(LogEntry {
                    worker: state.worker,
                    level,
                    message: String::from_utf8_lossy(&message).into_owned(),
                });
            }
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut caller: Ctx<'_>, ret: i32| -> HostResult {
            let level = caller.data().log_level as u32;
            ok(if write_u32(&mut caller, ret, level) {
                Status::Ok
            } else {
                Status::InvalidMemoryAccess
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut caller: Ctx<'_>, ret: i32| -> HostResult {
            let now = caller.data().shared.clock.now_nanos();
            ok(if write(&mut caller, ret, &now.to_le_bytes()) {
                Status::Ok
            } else {
                Status::InvalidMemoryAccess
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut caller: Ctx<'_>, period: i32| -> HostResult {
            caller.data_mut().tick_period = Duration::from_millis(u64::from(period as u32));
            ok(Status::Ok)
        },
    )?;
    Ok(())
}

// ---- buffers ------------------------------------------------------------------------------

fn buffer(state: &HostState, kind: BufferType) -> Option<Vec<u8>> {
    match kind {
        BufferType::PluginConfiguration => Some(state.plugin_configuration.clone()),
        BufferType::VmConfiguration => Some(state.vm_configuration.clone()),
        BufferType::RequestBody => state.stream().map(|s| s.request_body.clone()),
        BufferType::ResponseBody => state.stream().map(|s| s.response_body.clone()),
        BufferType::HttpCallResponseBody => state.delivering.as_ref().map(|d| {
            d.response
                .as_ref()
                .map(|r| r.body.clone())
                .unwrap_or_default()
        }),
    }
}

fn link_buffers(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut caller: Ctx<'_>, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| {
            let kind = argument!(BufferType::from_guest(kind));
            let Some(bytes) = buffer(caller.data(), kind) else {
                return ok(Status::NotFound);
            };
            let start = start as u32 as usize;
            if start > bytes.len() {
                return ok(Status::BadArgument);
            }
            let end = start.saturating_add(max as u32 as usize).min(bytes.len());
            return_bytes(&mut caller, &bytes[start..end], ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut caller: Ctx<'_>, kind: i32, ret_size: i32, ret_flags: i32| -> HostResult {
            let kind = argument!(BufferType::from_guest(kind));
            let Some(bytes) = buffer(caller.data(), kind) else {
                return ok(Status::NotFound);
            };
            let written = write_u32(&mut caller, ret_size, len_u32(bytes.len()))
                && write_u32(&mut caller, ret_flags, 0);
            ok(if written {
                Status::Ok
            } else {
                Status::InvalidMemoryAccess
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut caller: Ctx<'_>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| {
            let kind = argument!(BufferType::from_guest(kind));
            let value = guest!(read(&caller, ptr, len));
            let state = caller.data_mut();
            let target = match kind {
                BufferType::RequestBody => state.stream_mut().map(|s| &mut s.request_body),
                BufferType::ResponseBody => state.stream_mut().map(|s| &mut s.response_body),
                _ => return ok(Status::BadArgument),
            };
            let Some(target) = target else {
                return ok(Status::NotFound);
            };
            // Envoy: start=0,size=0 prepends; start past the end appends; otherwise replace.
            let start = (start as u32 as usize).min(target.len());
            let end = start.saturating_add(size as u32 as usize).min(target.len());
            target.splice(start..end, value);
            ok(Status::Ok)
        },
    )?;
    Ok(())
}

// ---- header maps --------------------------------------------------------------------------

/// The map `kind` of the effective context; `None` when it does not exist there (Envoy:
/// `BadArgument`, "requested map type is not currently available"), as for the response
/// maps of an http call that was reset.
fn map(state: &HostState, kind: MapType) -> Option<&HeaderMap> {
    match kind {
        MapType::HttpCallResponseHeaders => state
            .delivering
            .as_ref()?
            .response
            .as_ref()
            .map(|r| &r.headers),
        MapType::HttpCallResponseTrailers => state
            .delivering
            .as_ref()?
            .response
            .as_ref()
            .map(|r| &r.trailers),
        MapType::RequestHeaders => state.stream().map(|s| &s.request_headers),
        MapType::RequestTrailers => state.stream().map(|s| &s.request_trailers),
        MapType::ResponseHeaders => state.stream().map(|s| &s.response_headers),
        MapType::ResponseTrailers => state.stream().map(|s| &s.response_trailers),
    }
}

/// The writable map `kind` of the effective stream; http call maps are read-only.
fn map_mut(state: &mut HostState, kind: MapType) -> Option<&mut HeaderMap> {
    let stream = state.stream_mut()?;
    match kind {
        MapType::RequestHeaders => Some(&mut stream.request_headers),
        MapType::RequestTrailers => Some(&mut stream.request_trailers),
        MapType::ResponseHeaders => Some(&mut stream.response_headers),
        MapType::ResponseTrailers => Some(&mut stream.response_trailers),
        MapType::HttpCallResponseHeaders | MapType::HttpCallResponseTrailers => None,
    }
}

fn link_header_maps(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut caller: Ctx<'_>, kind: i32, ret_ptr: i32, ret_size: i32| -> HostResult {
            let kind = argument!(MapType::from_guest(kind));
            // Envoy returns an empty map when the map is not available.
            let bytes = map(caller.data(), kind)
                .map(|pairs| encode_map(pairs))
                .unwrap_or_else(|| encode_map(&[]));
            return_bytes(&mut caller, &bytes, ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut caller: Ctx<'_>, kind: i32, ptr: i32, len: i32| -> HostResult {
            let kind = argument!(MapType::from_guest(kind));
            let bytes = guest!(read(&caller, ptr, len));
            let pairs = argument!(decode_map(&bytes));
            let target = argument!(map_mut(caller.data_mut(), kind));
            *target = headers::normalized(pairs);
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut caller: Ctx<'_>,
         kind: i32,
         key_ptr: i32,
         key_len: i32,
         ret_ptr: i32,
         ret_size: i32| {
            let kind = argument!(MapType::from_guest(kind));
            let key = guest!(read(&caller, key_ptr, key_len));
            let pairs = argument!(map(caller.data(), kind));
            let Some(value) = headers::first(pairs, &key).map(<[u8]>::to_vec) else {
                return ok(Status::NotFound);
            };
            return_bytes(&mut caller, &value, ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut caller: Ctx<'_>, kind: i32, key_ptr: i32, key_len: i32, ptr: i32, len: i32| {
            let kind = argument!(MapType::from_guest(kind));
            let key = guest!(read(&caller, key_ptr, key_len));
            let value = guest!(read(&caller, ptr, len));
            headers::add(argument!(map_mut(caller.data_mut(), kind)), &key, &value);
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut caller: Ctx<'_>, kind: i32, key_ptr: i32, key_len: i32, ptr: i32, len: i32| {
            let kind = argument!(MapType::from_guest(kind));
            let key = guest!(read(&caller, key_ptr, key_len));
            let value = guest!(read(&caller, ptr, len));
            headers::replace(argument!(map_mut(caller.data_mut(), kind)), &key, &value);
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut caller: Ctx<'_>, kind: i32, key_ptr: i32, key_len: i32| -> HostResult {
            let kind = argument!(MapType::from_guest(kind));
            let key = guest!(read(&caller, key_ptr, key_len));
            headers::remove(argument!(map_mut(caller.data_mut(), kind)), &key);
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut caller: Ctx<'_>, kind: i32, ret_size: i32| -> HostResult {
            let kind = argument!(MapType::from_guest(kind));
            let pairs = argument!(map(caller.data(), kind));
            let size = len_u32(encode_map(pairs).len());
            ok(if write_u32(&mut caller, ret_size, size) {
                Status::Ok
            } else {
                Status::InvalidMemoryAccess
            })
        },
    )?;
    Ok(())
}

// ---- properties ---------------------------------------------------------------------------

/// `request.*` attributes Envoy derives from the request headers.
fn request_attribute(state: &HostState, path: &[u8]) -> Option<Vec<u8>> {
    let stream = state.stream()?;
    let header = |name: &[u8]| headers::first(&stream.request_headers, name).map(<[u8]>::to_vec);
    let value = match path {
        b"request\0path" => header(b":path")?,
        b"request\0url_path" => {
            let path = header(b":path")?;
            let end = path.iter().position(|&b| b == b'?').unwrap_or(path.len());
            path[..end].to_vec()
        }
        b"request\0host" => header(b":authority")?,
        b"request\0method" => header(b":method")?,
        b"request\0scheme" => header(b":scheme")?,
        b"request\0id" => header(b"x-request-id")?,
        b"request\0useragent" => header(b"user-agent")?,
        b"request\0referer" => header(b"referer")?,
        _ => return None,
    };
    Some(value)
}

fn lookup_property(state: &HostState, path: &[u8]) -> Option<Vec<u8>> {
    if let Some(stream) = state.stream() {
        if let Some(value) = stream.properties.get(path) {
            return Some(value.clone());
        }
        if let Some(value) = request_attribute(state, path) {
            return Some(value);
        }
    }
    state.plugin_properties.get(path).cloned()
}

fn link_properties(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut caller: Ctx<'_>, ptr: i32, len: i32, ret_ptr: i32, ret_size: i32| -> HostResult {
            let path = guest!(read(&caller, ptr, len));
            match lookup_property(caller.data(), &path) {
                Some(value) => return_bytes(&mut caller, &value, ret_ptr, ret_size),
                None => ok(Status::NotFound),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut caller: Ctx<'_>, ptr: i32, len: i32, value_ptr: i32, value_len: i32| -> HostResult {
            let path = guest!(read(&caller, ptr, len));
            let value = guest!(read(&caller, value_ptr, value_len));
            if path.is_empty() {
                return ok(Status::BadArgument);
            }
            let state = caller.data_mut();
            match state.stream_mut() {
                Some(stream) => stream.properties.insert(path, value),
                None => state.plugin_properties.insert(path, value),
            };
            ok(Status::Ok)
        },
    )?;
    Ok(())
}

// ---- shared data and queues ---------------------------------------------------------------

fn link_shared_data_and_queues(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut caller: Ctx<'_>, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32, ret_cas: i32| {
            let key = guest!(read_string(&caller, kp, kl));
            let entry = {
                let mut shared = caller.data().shared.lock();
                shared.shared_data_calls.reads += 1;
                shared.data.get(&key).cloned()
            };
            let Some((value, cas)) = entry else {
                return ok(Status::NotFound);
            };
            if !write_u32(&mut caller, ret_cas, cas) {
                return ok(Status::InvalidMemoryAccess);
            }
            return_bytes(&mut caller, &value, ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |caller: Ctx<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> HostResult {
            let key = guest!(read_string(&caller, kp, kl));
            let value = guest!(read(&caller, vp, vl));
            let mut shared = caller.data().shared.lock();
            shared.shared_data_calls.writes += 1;
            ok(shared.set_data(&key, value, cas as u32))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut caller: Ctx<'_>, np: i32, nl: i32, ret_id: i32| -> HostResult {
            let name = guest!(read_string(&caller, np, nl));
            let state = caller.data();
            let (worker, context, vm_id) = (state.worker, state.effective, state.vm_id.clone());
            let id = {
                let mut shared = state.shared.lock();
                match shared.queue_id(&vm_id, &name) {
                    // Re-registering moves the queue to the caller, as in proxy-wasm-cpp-host.
                    Some(id) => {
                        if let Some(queue) = shared.queue_mut(id) {
                            queue.owner_worker = worker;
                            queue.owner_context = context;
                        }
                        id
                    }
                    None => {
                        shared.queues.push(crate::shared::Queue {
                            vm_id,
                            name,
                            owner_worker: worker,
                            owner_context: context,
                            items: Default::default(),
                        });
                        len_u32(shared.queues.len())
                    }
                }
            };
            ok(if write_u32(&mut caller, ret_id, id) {
                Status::Ok
            } else {
                Status::InvalidMemoryAccess
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut caller: Ctx<'_>, vp: i32, vl: i32, np: i32, nl: i32, ret_id: i32| -> HostResult {
            let vm_id = guest!(read_string(&caller, vp, vl));
            let name = guest!(read_string(&caller, np, nl));
            let Some(id) = caller.data().shared.lock().queue_id(&vm_id, &name) else {
                return ok(Status::NotFound);
            };
            ok(if write_u32(&mut caller, ret_id, id) {
                Status::Ok
            } else {
                Status::InvalidMemoryAccess
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |caller: Ctx<'_>, id: i32, ptr: i32, len: i32| -> HostResult {
            let value = guest!(read(&caller, ptr, len));
            let mut shared = caller.data().shared.lock();
            let Some(queue) = shared.queue_mut(id as u32) else {
                return ok(Status::NotFound);
            };
            queue.items.push_back(value);
            let ready = QueueReady {
                worker: queue.owner_worker,
                context: queue.owner_context,
                queue_id: id as u32,
            };
            shared.queue_ready.push(ready);
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut caller: Ctx<'_>, id: i32, ret_ptr: i32, ret_size: i32| -> HostResult {
            let item = {
                let mut shared = caller.data().shared.lock();
                let Some(queue) = shared.queue_mut(id as u32) else {
                    return ok(Status::NotFound);
                };
                queue.items.pop_front()
            };
            match item {
                Some(value) => return_bytes(&mut caller, &value, ret_ptr, ret_size),
                None => ok(Status::Empty),
            }
        },
    )?;
    Ok(())
}

// ---- metrics ------------------------------------------------------------------------------

fn link_metrics(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut caller: Ctx<'_>, kind: i32, np: i32, nl: i32, ret_id: i32| -> HostResult {
            let kind = argument!(MetricType::from_guest(kind));
            let name = guest!(read_string(&caller, np, nl));
            let defined = caller.data().shared.lock().define_metric(kind, &name);
            match defined {
                Ok(id) if write_u32(&mut caller, ret_id, id) => ok(Status::Ok),
                Ok(_) => ok(Status::InvalidMemoryAccess),
                Err(status) => ok(status),
            }
        },
    )?;
    // Envoy: a counter only grows (offset must be positive), a gauge moves both ways.
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |caller: Ctx<'_>, id: i32, offset: i64| -> HostResult {
            let mut shared = caller.data().shared.lock();
            let Some(metric) = shared.metric_mut(id as u32) else {
                return ok(Status::NotFound);
            };
            match metric.kind {
                MetricType::Counter if offset > 0 => metric.value += offset,
                MetricType::Gauge => metric.value += offset,
                _ => return ok(Status::BadArgument),
            }
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |caller: Ctx<'_>, id: i32, value: i64| -> HostResult {
            let mut shared = caller.data().shared.lock();
            let Some(metric) = shared.metric_mut(id as u32) else {
                return ok(Status::NotFound);
            };
            match metric.kind {
                MetricType::Counter => metric.value += value,
                MetricType::Gauge => metric.value = value,
                MetricType::Histogram => metric.samples.push(value as u64),
            }
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut caller: Ctx<'_>, id: i32, ret: i32| -> HostResult {
            let value = {
                let mut shared = caller.data().shared.lock();
                let Some(metric) = shared.metric_mut(id as u32) else {
                    return ok(Status::NotFound);
                };
                if metric.kind == MetricType::Histogram {
                    return ok(Status::BadArgument);
                }
                metric.value
            };
            ok(if write(&mut caller, ret, &value.to_le_bytes()) {
                Status::Ok
            } else {
                Status::InvalidMemoryAccess
            })
        },
    )?;
    Ok(())
}

// ---- http calls and stream control --------------------------------------------------------

#[allow(clippy::too_many_arguments)] // the ABI's signature
fn http_call(
    mut caller: Ctx<'_>,
    up: i32,
    up_len: i32,
    hp: i32,
    hl: i32,
    bp: i32,
    bl: i32,
    tp: i32,
    tl: i32,
    timeout_ms: i32,
    ret_token: i32,
) -> HostResult {
    let cluster = guest!(read_string(&caller, up, up_len));
    let headers = argument!(decode_map(&guest!(read(&caller, hp, hl))));
    let body = guest!(read(&caller, bp, bl));
    let trailers = argument!(decode_map(&guest!(read(&caller, tp, tl))));
    let state = caller.data();
    if !state.clusters.contains(&cluster) {
        return ok(Status::BadArgument);
    }
    let required: [&[u8]; 3] = [b":method", b":path", b":authority"];
    if required
        .iter()
        .any(|name| headers::first(&headers, name).is_none())
    {
        return ok(Status::BadArgument);
    }
    let call = HttpCall {
        worker: state.worker,
        cluster,
        headers,
        body,
        trailers,
        timeout: Duration::from_millis(u64::from(timeout_ms as u32)),
    };
    let token = state.next_token;
    let pending = PendingCall {
        token,
        context: state.effective,
        call: call.clone(),
        dispatched_at_nanos: state.shared.clock.now_nanos(),
    };
    state.shared.lock().http_calls.push(call);
    let state = caller.data_mut();
    state.next_token = token.wrapping_add(1).max(1);
    state.pending_calls.push(pending);
    ok(if write_u32(&mut caller, ret_token, token) {
        Status::Ok
    } else {
        Status::InvalidMemoryAccess
    })
}

#[allow(clippy::too_many_arguments)] // the ABI's signature
fn send_local_response(
    mut caller: Ctx<'_>,
    status: i32,
    dp: i32,
    dl: i32,
    bp: i32,
    bl: i32,
    hp: i32,
    hl: i32,
    grpc_status: i32,
) -> HostResult {
    let details = guest!(read_string(&caller, dp, dl));
    let body = guest!(read(&caller, bp, bl));
    let headers = argument!(decode_map(&guest!(read(&caller, hp, hl))));
    let stream = argument!(caller.data_mut().stream_mut());
    stream.local_response = Some(LocalResponse {
        status: status as u32,
        details,
        body,
        headers: headers::normalized(headers),
        grpc_status,
    });
    ok(Status::Ok)
}

fn link_http_and_streams(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap("env", "proxy_http_call", http_call)?;
    linker.func_wrap("env", "proxy_send_local_response", send_local_response)?;
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut caller: Ctx<'_>, kind: i32| -> HostResult {
            let kind = argument!(StreamType::from_guest(kind));
            argument!(caller.data_mut().stream_mut())
                .continued
                .push(kind);
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut caller: Ctx<'_>, kind: i32| -> HostResult {
            let kind = argument!(StreamType::from_guest(kind));
            argument!(caller.data_mut().stream_mut()).closed.push(kind);
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut caller: Ctx<'_>, ret_code: i32, ret_ptr: i32, ret_size: i32| -> HostResult {
            let (code, message) = caller.data().last_status.clone();
            if !write_u32(&mut caller, ret_code, code) {
                return ok(Status::InvalidMemoryAccess);
            }
            return_bytes(&mut caller, message.as_bytes(), ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_: Ctx<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> HostResult {
            // Envoy registers no foreign functions for this filter.
            ok(Status::NotFound)
        },
    )?;
    Ok(())
}

// ---- contexts -----------------------------------------------------------------------------

fn link_contexts(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut caller: Ctx<'_>, id: i32| -> HostResult {
            let id = id as u32;
            let state = caller.data_mut();
            if !state.is_known_context(id) {
                return ok(Status::BadArgument);
            }
            state.effective = id;
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap("env", "proxy_done", |mut caller: Ctx<'_>| -> HostResult {
        let state = caller.data_mut();
        let id = state.effective;
        if state.awaiting_done.remove(&id) {
            state.ready_to_finalize.push(id);
            ok(Status::Ok)
        } else {
            ok(Status::NotFound)
        }
    })?;
    Ok(())
}
