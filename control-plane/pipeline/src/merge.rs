//! Stage 1, sources → merged endpoints: runs every endpoint source, folds bursts of their
//! updates with a debounce, and merges the latest state of each into one set of services.
//!
//! After the first update of a burst the stage waits `quiet` for more; every further
//! update restarts that wait, but never beyond `max_delay` after the burst's first update,
//! so a source that churns without pause still gets its changes out. Nothing is emitted
//! until every source has published once (a merge missing a source would remove its
//! clusters), and a merge equal to the last one is not emitted again.
//!
//! A service known to several sources gets the union of their endpoints; when two sources
//! list the same address for a service, the earlier source (in configuration order) wins.
//! Its protocol is the one the earliest source naming one gives (a source naming none has no
//! say); when two sources name different protocols, that one still wins, the conflict is
//! logged and counted in `fulcrum_service_protocol_conflicts` (one Envoy cluster speaks one
//! protocol, so the endpoints of the other source will fail until the sources agree).
use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use fulcrum_core::{Endpoint, ServiceEndpoints, UpstreamProtocol};
use fulcrum_sources::{Services, Source, SourceSink, SourceUpdate};
use fulcrum_xds::ChangeTrace;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{debug, info, info_span, warn};

use crate::{change::Traced, metrics::PipelineMetrics, share_unchanged};

/// Updates buffered between the sources and the pipeline.
const UPDATE_QUEUE: usize = 64;

/// How updates are folded. Defaults: 50 ms quiet period, at most 500 ms of delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debounce {
    /// Wait this long after the latest update for another one.
    pub quiet: Duration,
    /// Never hold a burst's first update longer than this.
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Self::new(Duration::from_millis(50))
    }
}

impl Debounce {
    /// A debounce of `quiet` with `max_delay` ten times as long.
    pub fn new(quiet: Duration) -> Self {
        Self {
            quiet,
            max_delay: quiet * 10,
        }
    }
}

/// Starts every source on the current tokio runtime and sends each new merge to `output`.
/// Returns when every source has stopped.
pub async fn run(
    sources: Vec<Box<dyn Source>>,
    debounce: Debounce,
    output: watch::Sender<Option<Traced<Services>>>,
    metrics: PipelineMetrics,
) {
    let (sender, mut updates) = mpsc::channel(UPDATE_QUEUE);
    let names: Vec<String> = sources.iter().map(|source| source.name()).collect();
    for (index, source) in sources.into_iter().enumerate() {
        tokio::spawn(source.run(SourceSink::new(index, sender.clone())));
    }
    drop(sender);
    let mut latest: Vec<Option<Arc<Services>>> = vec![None; names.len()];
    while let Some(first) = updates.recv().await {
        let burst_start = Instant::now();
        let source = first.source;
        apply(&mut latest, first);
        let mut open = true;
        let mut folded = 1_u32;
        let mut deadline = burst_start + debounce.quiet;
        while open {
            tokio::select! {
                update = updates.recv() => match update {
                    Some(update) => {
                        apply(&mut latest, update);
                        folded += 1;
                        deadline = (Instant::now() + debounce.quiet).min(burst_start + debounce.max_delay);
                    }
                    None => open = false,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let Some(states) = latest
            .iter()
            .zip(&names)
            .map(|(state, name)| state.as_deref().map(|state| (name.as_str(), state)))
            .collect::<Option<Vec<_>>>()
        else {
            debug!(folded, "waiting for every source's first state");
            continue;
        };
        let Merged {
            services: merged,
            protocol_conflicts,
        } = merge(states);
        metrics.observe_protocol_conflicts(protocol_conflicts);
        let merged = share_unchanged(
            merged,
            output.borrow().as_ref().map(|current| &*current.value),
        );
        if output.borrow().as_ref().map(|current| &*current.value) == Some(&merged) {
            debug!(folded, "sources changed nothing");
            continue;
        }
        // The root of this change's trace: the source whose update opened the burst.
        let change = info_span!(
            parent: None,
            "endpoint_change",
            source = %names[source],
            folded,
            services = merged.len(),
        );
        let trace = ChangeTrace::of(&change);
        change.in_scope(|| info!(folded, services = merged.len(), "sources changed"));
        output.send_replace(Some(Traced::new(Arc::new(merged), trace)));
    }
}

/// What [`merge`] made of the sources' states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// Every service with the union of its endpoints.
    pub services: Services,
    /// Services whose sources named different protocols.
    pub protocol_conflicts: usize,
}

/// Merges `sources` (name, state), earlier sources taking precedence on conflicts.
/// Endpoints come out sorted by address. A service only one source knows, already sorted
/// and without a repeated address, is passed on as it is (the same [`Arc`]).
pub fn merge<'a>(sources: impl IntoIterator<Item = (&'a str, &'a Services)>) -> Merged {
    let mut by_service: BTreeMap<&'a str, Vec<(&'a str, &'a Arc<ServiceEndpoints>)>> =
        BTreeMap::new();
    for (source, services) in sources {
        for (service, endpoints) in services {
            by_service
                .entry(service.as_str())
                .or_default()
                .push((source, endpoints));
        }
    }
    let mut protocol_conflicts = 0;
    let services = by_service
        .into_iter()
        .map(|(name, known)| {
            let merged = match known.as_slice() {
                [(_, only)] if sorted_by_address(only) => Arc::clone(only),
                _ => {
                    let (merged, conflict) = merge_service(name, &known);
                    protocol_conflicts += usize::from(conflict);
                    Arc::new(merged)
                }
            };
            (name.to_owned(), merged)
        })
        .collect();
    Merged {
        services,
        protocol_conflicts,
    }
}

/// Whether `service`'s endpoints are in strictly increasing address order.
fn sorted_by_address(service: &ServiceEndpoints) -> bool {
    service
        .endpoints
        .windows(2)
        .all(|pair| pair[0].address < pair[1].address)
}

/// The union of what the sources `known` (name, state) say of `service`, and whether they
/// named different protocols.
fn merge_service<'a>(
    service: &str,
    known: &[(&'a str, &'a Arc<ServiceEndpoints>)],
) -> (ServiceEndpoints, bool) {
    let mut entry = MergedService::default();
    for (source, endpoints) in known {
        if let Some(protocol) = endpoints.protocol {
            entry.name_protocol(service, source, protocol);
        }
        for endpoint in &endpoints.endpoints {
            match entry.endpoints.get(&endpoint.address) {
                Some((winner, existing)) if *existing != endpoint => warn!(
                    service = %service,
                    address = %endpoint.address,
                    kept_from = %winner,
                    ignored_from = %source,
                    "two sources disagree about one endpoint; keeping the earlier source's"
                ),
                Some(_) => {}
                None => {
                    entry.endpoints.insert(endpoint.address, (source, endpoint));
                }
            }
        }
    }
    let endpoints = entry
        .endpoints
        .into_values()
        .map(|(_, e)| e.clone())
        .collect();
    let merged = ServiceEndpoints {
        endpoints,
        protocol: entry.protocol.map(|(_, protocol)| protocol),
    };
    (merged, entry.conflict)
}

/// One service while [`merge`] folds the sources in.
#[derive(Debug, Default)]
struct MergedService<'a> {
    endpoints: BTreeMap<SocketAddr, (&'a str, &'a Endpoint)>,
    /// The protocol and the source that named it first.
    protocol: Option<(&'a str, UpstreamProtocol)>,
    conflict: bool,
}

impl<'a> MergedService<'a> {
    /// Records that `source` names `protocol` for `service`: the first source to name one
    /// keeps it.
    fn name_protocol(&mut self, service: &str, source: &'a str, protocol: UpstreamProtocol) {
        match self.protocol {
            None => self.protocol = Some((source, protocol)),
            Some((winner, kept)) if kept != protocol => {
                self.conflict = true;
                warn!(
                    service = %service,
                    kept = kept.as_str(),
                    kept_from = %winner,
                    ignored = protocol.as_str(),
                    ignored_from = %source,
                    "two sources name different protocols for one service; keeping the earlier source's"
                );
            }
            Some(_) => {}
        }
    }
}

/// Records the latest state of the update's source.
fn apply(latest: &mut [Option<Arc<Services>>], update: SourceUpdate) {
    debug_assert!(
        update.source < latest.len(),
        "update from an unknown source index"
    );
    if let Some(slot) = latest.get_mut(update.source) {
        *slot = Some(update.services);
    }
}

#[cfg(test)]
mod tests {
    use fulcrum_core::Health;
    use fulcrum_sources::SourceFuture;
    use proptest::prelude::*;

    use super::*;

    /// A source whose states a test feeds in at chosen (paused-clock) times; it stays open
    /// for a further 10 s so the pipeline's timing, not the source's end, decides emission.
    struct ScriptedSource {
        name: &'static str,
        script: Vec<(Duration, Services)>,
    }

    impl Source for ScriptedSource {
        fn name(&self) -> String {
            self.name.to_owned()
        }
        fn run(self: Box<Self>, sink: SourceSink) -> SourceFuture {
            Box::pin(async move {
                for (after, services) in self.script {
                    tokio::time::sleep(after).await;
                    if sink.publish(services).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            })
        }
    }

    fn one(service: &str, port: u16) -> Services {
        let endpoints = vec![Endpoint::new(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            port,
        )))];
        BTreeMap::from([(
            service.to_owned(),
            Arc::new(ServiceEndpoints {
                endpoints,
                protocol: None,
            }),
        )])
    }

    /// Every merge the stage emits, with when (on the paused clock).
    async fn collect(
        sources: Vec<Box<dyn Source>>,
        debounce: Debounce,
    ) -> Vec<(Duration, Arc<Services>)> {
        let start = Instant::now();
        let (output, mut merged) = watch::channel(None::<Traced<Services>>);
        let recorder = tokio::spawn(async move {
            let mut emitted = Vec::new();
            while merged.changed().await.is_ok() {
                if let Some(services) = merged.borrow_and_update().clone() {
                    emitted.push((start.elapsed(), services.value));
                }
            }
            emitted
        });
        run(sources, debounce, output, PipelineMetrics::default()).await;
        recorder.await.expect("recorder")
    }

    fn ports(services: &Services, service: &str) -> Vec<u16> {
        services[service]
            .endpoints
            .iter()
            .map(|e| e.address.port())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn updates_folded_until_quiet_then_emitted_once() {
        let source = ScriptedSource {
            name: "file",
            script: vec![
                (Duration::ZERO, one("a", 1)),
                (Duration::from_millis(30), one("a", 2)),
                (Duration::from_millis(30), one("a", 3)),
            ],
        };
        let emitted = collect(
            vec![Box::new(source)],
            Debounce::new(Duration::from_millis(50)),
        )
        .await;
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0].0, Duration::from_millis(110));
        assert_eq!(ports(&emitted[0].1, "a"), [3]);
    }

    #[tokio::test(start_paused = true)]
    async fn continuous_churn_is_emitted_after_max_delay() {
        let script = (0..30)
            .map(|port| (Duration::from_millis(30), one("a", port + 1)))
            .collect();
        let source = ScriptedSource {
            name: "file",
            script,
        };
        let debounce = Debounce {
            quiet: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
        };
        let emitted = collect(vec![Box::new(source)], debounce).await;
        // An update every 30 ms. The first, at 30 ms, is held at most 200 ms: out at 230 ms
        // with the update of 210 ms (port 7); the next burst starts at 240 ms.
        assert_eq!(emitted[0].0, Duration::from_millis(230));
        assert_eq!(ports(&emitted[0].1, "a"), [7]);
        assert_eq!(emitted[1].0, Duration::from_millis(440));
        assert!(
            emitted.len() >= 3,
            "churn keeps producing snapshots: {}",
            emitted.len()
        );
        assert_eq!(ports(&emitted.last().expect("some").1, "a"), [30]);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_emitted_before_every_source_published() {
        let fast = ScriptedSource {
            name: "file",
            script: vec![(Duration::ZERO, one("a", 1))],
        };
        let slow = ScriptedSource {
            name: "registry",
            script: vec![(Duration::from_secs(5), one("b", 2))],
        };
        let emitted = collect(vec![Box::new(fast), Box::new(slow)], Debounce::default()).await;
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0].0, Duration::from_millis(5050));
        assert_eq!(emitted[0].1.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_content_is_not_emitted_again() {
        let source = ScriptedSource {
            name: "file",
            script: vec![
                (Duration::ZERO, one("a", 1)),
                (Duration::from_secs(1), one("a", 1)),
            ],
        };
        let emitted = collect(vec![Box::new(source)], Debounce::default()).await;
        assert_eq!(emitted.len(), 1);
    }

    fn services(entries: &[(&str, &[&str])]) -> Services {
        entries
            .iter()
            .map(|(name, addresses)| {
                let endpoints = addresses
                    .iter()
                    .map(|address| Endpoint::new(address.parse().expect("address")))
                    .collect();
                (
                    (*name).to_owned(),
                    Arc::new(ServiceEndpoints {
                        endpoints,
                        protocol: None,
                    }),
                )
            })
            .collect()
    }

    fn addresses(merged: &Services, service: &str) -> Vec<String> {
        merged[service]
            .endpoints
            .iter()
            .map(|endpoint| endpoint.address.to_string())
            .collect()
    }

    #[test]
    fn union_of_endpoints_sorted_by_address() {
        let file = services(&[("a", &["127.0.0.2:80"]), ("b", &["127.0.0.9:80"])]);
        let registry = services(&[("a", &["127.0.0.1:80"])]);
        let merged = merge([("file", &file), ("registry", &registry)]).services;
        assert_eq!(addresses(&merged, "a"), ["127.0.0.1:80", "127.0.0.2:80"]);
        assert_eq!(addresses(&merged, "b"), ["127.0.0.9:80"]);
    }

    #[test]
    fn earlier_source_wins_a_conflicting_endpoint() {
        let file = services(&[("a", &["127.0.0.1:80"])]);
        let mut registry = services(&[("a", &["127.0.0.1:80"])]);
        Arc::make_mut(registry.get_mut("a").expect("a")).endpoints[0].health = Health::Unhealthy;
        let merged = merge([("file", &file), ("registry", &registry)]).services;
        assert_eq!(merged["a"].endpoints[0].health, Health::Healthy);
    }

    fn with_protocol(mut services: Services, protocol: Option<UpstreamProtocol>) -> Services {
        for service in services.values_mut() {
            Arc::make_mut(service).protocol = protocol;
        }
        services
    }

    #[test]
    fn a_protocol_comes_from_the_earliest_source_naming_one() {
        let file = with_protocol(services(&[("a", &["127.0.0.1:80"])]), None);
        let registry = with_protocol(
            services(&[("a", &["127.0.0.2:80"])]),
            Some(UpstreamProtocol::Http2),
        );
        let merged = merge([("file", &file), ("registry", &registry)]);
        assert_eq!(
            merged.services["a"].protocol,
            Some(UpstreamProtocol::Http2),
            "a source naming no protocol has no say"
        );
        assert_eq!(merged.protocol_conflicts, 0);
    }

    #[test]
    fn conflicting_protocols_keep_the_earlier_source_and_are_counted() {
        let kube = with_protocol(
            services(&[("a", &["127.0.0.1:80"]), ("b", &["127.0.0.3:80"])]),
            Some(UpstreamProtocol::Http1),
        );
        let registry = with_protocol(
            services(&[("a", &["127.0.0.2:80"]), ("b", &["127.0.0.4:80"])]),
            Some(UpstreamProtocol::Http2),
        );
        let merged = merge([("kube", &kube), ("registry", &registry)]);
        assert_eq!(merged.services["a"].protocol, Some(UpstreamProtocol::Http1));
        assert_eq!(merged.protocol_conflicts, 2);
        let backward = merge([("registry", &registry), ("kube", &kube)]);
        assert_eq!(
            backward.services["a"].protocol,
            Some(UpstreamProtocol::Http2)
        );
    }

    #[test]
    fn the_merge_depends_on_content_only() {
        let a = services(&[("a", &["127.0.0.1:80"])]);
        let b = services(&[("a", &["127.0.0.1:81"])]);
        assert_eq!(merge([("x", &a)]), merge([("y", &a)]));
        assert_ne!(merge([("x", &a)]), merge([("x", &b)]));
    }

    proptest! {
        #[test]
        fn source_order_does_not_change_content_without_conflicts(
            left in prop::collection::btree_set(1u16..500, 0..8),
            right in prop::collection::btree_set(500u16..1000, 0..8),
        ) {
            let to_services = |ports: &std::collections::BTreeSet<u16>| -> Services {
                let endpoints = ports
                    .iter()
                    .map(|port| Endpoint::new(SocketAddr::from(([127, 0, 0, 1], *port))))
                    .collect();
                BTreeMap::from([(
                    "svc".to_owned(),
                    Arc::new(ServiceEndpoints {
                        endpoints,
                        protocol: None,
                    }),
                )])
            };
            let (left, right) = (to_services(&left), to_services(&right));
            let forward = merge([("l", &left), ("r", &right)]);
            let backward = merge([("r", &right), ("l", &left)]);
            prop_assert_eq!(forward, backward);
        }
    }
}
