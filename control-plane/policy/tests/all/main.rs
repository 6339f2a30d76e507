//! The policy source's tests, one binary: the store, the polled file, and the ConfigMap
//! watched with kube-rs against the in-process fake API server.

mod configmap;
mod file;
mod status;
mod store;
mod support;
