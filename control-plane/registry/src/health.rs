//! Active health checks: HTTP, TCP and gRPC probes per registration, with thresholds.
//!
//! Modelled on Envoy's active health checking: each registration with a check gets its own
//! task that probes every `interval` plus a random `0..jitter` (so probes of many instances
//! do not align), fails a probe that takes longer than `timeout`, and moves the instance's
//! health only after `healthy_threshold` consecutive passes or `unhealthy_threshold`
//! consecutive failures ([`Checker`], a pure state machine). Results go into the [`View`],
//! so they reach Discover, Watch and the published endpoints (Envoy sees `UNHEALTHY`).
//! Every control-plane replica probes on its own, as every Envoy does.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Weak},
    time::Duration,
};

use fulcrum_core::rng::{Rng, SplitMix64};
use tokio::task::JoinHandle;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tracing::{debug, info};

use crate::{
    model::{HealthCheck, Probe},
    view::{HealthStatus, Record, Since, View},
};

/// Consecutive probe results and the health they add up to. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checker {
    health: HealthStatus,
    /// Consecutive passes (reset by a failure).
    passes: u32,
    /// Consecutive failures (reset by a pass).
    failures: u32,
}

impl Checker {
    /// The health so far.
    pub fn health(&self) -> HealthStatus {
        self.health
    }

    /// Records one probe result; returns the new health when it changed.
    ///
    /// From `Unknown` or `Unhealthy`, `healthy_threshold` consecutive passes make it
    /// `Healthy`; from `Unknown` or `Healthy`, `unhealthy_threshold` consecutive failures make
    /// it `Unhealthy`.
    pub fn observe(
        &mut self,
        passed: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<HealthStatus> {
        if passed {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
        }
        let next = match self.health {
            HealthStatus::Unknown | HealthStatus::Unhealthy
                if self.passes >= healthy_threshold.max(1) =>
            {
                HealthStatus::Healthy
            }
            HealthStatus::Unknown | HealthStatus::Healthy
                if self.failures >= unhealthy_threshold.max(1) =>
            {
                HealthStatus::Unhealthy
            }
            unchanged => unchanged,
        };
        (next != self.health).then(|| {
            self.health = next;
            next
        })
    }
}

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
    http: reqwest::Client,
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
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(check.timeout)
            .pool_max_idle_per_host(1)
            .build()
            .unwrap_or_default();
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
                    let response = self
                        .http
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

/// The address a check probes: the instance's IP at the probe's port.
pub fn probe_target(record: &Record, check: &HealthCheck) -> SocketAddr {
    let port = match check.probe {
        Probe::Http { port, .. } | Probe::Tcp { port } | Probe::Grpc { port, .. } => port,
    };
    SocketAddr::new(record.registration.address.ip(), port)
}

/// Runs the checks of every registration in `view` until the view is dropped: starts a
/// task per registration with a check, restarts it when the check or address changes, and
/// stops it when the registration goes.
pub fn spawn_monitor(view: &Arc<View>) -> JoinHandle<()> {
    let weak = Arc::downgrade(view);
    let mut revisions = view.subscribe();
    tokio::spawn(async move {
        let mut running: HashMap<String, (Arc<Record>, JoinHandle<()>)> = HashMap::new();
        let mut cursor = None;
        loop {
            {
                let Some(view) = weak.upgrade() else { break };
                let (since, now) = view.since(cursor.as_ref());
                cursor = Some(now);
                match since {
                    Since::Reset(entries) => {
                        let mut keep = HashMap::new();
                        for entry in entries {
                            keep.insert(entry.record.registration.id.clone(), ());
                            reconcile(
                                &weak,
                                &mut running,
                                &entry.record.registration.id.clone(),
                                Some(entry.record),
                            );
                        }
                        let gone: Vec<String> = running
                            .keys()
                            .filter(|id| !keep.contains_key(*id))
                            .cloned()
                            .collect();
                        for id in gone {
                            reconcile(&weak, &mut running, &id, None);
                        }
                    }
                    Since::Changes(changes) => {
                        for change in changes {
                            reconcile(
                                &weak,
                                &mut running,
                                &change.id,
                                change.entry.map(|e| e.record),
                            );
                        }
                    }
                }
            }
            if revisions.changed().await.is_err() {
                break;
            }
        }
        for (_, (_, task)) in running {
            task.abort();
        }
    })
}

/// Makes the task for `id` match `record` (None: no task).
fn reconcile(
    view: &Weak<View>,
    running: &mut HashMap<String, (Arc<Record>, JoinHandle<()>)>,
    id: &str,
    record: Option<Arc<Record>>,
) {
    let wanted = record.filter(|record| record.registration.health_check.is_some());
    if let (Some(wanted), Some((current, _))) = (&wanted, running.get(id))
        && wanted.registration.health_check == current.registration.health_check
        && wanted.registration.address == current.registration.address
    {
        return;
    }
    if let Some((_, task)) = running.remove(id) {
        task.abort();
    }
    if let Some(record) = wanted {
        let task = tokio::spawn(run_check(view.clone(), record.clone()));
        running.insert(id.to_owned(), (record, task));
    }
}

/// A seed for one check's jitter, from its id (repeatable, and different per instance).
fn seed(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
    })
}

async fn run_check(view: Weak<View>, record: Arc<Record>) {
    let Some(check) = record.registration.health_check.clone() else {
        return;
    };
    let target = probe_target(&record, &check);
    let mut prober = Prober::new(&check, target);
    let mut checker = Checker::default();
    let mut rng = SplitMix64::new(seed(&record.registration.id));
    let id = &record.registration.id;
    let mut wait = Duration::ZERO;
    loop {
        tokio::time::sleep(wait + check.jitter.mul_f64(rng.unit())).await;
        wait = check.interval;
        let result = prober.probe(&check, target).await;
        if let Err(error) = &result {
            debug!(instance = %id, %target, %error, "health probe failed");
        }
        let Some(health) = checker.observe(
            result.is_ok(),
            check.healthy_threshold,
            check.unhealthy_threshold,
        ) else {
            continue;
        };
        let Some(view) = view.upgrade() else { return };
        if view.set_health(&record, health) {
            info!(
                instance = %id,
                service = %record.registration.name,
                %target,
                health = health.as_str(),
                "health changed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(checker: &mut Checker, results: &[bool]) -> Vec<Option<HealthStatus>> {
        results
            .iter()
            .map(|passed| checker.observe(*passed, 2, 3))
            .collect()
    }

    #[test]
    fn healthy_after_two_consecutive_passes() {
        let mut checker = Checker::default();
        assert_eq!(
            run(&mut checker, &[true, false, true, true]),
            [None, None, None, Some(HealthStatus::Healthy)]
        );
    }

    #[test]
    fn unhealthy_after_three_consecutive_failures_and_back_after_two_passes() {
        let mut checker = Checker::default();
        run(&mut checker, &[true, true]);
        assert_eq!(
            run(&mut checker, &[false, false, true, false, false, false]),
            [None, None, None, None, None, Some(HealthStatus::Unhealthy)]
        );
        assert_eq!(
            run(&mut checker, &[true, true]),
            [None, Some(HealthStatus::Healthy)]
        );
    }

    #[test]
    fn a_threshold_of_zero_acts_as_one() {
        let mut checker = Checker::default();
        assert_eq!(checker.observe(false, 0, 0), Some(HealthStatus::Unhealthy));
    }
}
