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
//! Its tests run kube-rs against the fake API server of `fulcrum-test-support` (feature
//! `kube-api`), which speaks the real list/watch protocol.

pub mod left_out;
pub mod mapping;
mod source;

pub use left_out::{LeftOut, Reason};
pub use mapping::{Mapped, Mapping, cluster_name, endpoint_health, port_protocol};
pub use source::{KubeOptions, KubeSource, KubeSourceError, KubeSourceMetrics, LeftOutLabels};
