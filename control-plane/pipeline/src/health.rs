//! Stage 3, validated endpoints → checked endpoints: active checks of any source's
//! endpoints, asked for by the policy (`health_check` of a service, or of `default`).
//!
//! The stage keeps exactly one probe task per (service, endpoint address) of every service
//! whose policy has a check, reconciled whenever the endpoints or the policy change, and
//! emits the endpoints with those failing their checks set to [`Health::Unhealthy`]. A check
//! only ever makes an endpoint worse: a source's `unhealthy` or `draining` is never upgraded.
//! Every health change is new content, so it reaches Envoy as a new EDS version and the
//! filters as a new snapshot version. Without any check in the policy the endpoints pass
//! through unchanged and no task runs.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use fulcrum_core::{Health, Policy};
use fulcrum_health::{HealthStatus, ProbeHub, Reconciler, Report, Wanted};
use fulcrum_policy::AppliedPolicy;
use fulcrum_sources::Services;
use fulcrum_xds::ChangeTrace;
use tokio::sync::{mpsc, watch};
use tracing::{info, info_span, warn};

use crate::{change::Traced, share_unchanged};

/// One probed endpoint: its service and address.
type Key = (String, SocketAddr);

/// Runs the stage until `input` or `policy` closes: reads endpoints from `input` and the
/// policy from `policy`, probes through `probes`, and sends `output` the checked endpoints
/// whenever they differ from what it holds.
pub async fn run(
    mut input: watch::Receiver<Option<Traced<Services>>>,
    mut policy: watch::Receiver<Option<Arc<AppliedPolicy>>>,
    probes: ProbeHub,
    output: watch::Sender<Option<Traced<Services>>>,
) {
    let (mut overlay, mut reports) = Overlay::new(probes);
    // `None`: the endpoints or the policy changed; `Some`: a check flipped an endpoint, the
    // root of a trace of its own.
    let mut transition: Option<ChangeTrace> = None;
    loop {
        let endpoints = if transition.is_none() {
            let endpoints = input.borrow_and_update().clone();
            let current = policy
                .borrow_and_update()
                .as_ref()
                .map(|applied| Arc::clone(&applied.policy));
            overlay.reconcile(endpoints.as_deref(), current.as_deref());
            endpoints
        } else {
            input.borrow().clone()
        };
        if let Some(endpoints) = endpoints {
            let trace = transition.take().unwrap_or(endpoints.trace);
            let checked = overlay.apply(
                endpoints.value,
                output.borrow().as_ref().map(|current| &*current.value),
            );
            let checked = Traced::new(checked, trace);
            output.send_if_modified(|current| {
                if current.as_ref() == Some(&checked) {
                    return false;
                }
                *current = Some(checked);
                true
            });
        }
        transition = loop {
            tokio::select! {
                changed = input.changed() => match changed {
                    Ok(()) => break None,
                    Err(_) => return,
                },
                changed = policy.changed() => match changed {
                    Ok(()) => break None,
                    Err(_) => return,
                },
                Some(report) = reports.recv() => {
                    let (service, address) = report.key.clone();
                    let status = report.status;
                    if overlay.record(report) {
                        let span = info_span!(
                            parent: None,
                            "health_transition",
                            service = %service,
                            endpoint = %address,
                            status = ?status,
                        );
                        break Some(ChangeTrace::of(&span));
                    }
                }
            }
        };
    }
}

/// The stage's state: the probes it follows and which endpoints fail their checks.
///
/// Invariant: every key in `failing` is followed by `probes`.
#[derive(Debug)]
struct Overlay {
    probes: Reconciler<Key>,
    failing: BTreeSet<Key>,
}

impl Overlay {
    fn new(hub: ProbeHub) -> (Self, mpsc::Receiver<Report<Key>>) {
        let (probes, reports) = Reconciler::new(hub);
        let overlay = Self {
            probes,
            failing: BTreeSet::new(),
        };
        (overlay, reports)
    }

    /// Makes the probes match the endpoints of the services `policy` checks: follows new
    /// ones, re-follows those whose check changed, drops the rest.
    fn reconcile(&mut self, services: Option<&Services>, policy: Option<&Policy>) {
        let mut wanted = HashMap::new();
        if let (Some(services), Some(policy)) = (services, policy) {
            for (service, endpoints) in services {
                let Some(check) = &policy.for_service(service).health_check else {
                    continue;
                };
                for endpoint in &endpoints.endpoints {
                    let key = (service.clone(), endpoint.address);
                    let probe = Wanted {
                        target: check.probe.target(endpoint.address),
                        check: check.clone(),
                        cluster: service.clone(),
                    };
                    wanted.insert(key, probe);
                }
            }
        }
        self.probes.reconcile(wanted);
        let probes = &self.probes;
        self.failing.retain(|key| probes.contains(key));
    }

    /// Records a probe's status; true when the set of failing endpoints changed.
    fn record(&mut self, report: Report<Key>) -> bool {
        if !self.probes.is_current(&report) {
            return false;
        }
        let (service, address) = &report.key;
        match report.status {
            HealthStatus::Unhealthy => {
                warn!(%service, endpoint = %address, "endpoint failed its health checks: publishing it unhealthy");
                self.failing.insert(report.key)
            }
            HealthStatus::Healthy | HealthStatus::Unknown => {
                let recovered = self.failing.remove(&report.key);
                if recovered {
                    info!(%service, endpoint = %address, "endpoint passes its health checks again");
                }
                recovered
            }
        }
    }

    /// `endpoints` with the failing ones unhealthy; `endpoints` itself (not a copy) when
    /// none changes. Only the services with a failing endpoint are copied, and a copy equal
    /// to the one in `previous` (the last output) is that one.
    fn apply(&self, endpoints: Arc<Services>, previous: Option<&Services>) -> Arc<Services> {
        let mut checked: Option<Services> = None;
        for (service, address) in &self.failing {
            let passing = |services: &Services| {
                services
                    .get(service)?
                    .endpoints
                    .iter()
                    .position(|endpoint| {
                        endpoint.address == *address && endpoint.health != Health::Unhealthy
                    })
            };
            let Some(index) = passing(checked.as_ref().unwrap_or(&endpoints)) else {
                continue;
            };
            let checked = checked.get_or_insert_with(|| Services::clone(&endpoints));
            if let Some(endpoint) = checked
                .get_mut(service)
                .and_then(|service| Arc::make_mut(service).endpoints.get_mut(index))
            {
                endpoint.health = Health::Unhealthy;
            }
        }
        checked.map_or(endpoints, |checked| {
            Arc::new(share_unchanged(checked, previous))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fulcrum_core::{
        Endpoint, ServiceEndpoints,
        policy::{HealthCheck, Probe},
        version::snapshot_version,
    };
    use fulcrum_health::HealthMetrics;

    use super::*;

    fn snapshot(endpoints: &[(&str, Health)]) -> Arc<Services> {
        let endpoints = endpoints
            .iter()
            .map(|(address, health)| {
                Endpoint::new(address.parse().expect("address")).with_health(*health)
            })
            .collect();
        Arc::new(
            [(
                "shop".to_owned(),
                Arc::new(ServiceEndpoints {
                    endpoints,
                    protocol: None,
                }),
            )]
            .into(),
        )
    }

    fn checked(service: &str) -> Policy {
        let mut policy = Policy::default();
        policy
            .services
            .entry(service.to_owned())
            .or_default()
            .health_check = Some(HealthCheck {
            interval: Duration::from_secs(60),
            ..HealthCheck::new(Probe::Tcp { port: None })
        });
        policy
    }

    fn failing(overlay: &mut Overlay, address: &str) {
        let key = ("shop".to_owned(), address.parse().expect("address"));
        let generation = overlay.probes.generation(&key).expect("followed");
        assert!(overlay.record(Report {
            key,
            status: HealthStatus::Unhealthy,
            generation,
        }));
    }

    fn overlay() -> Overlay {
        Overlay::new(ProbeHub::new(HealthMetrics::default())).0
    }

    #[tokio::test]
    async fn one_task_per_checked_endpoint_and_none_without_a_check() {
        let mut overlay = overlay();
        let merged = snapshot(&[
            ("127.0.0.1:1", Health::Healthy),
            ("127.0.0.1:2", Health::Healthy),
        ]);
        overlay.reconcile(Some(&merged), Some(&checked("other")));
        assert!(overlay.probes.is_empty());
        assert_eq!(overlay.apply(merged.clone(), None), merged);

        overlay.reconcile(Some(&merged), Some(&checked("shop")));
        assert_eq!(overlay.probes.len(), 2);
        let generations = |overlay: &Overlay| {
            ["127.0.0.1:1", "127.0.0.1:2"].map(|address| {
                let key = ("shop".to_owned(), address.parse().expect("address"));
                overlay.probes.generation(&key)
            })
        };
        let first = generations(&overlay);
        overlay.reconcile(Some(&merged), Some(&checked("shop")));
        assert_eq!(
            first,
            generations(&overlay),
            "an unchanged check keeps its tasks"
        );

        let fewer = snapshot(&[("127.0.0.1:2", Health::Healthy)]);
        overlay.reconcile(Some(&fewer), Some(&checked("shop")));
        assert_eq!(overlay.probes.len(), 1);
        overlay.reconcile(Some(&fewer), None);
        assert!(overlay.probes.is_empty());
    }

    #[tokio::test]
    async fn failing_endpoints_are_published_unhealthy_with_a_new_version_and_never_upgraded() {
        let mut overlay = overlay();
        let merged = snapshot(&[
            ("127.0.0.1:1", Health::Healthy),
            ("127.0.0.1:2", Health::Draining),
            ("127.0.0.1:3", Health::Unhealthy),
        ]);
        overlay.reconcile(Some(&merged), Some(&checked("shop")));
        failing(&mut overlay, "127.0.0.1:3");
        assert_eq!(
            overlay.apply(merged.clone(), None),
            merged,
            "an endpoint the source already marks unhealthy changes nothing"
        );
        failing(&mut overlay, "127.0.0.1:1");
        let overlaid = overlay.apply(merged.clone(), None);
        let health: Vec<Health> = overlaid["shop"]
            .endpoints
            .iter()
            .map(|e| e.health)
            .collect();
        assert_eq!(
            health,
            [Health::Unhealthy, Health::Draining, Health::Unhealthy]
        );
        assert_ne!(
            snapshot_version(&overlaid, None),
            snapshot_version(&merged, None)
        );
    }

    #[tokio::test]
    async fn results_of_a_replaced_task_are_ignored() {
        let mut overlay = overlay();
        let merged = snapshot(&[("127.0.0.1:1", Health::Healthy)]);
        overlay.reconcile(Some(&merged), Some(&checked("shop")));
        let key = ("shop".to_owned(), "127.0.0.1:1".parse().expect("address"));
        let stale = overlay.probes.generation(&key).expect("followed");
        let mut policy = checked("shop");
        if let Some(check) = &mut policy.services.get_mut("shop").expect("shop").health_check {
            check.unhealthy_threshold = 1;
        }
        overlay.reconcile(Some(&merged), Some(&policy));
        assert_ne!(
            overlay.probes.generation(&key),
            Some(stale),
            "a changed check restarts the task"
        );
        assert!(!overlay.record(Report {
            key,
            status: HealthStatus::Unhealthy,
            generation: stale,
        }));
        assert!(overlay.failing.is_empty());
    }
}
