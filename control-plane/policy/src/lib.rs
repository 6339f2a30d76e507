//! The policy source: the balancing policy from a file or a Kubernetes ConfigMap, validated by
//! `fulcrum-core`, with the last good policy kept and a bounded history to roll back to,
//! durable and agreed between replicas when a status ConfigMap is configured.
//!
//! A [`PolicyStore`] holds the accepted versions and publishes the current one on a
//! [`tokio::sync::watch`] channel. Sources offer it text: a [`PolicyFile`] polled for changes,
//! or a [`PolicyConfigMap`] key watched with kube-rs. Text is parsed and validated as a whole
//! ([`fulcrum_core::Policy::from_yaml`] / [`from_json`](fulcrum_core::Policy::from_json)); a
//! bad policy is rejected with every error logged (one `tracing` event per invalid field, with
//! its path) and counted, and the current policy stays, as Envoy keeps its last good
//! configuration after a NACK. [`PolicyStore::rollback`] makes an earlier accepted version
//! current again, as a new version, the way `helm rollback` records a new revision.
//!
//! What the store decides is one [`PolicyRecord`], changed only by its pure rules. With a
//! [`PolicyStatus`] the record lives in a ConfigMap the control plane owns, written with
//! compare-and-swap and watched by every replica: the accepted policy, its history and
//! rollbacks survive restarts and are the same on every replica.

mod configmap;
mod file;
mod record;
mod status;
mod store;

pub use configmap::PolicyConfigMap;
pub use file::PolicyFile;
pub use record::{PolicyRecord, RecordError, source_digest};
pub use status::{MAX_RECORD_BYTES, PolicyStatus, RECORD_KEY, StatusError};
pub use store::{
    AppliedPolicy, DEFAULT_HISTORY, OfferError, Offered, PolicyFormat, PolicyMetrics,
    PolicyRejected, PolicyStore, RollbackError,
};
