//! fulcrum's release artifacts, as code: the OCI image packers for the filter ([`oci`]) and
//! the control plane ([`image`]), and the renderer of the WasmPlugin / TrafficExtension
//! templates with the filter image's digest ([`template`]).
//!
//! `cargo xtask oci` and `cargo xtask image` call them to release; the manifest tests
//! (`tests/manifests`) call the very same code and then check the result the way Istio's wasm
//! image fetcher, a container runtime and the Kubernetes API server would. They live beside
//! xtask, which owns the release, as a library because a test crate cannot depend on a binary.

pub mod image;
pub mod oci;
pub mod template;
