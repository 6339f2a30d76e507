//! Prometheus metrics of the registry: calls per API face, operation and outcome, their
//! latency, refused registrations by reason, the live instances per service and health, the
//! services whose registrations disagree on the protocol, and (with a backend that reloads,
//! etcd) the failed reloads of the registrations and the records kept out of the view.
//!
//! Both faces count at their edge (after the answer is decided, unauthenticated calls
//! included) with the same labels, so one query covers REST and gRPC. The outcome is the
//! gRPC status code name in snake case for both (REST's HTTP statuses map onto the same
//! set, see [`crate::api`]). The instances gauge is read at each scrape from the counts the
//! [`View`] keeps per service and health (one read of the services, never a scan of the
//! registrations).
//!
//! **Bounded series**: every label value is a fixed name, except the service, which clients
//! choose. [`ServiceLabels`] gives the first `max_service_series` service names seen their
//! own series and counts every later one under [`OTHER_SERVICES`], for the life of the
//! process; the registry's health checks are counted under the same labels. Identities and
//! instance ids are never labels (refusals are logged with the identity).

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex, OnceLock, Weak},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{
        MetricType, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry as MetricsRegistry,
};

use crate::{admission::Refusal, backend::RegistryBackend, view::View};

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
    /// `fulcrum_registry_instances{service,health}`: live registrations, read from the view
    /// at each scrape; a label set at zero is not exposed, so gone services do not linger.
    instances: InstancesGauge,
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
        let services = ServiceLabels::new(max_service_series);
        let refusals = Family::default();
        // Every reason exposed from the start, at 0, so a rate over it is defined at once.
        for reason in Refusal::REASONS {
            let _ = refusals.get_or_create(&RefusalLabels { reason });
        }
        Self {
            refusals,
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            instances: InstancesGauge {
                view: Arc::default(),
                services: services.clone(),
            },
            services,
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

    /// Counts `view`'s registrations in the instances gauge (read at each scrape; nothing
    /// once the view is dropped). The first view named is the one counted.
    pub fn count(&self, view: &Arc<View>) {
        let _ = self.instances.view.set(Arc::downgrade(view));
    }
}

/// `fulcrum_registry_instances{service,health}`, read from the [`View`] at each scrape: the
/// view keeps its registrations' count per service and health, so the gauge is never
/// behind it and takes nothing per instance (a tally of its own took a set entry per
/// registration, 41 bytes at 10,000).
#[derive(Debug, Clone)]
struct InstancesGauge {
    /// The view counted, once [`RegistryMetrics::count`] named it.
    view: Arc<OnceLock<Weak<View>>>,
    services: ServiceLabels,
}

impl InstancesGauge {
    /// The series now: count per label set, every label set above zero.
    fn series(&self) -> BTreeMap<(String, &'static str), usize> {
        let mut series = BTreeMap::new();
        let Some(view) = self.view.get().and_then(Weak::upgrade) else {
            return series;
        };
        for (service, health, count) in view.instances_by_health() {
            *series
                .entry((self.services.label(&service), health.as_str()))
                .or_default() += count;
        }
        series
    }
}

/// Encoded as a family of gauges is: one series per label set.
impl EncodeMetric for InstancesGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        for ((service, health), count) in self.series() {
            let labels = InstanceLabels { service, health };
            ConstGauge::new(i64::try_from(count).unwrap_or(i64::MAX))
                .encode(encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }

    /// As a family without series: not exposed.
    fn is_empty(&self) -> bool {
        self.series().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        test_support::{record, spec},
        view::HealthStatus,
    };

    /// A view counted by metrics naming at most `max_service_series` services.
    fn counted(max_service_series: usize) -> (Arc<View>, RegistryMetrics) {
        let view = Arc::new(View::new("e"));
        let metrics = RegistryMetrics::new(max_service_series);
        metrics.count(&view);
        (view, metrics)
    }

    /// The instances gauge as scraped: (service, health, value), sorted.
    fn exposed(metrics: &RegistryMetrics) -> Vec<(String, String, i64)> {
        let mut registry = MetricsRegistry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        let mut series: Vec<_> = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("fulcrum_registry_instances{service=\"")?;
                let (service, rest) = rest.split_once("\",health=\"")?;
                let (health, value) = rest.split_once("\"} ")?;
                Some((service.to_owned(), health.to_owned(), value.parse().ok()?))
            })
            .collect();
        series.sort();
        series
    }

    fn series(list: &[(&str, &str, i64)]) -> Vec<(String, String, i64)> {
        list.iter()
            .map(|(service, health, value)| ((*service).to_owned(), (*health).to_owned(), *value))
            .collect()
    }

    fn set_health(view: &View, id: &str, health: HealthStatus) {
        let entry = view.get(id).expect("registered");
        assert!(view.set_health(&entry.record, health), "{id} changed");
    }

    #[test]
    fn the_gauge_moves_an_instance_between_label_sets_and_drops_empty_ones() {
        let (view, metrics) = counted(10);
        view.upsert(record(spec("a", "a-1", 1)));
        view.upsert(record(spec("a", "a-2", 2)));
        // The same registration again: no double count.
        view.upsert(record(spec("a", "a-2", 2)));
        assert_eq!(exposed(&metrics), series(&[("a", "unknown", 2)]));
        set_health(&view, "a-1", HealthStatus::Unhealthy);
        assert_eq!(
            exposed(&metrics),
            series(&[("a", "unhealthy", 1), ("a", "unknown", 1)])
        );
        // Moved to another service.
        view.upsert(record(spec("b", "a-2", 2)));
        assert_eq!(
            exposed(&metrics),
            series(&[("a", "unhealthy", 1), ("b", "unknown", 1)])
        );
        view.remove("a-1", None);
        assert_eq!(exposed(&metrics), series(&[("b", "unknown", 1)]));
        // A removal of something never registered changes nothing.
        view.remove("ghost", None);
        assert_eq!(exposed(&metrics), series(&[("b", "unknown", 1)]));
    }

    #[test]
    fn a_reload_replaces_every_count() {
        let (view, metrics) = counted(10);
        view.upsert(record(spec("a", "a-1", 1)));
        set_health(&view, "a-1", HealthStatus::Healthy);
        view.replace_all(vec![
            record(spec("b", "b-1", 1)),
            record(spec("b", "b-2", 2)),
        ]);
        assert_eq!(exposed(&metrics), series(&[("b", "unknown", 2)]));
        view.remove("b-1", None);
        assert_eq!(exposed(&metrics), series(&[("b", "unknown", 1)]));
    }

    #[test]
    fn the_gauge_is_current_at_the_scrape_after_more_changes_than_the_history_keeps() {
        let (view, metrics) = counted(10);
        view.upsert(record(spec("c", "c-1", 1)));
        for port in 1..=u16::try_from(crate::view::HISTORY).expect("fits") + 10 {
            view.upsert(record(spec("a", &format!("a-{}", port % 3), port)));
        }
        view.remove("c-1", None);
        view.upsert(record(spec("b", "b-1", 1)));
        assert_eq!(
            exposed(&metrics),
            series(&[("a", "unknown", 3), ("b", "unknown", 1)])
        );
    }

    #[test]
    fn nothing_is_exposed_without_a_view_or_after_it_is_dropped() {
        let metrics = RegistryMetrics::new(10);
        assert_eq!(exposed(&metrics), []);
        let view = Arc::new(View::new("e"));
        metrics.count(&view);
        assert_eq!(exposed(&metrics), []);
        view.upsert(record(spec("a", "a-1", 1)));
        assert_eq!(exposed(&metrics), series(&[("a", "unknown", 1)]));
        drop(view);
        assert_eq!(exposed(&metrics), []);
    }

    #[test]
    fn services_beyond_the_series_cap_are_counted_as_other() {
        let (view, metrics) = counted(2);
        for (port, service) in (1..).zip(["a", "b", "c", "d"]) {
            view.upsert(record(spec(service, &format!("{service}-1"), port)));
        }
        assert_eq!(
            exposed(&metrics),
            series(&[
                ("(other)", "unknown", 2),
                ("a", "unknown", 1),
                ("b", "unknown", 1)
            ])
        );
    }

    proptest::proptest! {
        #[test]
        fn the_gauge_counts_every_live_instance_under_its_labels_in_at_most_the_capped_series(
            changes in proptest::collection::vec((0u8..40, 0u8..30, 0u8..4), 0..200),
        ) {
            let cap = 5;
            let (view, metrics) = counted(cap);
            for (id, service, health) in changes {
                let id = format!("i-{id}");
                match health {
                    0 => {
                        view.remove(&id, None);
                    }
                    1 | 2 => {
                        if let Some(entry) = view.get(&id) {
                            let health = if health == 1 {
                                HealthStatus::Healthy
                            } else {
                                HealthStatus::Unhealthy
                            };
                            view.set_health(&entry.record, health);
                        }
                    }
                    _ => view.upsert(record(spec(&format!("s-{service}"), &id, 1))),
                }
                let scraped = exposed(&metrics);
                // What the registrations give, under the labels the scrape handed out.
                let mut expected: BTreeMap<(String, String), i64> = BTreeMap::new();
                for entry in view.entries() {
                    let label = metrics.services.label(&entry.record.registration.name);
                    *expected
                        .entry((label, entry.health.as_str().to_owned()))
                        .or_default() += 1;
                }
                let expected: Vec<_> = expected
                    .into_iter()
                    .map(|((service, health), value)| (service, health, value))
                    .collect();
                proptest::prop_assert_eq!(&scraped, &expected);
                let services: HashSet<&String> = scraped.iter().map(|(service, _, _)| service).collect();
                proptest::prop_assert!(services.len() <= cap + 1, "{services:?}");
            }
        }
    }
}
