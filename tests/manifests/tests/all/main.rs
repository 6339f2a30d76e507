//! The manifest tests, one binary: every object under `istio/`, and every object its
//! kustomizations render (with and without the registry), against the Kubernetes types
//! (strictly) and the Istio CRD schemas; the Deployment's flags against the control plane's
//! binary; the policy ConfigMap against fulcrum-core; the filter's pluginConfig against the
//! filter's own parser; the filter's OCI image against what Istio's wasm image fetcher reads
//! and the control plane's image against what a container runtime reads; the alerts and the
//! dashboard against the metrics the code defines; the EnvoyFilter patches and the WasmPlugin,
//! applied as istiod applies them, against Envoy 1.40 with the real filter and module.

mod crds;
mod envoy_config;
mod image;
mod kubernetes;
mod kustomize;
mod observability;
mod oci;
mod plugin;
mod registry;
mod test_support;
