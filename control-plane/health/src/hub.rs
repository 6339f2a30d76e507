//! One probe task per (target, check) in the process, however many ask for it.
//!
//! The registry checks the registrations that carry a `health_check`, and the pipeline's health
//! stage checks every endpoint whose policy asks for one; a registered endpoint can be both.
//! Both subscribe here, so the same check of the same address runs once and both see its
//! result. (Two different checks of one address ask different questions, so each runs.)
//! The task stops when the last [`Subscription`] to it is dropped.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
};

use fulcrum_core::policy::HealthCheck;
use tokio::{sync::watch, task::JoinHandle};

use crate::{HealthMetrics, HealthStatus, ProbeLoop};

type Key = (SocketAddr, HealthCheck);

/// The running probes of a process. Cheap to clone (a shared handle).
#[derive(Debug, Clone)]
pub struct ProbeHub {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    metrics: HealthMetrics,
    probes: Mutex<HashMap<Key, Probe>>,
}

#[derive(Debug)]
struct Probe {
    status: watch::Receiver<HealthStatus>,
    subscribers: usize,
    task: JoinHandle<()>,
}

impl ProbeHub {
    /// A hub whose probes count into `metrics`.
    pub fn new(metrics: HealthMetrics) -> Self {
        Self {
            shared: Arc::new(Shared {
                metrics,
                probes: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The process's hub, counting into [`HealthMetrics::global`]: what the registry and the
    /// pipeline share.
    pub fn global() -> &'static ProbeHub {
        static GLOBAL: OnceLock<ProbeHub> = OnceLock::new();
        GLOBAL.get_or_init(|| ProbeHub::new(HealthMetrics::global().clone()))
    }

    /// Follows `check` of `target`, starting its probe task (on the current tokio runtime,
    /// counted under `cluster`) unless one runs already.
    pub fn subscribe(
        &self,
        target: SocketAddr,
        check: &HealthCheck,
        cluster: &str,
    ) -> Subscription {
        let key = (target, check.clone());
        let mut probes = self.shared.lock();
        let probe = probes.entry(key.clone()).or_insert_with(|| {
            let (sender, status) = watch::channel(HealthStatus::Unknown);
            let mut probes = ProbeLoop::new(
                check.clone(),
                target,
                cluster,
                &format!("{target}/{check:?}"),
                &self.shared.metrics,
            );
            let task = tokio::spawn(async move {
                loop {
                    let status = probes.next_change().await;
                    sender.send_replace(status);
                }
            });
            Probe {
                status,
                subscribers: 0,
                task,
            }
        });
        probe.subscribers += 1;
        Subscription {
            status: probe.status.clone(),
            key: Some(key),
            hub: self.clone(),
        }
    }

    /// How many probe tasks run.
    pub fn running(&self) -> usize {
        self.shared.lock().len()
    }

    fn unsubscribe(&self, key: &Key) {
        let mut probes = self.shared.lock();
        if let Some(probe) = probes.get_mut(key) {
            probe.subscribers -= 1;
            if probe.subscribers == 0
                && let Some(probe) = probes.remove(key)
            {
                probe.task.abort();
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Probe>> {
        // The map holds no invariant a panic elsewhere could break halfway.
        self.probes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One subscriber's handle on a probe; dropping the last one stops the probe (at once).
#[derive(Debug)]
pub struct Subscription {
    status: watch::Receiver<HealthStatus>,
    /// Taken by `Drop`.
    key: Option<Key>,
    hub: ProbeHub,
}

impl Subscription {
    /// The status now (`Unknown` until a threshold is reached).
    pub fn status(&self) -> HealthStatus {
        *self.status.borrow()
    }

    /// A receiver of the probe's status changes; it closes when the probe stops.
    pub fn watch(&self) -> watch::Receiver<HealthStatus> {
        self.status.clone()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.hub.unsubscribe(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use fulcrum_core::policy::Probe;

    use super::*;

    fn tcp_check() -> HealthCheck {
        HealthCheck::new(Probe::Tcp { port: None })
    }

    #[tokio::test]
    async fn the_same_check_of_one_address_runs_once_until_its_last_subscriber_goes() {
        let hub = ProbeHub::new(HealthMetrics::default());
        let target: SocketAddr = "127.0.0.1:9".parse().expect("address");
        let first = hub.subscribe(target, &tcp_check(), "shop");
        let second = hub.subscribe(target, &tcp_check(), "shop");
        assert_eq!(hub.running(), 1);
        let mut other = tcp_check();
        other.unhealthy_threshold = 1;
        let different = hub.subscribe(target, &other, "shop");
        assert_eq!(hub.running(), 2, "another check asks another question");
        drop(first);
        assert_eq!(hub.running(), 2);
        drop(second);
        assert_eq!(hub.running(), 1);
        drop(different);
        assert_eq!(hub.running(), 0);
    }
}
