//! Shared fixtures: the WAT guests and the real filter's loader.

use std::time::Duration;

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
