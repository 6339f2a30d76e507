//! fulcrum's pure balancing core.
//!
//! Holds the policy model, its validation, and the selection and circuit-breaking
//! algorithms. It does no IO and reads no clock or randomness of its own: time and random
//! numbers are passed in, so every behaviour is deterministic under test. The proxy-wasm
//! filter, the control plane and the benches all use it.
//!
//! - Time is `now: std::time::Duration` measured from an epoch the caller chooses (the filter:
//!   the host's clock since the Unix epoch, the same in every worker, which the rate limit's
//!   shared buckets rely on); time going backwards counts as no time passing.
//! - Randomness is any [`rng::Rng`]; [`rng::SplitMix64`] in production, [`rng::Sequence`] in
//!   tests.
//! - The per-request API is [`ServicePicker`]: `pick`, then `complete`.

/// The request header the filter writes the picked `IP:port` (then the retry targets) into,
/// and the cluster's `override_host` policy reads: the contract between the filter and the
/// clusters the control plane, the demo and the Istio manifests configure.
pub const OVERRIDE_HEADER: &str = "x-fulcrum-endpoint";

/// The native data plane's dynamic module: Envoy loads `lib<NATIVE_MODULE>.so` from the
/// directory in `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`. With [`NATIVE_LB_POLICY`] and
/// [`NATIVE_OUTCOME_FILTER`], the contract between the module and the clusters and filter
/// chains the control plane, the demo and the Istio manifests configure.
pub const NATIVE_MODULE: &str = "fulcrum_native";

/// The load-balancing policy's name inside [`NATIVE_MODULE`] (`lb_policy_name` of a cluster's
/// `DynamicModulesLoadBalancerConfig`); its configuration is the service's policy as JSON.
pub const NATIVE_LB_POLICY: &str = "fulcrum";

/// The HTTP filter's name inside [`NATIVE_MODULE`] (`filter_name` of a `DynamicModuleFilter`):
/// it reports each response's outcome to the load-balancing policy that picked.
pub const NATIVE_OUTCOME_FILTER: &str = "fulcrum_outcomes";

/// The request header [`NATIVE_OUTCOME_FILTER`] names a request's stream in for the module's
/// `choose_host`: an opaque random id, like `x-request-id`. It reaches the upstream: Envoy's
/// upstream filters edit the request's own header map, so removing it after the first host
/// selection would hide the stream from every retry's `choose_host` (docs/native.md).
pub const NATIVE_STREAM_HEADER: &str = "x-fulcrum-stream";

pub mod breaker;
pub mod decimal;
pub mod diagnostics;
pub mod distribution;
pub mod duration;
pub mod ejections;
pub mod endpoint;
pub mod mesh;
pub mod policy;
pub mod ratelimit;
pub mod receive;
pub mod replica;
pub mod rng;
#[cfg(feature = "schema")]
pub mod schema;
pub mod select;
pub mod service;
pub mod tables;
pub mod validate;
pub mod version;
pub mod window;
#[cfg(feature = "yaml")]
pub mod yaml;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

pub use service::{
    EndpointView, Outcome, Pick, PickExplanation, Rejection, RequestAttributes, RequestInputs,
    RequestNeeds, RequestSent, RetryTargets, Served, ServicePicker, Transition, Transitions,
    response_flags,
};

pub use breaker::BreakerState;
pub use endpoint::{Attributes, Endpoint, Health, ServiceEndpoints, Snapshot, UpstreamProtocol};
pub use policy::{DataPlane, LoadBalancer, OnNoEndpoint, Policy, ServicePolicy};
pub use select::sticky::SessionKeys;
pub use validate::{PolicyError, ValidationError, ValidationErrors};
