//! Active health checks of registrations, with the shared checker of `fulcrum-health`.
//!
//! Each registration with a check gets its own task running a [`ProbeLoop`] (HTTP, TCP or
//! gRPC probes every `interval` plus jitter, with thresholds; see the `fulcrum-health` crate).
//! Status changes go into the [`View`], so they reach Discover, Watch and the published
//! endpoints (Envoy sees `UNHEALTHY`). Every probe is counted in
//! `fulcrum_health_checks_total` under the registration's service name. Every control-plane
//! replica probes on its own, as every Envoy does.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
};

use fulcrum_health::{HealthMetrics, ProbeLoop, Status};
use tokio::task::JoinHandle;
use tracing::info;

use crate::view::{self, HealthStatus, Record, Since, View};

impl From<Status> for HealthStatus {
    fn from(status: Status) -> Self {
        match status {
            Status::Unknown => Self::Unknown,
            Status::Healthy => Self::Healthy,
            Status::Unhealthy => Self::Unhealthy,
        }
    }
}

/// Runs the checks of every registration in `view` until the view is dropped: starts a
/// task per registration with a check, restarts it when the check or address changes, and
/// stops it when the registration goes.
pub fn spawn_monitor(view: &Arc<View>) -> JoinHandle<()> {
    let weak = Arc::downgrade(view);
    tokio::spawn(async move {
        let mut running: HashMap<String, (Arc<Record>, JoinHandle<()>)> = HashMap::new();
        view::follow(weak.clone(), |since| match since {
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
        })
        .await;
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

async fn run_check(view: Weak<View>, record: Arc<Record>) {
    let Some(check) = record.registration.health_check.clone() else {
        return;
    };
    let registration = &record.registration;
    let target = check.probe.target(registration.address);
    let mut probes = ProbeLoop::new(
        check,
        target,
        &registration.name,
        &registration.id,
        HealthMetrics::global(),
    );
    loop {
        let health = HealthStatus::from(probes.next_change().await);
        let Some(view) = view.upgrade() else { return };
        if view.set_health(&record, health) {
            info!(
                instance = %registration.id,
                service = %registration.name,
                target = %probes.target(),
                health = health.as_str(),
                "health changed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_statuses_map_onto_the_registrys_health() {
        assert_eq!(HealthStatus::from(Status::Unknown), HealthStatus::Unknown);
        assert_eq!(HealthStatus::from(Status::Healthy), HealthStatus::Healthy);
        assert_eq!(
            HealthStatus::from(Status::Unhealthy),
            HealthStatus::Unhealthy
        );
    }
}
