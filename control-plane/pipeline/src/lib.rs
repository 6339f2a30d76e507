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
//! The policy enters the flow in one place ([`Pipeline::start`]'s `policy`), read by the
//! health and policy stages; everything downstream (Envoy, the filters, the registry's
//! picks) sees it through the published snapshot, with one version for one state.
//! [`Pipeline::published`] is the flow's output for anything else that follows it.

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
use fulcrum_sources::Source;
use fulcrum_xds::{ClusterOptions, SnapshotCache};
use tokio::{sync::watch, task::JoinHandle};

pub use merge::Debounce;
pub use metrics::PipelineMetrics;
pub use publish::{ServedSnapshot, SnapshotStore};
pub use validate::Dropped;

/// A running pipeline. Dropping it stops every stage (and with them the sources and probes).
#[derive(Debug)]
pub struct Pipeline {
    cache: Arc<SnapshotCache>,
    store: SnapshotStore,
    published: watch::Receiver<Option<Arc<Snapshot>>>,
    dropped: watch::Receiver<Arc<Dropped>>,
    task: JoinHandle<()>,
}

impl Pipeline {
    /// Starts every stage on the current tokio runtime: `sources` merged with `debounce`,
    /// checked (through `probes`) and published with the policy `policy` holds, as clusters
    /// built with `cluster_options`; `metrics` counts what the stages do.
    pub fn start(
        sources: Vec<Box<dyn Source>>,
        debounce: Debounce,
        policy: watch::Receiver<Option<Arc<AppliedPolicy>>>,
        cluster_options: ClusterOptions,
        metrics: PipelineMetrics,
        probes: ProbeHub,
    ) -> Self {
        let cache = Arc::new(SnapshotCache::new(cluster_options));
        let store = SnapshotStore::default();
        let (merged, merged_out) = watch::channel(None);
        let (valid, valid_out) = watch::channel(None);
        let (dropped, dropped_out) = watch::channel(Arc::default());
        let (checked, checked_out) = watch::channel(None);
        let (snapshots, published) = watch::channel(None);
        let stages = (
            merge::run(sources, debounce, merged),
            validate::run(merged_out, valid, dropped, metrics.clone()),
            health::run(valid_out, policy.clone(), probes, checked),
            policy::run(checked_out, policy, snapshots),
            publish::run(
                published.clone(),
                Arc::clone(&cache),
                store.clone(),
                metrics,
            ),
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

    /// Every published snapshot, as it is published.
    pub fn published(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.published.clone()
    }

    /// What validation left out of the latest published snapshot.
    pub fn dropped(&self) -> watch::Receiver<Arc<Dropped>> {
        self.dropped.clone()
    }

    /// Stops every stage; the cache and the store keep what they hold.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop();
    }
}
