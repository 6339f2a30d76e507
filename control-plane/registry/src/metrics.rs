//! Prometheus metrics of the registry: calls per API face, operation and outcome, their
//! latency, refused registrations by reason, the live instances per service and health, the
//! services whose registrations disagree on the protocol, and (with a backend that reloads,
//! etcd) the failed reloads of the registrations and the records kept out of the view.
//!
//! Both faces count at their edge (after the answer is decided, unauthenticated calls
//! included) with the same labels, so one query covers REST and gRPC. The outcome is the
//! gRPC status code name in snake case for both (REST's HTTP statuses map onto the same
//! set, see [`crate::api`]). The instances gauge follows the [`View`]'s change history: it
//! moves when a registration, a removal or a health transition happens, never by scanning
//! on a request.
//!
//! **Bounded series**: every label value is a fixed name, except the service, which clients
//! choose. [`ServiceLabels`] gives the first `max_service_series` service names seen their
//! own series and counts every later one under [`OTHER_SERVICES`], for the life of the
//! process; the registry's health checks are counted under the same labels. Identities and
//! instance ids are never labels (refusals are logged with the identity).

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry as MetricsRegistry,
};
use tokio::task::JoinHandle;

use crate::{
    admission::Refusal,
    backend::RegistryBackend,
    view::{self, Entry, Since, View},
};

/// The service label of every service beyond the first `max_service_series`: a value no
/// service name can take (service names have no parentheses).
pub const OTHER_SERVICES: &str = "(other)";

/// The service label values of the registry's metrics, bounded. See the module docs.
#[derive(Debug, Clone)]
pub struct ServiceLabels {
    named: Arc<Mutex<HashSet<String>>>,
    max: usize,
}

impl ServiceLabels {
    /// Labels naming at most `max` services.
    pub fn new(max: usize) -> Self {
        Self {
            named: Arc::default(),
            max,
        }
    }

    /// The label of `service`: its name while fewer than `max` names were given out (or it
    /// got its own before), else [`OTHER_SERVICES`].
    pub fn label(&self, service: &str) -> String {
        let mut named = self
            .named
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if named.contains(service) {
            return service.to_owned();
        }
        if named.len() < self.max {
            named.insert(service.to_owned());
            return service.to_owned();
        }
        OTHER_SERVICES.to_owned()
    }
}

/// Latency buckets, in seconds: 100 µs to 1 s, with 50 ms on a boundary so a "p99 above
/// 50 ms" alert reads one bucket exactly.
const DURATION_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Which face served a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// REST/JSON ([`crate::api::rest`]).
    Rest,
    /// gRPC ([`crate::api::grpc`]).
    Grpc,
}

impl Api {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rest => "rest",
            Self::Grpc => "grpc",
        }
    }
}

/// A registry operation, as both faces name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Register or re-register an instance.
    Register,
    /// Renew an instance's lease.
    Heartbeat,
    /// Remove an instance.
    Deregister,
    /// Find (or pick) instances of a service.
    Discover,
    /// Follow changes (a REST long poll, or a gRPC stream counted when opened).
    Watch,
}

impl Operation {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Register => "register",
            Self::Heartbeat => "heartbeat",
            Self::Deregister => "deregister",
            Self::Discover => "discover",
            Self::Watch => "watch",
        }
    }
}

/// The gRPC status code name in snake case (`ok`, `invalid_argument`, ...), the `code`
/// label of both faces.
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "ok",
        tonic::Code::Cancelled => "cancelled",
        tonic::Code::Unknown => "unknown",
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::DeadlineExceeded => "deadline_exceeded",
        tonic::Code::NotFound => "not_found",
        tonic::Code::AlreadyExists => "already_exists",
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::FailedPrecondition => "failed_precondition",
        tonic::Code::Aborted => "aborted",
        tonic::Code::OutOfRange => "out_of_range",
        tonic::Code::Unimplemented => "unimplemented",
        tonic::Code::Internal => "internal",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DataLoss => "data_loss",
        tonic::Code::Unauthenticated => "unauthenticated",
    }
}

/// Labels of `fulcrum_registry_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// `rest` or `grpc`.
    pub api: &'static str,
    /// `register`, `heartbeat`, `deregister`, `discover` or `watch`.
    pub operation: &'static str,
    /// The gRPC status code name in snake case.
    pub code: &'static str,
}

/// Labels of `fulcrum_registry_request_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OperationLabels {
    /// `rest` or `grpc`.
    pub api: &'static str,
    /// `register`, `heartbeat`, `deregister`, `discover` or `watch`.
    pub operation: &'static str,
}

/// Labels of `fulcrum_registry_refusals_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    /// One of [`Refusal::REASONS`].
    pub reason: &'static str,
}

/// Labels of `fulcrum_registry_etcd_records_refused_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusedRecordLabels {
    /// One of [`RecordRefusal::REASONS`](crate::backend::etcd::RecordRefusal::REASONS).
    pub reason: &'static str,
}

/// Labels of `fulcrum_registry_instances`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct InstanceLabels {
    /// The service name, or [`OTHER_SERVICES`] (see [`ServiceLabels`]).
    pub service: String,
    /// `healthy`, `unhealthy` or `unknown`.
    pub health: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The registry's metrics. Cheap to clone (shared handles); register them once with
/// [`register`](Self::register).
#[derive(Debug, Clone)]
pub struct RegistryMetrics {
    /// `fulcrum_registry_refusals_total{reason}`: registrations refused by admission.
    refusals: Family<RefusalLabels, Counter>,
    /// `fulcrum_registry_requests_total{api,operation,code}`: calls answered.
    requests: Family<RequestLabels, Counter>,
    /// `fulcrum_registry_request_duration_seconds{api,operation}`: from the call reaching
    /// the handler to its answer (for a gRPC watch: to the stream being open).
    duration: Family<OperationLabels, Histogram, fn() -> Histogram>,
    /// `fulcrum_registry_instances{service,health}`: live registrations. A label set whose
    /// count drops to zero is removed, so gone services do not linger.
    instances: Family<InstanceLabels, Gauge>,
    /// The service labels of `instances` and of the registry's health checks.
    services: ServiceLabels,
    /// `fulcrum_registry_protocol_conflicts`: services whose registrations name different
    /// protocols (the earliest registration's is used), as last published.
    protocol_conflicts: Gauge,
    /// `fulcrum_registry_etcd_reload_failures_total`: the backend's failed reloads
    /// ([`RegistryBackend::reload_failures`]); not exposed without one.
    etcd_reload_failures: Option<Counter>,
    /// `fulcrum_registry_etcd_records_refused_total{reason}`: records read from etcd that
    /// the view does not take ([`RegistryBackend::records_refused`]); not exposed without.
    etcd_records_refused: Option<Family<RefusedRecordLabels, Counter>>,
}

impl RegistryMetrics {
    /// Metrics naming at most `max_service_series` services (see [`ServiceLabels`]).
    pub fn new(max_service_series: usize) -> Self {
        let refusals = Family::default();
        // Every reason exposed from the start, at 0, so a rate over it is defined at once.
        for reason in Refusal::REASONS {
            let _ = refusals.get_or_create(&RefusalLabels { reason });
        }
        Self {
            refusals,
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            instances: Family::default(),
            services: ServiceLabels::new(max_service_series),
            protocol_conflicts: Gauge::default(),
            etcd_reload_failures: None,
            etcd_records_refused: None,
        }
    }

    /// Exposes `backend`'s own counts, when it keeps them (etcd: failed reloads, refused
    /// records).
    pub fn count_backend(&mut self, backend: &dyn RegistryBackend) {
        self.etcd_reload_failures = backend.reload_failures();
        self.etcd_records_refused = backend.records_refused();
    }

    /// The gauge of services whose registrations name different protocols, set by the
    /// registry's endpoint source.
    pub fn protocol_conflicts(&self) -> Gauge {
        self.protocol_conflicts.clone()
    }

    /// The bounded service labels, for whatever else counts per registered service.
    pub fn service_labels(&self) -> &ServiceLabels {
        &self.services
    }

    /// Registers every metric under the `fulcrum_registry` prefix.
    pub fn register(&self, registry: &mut MetricsRegistry) {
        let prefixed = registry.sub_registry_with_prefix("fulcrum_registry");
        prefixed.register(
            "requests",
            "Registry API calls answered, by face, operation and gRPC status code name",
            self.requests.clone(),
        );
        prefixed.register(
            "request_duration_seconds",
            "Registry API call latency, by face and operation (a gRPC watch: until the stream is open)",
            self.duration.clone(),
        );
        prefixed.register(
            "instances",
            "Live registrations, by service (the first ones seen; others as \"(other)\") and health",
            self.instances.clone(),
        );
        prefixed.register(
            "protocol_conflicts",
            "Services whose registrations name different protocols (the earliest registration's is used)",
            self.protocol_conflicts.clone(),
        );
        prefixed.register(
            "refusals",
            "Registrations refused by admission, by reason",
            self.refusals.clone(),
        );
        if let Some(failures) = &self.etcd_reload_failures {
            prefixed.register(
                "etcd_reload_failures",
                "Failed reloads of the registrations from etcd after its watch broke (meanwhile the last loaded state is served)",
                failures.clone(),
            );
        }
        if let Some(refused) = &self.etcd_records_refused {
            prefixed.register(
                "etcd_records_refused",
                "Records read from etcd kept out of this replica's view, by reason (address_class: an address this replica refuses); each key counted once per revision",
                refused.clone(),
            );
        }
    }

    /// Counts one refused registration.
    pub fn refused(&self, refusal: &Refusal) {
        self.refusals
            .get_or_create(&RefusalLabels {
                reason: refusal.reason(),
            })
            .inc();
    }

    /// Counts one answered call and its latency.
    pub fn observe(&self, api: Api, operation: Operation, code: &'static str, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                api: api.as_str(),
                operation: operation.as_str(),
                code,
            })
            .inc();
        self.duration
            .get_or_create(&OperationLabels {
                api: api.as_str(),
                operation: operation.as_str(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Keeps the instances gauge equal to `view`'s content by following its changes; the
    /// task ends when the view is dropped.
    pub fn follow(&self, view: &Arc<View>) -> JoinHandle<()> {
        let mut tally = InstanceTally {
            gauge: self.instances.clone(),
            services: self.services.clone(),
            known: HashSet::new(),
        };
        tokio::spawn(view::follow(
            Arc::downgrade(view),
            move |since| match since {
                Since::Reset(entries) => tally.reset(&entries),
                Since::Changes(changes) => {
                    for change in changes {
                        tally.apply(&change.id, change.entry.as_ref());
                    }
                }
            },
        ))
    }
}

/// What the gauge counts, per instance, so a change can move one instance between label
/// sets. Invariant: every label set's gauge equals the number of `known` instances counted
/// under it.
#[derive(Debug)]
struct InstanceTally {
    gauge: Family<InstanceLabels, Gauge>,
    services: ServiceLabels,
    known: HashSet<Counted>,
}

/// One counted instance: its entry as counted (the view's record, shared, not copied) and
/// whether its service has its own series. Keyed by the record's id: 24 bytes a
/// registration, where an id-keyed map of label sets took a copy of the id, a copy of the
/// service name and a 64-byte slot.
#[derive(Debug)]
struct Counted {
    entry: Entry,
    named: bool,
}

impl Counted {
    fn id(&self) -> &str {
        &self.entry.record.registration.id
    }

    /// The label set it is counted under.
    fn labels(&self) -> InstanceLabels {
        InstanceLabels {
            service: if self.named {
                self.entry.record.registration.name.to_string()
            } else {
                OTHER_SERVICES.to_owned()
            },
            health: self.entry.health.as_str(),
        }
    }
}

impl PartialEq for Counted {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl Eq for Counted {}

/// Hashes as its id, so the set is looked up by id ([`Borrow<str>`](std::borrow::Borrow)).
impl std::hash::Hash for Counted {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id().hash(state);
    }
}

impl std::borrow::Borrow<str> for Counted {
    fn borrow(&self) -> &str {
        self.id()
    }
}

impl InstanceTally {
    fn reset(&mut self, entries: &[Entry]) {
        self.gauge.clear();
        self.known.clear();
        for entry in entries {
            self.apply(&entry.record.registration.id, Some(entry));
        }
    }

    fn apply(&mut self, id: &str, entry: Option<&Entry>) {
        let counted = entry.map(|entry| {
            let service = &entry.record.registration.name;
            Counted {
                entry: entry.clone(),
                named: *self.services.label(service) == **service,
            }
        });
        let old = self.known.take(id).map(|old| old.labels());
        let new = counted.as_ref().map(Counted::labels);
        if old != new {
            if let Some(old) = old {
                let left = self.gauge.get_or_create(&old).dec() - 1;
                if left <= 0 {
                    self.gauge.remove(&old);
                }
            }
            if let Some(new) = new {
                self.gauge.get_or_create(&new).inc();
            }
        }
        // The current record, even when the labels are the same: an old one is not kept.
        if let Some(counted) = counted {
            self.known.insert(counted);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{
        test_support::{record, spec},
        view::HealthStatus,
    };

    fn entry(service: &str, id: &str, health: HealthStatus) -> Entry {
        Entry {
            record: Arc::new(record(spec(service, id, 1))),
            health,
        }
    }

    fn tally(max_service_series: usize) -> InstanceTally {
        InstanceTally {
            gauge: Family::default(),
            services: ServiceLabels::new(max_service_series),
            known: HashSet::new(),
        }
    }

    fn count(tally: &InstanceTally, service: &str, health: HealthStatus) -> Option<i64> {
        let labels = InstanceLabels {
            service: service.into(),
            health: health.as_str(),
        };
        tally.gauge.get(&labels).map(|gauge| gauge.get())
    }

    #[test]
    fn the_tally_moves_an_instance_between_label_sets_and_drops_empty_ones() {
        let mut tally = tally(10);
        tally.apply("a-1", Some(&entry("a", "a-1", HealthStatus::Unknown)));
        tally.apply("a-2", Some(&entry("a", "a-2", HealthStatus::Unknown)));
        // The same labels again (a re-registration): no double count.
        tally.apply("a-2", Some(&entry("a", "a-2", HealthStatus::Unknown)));
        assert_eq!(count(&tally, "a", HealthStatus::Unknown), Some(2));
        tally.apply("a-1", Some(&entry("a", "a-1", HealthStatus::Unhealthy)));
        assert_eq!(count(&tally, "a", HealthStatus::Unknown), Some(1));
        assert_eq!(count(&tally, "a", HealthStatus::Unhealthy), Some(1));
        // Moved to another service.
        tally.apply("a-2", Some(&entry("b", "a-2", HealthStatus::Unknown)));
        assert_eq!(count(&tally, "a", HealthStatus::Unknown), None);
        assert_eq!(count(&tally, "b", HealthStatus::Unknown), Some(1));
        tally.apply("a-1", None);
        assert_eq!(count(&tally, "a", HealthStatus::Unhealthy), None);
        // A removal of something never seen changes nothing.
        tally.apply("ghost", None);
        assert_eq!(count(&tally, "b", HealthStatus::Unknown), Some(1));
    }

    #[test]
    fn a_reset_replaces_every_count() {
        let mut tally = tally(10);
        tally.apply("a-1", Some(&entry("a", "a-1", HealthStatus::Healthy)));
        tally.reset(&[
            entry("b", "b-1", HealthStatus::Healthy),
            entry("b", "b-2", HealthStatus::Healthy),
        ]);
        assert_eq!(count(&tally, "a", HealthStatus::Healthy), None);
        assert_eq!(count(&tally, "b", HealthStatus::Healthy), Some(2));
        tally.apply("b-1", None);
        assert_eq!(count(&tally, "b", HealthStatus::Healthy), Some(1));
    }

    #[tokio::test]
    async fn the_follower_catches_up_with_a_view_whose_history_overflowed() {
        let view = Arc::new(View::new("e"));
        let metrics = RegistryMetrics::new(10);
        let follower = metrics.follow(&view);
        let count = |service: &str| {
            metrics
                .instances
                .get(&InstanceLabels {
                    service: service.into(),
                    health: "unknown",
                })
                .map(|gauge| gauge.get())
        };
        let settles = |expected: &'static [(&'static str, Option<i64>)]| async move {
            tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !expected
                    .iter()
                    .all(|(service, value)| count(service) == *value)
                {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            })
            .await
            .is_ok()
        };
        view.upsert(record(spec("c", "c-1", 1)));
        assert!(settles(&[("c", Some(1))]).await, "c-1 never counted");
        // More changes than the history keeps, without the follower running in between: its
        // cursor falls out of the history and it gets a reset.
        for port in 1..=u16::try_from(crate::view::HISTORY).expect("fits") + 10 {
            view.upsert(record(spec("a", &format!("a-{}", port % 3), port)));
        }
        view.remove("c-1", None);
        view.upsert(record(spec("b", "b-1", 1)));
        assert!(
            settles(&[("a", Some(3)), ("b", Some(1)), ("c", None)]).await,
            "the gauge never reached a=3, b=1, no c"
        );
        drop(view);
        tokio::time::timeout(std::time::Duration::from_secs(5), follower)
            .await
            .expect("the follower ends with the view")
            .expect("no panic");
    }

    /// The gauge's series as exposed: (service, health, value).
    fn exposed(tally: &InstanceTally) -> Vec<(String, String, i64)> {
        let mut registry = MetricsRegistry::default();
        registry.register("i", "instances", tally.gauge.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("i{service=\"")?;
                let (service, rest) = rest.split_once("\",health=\"")?;
                let (health, value) = rest.split_once("\"} ")?;
                Some((service.to_owned(), health.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    #[test]
    fn services_beyond_the_series_cap_are_counted_as_other() {
        let mut tally = tally(2);
        for service in ["a", "b", "c", "d"] {
            let id = format!("{service}-1");
            tally.apply(&id, Some(&entry(service, &id, HealthStatus::Unknown)));
        }
        let mut series = exposed(&tally);
        series.sort();
        assert_eq!(
            series,
            [
                ("(other)".to_owned(), "unknown".to_owned(), 2),
                ("a".to_owned(), "unknown".to_owned(), 1),
                ("b".to_owned(), "unknown".to_owned(), 1),
            ]
        );
    }

    proptest::proptest! {
        #[test]
        fn the_gauge_counts_every_live_instance_in_at_most_the_capped_series(
            changes in proptest::collection::vec((0u8..40, 0u8..30, 0u8..4), 0..200),
        ) {
            let cap = 5;
            let mut tally = tally(cap);
            let mut live = HashMap::new();
            for (id, service, health) in changes {
                let id = format!("i-{id}");
                let health = match health {
                    0 => None,
                    1 => Some(HealthStatus::Healthy),
                    2 => Some(HealthStatus::Unhealthy),
                    _ => Some(HealthStatus::Unknown),
                };
                let entry = health.map(|health| entry(&format!("s-{service}"), &id, health));
                tally.apply(&id, entry.as_ref());
                match entry {
                    Some(entry) => live.insert(id, entry),
                    None => live.remove(&id),
                };
                let series = exposed(&tally);
                let total: i64 = series.iter().map(|(_, _, value)| value).sum();
                proptest::prop_assert_eq!(total, i64::try_from(live.len()).expect("small"));
                proptest::prop_assert!(series.iter().all(|(_, _, value)| *value > 0));
                let services: HashSet<&String> = series.iter().map(|(service, _, _)| service).collect();
                proptest::prop_assert!(services.len() <= cap + 1, "{services:?}");
            }
        }
    }
}
