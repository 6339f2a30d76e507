//! Fault injection for end-to-end tests of Envoy's wasm failure policy; compiled only with the
//! `fault-injection` feature, which the release filter never has.
//!
//! A request carrying `x-fulcrum-test-fault: panic` panics the VM, the way a bug would. The
//! tests use it to show that with `failure_policy: FAIL_RELOAD` (what fulcrum ships) Envoy
//! replaces the failed VM and the filter is back, stripping client override headers, within
//! the reload backoff.

use proxy_wasm::{hostcalls, types::MapType};

/// The header that asks for a panic.
const FAULT_HEADER: &str = "x-fulcrum-test-fault";

/// Panics when the request asks for it.
pub fn panic_if_asked() {
    if let Ok(Some(value)) =
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, FAULT_HEADER)
        && value == b"panic"
    {
        panic!("fulcrum: fault injected by {FAULT_HEADER}");
    }
}
