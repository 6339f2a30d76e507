//! One VM's balancing state: a [`ServicePicker`] per service, built from the current
//! snapshot, plus the VM's stats and random source.
//!
//! Envoy runs one VM per worker thread and its own load balancers per worker too; fulcrum's
//! in-flight counts and latency estimates are likewise per worker: each worker balances by
//! the requests it sent. Two things are per proxy, through shared data: the rate limit's
//! buckets ([`SharedBuckets`]), and ejections with the failure counts that lead to them
//! ([`SharedEjections`]): a closed endpoint's failure is counted in its service's record
//! before its breaker judges the proxy's count ([`SharedCounting`]), a breaker that opens or
//! closes after an ejection on one worker is written there too, and every worker applies the
//! record on its next tick (or sooner, before recording a response that may be a failure), so
//! an endpoint found dead by the proxy costs the proxy one threshold of failures and is
//! avoided by all. The root
//! context and the request contexts of a VM share this state through `Rc<RefCell<_>>` (a VM is
//! single-threaded).

use std::{net::SocketAddr, rc::Rc, time::Duration};

use fulcrum_core::{
    BreakerState, DataPlane, Endpoint, Outcome, Policy, Served, ServiceEndpoints, ServicePicker,
    ServicePolicy, SessionKeys, Snapshot, Transition, Transitions,
    breaker::{Consecutive, Verdict},
    diagnostics::EndpointDiagnostics,
    distribution::content_hash,
    ejections::{FailureCounts, SharedEjection, rules_fingerprint},
    mesh::{Applied, Change, Hashed, Lifecycle, ServiceState, Services},
    rng::SplitMix64,
    tables::TableBudgetError,
};

use crate::{
    input::NodeLocality,
    log_warn,
    metrics::{FailOpen, Metrics, ServiceMetrics},
    sync::{
        EjectionsRead, EjectionsWriteError, Fetched, SharedBuckets, SharedEjections, SharedKeys,
    },
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
    /// Applies the service's shared ejections and failure counts if another VM changed them
    /// since the last read: one host call, plus a decoding when they changed. Returns what
    /// was read, for a compare-and-swap that follows (`None` when the host refused the read).
    pub fn adopt_shared_ejections(&mut self, now: Duration, vm: &Metrics) -> Option<Fetched> {
        let fetched = self.ejections.fetch().ok()?;
        match self.ejections.read(&fetched) {
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
        Some(fetched)
    }

    /// Records the end of a request ([`ServicePicker::complete_counted`]) with the
    /// consecutive-failure counts kept in the shared record, `fetched` being the record as
    /// read just before (for a response that may be a failure), and shares the ejections and
    /// their ends it causes.
    pub fn complete(
        &mut self,
        picked: SocketAddr,
        served_by: Served,
        outcome: Outcome,
        now: Duration,
        fetched: Option<Fetched>,
        vm: &Metrics,
    ) -> Transitions {
        let mut counting = SharedCounting {
            ejections: &self.ejections,
            fetched,
            max_ejection_time: self.picker.policy().outlier_detection.max_ejection_time,
            vm,
        };
        let transitions =
            self.picker
                .complete_counted(picked, served_by, outcome, now, &mut counting);
        for transition in transitions.iter() {
            self.metrics.transition(transition);
        }
        if !transitions.is_empty() {
            self.share_transitions(transitions.iter(), now, vm);
        }
        transitions
    }

    /// Writes this VM's ejections and their ends among `transitions` to the shared record.
    fn share_transitions<'t>(
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
                BreakerState::Open { until, ejections } => self.ejections.write(None, |record| {
                    let pruned = record.prune(expired_before);
                    let ejection = SharedEjection {
                        address,
                        until,
                        ejections,
                    };
                    // The breaker's counters restarted with the ejection; so do the proxy's.
                    let forgotten = record.forget_count(address);
                    let recorded = record.record_ejection(ejection);
                    if recorded || record.get(address).is_some() {
                        Ok(recorded || pruned || forgotten)
                    } else {
                        Err(EjectionsWriteError::Full)
                    }
                }),
                BreakerState::Closed { .. } => self
                    .ejections
                    .write(None, |record| Ok(record.record_restored(address, now))),
                BreakerState::HalfOpen { .. } => continue,
            };
            if written.is_err() {
                vm.shared_ejections_write_failed();
            }
        }
    }
}

/// The consecutive-failure counts of a service's endpoints in its shared record, for one
/// completion: each count is a compare-and-swap whose first round uses the record as read
/// just before, when there is one. A count that cannot be written (contention, a record full
/// of counters, a host error) is counted in `fulcrum_shared_ejections_write_failures_total`
/// and left to the worker's breaker alone.
struct SharedCounting<'a> {
    ejections: &'a SharedEjections,
    fetched: Option<Fetched>,
    /// Counters last counted longer ago are pruned, like ejections expired that long.
    max_ejection_time: Duration,
    vm: &'a Metrics,
}

impl FailureCounts for SharedCounting<'_> {
    fn count(
        &mut self,
        address: SocketAddr,
        verdict: &Verdict,
        now: Duration,
    ) -> Option<Consecutive> {
        let expired_before = now.saturating_sub(self.max_ejection_time);
        let mut counted = None;
        let written = self.ejections.write(self.fetched.take(), |record| {
            let pruned = record.prune(expired_before);
            let outcome = record
                .count_outcome(address, verdict, now)
                .ok_or(EjectionsWriteError::Full)?;
            counted = Some(outcome.proxy);
            Ok(outcome.changed || pruned)
        });
        match written {
            Ok(()) => counted,
            Err(_) => {
                self.vm.shared_ejections_write_failed();
                None
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
    /// Services of the snapshot in force, under the policy in force: the configuration's
    /// until a snapshot brings one, then the last one a snapshot brought.
    services: Services<Service>,
    /// How a service's state is made and released.
    lifecycle: ServiceLifecycle,
    /// The locality of this proxy's Envoy node: its zone and region, given to every service
    /// policy without a `locality.local_zone` or `local_region` of its own
    /// ([`Policy::in_zone`], [`Policy::in_region`]).
    node_locality: NodeLocality,
    /// The most bytes every consistent-hash table together may take (`max_table_bytes`).
    max_table_bytes: u64,
    /// The version last refused for exceeding `max_table_bytes`, so it is not read again.
    refused: Option<String>,
    pub rng: SplitMix64,
}

/// Makes a service's state (its picker, shared-data handles and stats) and releases the
/// stats of endpoints that go.
#[derive(Debug)]
struct ServiceLifecycle {
    /// Keys of sticky-session cookies, given to every service's picker.
    session_keys: SessionKeys,
    /// Where the plugin's VMs share state (here: each service's rate-limit buckets and
    /// ejections).
    shared: SharedKeys,
    /// The VM-wide stats, shared with the root context and every request context.
    metrics: Rc<Metrics>,
}

impl Lifecycle<Service> for ServiceLifecycle {
    fn create(&mut self, name: &str, policy: &ServicePolicy, endpoints: &[Endpoint]) -> Service {
        let mut picker = ServicePicker::new(policy, endpoints);
        picker.set_session_keys(&self.session_keys);
        Service {
            picker,
            buckets: self.shared.rate_limit_buckets(name),
            ejections: self.shared.ejections(
                name,
                rules_fingerprint(&policy.outlier_detection, &policy.failure_kinds),
            ),
            metrics: ServiceMetrics::new(name, endpoints.len(), &self.metrics),
        }
    }

    fn release(&mut self, service: &mut Service, remaining: &[Endpoint]) {
        release_removed(service, remaining);
        service.metrics.set_service_endpoints(remaining.len());
    }
}

impl ServiceState for Service {
    fn picker(&self) -> &ServicePicker {
        &self.picker
    }

    fn picker_mut(&mut self) -> &mut ServicePicker {
        &mut self.picker
    }
}

impl Worker {
    pub fn new(
        configured_policy: Policy,
        node_locality: NodeLocality,
        session_keys: SessionKeys,
        shared: SharedKeys,
        max_table_bytes: u64,
        seed: u64,
        metrics: Rc<Metrics>,
    ) -> Self {
        Self {
            services: Services::new(placed(configured_policy, &node_locality)),
            lifecycle: ServiceLifecycle {
                session_keys,
                shared,
                metrics,
            },
            node_locality,
            max_table_bytes,
            refused: None,
            rng: SplitMix64::new(seed),
        }
    }

    /// The VM-wide stats.
    pub fn metrics(&self) -> &Rc<Metrics> {
        &self.lifecycle.metrics
    }

    /// The version of the snapshot in force.
    pub fn version(&self) -> Option<&str> {
        self.services.version()
    }

    /// The services in force, which a change is computed against.
    pub fn services(&self) -> &Services<Service> {
        &self.services
    }

    /// Whether `version` was refused for exceeding `max_table_bytes`.
    pub fn refused(&self, version: &[u8]) -> bool {
        self.refused.as_deref().map(str::as_bytes) == Some(version)
    }

    /// Everything a pick for `service` needs, borrowed at once; `None` (counted as a
    /// fail-open) when there is no snapshot yet or the snapshot lacks the service.
    pub fn route(&mut self, service: &str) -> Option<Routed<'_>> {
        let Self {
            services,
            lifecycle,
            rng,
            ..
        } = self;
        let metrics = &lifecycle.metrics;
        let known = services.version().is_some();
        let Some((key, service)) = services.get_key_value_mut(service) else {
            metrics.fail_open(if known {
                FailOpen::UnknownService
            } else {
                FailOpen::NoSnapshot
            });
            return None;
        };
        let key = key.clone();
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
            // The tick only applies the record; nothing follows that could use the read.
            let _ = service.adopt_shared_ejections(now, &self.lifecycle.metrics);
        }
    }

    /// Hands every service's picks counted since the last tick to Envoy's stats.
    pub fn flush_metrics(&mut self) {
        for service in self.services.values_mut() {
            service.metrics.flush();
        }
    }

    /// What this VM's picker of `service` believes about each endpoint at `now`
    /// ([`ServicePicker::diagnose`]); `None` when the snapshot in force lacks the service.
    pub fn diagnose(&mut self, service: &str, now: Duration) -> Option<Vec<EndpointDiagnostics>> {
        Some(self.services.get_mut(service)?.picker.diagnose(now))
    }

    /// Whether the policy in force puts `service` on the native data plane: its cluster's own
    /// policy, fulcrum's native module, picks, so the filter leaves it alone.
    pub fn is_native(&self, service: &str) -> bool {
        self.services.policy().for_service(service).data_plane == DataPlane::Native
    }

    /// The state of a service the request context already holds the key of.
    pub fn service_by_key(&mut self, key: &Rc<str>) -> Option<&mut Service> {
        self.services.get_mut(key)
    }

    /// Applies a snapshot change (`fulcrum_core::mesh`): only the services it names are
    /// rebuilt or updated, every other keeps its state; a change of policy rebuilds the
    /// services whose selection it changes. Refused whole, changing nothing, when its tables
    /// would exceed `max_table_bytes`.
    pub fn apply(&mut self, mut change: Change) -> Result<Applied, TableBudgetError> {
        if let Some(policy) = &mut change.policy {
            policy.value = placed(std::mem::take(&mut policy.value), &self.node_locality);
        }
        let version = change.version.clone();
        let applied = self
            .services
            .apply(change, self.max_table_bytes, &mut self.lifecycle);
        if applied.is_err() {
            self.refused = Some(version);
        }
        applied
    }

    /// Applies a whole snapshot (the configuration's static endpoints).
    pub fn apply_whole(&mut self, snapshot: &Snapshot) -> Result<Applied, TableBudgetError> {
        let services = snapshot
            .services
            .iter()
            .map(|(name, service)| {
                // Plain data over ordered maps: serialization cannot fail.
                let json = serde_json::to_vec(&**service).unwrap_or_default();
                let hashed = Hashed {
                    hash: content_hash(&json),
                    value: ServiceEndpoints::clone(service),
                };
                (name.clone(), hashed)
            })
            .collect();
        let change = self
            .services
            .whole(snapshot.version.clone(), services, None);
        self.apply(change)
    }
}

/// `policy` as this proxy applies it: in the node's zone and region, those it has.
fn placed(mut policy: Policy, node: &NodeLocality) -> Policy {
    if let Some(zone) = &node.zone {
        policy = policy.in_zone(zone);
    }
    if let Some(region) = &node.region {
        policy = policy.in_region(region);
    }
    policy
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
