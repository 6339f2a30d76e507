//! One VM's balancing state: a [`ServicePicker`] per service, built from the current
//! snapshot, plus the VM's stats and random source.
//!
//! Envoy runs one VM per worker thread and its own load balancers per worker too; fulcrum's
//! in-flight counts and latency estimates are likewise per worker: each worker balances by
//! the requests it sent. Two things are per proxy, through shared data: the rate limit's
//! buckets ([`SharedBuckets`]), and ejections ([`SharedEjections`]): a breaker that opens or
//! closes after an ejection on one worker is written to its service's record, and every
//! worker applies the record on its next tick (or sooner, before recording a response that
//! may be a failure), so an endpoint found dead by one worker is avoided by all. The root
//! context and the request contexts of a VM share this state through `Rc<RefCell<_>>` (a VM is
//! single-threaded).

use std::{collections::HashMap, net::SocketAddr, rc::Rc, time::Duration};

use fulcrum_core::{
    BreakerState, Endpoint, Policy, ServicePicker, SessionKeys, Snapshot, Transition,
    ejections::{SharedEjection, rules_fingerprint},
    rng::SplitMix64,
};

use crate::{
    log_warn,
    metrics::{FailOpen, Metrics, ServiceMetrics},
    sync::{EjectionsRead, EjectionsWriteError, SharedBuckets, SharedEjections, SharedKeys},
};

/// A service's picker, rate-limit buckets, shared ejections and stats.
#[derive(Debug)]
pub struct Service {
    pub picker: ServicePicker,
    /// The rate limit's buckets, shared with every VM of the plugin.
    pub buckets: SharedBuckets,
    /// The service's ejections, shared with every VM of the plugin.
    ejections: SharedEjections,
    pub metrics: ServiceMetrics,
}

impl Service {
    /// Applies the service's shared ejections if another VM changed them since the last read:
    /// one host call, plus a decoding when they changed.
    pub fn adopt_shared_ejections(&mut self, now: Duration, vm: &Metrics) {
        match self.ejections.read() {
            EjectionsRead::Unchanged => {}
            EjectionsRead::Changed(record) => {
                for transition in self.picker.apply_shared_ejections(&record, now) {
                    self.metrics.shared_transition(&transition);
                }
            }
            EjectionsRead::Invalid(error) => {
                vm.shared_ejections_invalid();
                log_warn(&error.to_string());
            }
        }
    }

    /// Writes this VM's ejections and their ends among `transitions` to the shared record.
    pub fn share_transitions<'t>(
        &self,
        transitions: impl IntoIterator<Item = &'t Transition>,
        now: Duration,
        vm: &Metrics,
    ) {
        let expired_before =
            now.saturating_sub(self.picker.policy().outlier_detection.max_ejection_time);
        for transition in transitions {
            let address = transition.endpoint;
            let written = match transition.to {
                BreakerState::Open { until, ejections } => self.ejections.write(|record| {
                    let pruned = record.prune(expired_before);
                    let ejection = SharedEjection {
                        address,
                        until,
                        ejections,
                    };
                    let recorded = record.record_ejection(ejection);
                    if recorded || record.get(address).is_some() {
                        Ok(recorded || pruned)
                    } else {
                        Err(EjectionsWriteError::Full)
                    }
                }),
                BreakerState::Closed { .. } => self
                    .ejections
                    .write(|record| Ok(record.record_restored(address, now))),
                BreakerState::HalfOpen { .. } => continue,
            };
            if written.is_err() {
                vm.shared_ejections_write_failed();
            }
        }
    }
}

/// A service's state and the VM's shared parts, borrowed together for one pick.
#[derive(Debug)]
pub struct Routed<'a> {
    /// The service name, shared so the request can hold it until the response.
    pub key: Rc<str>,
    pub service: &'a mut Service,
    pub rng: &'a mut SplitMix64,
    pub metrics: &'a Metrics,
}

/// The state every context of one VM shares.
#[derive(Debug)]
pub struct Worker {
    /// Services of the current snapshot; `Rc<str>` keys so a request can keep its service
    /// name until the response without copying it.
    services: HashMap<Rc<str>, Service>,
    /// The policy in force: the configuration's until a snapshot brings one, then the last
    /// one a snapshot brought.
    policy: Policy,
    /// Keys of sticky-session cookies, given to every service's picker.
    session_keys: SessionKeys,
    /// Where the plugin's VMs share state (here: each service's rate-limit buckets and
    /// ejections).
    shared: SharedKeys,
    /// The zone of this proxy's Envoy node, given to every service policy without a
    /// `locality.local_zone` of its own ([`Policy::in_zone`]).
    node_zone: Option<String>,
    /// Version of the snapshot in force, `None` before the first one.
    version: Option<String>,
    /// The VM-wide stats, shared with the root context and every request context.
    pub metrics: Rc<Metrics>,
    pub rng: SplitMix64,
}

impl Worker {
    pub fn new(
        configured_policy: Policy,
        node_zone: Option<String>,
        session_keys: SessionKeys,
        shared: SharedKeys,
        seed: u64,
        metrics: Rc<Metrics>,
    ) -> Self {
        Self {
            services: HashMap::new(),
            policy: placed(configured_policy, node_zone.as_deref()),
            node_zone,
            session_keys,
            shared,
            version: None,
            metrics,
            rng: SplitMix64::new(seed),
        }
    }

    /// The version of the snapshot in force.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// Everything a pick for `service` needs, borrowed at once; `None` (counted as a
    /// fail-open) when there is no snapshot yet or the snapshot lacks the service.
    pub fn route(&mut self, service: &str) -> Option<Routed<'_>> {
        let Self {
            services,
            metrics,
            rng,
            version,
            ..
        } = self;
        let Some(key) = services.get_key_value(service).map(|(key, _)| key.clone()) else {
            metrics.fail_open(if version.is_some() {
                FailOpen::UnknownService
            } else {
                FailOpen::NoSnapshot
            });
            return None;
        };
        let service = services.get_mut(&key)?;
        Some(Routed {
            key,
            service,
            rng,
            metrics,
        })
    }

    /// Applies every service's shared ejections that changed since the last tick.
    pub fn adopt_shared_ejections(&mut self, now: Duration) {
        for service in self.services.values_mut() {
            service.adopt_shared_ejections(now, &self.metrics);
        }
    }

    /// Hands every service's picks counted since the last tick to Envoy's stats.
    pub fn flush_metrics(&mut self) {
        for service in self.services.values_mut() {
            service.metrics.flush();
        }
    }

    /// The state of a service the request context already holds the key of.
    pub fn service_by_key(&mut self, key: &Rc<str>) -> Option<&mut Service> {
        self.services.get_mut(key)
    }

    /// Applies a received snapshot: new services get pickers, services whose selection
    /// policy is unchanged keep the state of their surviving endpoints (a change of
    /// `health_check` alone, or of another service's policy, resets nothing), services whose
    /// selection policy changed start afresh, and removed services are dropped. A snapshot
    /// without a policy keeps the policy in force (the configured one until a snapshot brings
    /// one).
    pub fn apply(&mut self, snapshot: &Snapshot) {
        let replaced = snapshot.policy.as_ref().map(|policy| {
            let placed = placed(policy.clone(), self.node_zone.as_deref());
            std::mem::replace(&mut self.policy, placed)
        });
        let previous_policy = replaced.as_ref().unwrap_or(&self.policy);
        let mut previous = std::mem::take(&mut self.services);
        for (name, endpoints) in &snapshot.services {
            let service_policy = self.policy.for_service(name);
            let unchanged = service_policy.same_selection(previous_policy.for_service(name));
            let key: Rc<str> = Rc::from(name.as_str());
            let service = match previous.remove(name.as_str()) {
                Some(mut service) if unchanged => {
                    release_removed(&mut service, &endpoints.endpoints);
                    service.picker.update_endpoints(&endpoints.endpoints);
                    service
                }
                stale => {
                    if let Some(mut stale) = stale {
                        release_removed(&mut stale, &[]);
                    }
                    let mut picker = ServicePicker::new(service_policy, &endpoints.endpoints);
                    picker.set_session_keys(&self.session_keys);
                    Service {
                        picker,
                        buckets: self.shared.rate_limit_buckets(name),
                        ejections: self.shared.ejections(
                            name,
                            rules_fingerprint(
                                &service_policy.outlier_detection,
                                &service_policy.failure_kinds,
                            ),
                        ),
                        metrics: ServiceMetrics::new(name, &self.metrics),
                    }
                }
            };
            self.services.insert(key, service);
        }
        for (_, mut removed) in previous {
            release_removed(&mut removed, &[]);
        }
        self.version = Some(snapshot.version.clone());
    }
}

/// `policy` as this proxy applies it: in the node's zone when the node has one.
fn placed(policy: Policy, node_zone: Option<&str>) -> Policy {
    match node_zone {
        Some(zone) => policy.in_zone(zone),
        None => policy,
    }
}

/// Takes the endpoints that are about to disappear out of the circuit-open gauge and frees
/// their stat handles, so the per-service cap counts current endpoints, not every address
/// the service ever had.
fn release_removed(service: &mut Service, remaining: &[Endpoint]) {
    let removed: Vec<(SocketAddr, bool)> = service
        .picker
        .endpoints()
        .filter(|view| !remaining.iter().any(|e| e.address == view.endpoint.address))
        .map(|view| {
            (
                view.endpoint.address,
                !matches!(view.breaker, BreakerState::Closed { .. }),
            )
        })
        .collect();
    for (address, open) in removed {
        service.metrics.release(address, open);
    }
}
