//! The Kubernetes source's tests, one binary: the pure mapping, and the real kube-rs client
//! and watcher against the in-process fake API server.

mod mapping;
mod watch;
