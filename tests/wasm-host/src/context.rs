//! The per-worker host state every host call reads and writes: the root context, the live
//! stream contexts with their headers, bodies and properties, pending http calls and the
//! effective context (Envoy's `current_context_` / `effective_context_id_`).

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::Duration,
};

use wasmtime::Memory;
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::{
    abi::{LogLevel, StreamType},
    headers::HeaderMap,
    http_call::{HttpCall, Response},
    shared::Shared,
};

/// A reply the guest sent with `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub details: String,
    pub body: Vec<u8>,
    /// Header names and values as the guest sent them (names lower-cased).
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// `-1` when the reply is not gRPC.
    pub grpc_status: i32,
}

/// One HTTP stream context (request/response pair). Header maps hold bytes, as Envoy's do.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamContext {
    pub(crate) request_headers: HeaderMap,
    pub(crate) request_body: Vec<u8>,
    pub(crate) request_trailers: HeaderMap,
    pub(crate) response_headers: HeaderMap,
    pub(crate) response_body: Vec<u8>,
    pub(crate) response_trailers: HeaderMap,
    /// NUL-separated path → Envoy-encoded value. Ordered maps here and below: a request
    /// looks properties and its stream up on nearly every host call, and a B-tree of a few
    /// entries compares keys where a `HashMap` hashes them with SipHash (the host's largest
    /// cost per request in the filter bench, beside allocation).
    pub(crate) properties: BTreeMap<Vec<u8>, Vec<u8>>,
    pub(crate) local_response: Option<LocalResponse>,
    /// Every `proxy_continue_stream` call, in order.
    pub(crate) continued: Vec<StreamType>,
    /// Every `proxy_close_stream` call, in order.
    pub(crate) closed: Vec<StreamType>,
}

/// A dispatched http call waiting for its answer.
#[derive(Debug, Clone)]
pub(crate) struct PendingCall {
    pub(crate) token: u32,
    /// The context that dispatched it; it receives `proxy_on_http_call_response`.
    pub(crate) context: u32,
    pub(crate) call: HttpCall,
    pub(crate) dispatched_at_nanos: u64,
}

/// The response of the http call being delivered, readable only during
/// `proxy_on_http_call_response` (Envoy drops it after the callback).
#[derive(Debug, Clone)]
pub(crate) struct DeliveredCall {
    pub(crate) response: Option<Response>,
}

/// What a `Store` carries for one worker VM.
pub(crate) struct HostState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) shared: Shared,
    pub(crate) worker: usize,
    pub(crate) vm_id: String,
    pub(crate) root_context: u32,
    pub(crate) plugin_configuration: Vec<u8>,
    pub(crate) vm_configuration: Vec<u8>,
    /// Properties of the plugin (`plugin_name`, `plugin_root_id`, …), visible from any context.
    pub(crate) plugin_properties: BTreeMap<Vec<u8>, Vec<u8>>,
    pub(crate) log_level: LogLevel,
    /// Clusters `proxy_http_call` accepts (Envoy: the thread-local cluster must exist).
    pub(crate) clusters: Arc<HashSet<String>>,
    /// The context host calls act on: the one the host called into, or the one set by
    /// `proxy_set_effective_context`.
    pub(crate) effective: u32,
    pub(crate) streams: BTreeMap<u32, StreamContext>,
    pub(crate) tick_period: Duration,
    pub(crate) delivering: Option<DeliveredCall>,
    pub(crate) pending_calls: Vec<PendingCall>,
    pub(crate) next_token: u32,
    /// `proxy_get_status`: the outcome of the last delivered http call.
    pub(crate) last_status: (u32, String),
    /// Contexts whose `proxy_on_done` returned false, waiting for `proxy_done`.
    pub(crate) awaiting_done: HashSet<u32>,
    /// Contexts that called `proxy_done` and are ready for `proxy_on_log` + `proxy_on_delete`.
    pub(crate) ready_to_finalize: Vec<u32>,
    pub(crate) memory: Option<Memory>,
    pub(crate) allocate: Option<crate::vm::Export<i32, i32>>,
    /// Calls the guest made into the host (proxy-wasm and WASI imports alike) since the VM
    /// started: what a request costs in boundary crossings, which Envoy pays for each.
    pub(crate) host_calls: u64,
}

impl HostState {
    pub(crate) fn stream(&self) -> Option<&StreamContext> {
        self.streams.get(&self.effective)
    }

    pub(crate) fn stream_mut(&mut self) -> Option<&mut StreamContext> {
        self.streams.get_mut(&self.effective)
    }

    pub(crate) fn is_known_context(&self, id: u32) -> bool {
        id == self.root_context || self.streams.contains_key(&id)
    }
}
