//! fulcrum's Istio delivery, as code: the OCI image packer for the filter and the renderer of
//! the WasmPlugin / TrafficExtension templates with the image's digest.
//!
//! `cargo xtask oci` calls both; the manifest tests (`tests/all`) call them directly and then
//! check the result the way Istio's wasm image fetcher and the Kubernetes API server would.
//! The packer lives here rather than in xtask so the tests exercise the very code that
//! produces the release artifact.

pub mod oci;
pub mod template;
