//! A wasmtime host for the proxy-wasm ABI 0.2.1 that runs the real fulcrum filter (`.wasm`)
//! outside Envoy, with Envoy's semantics where Envoy defines them.
//!
//! Why: scenario tests of the balancer (spread, ejection, peak EWMA, snapshots shared between
//! workers) need the compiled filter, several workers and a clock the test controls; real
//! Envoy gives none of that deterministically. This host gives:
//! - several worker VMs of one plugin sharing shared data (with CAS), queues and metrics;
//! - a controllable clock (`proxy_get_current_time_nanoseconds` and WASI clocks);
//! - header names and values as bytes, so a test can send anything a client can (bytes that
//!   are not UTF-8, repeated or upper-case names, 60 KiB values) and see exactly what the
//!   guest left;
//! - the size of each worker's guest memory, to bound what the guest allocates;
//! - the guests' shared-data reads and writes counted, to pin what shared state costs;
//! - http calls validated like Envoy and answered by the test on a later turn;
//! - every guest callback under a fuel limit, and a named trap for any host call this host
//!   does not implement.
//!
//! ```no_run
//! use std::time::Duration;
//! use fulcrum_wasm_host::Plugin;
//! # fn main() -> anyhow::Result<()> {
//! let plugin = Plugin::load_filter()?.configure(r#"{"services": []}"#).workers(2).start()?;
//! let mut request = plugin.worker(0).request().header(":authority", "checkout").send_headers()?;
//! request.respond(200).upstream("10.0.0.1:8080").latency(Duration::from_millis(20)).finish()?;
//! plugin.advance_clock(Duration::from_secs(5));
//! plugin.tick_all()?;
//! # Ok(()) }
//! ```

mod abi;
mod context;
mod engine;
mod headers;
mod hostcalls;
mod http_call;
mod plugin;
mod property;
mod request;
mod shared;
mod vm;

pub use abi::{Action, LogLevel, StreamType};
pub use context::LocalResponse;
pub use http_call::{HttpCall, Outcome, Response};
pub use plugin::{DEFAULT_FUEL_PER_CALLBACK, Plugin, PluginBuilder, Worker, filter_wasm_path};
pub use property::{Property, response_flags};
pub use request::{Request, RequestBuilder, ResponseBuilder};
pub use shared::{LogEntry, SharedDataCalls};
