//! The endpoint-change flow of fulcrum's control plane, in one place: from the endpoint
//! sources to the two things that publish it, Envoy's xDS cache and the filters' snapshot.
//!
//! Every stage has one shape: it reads the latest state from a [`watch::Receiver`], and sends
//! its own latest state to a [`watch::Sender`] only when it changed. Five stages, in the
//! order data passes them, one module each:
//!
//! 1. [`merge`]: runs the [`Source`]s, folds bursts with a debounce, merges their states;
//! 2. [`validate`]: leaves out what the filter or Envoy would refuse, reporting it;
//! 3. [`health`]: probes the endpoints the policy asks to check and marks failing ones;
//! 4. [`policy`]: attaches the current policy and versions the result, once;
//! 5. [`publish`]: hands the snapshot to the xDS cache and the [`SnapshotStore`].
//!
//! The state is per service: every stage passes services on as [`Services`] (each behind
//! an `Arc`), keeps the `Arc` of a service it did not change, and does its per-service work
//! (screening, encoding, building Envoy resources) only for a service whose `Arc` is new.
//! So a change costs what changed, plus a pass over the service names, and the stages and
//! the recent snapshots share one copy of each service.
//!
//! The policy enters the flow in one place ([`Pipeline::start`]'s `policy`), read by the
//! health and policy stages; everything downstream (Envoy, the filters, the registry's
//! picks) sees it through the published snapshot, with one version for one state.
//! [`Pipeline::published`] is the flow's output for anything else that follows it.
//!
//! Every stage's output carries the trace of the change that made it ([`change`]), so a
//! change is one trace from where it entered to every Envoy's ACK of its version.

pub mod change;
pub mod encode;
pub mod health;
pub mod merge;
pub mod metrics;
pub mod policy;
pub mod publish;
pub mod validate;

use std::sync::Arc;

use fulcrum_core::Snapshot;
use fulcrum_health::ProbeHub;
use fulcrum_policy::AppliedPolicy;
use fulcrum_sources::{Services, Source};
use fulcrum_xds::{ClusterOptions, SnapshotCache};
use tokio::{sync::watch, task::JoinHandle};

pub use change::Traced;
pub use merge::Debounce;
pub use metrics::PipelineMetrics;
pub use publish::{DELTA_HISTORY, Refused, ServedSnapshot, SnapshotStore};
pub use validate::Dropped;

/// The default snapshot budget: half the filters' default `max_snapshot_bytes` (32 MiB), so
/// a snapshot the filters would refuse is refused here first, with room for growth.
pub const DEFAULT_SNAPSHOT_BUDGET: usize = 16 << 20;

/// How the pipeline runs.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// How source updates are folded.
    pub debounce: Debounce,
    /// Settings of the generated Envoy clusters.
    pub cluster_options: ClusterOptions,
    /// The largest snapshot published, in bytes of JSON (see [`publish`]).
    pub snapshot_budget_bytes: usize,
    /// Publish nothing until a policy is accepted (a policy source is configured; see
    /// [`policy`]).
    pub require_policy: bool,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            debounce: Debounce::default(),
            cluster_options: ClusterOptions::default(),
            snapshot_budget_bytes: DEFAULT_SNAPSHOT_BUDGET,
            require_policy: false,
        }
    }
}

/// A running pipeline. Dropping it stops every stage (and with them the sources and probes).
#[derive(Debug)]
pub struct Pipeline {
    cache: Arc<SnapshotCache>,
    store: SnapshotStore,
    published: watch::Receiver<Option<Arc<Snapshot>>>,
    dropped: watch::Receiver<Arc<Dropped>>,
    refused: watch::Receiver<Option<Arc<Refused>>>,
    task: JoinHandle<()>,
}

impl Pipeline {
    /// Starts every stage on the current tokio runtime: `sources` merged, checked (through
    /// `probes`) and published with the policy `policy` holds, as `config` says; `metrics`
    /// counts what the stages do.
    pub fn start(
        sources: Vec<Box<dyn Source>>,
        policy: watch::Receiver<Option<Arc<AppliedPolicy>>>,
        config: PipelineConfig,
        metrics: PipelineMetrics,
        probes: ProbeHub,
    ) -> Self {
        let cache = Arc::new(SnapshotCache::new(config.cluster_options));
        let store = SnapshotStore::default();
        let (refused, refused_out) = watch::channel(None);
        let (published_in, published) = watch::channel(None);
        let sinks = publish::Sinks {
            cache: Arc::clone(&cache),
            store: store.clone(),
            budget_bytes: config.snapshot_budget_bytes,
            refused,
            published: published_in,
        };
        let (merged, merged_out) = watch::channel(None);
        let (valid, valid_out) = watch::channel(None);
        let (dropped, dropped_out) = watch::channel(Arc::default());
        let (checked, checked_out) = watch::channel(None);
        let (snapshots, versioned) = watch::channel(None);
        let stages = (
            merge::run(sources, config.debounce, merged, metrics.clone()),
            validate::run(merged_out, valid, dropped, metrics.clone()),
            health::run(valid_out, policy.clone(), probes, checked),
            policy::run(checked_out, policy, snapshots, config.require_policy),
            publish::run(versioned, sinks, metrics),
        );
        let task = tokio::spawn(async move {
            let (merge, validate, health, policy, publish) = stages;
            tokio::join!(merge, validate, health, policy, publish);
        });
        Self {
            cache,
            store,
            published,
            dropped: dropped_out,
            refused: refused_out,
            task,
        }
    }

    /// The xDS cache Envoy's streams serve from.
    pub fn cache(&self) -> &Arc<SnapshotCache> {
        &self.cache
    }

    /// The snapshot the filters poll.
    pub fn store(&self) -> &SnapshotStore {
        &self.store
    }

    /// Every snapshot the flow published (to Envoy and the filters alike), as it is published.
    pub fn published(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.published.clone()
    }

    /// What validation left out of the latest published snapshot.
    pub fn dropped(&self) -> watch::Receiver<Arc<Dropped>> {
        self.dropped.clone()
    }

    /// The snapshot refused last for exceeding the budget, while no later one is published.
    pub fn refused(&self) -> watch::Receiver<Option<Arc<Refused>>> {
        self.refused.clone()
    }

    /// Stops every stage; the cache and the store keep what they hold.
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// `merged` with every service equal to the one in `previous` replaced by that one, so
/// that an unchanged service keeps its [`Arc`] through every stage whichever source rebuilt
/// it or which stage copied it (the stages cache their work per service by pointer).
pub fn share_unchanged(mut merged: Services, previous: Option<&Services>) -> Services {
    if let Some(previous) = previous {
        for (name, service) in &mut merged {
            if let Some(before) = previous.get(name)
                && !Arc::ptr_eq(before, service)
                && before == service
            {
                *service = Arc::clone(before);
            }
        }
    }
    merged
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop();
    }
}
