//! What fulcrum's tests, the demo and the comparison benchmark share to run real processes
//! on loopback, in one place so each exists once.
//!
//! - [`envoy`]: the one Envoy bootstrap builder ([`Bootstrap`]) and the launcher of a real
//!   Envoy ([`Envoy`]) with its admin API;
//! - [`process`]: a child process guard ([`Process`]): its output in a log file, killed on
//!   drop, the log's tail printed when a test panics and carried by every error;
//! - [`ports`]: loopback ports for children that must bind a given port themselves
//!   ([`reserve_port`]), which no other test process and no kernel-chosen port can take;
//! - [`eventually`]: the one bounded wait on eventually consistent state;
//! - `kube_api` (feature `kube-api`): an in-process fake Kubernetes API server speaking the
//!   real list/watch protocol, for anything that watches Kubernetes objects with kube-rs.
//!
//! Everything binds 127.0.0.1 only. Errors are [`Error`]; the fake API server, made for
//! test bodies, panics instead.

pub mod envoy;
mod error;
mod eventually;
#[cfg(feature = "kube-api")]
pub mod kube_api;
pub mod ports;
pub mod process;

pub use envoy::{
    AdsApi, Bootstrap, ClusterBalancing, ClusterHost, ClusterOptions, Endpoints, Envoy,
    EnvoyOptions, FailurePolicy, FilterSetup, HealthCheck, Ingress, NodeLocality, RETRY_ON_GRPC,
    RETRY_ON_HTTP, UpstreamProtocol,
};
pub use error::Error;
pub use eventually::{Ready, eventually};
pub use ports::{loopback, reserve_port};
pub use process::Process;
