//! fulcrum's active health checks, shared by the registry and the control plane.
//!
//! Modelled on Envoy's active health checking. A check ([`fulcrum_core::policy::HealthCheck`],
//! one model for the policy's `health_check` and the registry's registrations) probes one
//! target every `interval` plus a random `0..jitter`, fails a probe that takes longer than
//! `timeout`, and moves the target's health only after `healthy_threshold` consecutive passes
//! or `unhealthy_threshold` consecutive failures.
//!
//! - [`checker`]: the thresholds, a pure state machine;
//! - [`probe`]: one HTTP / TCP / gRPC probe ([`Prober`]) and the probe loop ([`ProbeLoop`]);
//! - [`metrics`]: `fulcrum_health_checks_total{cluster, result}`.
//!
//! The control-plane stage that probes every endpoint whose policy asks for a check is
//! `fulcrum-pipeline`'s `health`; the registry's checks of its registrations are in
//! `fulcrum-registry`.

pub mod checker;
pub mod metrics;
pub mod probe;

pub use checker::{Checker, Status};
pub use metrics::HealthMetrics;
pub use probe::{ProbeError, ProbeLoop, Prober};
