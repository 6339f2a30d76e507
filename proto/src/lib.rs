//! fulcrum's own gRPC APIs, generated at build time from the `.proto` files in `proto/`.
//!
//! - [`registry::v1`]: `fulcrum.registry.v1.Registry`, the self-registration API (register,
//!   heartbeat, deregister, discover, watch) that the control plane's registry serves.
//!
//! The generated code is not hand-edited; the `.proto` files are the contract, and their
//! comments document every field.

/// `fulcrum.registry.*`
pub mod registry {
    /// `fulcrum.registry.v1`: the self-registration registry API.
    pub mod v1 {
        #![allow(missing_docs, missing_debug_implementations, clippy::all)]
        tonic::include_proto!("fulcrum.registry.v1");
    }
}
