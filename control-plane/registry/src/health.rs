//! Active health checks of registrations, with the shared probes of `fulcrum-health`.
//!
//! Every registration with a check is followed by one [`Reconciler`] keyed by registration
//! id; the probe itself (HTTP, TCP or gRPC every `interval` plus jitter, with thresholds) runs
//! on a [`ProbeHub`] (the process's, in the control plane), so an endpoint the policy also
//! checks the same way is probed once. Status changes go into the [`View`], so they reach
//! Discover, Watch and the published endpoints (Envoy sees `UNHEALTHY`). Every probe is
//! counted in `fulcrum_health_checks_total` under the registration's service label, bounded
//! like the registry's own metrics ([`ServiceLabels`]). Every control-plane replica probes on
//! its own, as every Envoy does.

use std::{collections::HashMap, sync::Arc};

use fulcrum_health::{ProbeHub, Reconciler, Report, Wanted};
use tokio::task::JoinHandle;
use tracing::info;

use crate::{
    metrics::ServiceLabels,
    view::{Entry, Record, Since, View},
};

/// Runs the checks of every registration in `view` on `probes` until the view is dropped,
/// counting them under `labels`: follows a registration with a check, re-follows it when the
/// check or address changes, and stops when the registration goes.
pub fn spawn_monitor(view: &Arc<View>, probes: ProbeHub, labels: ServiceLabels) -> JoinHandle<()> {
    let weak = Arc::downgrade(view);
    let mut revisions = view.subscribe();
    tokio::spawn(async move {
        let (reconciler, mut reports) = Reconciler::new(probes);
        let mut monitor = Monitor {
            reconciler,
            records: HashMap::new(),
            labels,
        };
        let mut cursor = None;
        loop {
            {
                let Some(view) = weak.upgrade() else { return };
                let (since, now) = view.since(cursor.as_ref());
                cursor = Some(now);
                monitor.update(since);
            }
            loop {
                tokio::select! {
                    changed = revisions.changed() => match changed {
                        Ok(()) => break,
                        Err(_) => return,
                    },
                    Some(report) = reports.recv() => {
                        let Some(view) = weak.upgrade() else { return };
                        monitor.record(&view, &report);
                    }
                }
            }
        }
    })
}

/// The registrations with a check, and the probes following them.
struct Monitor {
    reconciler: Reconciler<String>,
    records: HashMap<String, Arc<Record>>,
    labels: ServiceLabels,
}

impl Monitor {
    /// Follows what changed in the view.
    fn update(&mut self, since: Since) {
        match since {
            Since::Reset(entries) => {
                self.records.clear();
                let wanted = entries
                    .into_iter()
                    .filter_map(|entry| self.keep(entry))
                    .collect();
                self.reconciler.reconcile(wanted);
            }
            Since::Changes(changes) => {
                for change in changes {
                    self.records.remove(&*change.id);
                    let wanted = change.entry.and_then(|entry| self.keep(entry));
                    self.reconciler
                        .set(change.id.to_string(), wanted.map(|(_, wanted)| wanted));
                }
            }
        }
    }

    /// Records `entry` when it has a check, returning what to probe for it.
    fn keep(&mut self, entry: Entry) -> Option<(String, Wanted)> {
        let registration = &entry.record.registration;
        let check = registration.health_check.as_deref()?;
        let wanted = Wanted {
            target: check.probe.target(registration.address()),
            check: check.clone(),
            cluster: self.labels.label(&registration.name),
        };
        let id = registration.id.to_string();
        self.records.insert(id.clone(), entry.record);
        Some((id, wanted))
    }

    /// Writes a probe's status into its registration, unless the check was replaced since.
    fn record(&self, view: &View, report: &Report<String>) {
        if !self.reconciler.is_current(report) {
            return;
        }
        let Some(record) = self.records.get(&report.key) else {
            return;
        };
        if view.set_health(record, report.status) {
            let registration = &record.registration;
            info!(
                instance = %registration.id,
                service = %registration.name,
                health = report.status.as_str(),
                "health changed"
            );
        }
    }
}
