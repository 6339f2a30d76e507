//! Stage 5, the published snapshot → its two sinks: the xDS cache Envoy streams from, and
//! the [`SnapshotStore`] the filters poll (`/v1/snapshot`), with the same version in both.
//!
//! Each snapshot's JSON is assembled once, from its services' encodings, by the policy
//! stage's encoder ([`crate::encode`]), and the store keeps those bytes, so every
//! `GET /v1/snapshot` of a version serves the same buffer. A snapshot whose JSON exceeds the
//! budget (set below the filters' `max_snapshot_bytes`, which would refuse it on every proxy)
//! is published to neither sink: Envoy and the filters keep the last good one, the refusal is
//! logged, reported ([`Refused`], in `/v1/status`) and shown by
//! `fulcrum_snapshot_over_budget`. Each publication is logged with its version and reflected
//! in the snapshot metrics.
//!
//! The store keeps the [`DELTA_HISTORY`] versions before the current one that a proxy was
//! answered with, so a filter that holds one of them gets only what changed since
//! ([`SnapshotStore::delta`], `fulcrum_core::distribution`), each delta computed once and
//! served to every proxy. A version no proxy was answered with is not kept: no filter can
//! hold it, and keeping it would keep its services' older endpoint lists alive (a burst of
//! registrations publishes a version every debounce, each with most services changed).

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use fulcrum_core::{Snapshot, distribution};
use fulcrum_xds::{ChangeTrace, SnapshotCache};
use tokio::sync::watch;
use tracing::{info, info_span};

use serde::Serialize;
use tracing::warn;

use crate::{change::Traced, encode::EncodedSnapshot, metrics::PipelineMetrics};

/// A snapshot the stage refused to publish because it is over the budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    /// Its version.
    pub version: String,
    /// Its JSON size.
    pub bytes: usize,
    /// The budget it exceeds.
    pub budget_bytes: usize,
}

/// Where the stage publishes, and its budget.
#[derive(Debug, Clone)]
pub struct Sinks {
    /// The xDS cache Envoy's streams serve from.
    pub cache: Arc<SnapshotCache>,
    /// The snapshot the filters poll.
    pub store: SnapshotStore,
    /// The largest JSON published, in bytes.
    pub budget_bytes: usize,
    /// The snapshot refused last, `None` once one is published again.
    pub refused: watch::Sender<Option<Arc<Refused>>>,
    /// The snapshot published last, for whatever follows the flow's output.
    pub published: watch::Sender<Option<Arc<Snapshot>>>,
}

/// Runs the stage until `input` closes: every new snapshot within the budget goes to the
/// cache (Envoy) and the store (the filters); one over it to neither.
pub async fn run(
    mut input: watch::Receiver<Option<Traced<EncodedSnapshot>>>,
    sinks: Sinks,
    metrics: PipelineMetrics,
) {
    loop {
        let snapshot = input.borrow_and_update().clone();
        if let Some(snapshot) = snapshot {
            publish(&snapshot, &sinks, &metrics);
        }
        if input.changed().await.is_err() {
            return;
        }
    }
}

fn publish(encoded: &Traced<EncodedSnapshot>, sinks: &Sinks, metrics: &PipelineMetrics) {
    let snapshot = Arc::clone(&encoded.snapshot);
    let span = info_span!(
        parent: None,
        "publish",
        version = %snapshot.version,
        services = snapshot.services.len(),
        bytes = tracing::field::Empty,
        encoded = tracing::field::Empty,
        reused = tracing::field::Empty,
    );
    encoded.trace.adopt(&span);
    let body = encoded.body.clone();
    if body.len() > sinks.budget_bytes {
        warn!(
            version = %snapshot.version,
            bytes = body.len(),
            budget_bytes = sinks.budget_bytes,
            kept = ?sinks.store.current().map(|served| served.snapshot.version.clone()),
            "refused a snapshot over the budget: Envoy and the filters keep the last good one"
        );
        metrics.observe_over_budget(true);
        sinks.refused.send_replace(Some(Arc::new(Refused {
            version: snapshot.version.clone(),
            bytes: body.len(),
            budget_bytes: sinks.budget_bytes,
        })));
        return;
    }
    span.record("bytes", body.len());
    // The streams' pushes of this version are children of this span.
    let summary = sinks.cache.set_traced(&snapshot, ChangeTrace::of(&span));
    span.record("encoded", summary.encoded);
    span.record("reused", summary.reused);
    metrics.observe(&snapshot);
    metrics.observe_over_budget(false);
    sinks.refused.send_replace(None);
    info!(
        version = %snapshot.version,
        services = snapshot.services.len(),
        policy = snapshot.policy.is_some(),
        bytes = body.len(),
        encoded = summary.encoded,
        reused = summary.reused,
        "published snapshot"
    );
    sinks.store.publish(Arc::clone(&snapshot), body);
    sinks.published.send_replace(Some(snapshot));
}

/// How many recent versions the store answers deltas from. A filter more versions behind
/// (or holding one this replica never published or never answered a proxy with) gets the
/// whole snapshot.
pub const DELTA_HISTORY: usize = 16;

/// One snapshot with its JSON encoding, and the deltas to it computed so far.
#[derive(Debug)]
pub struct ServedSnapshot {
    /// The snapshot.
    pub snapshot: Arc<Snapshot>,
    /// Its JSON body, as served.
    pub body: Bytes,
    /// The `ETag` header value: the version in quotes.
    pub etag: String,
    /// Delta bodies from earlier versions (at most [`DELTA_HISTORY`]), computed on first
    /// request: every proxy one change behind asks for the same one.
    deltas: Mutex<Vec<(String, Bytes)>>,
    /// Whether a proxy was answered with this version (see
    /// [`SnapshotStore::current_for_proxy`]): only then is it kept for deltas once replaced.
    handed_out: AtomicBool,
}

/// The latest snapshot, shared by the pipeline (writer) and the HTTP API (readers), and the
/// versions before it that deltas are answered from.
#[derive(Debug, Clone, Default)]
pub struct SnapshotStore {
    current: Arc<watch::Sender<Option<Arc<ServedSnapshot>>>>,
    /// The last [`DELTA_HISTORY`] snapshots published before the current one that a proxy
    /// was answered with, oldest first: the snapshots alone (deltas are computed from them),
    /// not their bodies, and sharing every service they have in common.
    recent: Arc<Mutex<VecDeque<Arc<Snapshot>>>>,
}

impl SnapshotStore {
    /// Publishes `snapshot`, whose JSON is `body`.
    pub fn publish(&self, snapshot: Arc<Snapshot>, body: Bytes) {
        let etag = format!("\"{}\"", snapshot.version);
        let served = Arc::new(ServedSnapshot {
            snapshot,
            body,
            etag,
            deltas: Mutex::new(Vec::new()),
            handed_out: AtomicBool::new(false),
        });
        if let Some(previous) = self.current.send_replace(Some(served))
            && previous.handed_out.load(Ordering::Acquire)
        {
            let previous = Arc::clone(&previous.snapshot);
            let mut recent = lock(&self.recent);
            recent.retain(|kept| kept.version != previous.version);
            recent.push_back(previous);
            while recent.len() > DELTA_HISTORY {
                recent.pop_front();
            }
        }
    }

    /// The latest snapshot, if any was built yet.
    pub fn current(&self) -> Option<Arc<ServedSnapshot>> {
        self.current.borrow().clone()
    }

    /// The latest snapshot, to answer a proxy with (whole, as a delta or as not modified):
    /// marks it as one a proxy may hold, so it is kept for deltas once replaced. A proxy
    /// answered with a version in the instant it is replaced may find it not kept and get
    /// the whole snapshot next time.
    pub fn current_for_proxy(&self) -> Option<Arc<ServedSnapshot>> {
        let served = self.current()?;
        served.handed_out.store(true, Ordering::Release);
        Some(served)
    }

    /// The JSON of the delta from version `base` to `current`
    /// ([`fulcrum_core::distribution::delta`]), when `base` is one of the recent versions;
    /// `None` (answer the whole snapshot) otherwise, whatever `base` holds.
    pub fn delta(&self, current: &ServedSnapshot, base: &str) -> Option<Bytes> {
        if let Some((_, body)) = lock(&current.deltas).iter().find(|(from, _)| from == base) {
            return Some(body.clone());
        }
        let from = lock(&self.recent)
            .iter()
            .find(|kept| kept.version == base)
            .cloned()?;
        let delta = distribution::delta(&from, &current.snapshot);
        // Plain data over ordered maps: serialization cannot fail.
        let body = Bytes::from(serde_json::to_vec(&delta).unwrap_or_default());
        let mut deltas = lock(&current.deltas);
        if deltas.len() < DELTA_HISTORY {
            deltas.push((base.to_owned(), body.clone()));
        }
        Some(body)
    }
}

/// The data behind `mutex`, even if a holder panicked (it only ever holds plain data).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use fulcrum_core::{Endpoint, ServiceEndpoints};
    use fulcrum_xds::ClusterOptions;

    use super::*;
    use crate::encode::Encoder;

    fn snapshot(endpoints: u16) -> Traced<EncodedSnapshot> {
        let endpoints = (1..=endpoints)
            .map(|port| Endpoint::new(([10, 0, 0, 1], port).into()))
            .collect();
        let services = [(
            "shop".to_owned(),
            Arc::new(ServiceEndpoints {
                endpoints,
                protocol: None,
            }),
        )]
        .into();
        Traced::untraced(Arc::new(Encoder::default().encode(&services, None)))
    }

    fn sinks(budget_bytes: usize) -> Sinks {
        Sinks {
            cache: Arc::new(SnapshotCache::new(ClusterOptions::default())),
            store: SnapshotStore::default(),
            budget_bytes,
            refused: watch::Sender::new(None),
            published: watch::Sender::new(None),
        }
    }

    fn versions(sinks: &Sinks) -> (Option<String>, Option<String>) {
        (
            sinks
                .cache
                .current()
                .map(|current| current.version.to_string()),
            sinks
                .store
                .current()
                .map(|served| served.snapshot.version.clone()),
        )
    }

    #[test]
    fn a_snapshot_over_the_budget_reaches_neither_sink_and_the_last_good_stays() {
        let small = snapshot(2);
        let budget = serde_json::to_vec(&*small.snapshot).expect("json").len() + 100;
        let sinks = sinks(budget);
        let metrics = PipelineMetrics::default();
        publish(&small, &sinks, &metrics);
        assert_eq!(
            versions(&sinks),
            (
                Some(small.snapshot.version.clone()),
                Some(small.snapshot.version.clone())
            )
        );

        let big = snapshot(50);
        publish(&big, &sinks, &metrics);
        assert_eq!(
            versions(&sinks),
            (
                Some(small.snapshot.version.clone()),
                Some(small.snapshot.version.clone())
            ),
            "Envoy and the filters keep the last good snapshot"
        );
        let refused = sinks.refused.borrow().clone().expect("refused");
        assert_eq!(refused.version, big.snapshot.version);
        assert!(refused.bytes > budget);
        assert_eq!(metrics.over_budget.get(), 1);

        let fits = snapshot(3);
        publish(&fits, &sinks, &metrics);
        assert_eq!(
            versions(&sinks),
            (
                Some(fits.snapshot.version.clone()),
                Some(fits.snapshot.version.clone())
            )
        );
        assert!(sinks.refused.borrow().is_none());
        assert_eq!(metrics.over_budget.get(), 0);
        assert_eq!(
            sinks.published.borrow().as_ref().map(|s| s.version.clone()),
            Some(fits.snapshot.version.clone()),
            "what follows the flow sees only what was published"
        );
    }

    #[test]
    fn deltas_are_answered_from_the_recent_versions_only_and_computed_once() {
        let store = SnapshotStore::default();
        let versions: Vec<String> = (1..=DELTA_HISTORY as u16 + 2)
            .map(|endpoints| {
                let snapshot = Arc::clone(&snapshot(endpoints).snapshot);
                let body = Bytes::from(serde_json::to_vec(&*snapshot).expect("json"));
                store.publish(Arc::clone(&snapshot), body);
                // A filter polls each version.
                store.current_for_proxy().expect("published");
                snapshot.version.clone()
            })
            .collect();
        let current = store.current().expect("current");
        assert!(
            store.delta(&current, &versions[0]).is_none(),
            "the oldest version fell out of the history: the whole snapshot answers it"
        );
        assert!(store.delta(&current, "garbage").is_none());
        let base = &versions[versions.len() - 2];
        let delta = store.delta(&current, base).expect("a recent version");
        let delta: serde_json::Value = serde_json::from_slice(&delta).expect("json");
        assert_eq!(delta["base"], base.as_str());
        assert_eq!(delta["version"], current.snapshot.version.as_str());
        assert_eq!(
            delta["services"]["shop"]["endpoints"]
                .as_array()
                .map(Vec::len),
            Some(versions.len())
        );
        assert_eq!(current.deltas.lock().expect("deltas").len(), 1);
        store.delta(&current, base).expect("served again");
        assert_eq!(
            current.deltas.lock().expect("deltas").len(),
            1,
            "computed once"
        );
    }

    #[test]
    fn only_versions_a_proxy_was_answered_with_are_kept_for_deltas() {
        let store = SnapshotStore::default();
        let publish = |endpoints: u16| {
            let snapshot = Arc::clone(&snapshot(endpoints).snapshot);
            let body = Bytes::from(serde_json::to_vec(&*snapshot).expect("json"));
            store.publish(Arc::clone(&snapshot), body);
            snapshot.version.clone()
        };
        let polled = publish(1);
        store.current_for_proxy().expect("published");
        let unseen = publish(2);
        publish(3);
        let current = store.current_for_proxy().expect("current");
        assert!(
            store.delta(&current, &polled).is_some(),
            "a proxy may hold the polled version"
        );
        assert!(
            store.delta(&current, &unseen).is_none(),
            "no proxy can hold a version it was never answered with: not kept"
        );
        assert_eq!(lock(&store.recent).len(), 1);
    }
}
