//! The Kubernetes endpoint source: EndpointSlices and Services watched with kube-rs, mapped to
//! clusters the way Istio fills them.
//!
//! In the kube-rs shape *watcher → reflector store → consumer*: one
//! [`watcher`](kube::runtime::watcher()) per kind and namespace (it lists, watches from the
//! list's `resourceVersion`, follows bookmarks, and relists after `410 Gone`), each feeding a
//! [`reflector`](kube::runtime::reflector()) store; the [`KubeSource`] recomputes the whole
//! service set from the stores ([`mapping`]) after every change and publishes it when it
//! differs. Nothing is published until every store has listed once, so a slow watcher never
//! empties clusters.
//!
//! The `test_support` module (feature `test-support`) holds an in-process fake API server
//! speaking the real list/watch protocol, for this crate's tests and other crates' watchers.

pub mod mapping;
mod source;
#[cfg(feature = "test-support")]
pub mod test_support;

pub use mapping::{Mapping, cluster_name, endpoint_health};
pub use source::{KubeOptions, KubeSource, KubeSourceError};
