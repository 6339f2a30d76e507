//! Integration tests of the wasm host, as one binary: `abi` checks the host's ABI with
//! hand-written WAT guests; `filter` runs scenarios against the real fulcrum filter;
//! `explain` which responses say why their request went where it did; `golden` that the filter
//! and the native module's adapter pick alike for the same requests and outcomes;
//! `snapshots` how it takes control-plane snapshots and charges outcomes;
//! `snapshot_distribution` how the VMs of a proxy share them, one key per service;
//! `rate_limit` how the workers of a proxy share one limit; `replicas` how it follows one
//! control-plane replica; `shared_ejections` how an ejection on one worker reaches the
//! others; `node_locality` how the proxy's zone and region come from its node; `proxy_report` what
//! each poll tells the control plane about the proxy; `diagnostics` what its workers report
//! about a service's endpoints when the control plane asks; `untrusted_input` sends it hostile headers, properties and snapshot responses, and
//! `untrusted_input_property` thousands of generated ones; `host_calls` and `guest_work` what a
//! request costs in host calls and in the guest's own operators.

mod abi;
mod diagnostics;
mod explain;
mod filter;
mod golden;
mod grpc;
mod guest_work;
mod host_calls;
mod node_locality;
mod proxy_report;
mod rate_limit;
mod replicas;
mod shared_ejections;
mod snapshot_distribution;
mod snapshots;
mod test_support;
mod untrusted_input;
mod untrusted_input_property;
