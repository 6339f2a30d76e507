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

use fulcrum_core::{Health, Policy, policy::HealthCheck};
use fulcrum_health::{HealthMetrics, ProbeLoop, Status};
use fulcrum_policy::AppliedPolicy;
use fulcrum_sources::Services;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

/// Results buffered between the probe tasks and the stage; a full queue holds the probes back.
const RESULT_QUEUE: usize = 256;

/// One probed endpoint: its service and address.
type Key = (String, SocketAddr);

/// Runs the stage until `input` or `policy` closes: reads endpoints from `input` and the
/// policy from `policy`, and sends `output` the checked endpoints whenever they differ from
/// what it holds.
pub async fn run(
    mut input: watch::Receiver<Option<Arc<Services>>>,
    mut policy: watch::Receiver<Option<Arc<AppliedPolicy>>>,
    metrics: HealthMetrics,
    output: watch::Sender<Option<Arc<Services>>>,
) {
    let (results, mut received) = mpsc::channel(RESULT_QUEUE);
    let mut overlay = Overlay::new(metrics, results);
    let mut inputs_changed = true;
    loop {
        let endpoints = if inputs_changed {
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
            let checked = overlay.apply(endpoints);
            output.send_if_modified(|current| {
                if current.as_ref() == Some(&checked) {
                    return false;
                }
                *current = Some(checked);
                true
            });
        }
        inputs_changed = loop {
            tokio::select! {
                changed = input.changed() => match changed {
                    Ok(()) => break true,
                    Err(_) => return,
                },
                changed = policy.changed() => match changed {
                    Ok(()) => break true,
                    Err(_) => return,
                },
                Some(result) = received.recv() => {
                    if overlay.record(result) {
                        break false;
                    }
                }
            }
        };
    }
}

/// A status change reported by one probe task.
#[derive(Debug)]
struct ProbeResult {
    key: Key,
    /// The reporting task's id; results of a replaced task are ignored.
    task: u64,
    status: Status,
}

/// One running probe task; dropping it stops the task.
#[derive(Debug)]
struct Probing {
    check: HealthCheck,
    id: u64,
    task: JoinHandle<()>,
}

impl Drop for Probing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The stage's state: the probe tasks and which endpoints fail their checks.
///
/// Invariant: every key in `failing` has a task in `probes`.
#[derive(Debug)]
struct Overlay {
    metrics: HealthMetrics,
    results: mpsc::Sender<ProbeResult>,
    probes: HashMap<Key, Probing>,
    failing: BTreeSet<Key>,
    next_id: u64,
}

impl Overlay {
    fn new(metrics: HealthMetrics, results: mpsc::Sender<ProbeResult>) -> Self {
        Self {
            metrics,
            results,
            probes: HashMap::new(),
            failing: BTreeSet::new(),
            next_id: 0,
        }
    }

    /// Makes the probe tasks match the endpoints of the services `policy` checks: starts
    /// missing ones, restarts those whose check changed, stops the rest.
    fn reconcile(&mut self, services: Option<&Services>, policy: Option<&Policy>) {
        let mut wanted: HashMap<Key, &HealthCheck> = HashMap::new();
        if let (Some(services), Some(policy)) = (services, policy) {
            for (service, endpoints) in services {
                let Some(check) = &policy.for_service(service).health_check else {
                    continue;
                };
                for endpoint in &endpoints.endpoints {
                    wanted.insert((service.clone(), endpoint.address), check);
                }
            }
        }
        self.probes.retain(|key, probing| {
            wanted
                .get(key)
                .is_some_and(|check| **check == probing.check)
        });
        let probes = &self.probes;
        self.failing.retain(|key| probes.contains_key(key));
        for (key, check) in wanted {
            if !self.probes.contains_key(&key) {
                let probing = self.spawn(key.clone(), check.clone());
                self.probes.insert(key, probing);
            }
        }
    }

    fn spawn(&mut self, key: Key, check: HealthCheck) -> Probing {
        let id = self.next_id;
        self.next_id += 1;
        let (service, address) = &key;
        let mut probes = ProbeLoop::new(
            check.clone(),
            check.probe.target(*address),
            service,
            &format!("{service}/{address}"),
            &self.metrics,
        );
        let results = self.results.clone();
        let task = tokio::spawn(async move {
            loop {
                let status = probes.next_change().await;
                let result = ProbeResult {
                    key: key.clone(),
                    task: id,
                    status,
                };
                if results.send(result).await.is_err() {
                    return;
                }
            }
        });
        Probing { check, id, task }
    }

    /// Records a task's status change; true when the set of failing endpoints changed.
    fn record(&mut self, result: ProbeResult) -> bool {
        if self.probes.get(&result.key).map(|probing| probing.id) != Some(result.task) {
            return false;
        }
        let (service, address) = &result.key;
        match result.status {
            Status::Unhealthy => {
                warn!(%service, endpoint = %address, "endpoint failed its health checks: publishing it unhealthy");
                self.failing.insert(result.key)
            }
            Status::Healthy | Status::Unknown => {
                let recovered = self.failing.remove(&result.key);
                if recovered {
                    info!(%service, endpoint = %address, "endpoint passes its health checks again");
                }
                recovered
            }
        }
    }

    /// `endpoints` with the failing ones unhealthy; `endpoints` itself (not a copy) when
    /// none changes.
    fn apply(&self, endpoints: Arc<Services>) -> Arc<Services> {
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
                .and_then(|service| service.endpoints.get_mut(index))
            {
                endpoint.health = Health::Unhealthy;
            }
        }
        checked.map_or(endpoints, Arc::new)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fulcrum_core::{Endpoint, ServiceEndpoints, policy::Probe, version::snapshot_version};

    use super::*;

    fn snapshot(endpoints: &[(&str, Health)]) -> Arc<Services> {
        let endpoints = endpoints
            .iter()
            .map(|(address, health)| Endpoint {
                health: *health,
                ..Endpoint::new(address.parse().expect("address"))
            })
            .collect();
        Arc::new([("shop".to_owned(), ServiceEndpoints { endpoints })].into())
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
        let task = overlay.probes[&key].id;
        assert!(overlay.record(ProbeResult {
            key,
            task,
            status: Status::Unhealthy
        }));
    }

    fn overlay() -> Overlay {
        Overlay::new(HealthMetrics::default(), mpsc::channel(1).0)
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
        assert_eq!(overlay.apply(merged.clone()), merged);

        overlay.reconcile(Some(&merged), Some(&checked("shop")));
        assert_eq!(overlay.probes.len(), 2);
        let first = overlay
            .probes
            .values()
            .map(|p| p.id)
            .collect::<BTreeSet<_>>();
        overlay.reconcile(Some(&merged), Some(&checked("shop")));
        let again = overlay
            .probes
            .values()
            .map(|p| p.id)
            .collect::<BTreeSet<_>>();
        assert_eq!(first, again, "an unchanged check keeps its tasks");

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
            overlay.apply(merged.clone()),
            merged,
            "an endpoint the source already marks unhealthy changes nothing"
        );
        failing(&mut overlay, "127.0.0.1:1");
        let overlaid = overlay.apply(merged.clone());
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
        let stale = overlay.probes[&key].id;
        let mut policy = checked("shop");
        if let Some(check) = &mut policy.services.get_mut("shop").expect("shop").health_check {
            check.unhealthy_threshold = 1;
        }
        overlay.reconcile(Some(&merged), Some(&policy));
        assert_ne!(
            overlay.probes[&key].id, stale,
            "a changed check restarts the task"
        );
        assert!(!overlay.record(ProbeResult {
            key,
            task: stale,
            status: Status::Unhealthy
        }));
        assert!(overlay.failing.is_empty());
    }
}
