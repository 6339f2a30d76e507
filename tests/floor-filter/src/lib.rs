//! The floor: a proxy-wasm HTTP filter that does nothing.
//!
//! `cargo xtask bench` runs one Envoy three ways over the same backends and route: native
//! round robin, this filter in front of the same `override_host` cluster fulcrum uses, and
//! fulcrum. Every HTTP context here answers each callback Envoy makes (request headers,
//! response headers, log, done) with the SDK's default, `Continue`, and makes no host call, so
//! the difference between this filter and native round robin is what running *any* wasm
//! filter in Envoy's V8 costs, and the difference between fulcrum and this filter is
//! fulcrum's own work. Built the same way as fulcrum's filter (release, `wasm32-wasip1`, the
//! same proxy-wasm SDK), so the two differ only in what their callbacks do.

use proxy_wasm::{
    traits::{Context, HttpContext, RootContext},
    types::ContextType,
};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(FloorRoot));
}}

/// Accepts any configuration and hands every stream a [`Floor`].
struct FloorRoot;

impl Context for FloorRoot {}

impl RootContext for FloorRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One stream: every callback is the SDK's default (`Continue`, no host call).
struct Floor;

impl Context for Floor {}

impl HttpContext for Floor {}
