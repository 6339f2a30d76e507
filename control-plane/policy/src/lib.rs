//! The policy source: the balancing policy from a file or a Kubernetes ConfigMap, validated by
//! `fulcrum-core`, with the last good policy kept and a bounded history to roll back to.
//!
//! A [`PolicyStore`] holds the accepted versions and publishes the current one on a
//! [`tokio::sync::watch`] channel. Sources offer it text: a [`PolicyFile`] polled for changes,
//! or a [`PolicyConfigMap`] key watched with kube-rs. Text is parsed and validated as a whole
//! ([`fulcrum_core::Policy::from_yaml`] / [`from_json`](fulcrum_core::Policy::from_json)); a
//! bad policy is rejected with every error logged (one `tracing` event per invalid field, with
//! its path) and counted, and the current policy stays, as Envoy keeps its last good
//! configuration after a NACK. [`PolicyStore::rollback`] makes an earlier accepted version
//! current again, as a new version, the way `helm rollback` records a new revision.

mod configmap;
mod file;
mod store;

pub use configmap::PolicyConfigMap;
pub use file::PolicyFile;
pub use store::{
    AppliedPolicy, DEFAULT_HISTORY, Offered, PolicyFormat, PolicyMetrics, PolicyRejected,
    PolicyStore, RollbackError,
};
