//! fulcrum's proxy-wasm balancer filter: a thin adapter between Envoy and `fulcrum-core`.
//!
//! Envoy runs this filter in its HTTP filter chain (V8 runtime, one VM per worker). Per
//! request it picks the upstream endpoint and writes it into the header that the cluster's
//! `override_host` load-balancing policy reads; on the response it feeds the outcome to the
//! core's breakers and latency estimates. See `docs/filter.md` for the configuration, the
//! Envoy setup it needs and its stats.
//!
//! Modules follow the proxy-wasm SDK's shape: [`root`] (the root context: configuration,
//! snapshot polling and sharing) and [`http`] (one context per request), over `worker`
//! (the per-VM balancing state). [`input`] reads every request header and property, none of
//! which the filter trusts; `report` is what each snapshot poll tells the control plane
//! about the proxy, and `diagnostics` what its workers believe about a service's endpoints
//! when the control plane asks (`fulcrum endpoints`).

pub mod config;
mod diagnostics;
#[cfg(feature = "fault-injection")]
mod fault;
pub mod http;
pub mod input;
mod metrics;
mod report;
pub mod root;
mod shared_snapshot;
mod sync;
mod worker;

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::{hostcalls, types::LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| Box::new(root::Root::new(context_id)));
}}

/// Host time since the Unix epoch: the clock every pick, outcome and lease is measured on.
/// A host error reads as the epoch; the core treats time going backwards as no time passing.
fn now() -> Duration {
    hostcalls::get_current_time()
        .ok()
        .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default()
}

fn log(level: LogLevel, message: &str) {
    // Logging failures have nowhere to be reported.
    let _ = hostcalls::log(level, message);
}

fn log_debug(message: &str) {
    log(LogLevel::Debug, message);
}

fn log_info(message: &str) {
    log(LogLevel::Info, message);
}

fn log_warn(message: &str) {
    log(LogLevel::Warn, message);
}

fn log_error(message: &str) {
    log(LogLevel::Error, message);
}
