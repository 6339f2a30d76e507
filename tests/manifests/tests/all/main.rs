//! The manifest tests, one binary: every object under `istio/` against the Kubernetes types
//! (strictly) and the Istio CRD schemas, the policy ConfigMap against fulcrum-core, the
//! filter's pluginConfig against the filter's own parser, and the OCI image the packer writes
//! against what Istio's wasm image fetcher reads, the control plane's container image against
//! what a container runtime reads, and the alerts and dashboard against the
//! metrics the code defines.

mod crds;
mod image;
mod kubernetes;
mod observability;
mod oci;
mod plugin;
mod test_support;
