//! fulcrum's xDS control plane core: the snapshot cache and the ADS server.
//!
//! Split like go-control-plane (`pkg/cache/v3` vs `pkg/server/v3`): [`cache`] turns a
//! [`fulcrum_core::Snapshot`] into versioned, once-encoded Envoy resources ([`resources`]
//! says what they contain) and never touches a stream; [`server`] streams them to Envoy over
//! ADS (state of the world and delta) and never builds a resource. [`status`] and
//! [`metrics`] record what every Envoy accepted and rejected; [`trace`] carries the trace of
//! the change that made a snapshot to the pushes and ACKs of its version.

pub mod cache;
pub mod metrics;
pub mod resources;
pub mod server;
pub mod status;
pub mod trace;

pub use cache::{EncodedResource, ResourceType, SnapshotCache, UpdateSummary, XdsSnapshot};
pub use metrics::XdsMetrics;
pub use resources::ClusterOptions;
pub use server::{AdsServer, AdsService, DEFAULT_MAX_STREAMS};
pub use status::{Nack, NodeRegistry, StreamKind, StreamStatus, TypeStatus, TypeStatuses};
pub use trace::ChangeTrace;
