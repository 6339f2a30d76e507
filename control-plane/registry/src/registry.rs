//! The registry: validation and admission in front of a backend, reads from the view,
//! picks by policy.
//!
//! Writes (register, heartbeat, deregister) validate and go to the [`RegistryBackend`]; a
//! registration is admitted first ([`crate::admission`]: address classes, the identity's
//! scope and quota, the registry's cap), and a refusal is counted by reason and logged with
//! the identity;
//! reads (discover, watch, the endpoint source) come from the local [`View`], so they keep
//! answering with the last known state while the backend cannot take writes. A "pick one"
//! discovery applies the service's [`fulcrum_core::Policy`] through a
//! [`ServicePicker`] kept per service and filter, rebuilt when the service changes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use fulcrum_core::{Outcome, Policy, RequestAttributes, ServicePicker, rng::SplitMix64};
use fulcrum_health::ProbeHub;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::{
    admission::{Admission, Limits, Refusal},
    auth::Identity,
    backend::{
        BackendError, RegistryBackend,
        etcd::{EtcdBackend, EtcdConfig, EtcdConnectError},
        memory::MemoryBackend,
    },
    health::spawn_monitor,
    metrics::RegistryMetrics,
    model::{FieldErrors, InstanceSpec, validate_discovery, validate_instance_id},
    source::RegistrySource,
    view::{Cursor, Entry, HealthStatus, Record, Since, View},
};

/// Cached balancers kept at most; the cache is cleared when it would grow beyond.
const MAX_BALANCERS: usize = 4096;
/// Cached discovery answers kept at most; the cache is cleared when it would grow beyond.
pub const MAX_CACHED_ANSWERS: usize = 4096;

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Bad input; every bad field is named.
    #[error("invalid request: {0}")]
    Invalid(#[from] FieldErrors),
    /// Valid, but not admitted (address class, scope, quota, cap).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Another registration of the service already uses the address.
    #[error(
        "{address} is already registered for service `{service}` as instance `{holder}`; deregister it first or use another address"
    )]
    AddressInUse {
        /// The service.
        service: String,
        /// The address.
        address: std::net::SocketAddr,
        /// The instance holding it.
        holder: String,
    },
    /// The backend refused or failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Which instances of a service a discovery wants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Query {
    /// The service name.
    pub service: String,
    /// Tags every instance must have.
    pub tags: BTreeSet<String>,
    /// Capabilities every instance must have.
    pub capabilities: BTreeSet<String>,
    /// Key/values every instance must have.
    pub metadata: BTreeMap<String, String>,
    /// Only this zone.
    pub zone: Option<String>,
    /// Only these health states; empty means `Unknown` and `Healthy` (what serves).
    pub health: BTreeSet<HealthStatus>,
    /// One instance picked by the policy instead of all.
    pub pick: bool,
}

impl Query {
    /// Checks the service name, and the filters with the bounds of a registration's
    /// attributes ([`validate_discovery`]): a query beyond them is refused before it is
    /// matched or kept by any cache.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        validate_discovery(
            &self.service,
            self.zone.as_deref(),
            &self.tags,
            &self.capabilities,
            &self.metadata,
        )
    }

    fn matches(&self, entry: &Entry) -> bool {
        let registration = entry.record.registration.attributes();
        let health = entry.health;
        let health_ok = if self.health.is_empty() {
            health != HealthStatus::Unhealthy
        } else {
            self.health.contains(&health)
        };
        health_ok
            && self.tags.is_subset(&registration.tags)
            && self.capabilities.is_subset(&registration.capabilities)
            && self
                .metadata
                .iter()
                .all(|(key, value)| registration.metadata.get(key) == Some(value))
            && self
                .zone
                .as_ref()
                .is_none_or(|zone| registration.zone.as_ref() == Some(zone))
    }
}

/// What a discovery found.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// Matching entries sorted by id; with `pick`, the picked one or none.
    pub entries: Arc<[Entry]>,
    /// The service's generation the entries were read at: without `pick`, one query at one
    /// generation always finds the same entries, so an answer built from them can be reused
    /// while the generation stays (see [`AnswerCache`]).
    pub generation: u64,
    /// The view's cursor when it answered.
    pub cursor: Cursor,
}

/// Answers built from a discovery, kept per query and service generation so that repeated
/// discoveries of an unchanged service share one answer instead of rebuilding it. A change
/// to the service moves its generation, which makes the kept answer stale: it is rebuilt
/// on the next call. Holds at most [`MAX_CACHED_ANSWERS`] queries.
#[derive(Debug)]
pub struct AnswerCache<T: ?Sized> {
    answers: Mutex<HashMap<Query, (u64, Arc<T>)>>,
}

impl<T: ?Sized> Default for AnswerCache<T> {
    fn default() -> Self {
        Self {
            answers: Mutex::new(HashMap::new()),
        }
    }
}

impl<T: ?Sized> AnswerCache<T> {
    /// The answer for `query` at `generation`: the kept one, or `build()` (then kept).
    pub fn get_or_build(
        &self,
        query: &Query,
        generation: u64,
        build: impl FnOnce() -> Arc<T>,
    ) -> Arc<T> {
        if let Some((kept, answer)) = self.lock().get(query)
            && *kept == generation
        {
            return answer.clone();
        }
        let answer = build();
        let mut answers = self.lock();
        if answers.len() >= MAX_CACHED_ANSWERS && !answers.contains_key(query) {
            answers.clear();
        }
        answers.insert(query.clone(), (generation, answer.clone()));
        answer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Query, (u64, Arc<T>)>> {
        self.answers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug)]
struct CachedBalancer {
    generation: u64,
    policy_version: u64,
    /// Instance ids by address, to map the pick back.
    ids: HashMap<std::net::SocketAddr, usize>,
    entries: Vec<Entry>,
    balancer: ServicePicker,
}

#[derive(Debug)]
struct Picking {
    balancers: HashMap<Query, CachedBalancer>,
    rng: SplitMix64,
}

/// The registry. See the module docs.
#[derive(Debug)]
pub struct Registry {
    backend: Arc<dyn RegistryBackend>,
    view: Arc<View>,
    policy: RwLock<(u64, Arc<Policy>)>,
    picking: Mutex<Picking>,
    /// The filtered entries of discoveries without `pick`.
    filtered: AnswerCache<[Entry]>,
    started: Instant,
    metrics: RegistryMetrics,
    admission: Admission,
}

impl Registry {
    /// A registry over the in-memory backend admitting what `limits` allow, with health
    /// checks running.
    pub fn in_memory(limits: Limits) -> Arc<Self> {
        let view = Arc::new(View::new(new_epoch()));
        let backend = MemoryBackend::start(view.clone());
        Self::new(backend, view, limits)
    }

    /// A registry over etcd admitting what `limits` allow, with health checks running. The
    /// records every replica writes are admitted again with `limits`' address policy as
    /// they are read (see [`crate::backend::etcd`]).
    pub async fn on_etcd(
        config: EtcdConfig,
        limits: Limits,
    ) -> Result<Arc<Self>, EtcdConnectError> {
        let view = Arc::new(View::new(new_epoch()));
        let backend = EtcdBackend::connect(config, view.clone(), limits.addresses.clone()).await?;
        Ok(Self::new(backend, view, limits))
    }

    /// A registry over `backend`, which keeps `view` current, admitting what `limits` allow;
    /// starts the health monitor on the current runtime (it stops when the view is dropped)
    /// and counts the view in the instances gauge.
    pub fn new(backend: Arc<dyn RegistryBackend>, view: Arc<View>, limits: Limits) -> Arc<Self> {
        let mut metrics = RegistryMetrics::new(limits.max_service_series);
        metrics.count_backend(&*backend);
        spawn_monitor(
            &view,
            ProbeHub::global().clone(),
            metrics.service_labels().clone(),
        );
        metrics.count(&view);
        info!(
            backend = backend.kind(),
            max_instances = limits.max_instances,
            "registry started"
        );
        Arc::new(Self {
            backend,
            view,
            policy: RwLock::new((0, Arc::new(Policy::default()))),
            picking: Mutex::new(Picking {
                balancers: HashMap::new(),
                rng: SplitMix64::new(u64::from(std::process::id()) ^ unix_nanos()),
            }),
            filtered: AnswerCache::default(),
            started: Instant::now(),
            metrics,
            admission: Admission::new(limits),
        })
    }

    /// What this registry admits.
    pub fn limits(&self) -> &Limits {
        self.admission.limits()
    }

    /// The registry's Prometheus metrics, counted by the API faces; register them with
    /// [`RegistryMetrics::register`].
    pub fn metrics(&self) -> &RegistryMetrics {
        &self.metrics
    }

    /// The view (for the source, the API and tests).
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// The backend's kind.
    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// Replaces the balancing policy used by picks.
    pub fn set_policy(&self, policy: Policy) {
        let mut current = self
            .policy
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = (current.0 + 1, Arc::new(policy));
    }

    /// An endpoint source publishing every registration (with its health).
    pub fn source(&self) -> RegistrySource {
        RegistrySource::new(self.view.clone(), self.metrics.protocol_conflicts())
    }

    /// Registers (or re-registers) `spec` for `identity`, if admitted.
    pub async fn register(
        &self,
        spec: &InstanceSpec,
        identity: &Identity,
    ) -> Result<Entry, RegistryError> {
        let registration = spec.validate()?;
        let owner = identity.name.as_str();
        let reservation = self
            .admission
            .admit(&registration, owner, &identity.scope, &self.view)
            .map_err(|refusal| {
                self.metrics.refused(&refusal);
                warn!(
                    identity = owner,
                    instance = %registration.id,
                    service = %registration.name,
                    address = %registration.address(),
                    reason = refusal.reason(),
                    %refusal,
                    "registration refused"
                );
                refusal
            })?;
        let (entries, _) = self.view.service(&registration.name);
        if let Some(holder) = entries.iter().find(|entry| {
            entry.record.registration.address() == registration.address()
                && entry.record.registration.id != registration.id
        }) {
            return Err(RegistryError::AddressInUse {
                service: registration.name.to_string(),
                address: registration.address(),
                holder: holder.record.registration.id.to_string(),
            });
        }
        let record = self.backend.register(registration, owner).await?;
        drop(reservation);
        let health = self
            .view
            .get(&record.registration.id)
            .map_or(HealthStatus::Unknown, |entry| entry.health);
        info!(
            instance = %record.registration.id,
            service = %record.registration.name,
            address = %record.registration.address(),
            owner,
            "registered"
        );
        Ok(Entry { record, health })
    }

    /// Renews `id`'s lease; returns its TTL.
    pub async fn heartbeat(&self, id: &str, owner: &str) -> Result<Duration, RegistryError> {
        validate_instance_id(id).map_err(|reason| FieldErrors::one("id", reason))?;
        Ok(self.backend.heartbeat(id, owner).await?)
    }

    /// Removes `id`.
    pub async fn deregister(&self, id: &str, owner: &str) -> Result<(), RegistryError> {
        validate_instance_id(id).map_err(|reason| FieldErrors::one("id", reason))?;
        self.backend.deregister(id, owner).await?;
        info!(instance = %id, owner, "deregistered");
        Ok(())
    }

    /// The instances matching `query`, or one picked by the service's policy.
    pub fn discover(&self, query: &Query) -> Result<Discovery, RegistryError> {
        query.validate()?;
        let cursor = self.view.cursor();
        let (entries, generation) = self.view.service(&query.service);
        if !query.pick {
            let entries = self.filtered.get_or_build(query, generation, || {
                entries
                    .iter()
                    .filter(|entry| query.matches(entry))
                    .cloned()
                    .collect()
            });
            return Ok(Discovery {
                entries,
                generation,
                cursor,
            });
        }
        Ok(Discovery {
            entries: self.pick(query, entries, generation).into_iter().collect(),
            generation,
            cursor,
        })
    }

    /// Picks among `entries` (the service's at `generation`) by the policy.
    fn pick(&self, query: &Query, entries: Arc<[Entry]>, generation: u64) -> Option<Entry> {
        let (policy_version, policy) = self
            .policy
            .read()
            .map(|policy| (policy.0, policy.1.clone()))
            .unwrap_or_else(|poisoned| {
                let policy = poisoned.into_inner();
                (policy.0, policy.1.clone())
            });
        let now = self.started.elapsed();
        let mut picking = self
            .picking
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Picking { balancers, rng } = &mut *picking;
        let fresh = balancers.get(query).is_some_and(|cached| {
            cached.generation == generation && cached.policy_version == policy_version
        });
        if !fresh {
            let entries: Vec<Entry> = entries
                .iter()
                .filter(|entry| query.matches(entry))
                .cloned()
                .collect();
            let endpoints: Vec<fulcrum_core::Endpoint> = entries
                .iter()
                .map(|entry| {
                    entry
                        .record
                        .registration
                        .endpoint(entry.health.endpoint_health())
                })
                .collect();
            let ids = entries
                .iter()
                .enumerate()
                .map(|(index, entry)| (entry.record.registration.address(), index))
                .collect();
            let service_policy = policy.for_service(&query.service);
            let cached = CachedBalancer {
                generation,
                policy_version,
                ids,
                entries,
                balancer: ServicePicker::new(service_policy, &endpoints),
            };
            if balancers.len() >= MAX_BALANCERS {
                balancers.clear();
            }
            balancers.insert(query.clone(), cached);
        }
        let cached = balancers.get_mut(query)?;
        let pick = cached
            .balancer
            .pick(&RequestAttributes::default(), now, rng)
            .ok()?;
        // The registry never sees the request's outcome: count it as done at once so
        // in-flight counts stay at zero and the algorithm spreads by its other signals.
        cached.balancer.complete(
            pick.endpoint,
            fulcrum_core::Served::ByPick,
            Outcome::default(),
            now,
        );
        let index = *cached.ids.get(&pick.endpoint)?;
        cached.entries.get(index).cloned()
    }

    /// Changes after `cursor` (or a reset), and the cursor after them.
    pub fn since(&self, cursor: Option<&Cursor>) -> (Since, Cursor) {
        self.view.since(cursor)
    }

    /// Waits until the view moves past `cursor` or `timeout` passes; then returns what
    /// changed (possibly nothing).
    pub async fn wait_since(&self, cursor: Option<&Cursor>, timeout: Duration) -> (Since, Cursor) {
        let mut revisions = self.view.subscribe();
        let (since, now) = self.view.since(cursor);
        if !matches!(&since, Since::Changes(changes) if changes.is_empty()) {
            return (since, now);
        }
        let _ = tokio::time::timeout(timeout, revisions.changed()).await;
        self.view.since(cursor)
    }
}

/// A registry record from a backend, for the API: entry plus effective values.
pub fn record_ttl_ms(record: &Record) -> u32 {
    u32::try_from(record.registration.ttl().as_millis()).unwrap_or(u32::MAX)
}

/// A fresh epoch for a view: time and process id, unique per run.
pub fn new_epoch() -> String {
    format!("{:x}-{:x}", unix_nanos(), std::process::id())
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use fulcrum_core::{LoadBalancer, ServicePolicy};

    use super::*;
    use crate::test_support::{loopback, spec};

    fn alice() -> Identity {
        Identity::unscoped("alice")
    }

    async fn registered(ports: &[u16]) -> Arc<Registry> {
        let registry = Registry::in_memory(loopback());
        for port in ports {
            let mut spec = spec("svc", &format!("svc-{port}"), *port);
            if port.is_multiple_of(2) {
                spec.tags = vec!["even".into()];
            }
            spec.metadata
                .insert("version".into(), format!("v{}", port % 3));
            registry
                .register(&spec, &alice())
                .await
                .expect("registered");
        }
        registry
    }

    fn ids(discovery: &Discovery) -> Vec<&str> {
        discovery
            .entries
            .iter()
            .map(|e| &*e.record.registration.id)
            .collect()
    }

    #[tokio::test]
    async fn discover_filters_by_tags_and_metadata() {
        let registry = registered(&[1, 2, 3, 4, 5, 6]).await;
        let query = Query {
            service: "svc".into(),
            tags: BTreeSet::from(["even".into()]),
            metadata: BTreeMap::from([("version".into(), "v0".into())]),
            ..Query::default()
        };
        assert_eq!(ids(&registry.discover(&query).expect("ok")), ["svc-6"]);
    }

    #[tokio::test]
    async fn unhealthy_instances_are_hidden_unless_asked_for() {
        let registry = registered(&[1, 2]).await;
        let entry = registry.view().get("svc-1").expect("svc-1");
        registry
            .view()
            .set_health(&entry.record, HealthStatus::Unhealthy);
        let mut query = Query {
            service: "svc".into(),
            ..Query::default()
        };
        assert_eq!(ids(&registry.discover(&query).expect("ok")), ["svc-2"]);
        query.health = BTreeSet::from([HealthStatus::Unhealthy]);
        assert_eq!(ids(&registry.discover(&query).expect("ok")), ["svc-1"]);
    }

    #[tokio::test]
    async fn a_kept_discovery_answer_is_reused_and_follows_every_change_of_the_service() {
        let registry = registered(&[1, 2, 3, 4]).await;
        let even = Query {
            service: "svc".into(),
            tags: BTreeSet::from(["even".into()]),
            ..Query::default()
        };
        let first = registry.discover(&even).expect("ok");
        let again = registry.discover(&even).expect("ok");
        assert!(Arc::ptr_eq(&first.entries, &again.entries));
        assert_eq!(ids(&first), ["svc-2", "svc-4"]);

        let mut spec = spec("svc", "svc-6", 6);
        spec.tags = vec!["even".into()];
        registry
            .register(&spec, &alice())
            .await
            .expect("registered");
        assert_eq!(
            ids(&registry.discover(&even).expect("ok")),
            ["svc-2", "svc-4", "svc-6"]
        );
        let entry = registry.view().get("svc-4").expect("svc-4");
        registry
            .view()
            .set_health(&entry.record, HealthStatus::Unhealthy);
        assert_eq!(
            ids(&registry.discover(&even).expect("ok")),
            ["svc-2", "svc-6"]
        );
        registry
            .deregister("svc-2", "alice")
            .await
            .expect("removed");
        assert_eq!(ids(&registry.discover(&even).expect("ok")), ["svc-6"]);
        // Another query on the same service keeps its own answer.
        let all = Query {
            service: "svc".into(),
            ..Query::default()
        };
        assert_eq!(
            ids(&registry.discover(&all).expect("ok")),
            ["svc-1", "svc-3", "svc-6"]
        );
    }

    #[tokio::test]
    async fn an_oversized_discovery_is_refused_naming_the_field_before_any_cache() {
        let registry = registered(&[1, 2]).await;
        let oversized = [
            (
                "tags",
                Query {
                    tags: (0..100_000).map(|index| format!("t{index}")).collect(),
                    ..Query::default()
                },
            ),
            (
                "zone",
                Query {
                    zone: Some("z".repeat(100_000)),
                    ..Query::default()
                },
            ),
            (
                "metadata",
                Query {
                    metadata: (0..100_000)
                        .map(|index| (format!("k{index}"), String::new()))
                        .collect(),
                    ..Query::default()
                },
            ),
        ];
        for (field, query) in oversized {
            for pick in [false, true] {
                let query = Query {
                    service: "svc".into(),
                    pick,
                    ..query.clone()
                };
                let error = registry.discover(&query).expect_err("oversized");
                let RegistryError::Invalid(errors) = &error else {
                    panic!("not a validation error: {error}");
                };
                assert_eq!(errors.0.len(), 1, "{error}");
                assert_eq!(errors.0[0].path, field, "{error}");
            }
        }
        assert_eq!(
            registry.filtered.lock().len(),
            0,
            "a refused query was kept"
        );
        let picking = registry
            .picking
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        assert!(picking.balancers.is_empty(), "a refused query was kept");
    }

    #[test]
    fn the_answer_cache_rebuilds_on_a_new_generation_and_stays_bounded() {
        let cache: AnswerCache<u64> = AnswerCache::default();
        let query = |service: usize| Query {
            service: format!("svc-{service}"),
            ..Query::default()
        };
        assert_eq!(*cache.get_or_build(&query(0), 1, || Arc::new(10)), 10);
        assert_eq!(*cache.get_or_build(&query(0), 1, || Arc::new(11)), 10);
        assert_eq!(*cache.get_or_build(&query(0), 2, || Arc::new(12)), 12);
        for service in 1..=MAX_CACHED_ANSWERS {
            cache.get_or_build(&query(service), 1, || Arc::new(0));
        }
        assert!(cache.lock().len() <= MAX_CACHED_ANSWERS);
    }

    #[tokio::test]
    async fn pick_applies_the_services_policy_round_robin_over_the_filtered_set() {
        let registry = registered(&[1, 2, 3, 4]).await;
        let mut policy = Policy::default();
        policy.services.insert(
            "svc".into(),
            ServicePolicy {
                load_balancer: LoadBalancer::RoundRobin {},
                ..ServicePolicy::default()
            },
        );
        registry.set_policy(policy);
        let query = Query {
            service: "svc".into(),
            tags: BTreeSet::from(["even".into()]),
            pick: true,
            ..Query::default()
        };
        let picks: Vec<String> = (0..4)
            .map(|_| ids(&registry.discover(&query).expect("ok"))[0].to_owned())
            .collect();
        assert_eq!(picks, ["svc-2", "svc-4", "svc-2", "svc-4"]);
    }

    #[tokio::test]
    async fn an_address_held_by_another_instance_of_the_service_is_refused() {
        let registry = registered(&[1]).await;
        let error = registry
            .register(&spec("svc", "other", 1), &alice())
            .await
            .expect_err("address in use");
        assert!(error.to_string().contains("as instance `svc-1`"), "{error}");
    }
}
