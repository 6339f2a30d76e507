//! One probe of one target ([`Prober`]), and the loop that probes it forever ([`ProbeLoop`]).

use std::{net::SocketAddr, time::Duration};

use fulcrum_core::{
    policy::{HealthCheck, Probe},
    rng::{Rng, SplitMix64},
};
use prometheus_client::metrics::counter::Counter;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tracing::debug;

use crate::{Checker, HealthMetrics, HealthStatus};

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting or the request failed.
    #[error("{0}")]
    Failed(String),
    /// An answer that does not pass.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

/// Probes one target with reusable clients.
#[derive(Debug)]
pub struct Prober {
    /// The HTTP client, or why it could not be built (each HTTP probe then fails with it).
    http: Result<reqwest::Client, String>,
    grpc: Option<HealthClient<tonic::transport::Channel>>,
}

impl Prober {
    /// A prober for `check` (gRPC channels connect lazily and are reused across probes).
    pub fn new(check: &HealthCheck, target: SocketAddr) -> Self {
        let grpc = matches!(check.probe, Probe::Grpc { .. })
            .then(|| {
                tonic::transport::Endpoint::from_shared(format!("http://{target}"))
                    .ok()
                    .map(|endpoint| {
                        HealthClient::new(
                            endpoint
                                .connect_timeout(check.timeout)
                                .timeout(check.timeout)
                                .connect_lazy(),
                        )
                    })
            })
            .flatten();
        // Redirects are answers, judged by their status as Envoy's HTTP health checker does;
        // following one would let an endpoint point the prober at any address (SSRF).
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(check.timeout)
            .pool_max_idle_per_host(1)
            .build()
            .map_err(|error| error.to_string());
        Self { http, grpc }
    }

    /// Runs one probe against `target`.
    pub async fn probe(
        &mut self,
        check: &HealthCheck,
        target: SocketAddr,
    ) -> Result<(), ProbeError> {
        let probe = async {
            match &check.probe {
                Probe::Tcp { .. } => tokio::net::TcpStream::connect(target)
                    .await
                    .map(drop)
                    .map_err(|error| ProbeError::Failed(format!("tcp connect: {error}"))),
                Probe::Http {
                    path,
                    expected_statuses,
                    ..
                } => {
                    let http = self
                        .http
                        .as_ref()
                        .map_err(|error| ProbeError::Failed(format!("no HTTP client: {error}")))?;
                    let response = http
                        .get(format!("http://{target}{path}"))
                        .send()
                        .await
                        .map_err(|error| ProbeError::Failed(format!("http: {error}")))?;
                    let status = response.status().as_u16();
                    let passes = if expected_statuses.is_empty() {
                        (200..300).contains(&status)
                    } else {
                        expected_statuses.contains(&status)
                    };
                    if passes {
                        Ok(())
                    } else {
                        Err(ProbeError::Unexpected(format!("HTTP status {status}")))
                    }
                }
                Probe::Grpc { service, .. } => {
                    let client = self.grpc.as_mut().ok_or_else(|| {
                        ProbeError::Failed(format!("no gRPC endpoint for {target}"))
                    })?;
                    let response = client
                        .check(HealthCheckRequest {
                            service: service.clone(),
                        })
                        .await
                        .map_err(|status| ProbeError::Failed(format!("grpc: {status}")))?;
                    match ServingStatus::try_from(response.into_inner().status) {
                        Ok(ServingStatus::Serving) => Ok(()),
                        Ok(other) => Err(ProbeError::Unexpected(format!(
                            "serving status {}",
                            other.as_str_name()
                        ))),
                        Err(_) => Err(ProbeError::Unexpected("unknown serving status".into())),
                    }
                }
            }
        };
        tokio::time::timeout(check.timeout, probe)
            .await
            .unwrap_or(Err(ProbeError::Timeout(check.timeout)))
    }
}

/// Probes one target forever: the first probe after `0..jitter`, then one every `interval`
/// plus `0..jitter`, each counted in `fulcrum_health_checks_total`.
#[derive(Debug)]
pub struct ProbeLoop {
    check: HealthCheck,
    target: SocketAddr,
    prober: Prober,
    checker: Checker,
    rng: SplitMix64,
    wait: Duration,
    success: Counter,
    failure: Counter,
}

impl ProbeLoop {
    /// A loop probing `target` with `check`, counted under `cluster`; `key` (unique to this
    /// check, e.g. a registration id) seeds the jitter, so it differs between targets.
    pub fn new(
        check: HealthCheck,
        target: SocketAddr,
        cluster: &str,
        key: &str,
        metrics: &HealthMetrics,
    ) -> Self {
        let (success, failure) = metrics.counters(cluster);
        Self {
            prober: Prober::new(&check, target),
            check,
            target,
            checker: Checker::default(),
            rng: SplitMix64::new(seed(key)),
            wait: Duration::ZERO,
            success,
            failure,
        }
    }

    /// The probed address.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Probes until the status changes and returns it (`Healthy` or `Unhealthy`).
    pub async fn next_change(&mut self) -> HealthStatus {
        loop {
            tokio::time::sleep(self.wait + self.check.jitter.mul_f64(self.rng.unit())).await;
            self.wait = self.check.interval;
            let result = self.prober.probe(&self.check, self.target).await;
            match &result {
                Ok(()) => self.success.inc(),
                Err(error) => {
                    debug!(target = %self.target, %error, "health probe failed");
                    self.failure.inc()
                }
            };
            if let Some(status) = self.checker.observe(
                result.is_ok(),
                self.check.healthy_threshold,
                self.check.unhealthy_threshold,
            ) {
                return status;
            }
        }
    }
}

/// A seed for one check's jitter, from its key (repeatable, and different per key).
fn seed(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
    })
}
