//! fulcrum's Istio delivery, as code: the OCI image packers for the filter and the control
//! plane, and the renderer of the WasmPlugin / TrafficExtension templates with the filter
//! image's digest.
//!
//! `cargo xtask oci` and `cargo xtask image` call them; the manifest tests (`tests/all`) call
//! them directly and then check the result the way Istio's wasm image fetcher, a container
//! runtime and the Kubernetes API server would. The packers live here rather than in xtask
//! so the tests exercise the very code that produces the release artifacts.

pub mod image;
pub mod oci;
pub mod template;
