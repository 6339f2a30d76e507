//! End-to-end tests of the control plane against real Envoy (one test binary).

mod support;

mod binary;
mod kube_and_policy;
mod limits;
mod otlp;
mod proxies;
mod registry;
mod replicas;
mod snapshot_api;
mod tls;
mod xds_envoy;
