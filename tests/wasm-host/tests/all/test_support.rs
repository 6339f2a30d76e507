//! Shared fixtures: the WAT guests and the real filter's loader.

use std::time::Duration;

use fulcrum_core::OVERRIDE_HEADER;
use fulcrum_wasm_host::{Plugin, PluginBuilder};

/// The ABI test guest (see `guests/abi.wat`), with the cluster its ticks call declared.
pub fn abi_guest() -> PluginBuilder {
    Plugin::from_wat(include_str!("guests/abi.wat"))
        .expect("guests/abi.wat compiles")
        .cluster("control-plane")
}

/// A guest whose `proxy_on_vm_start` runs `body` (WAT instructions), with `imports` declared.
pub fn vm_start_guest(imports: &str, body: &str) -> PluginBuilder {
    let wat = format!(
        r#"(module {imports}
             (memory (export "memory") 1)
             (func (export "proxy_on_vm_start") (param i32 i32) (result i32) {body} (i32.const 1)))"#
    );
    Plugin::from_wat(wat).expect("the guest compiles")
}

/// The real filter, from `FULCRUM_FILTER_WASM` or the release build in the target dir.
pub fn filter() -> PluginBuilder {
    Plugin::load_filter().expect("the fulcrum filter loads")
}

pub fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// One request for `checkout` on worker 0 (`:authority` and `x-service` name it, plus
/// `headers`), answered `status` 1 ms later by the endpoint the filter picked: the unit the
/// cost budgets (`host_calls`, `guest_work`) count in.
pub fn request_answered_by_the_pick(plugin: &Plugin, status: u16, headers: &[(&str, &str)]) {
    let mut builder = plugin
        .worker(0)
        .request()
        .header(":authority", "checkout")
        .header("x-service", "checkout")
        .header(":path", "/");
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    let mut request = builder.send_headers().expect("request headers");
    let header = request.request_header(OVERRIDE_HEADER).expect("a pick");
    // The pick, then its retry targets.
    let pick = header.split(',').next().expect("an address");
    plugin.advance_clock(ms(1));
    request
        .respond(status)
        .upstream(pick)
        .finish()
        .expect("the response");
}
