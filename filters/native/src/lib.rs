//! fulcrum's balancing core as a native Envoy load-balancing policy: a dynamic module
//! (`libfulcrum_native.so`) for Envoy 1.40's `envoy.load_balancing_policies.dynamic_modules`,
//! with a companion HTTP filter that feeds each response back to the same state.
//!
//! The wasm filter cannot choose a host: it writes one into a header for Envoy's
//! `override_host` policy. This module *is* the cluster's policy: `choose_host` returns the
//! host `fulcrum-core` picked, under the same policy JSON (one service's
//! [`ServicePolicy`](fulcrum_core::ServicePolicy), see [`config`]), with the same algorithms,
//! breakers and outcome handling. See `docs/native.md` for the Envoy configuration, how it
//! compares with the wasm filter and its limits.
//!
//! Modules:
//! - [`config`]: the policy JSON a cluster gives the module, parsed and validated by the core;
//! - [`hosts`]: Envoy's host set as the core's endpoints, and back from an address to the host;
//! - [`balancer`]: the per-cluster shared picker and the per-worker LB (`choose_host`);
//! - [`outcomes`]: the `fulcrum_outcomes` HTTP filter's logic (one stream per request, its
//!   outcome charged to the pick);
//! - `guard`: every hook's body behind `catch_unwind`, failing open on a panic;
//! - `ffi`: the only module with `unsafe`: the ABI subset used (declared by hand from Envoy
//!   1.40's `abi.h`), the exported event hooks, each behind `catch_unwind`. It is left out of
//!   test builds: its callbacks are symbols of the Envoy binary.
//!
//! Everything but `ffi` is safe Rust, tested without Envoy (over
//! [`hosts::test_hosts`]); the wasm host's golden test (`tests/wasm-host/tests/all/golden.rs`)
//! drives it beside the real wasm filter and checks both pick alike; the e2e tests
//! (`tests/e2e/tests/all/native.rs`) run the `.so` in Envoy 1.40.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod balancer;
pub mod config;
#[cfg(not(test))]
mod ffi;
mod guard;
pub mod hosts;
pub mod outcomes;

use std::{sync::OnceLock, time::Instant};

/// Time since the module's first use: the monotonic clock every pick and outcome of the
/// process is measured on (the core only needs one epoch per picker).
pub fn now() -> std::time::Duration {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}
