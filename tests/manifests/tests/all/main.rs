//! The manifest tests, one binary: every object under `istio/` against the Kubernetes types
//! (strictly) and the Istio CRD schemas, the policy ConfigMap against fulcrum-core, the
//! filter's pluginConfig against the filter's own parser, and the OCI image the packer writes
//! against what Istio's wasm image fetcher reads.

mod crds;
mod kubernetes;
mod oci;
mod plugin;
mod test_support;
