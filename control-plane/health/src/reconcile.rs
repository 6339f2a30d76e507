//! Keeps the probes a component follows equal to what it wants, and tells it when their
//! status changes: the one reconciler of the registry (keyed by registration) and of the
//! pipeline's health stage (keyed by service and address).
//!
//! [`Reconciler::reconcile`] takes the full wanted set (key → target and check): it
//! subscribes to new ones on the [`ProbeHub`], re-subscribes those whose target or check
//! changed and drops the rest. Each followed probe has a small task forwarding its status
//! changes as [`Report`]s on one channel; a report from a replaced subscription is recognised
//! by [`Reconciler::is_current`] and ignored.

use std::{collections::HashMap, hash::Hash, net::SocketAddr};

use fulcrum_core::policy::HealthCheck;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{HealthStatus, ProbeHub, Subscription};

/// Reports buffered between the forwarding tasks and the owner; a full queue holds them back.
const REPORT_QUEUE: usize = 256;

/// What to probe for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The probed address.
    pub target: SocketAddr,
    /// The check.
    pub check: HealthCheck,
    /// The cluster (service) its probes are counted under.
    pub cluster: String,
}

/// A status of one followed probe: its first known status, then every change.
#[derive(Debug)]
pub struct Report<K> {
    /// Whose probe.
    pub key: K,
    /// The new status.
    pub status: HealthStatus,
    /// Which subscription of the key reported it (see [`Reconciler::generation`]).
    pub generation: u64,
}

#[derive(Debug)]
struct Following {
    wanted: Wanted,
    generation: u64,
    /// Dropped with this, which stops the probe if nobody else follows it.
    _subscription: Subscription,
    forward: JoinHandle<()>,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.forward.abort();
    }
}

/// The probes one component follows, by key.
#[derive(Debug)]
pub struct Reconciler<K> {
    hub: ProbeHub,
    following: HashMap<K, Following>,
    reports: mpsc::Sender<Report<K>>,
    next_generation: u64,
}

impl<K: Clone + Eq + Hash + Send + 'static> Reconciler<K> {
    /// A reconciler on `hub` and the receiver of its reports.
    pub fn new(hub: ProbeHub) -> (Self, mpsc::Receiver<Report<K>>) {
        let (reports, received) = mpsc::channel(REPORT_QUEUE);
        let reconciler = Self {
            hub,
            following: HashMap::new(),
            reports,
            next_generation: 0,
        };
        (reconciler, received)
    }

    /// Follows exactly `wanted`: keeps what is unchanged, replaces what changed, drops the rest.
    pub fn reconcile(&mut self, wanted: HashMap<K, Wanted>) {
        self.following
            .retain(|key, following| wanted.get(key) == Some(&following.wanted));
        for (key, wanted) in wanted {
            self.set(key, Some(wanted));
        }
    }

    /// Follows `wanted` for `key` (nothing for `None`), keeping the subscription when it is
    /// unchanged: the incremental form of [`reconcile`](Self::reconcile).
    pub fn set(&mut self, key: K, wanted: Option<Wanted>) {
        match wanted {
            None => {
                self.following.remove(&key);
            }
            Some(wanted) => {
                if self
                    .following
                    .get(&key)
                    .is_some_and(|following| following.wanted == wanted)
                {
                    return;
                }
                // Subscribe before dropping the old subscription, so a probe both share
                // (same target and check) keeps running.
                let following = self.follow(key.clone(), wanted);
                self.following.insert(key, following);
            }
        }
    }

    /// Whether `report` comes from the subscription currently followed for its key.
    pub fn is_current(&self, report: &Report<K>) -> bool {
        self.following
            .get(&report.key)
            .is_some_and(|following| following.generation == report.generation)
    }

    /// Whether `key` is followed.
    pub fn contains(&self, key: &K) -> bool {
        self.following.contains_key(key)
    }

    /// Which subscription follows `key`: a new number each time it is (re)subscribed.
    pub fn generation(&self, key: &K) -> Option<u64> {
        self.following
            .get(key)
            .map(|following| following.generation)
    }

    /// How many keys are followed.
    pub fn len(&self) -> usize {
        self.following.len()
    }

    /// Whether nothing is followed.
    pub fn is_empty(&self) -> bool {
        self.following.is_empty()
    }

    fn follow(&mut self, key: K, wanted: Wanted) -> Following {
        let generation = self.next_generation;
        self.next_generation += 1;
        let subscription = self
            .hub
            .subscribe(wanted.target, &wanted.check, &wanted.cluster);
        let mut statuses = subscription.watch();
        let reports = self.reports.clone();
        let forward = tokio::spawn(async move {
            // The current status first (a shared probe may know it already), then changes.
            loop {
                let status = *statuses.borrow_and_update();
                if status != HealthStatus::Unknown {
                    let report = Report {
                        key: key.clone(),
                        status,
                        generation,
                    };
                    if reports.send(report).await.is_err() {
                        return;
                    }
                }
                if statuses.changed().await.is_err() {
                    return;
                }
            }
        });
        Following {
            wanted,
            generation,
            _subscription: subscription,
            forward,
        }
    }
}

#[cfg(test)]
mod tests {
    use fulcrum_core::policy::Probe;

    use super::*;
    use crate::HealthMetrics;

    fn wanted(port: u16, unhealthy_threshold: u32) -> Wanted {
        Wanted {
            target: ([127, 0, 0, 1], port).into(),
            check: HealthCheck {
                unhealthy_threshold,
                ..HealthCheck::new(Probe::Tcp { port: None })
            },
            cluster: "shop".to_owned(),
        }
    }

    #[tokio::test]
    async fn reconcile_follows_exactly_what_is_wanted_and_shares_probes_between_owners() {
        let hub = ProbeHub::new(HealthMetrics::default());
        let (mut registry, _reports) = Reconciler::new(hub.clone());
        let (mut pipeline, _reports) = Reconciler::new(hub.clone());
        registry.reconcile(HashMap::from([("id-1", wanted(9, 3))]));
        pipeline.reconcile(HashMap::from([("a", wanted(9, 3)), ("b", wanted(10, 3))]));
        assert_eq!(hub.running(), 2, "port 9's check is probed once for both");

        pipeline.reconcile(HashMap::from([("a", wanted(9, 1))]));
        assert_eq!(pipeline.len(), 1);
        assert_eq!(hub.running(), 2, "port 9 twice (two checks), port 10 gone");
        registry.reconcile(HashMap::new());
        pipeline.reconcile(HashMap::new());
        assert_eq!(hub.running(), 0);
    }

    #[tokio::test]
    async fn a_report_of_a_replaced_subscription_is_not_current() {
        let (mut reconciler, _reports) = Reconciler::new(ProbeHub::new(HealthMetrics::default()));
        reconciler.reconcile(HashMap::from([("a", wanted(9, 3))]));
        let stale = Report {
            key: "a",
            status: HealthStatus::Unhealthy,
            generation: 0,
        };
        assert!(reconciler.is_current(&stale));
        reconciler.reconcile(HashMap::from([("a", wanted(9, 1))]));
        assert!(!reconciler.is_current(&stale));
    }
}
