//! fulcrum's demo and comparison driver.
//!
//! Starts real processes — sample backends, fulcrum's control plane, Envoy with the fulcrum
//! filter — drives bounded load through Envoy and reports what each backend got. The
//! `fulcrum-demo` binary tells the fault story; the end-to-end tests and the comparison
//! benchmark reuse the same Envoy configurations ([`envoy_config`]) so fulcrum and Envoy's
//! native balancers are compared on identical setups.

pub mod envoy_config;
pub mod load;
pub mod process;
pub mod stack;
