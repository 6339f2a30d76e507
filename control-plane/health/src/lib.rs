//! fulcrum's active health checks, shared by the registry and the control plane.
//!
//! Modelled on Envoy's active health checking. A check ([`fulcrum_core::policy::HealthCheck`],
//! one model for the policy's `health_check` and the registry's registrations) probes one
//! target every `interval` plus a random `0..jitter`, fails a probe that takes longer than
//! `timeout`, and moves the target's health only after `healthy_threshold` consecutive passes
//! or `unhealthy_threshold` consecutive failures.
//!
//! - [`checker`]: the thresholds, a pure state machine, and [`HealthStatus`], the one model
//!   of a check's result;
//! - [`probe`]: one HTTP / TCP / gRPC probe ([`Prober`]) and the probe loop ([`ProbeLoop`]);
//! - [`hub`]: one probe task per (target, check) in the process, shared by all who follow it
//!   ([`ProbeHub`]), so nothing is probed twice;
//! - [`reconcile`]: the one reconciler keeping the probes a component follows equal to what it
//!   wants, reporting status changes ([`Reconciler`]);
//! - [`metrics`]: `fulcrum_health_checks_total{cluster, result}`.
//!
//! The control-plane stage that probes every endpoint whose policy asks for a check is
//! `fulcrum-pipeline`'s `health`; the registry's checks of its registrations are in
//! `fulcrum-registry`.

pub mod checker;
pub mod hub;
pub mod metrics;
pub mod probe;
pub mod reconcile;

pub use checker::{Checker, HealthStatus};
pub use hub::{ProbeHub, Subscription};
pub use metrics::HealthMetrics;
pub use probe::{ProbeError, ProbeLoop, Prober};
pub use reconcile::{Reconciler, Report, Wanted};
