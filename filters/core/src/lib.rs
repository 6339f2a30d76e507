//! fulcrum's pure balancing core.
//!
//! Holds the policy model, its validation, and the selection and circuit-breaking
//! algorithms. It does no IO and reads no clock or randomness of its own: time and random
//! numbers are passed in, so every behaviour is deterministic under test. The proxy-wasm
//! filter, the control plane and the benches all use it.

pub mod endpoint;

pub use endpoint::{Endpoint, Health, ServiceEndpoints, Snapshot};
