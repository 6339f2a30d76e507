//! fulcrum's self-registration registry.
//!
//! Service instances register themselves (address, tags, capabilities, metadata, an active
//! health check, a TTL) over REST or gRPC with a bearer token, heartbeat within their TTL,
//! and are discovered by name and filters, or picked one at a time by the service's
//! balancing policy. Registrations reach Envoy and the filters as endpoints through
//! [`RegistrySource`], a [`fulcrum_sources::Source`].
//!
//! Layout, in the shape of pingora's discovery / health / selection split:
//! - [`model`]: what a client sends and its validation (no IO);
//! - [`admission`]: what an identity may register (address classes, scopes, quotas, the
//!   registry's cap);
//! - [`view`]: the local state every read serves from, with its change history;
//! - [`backend`]: where registrations and leases live: in memory, or etcd (shared by
//!   several control-plane replicas);
//! - [`health`]: the active checks of registrations, run by the shared `fulcrum-health` crate;
//! - [`registry`]: the operations, over a backend and the view;
//! - [`api`]: the REST (axum) and gRPC (tonic) faces, with token authentication ([`auth`]);
//! - [`metrics`]: Prometheus metrics of both faces and of the live instances;
//! - [`source`]: the registry as an endpoint source.
//!
//! `docs/registry.md` describes the API for operators.

pub mod admission;
pub mod api;
pub mod auth;
pub mod backend;
pub mod health;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod source;
pub mod view;

#[cfg(test)]
mod test_support;

pub use admission::{AddressPolicy, Limits, Refusal};
pub use auth::{Identity, TokenAuth};
pub use backend::{
    BackendError, RegistryBackend,
    etcd::{EtcdBackend, EtcdConfig},
    memory::MemoryBackend,
};
pub use metrics::RegistryMetrics;
pub use model::{FieldErrors, InstanceSpec, Registration};
pub use registry::{Discovery, Query, Registry, RegistryError};
pub use source::RegistrySource;
pub use view::{HealthStatus, View};

/// Milliseconds since the Unix epoch now.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}
