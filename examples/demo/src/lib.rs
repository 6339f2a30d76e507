//! fulcrum's demo and comparison driver.
//!
//! Starts real processes — sample backends, fulcrum's control plane, Envoy with the fulcrum
//! filter — drives bounded load through Envoy and reports what each backend got. The
//! `fulcrum-demo` binary tells the fault story; the comparison benchmark (`fulcrum-compare`)
//! sets fulcrum against Envoy's native balancers. Both build their Envoys with the one
//! bootstrap builder and launcher of `fulcrum-test-support`, the one the end-to-end tests
//! use, so every setup is made the same way.

pub mod callgrind;
pub mod load;
pub mod stack;
pub mod wrk;
