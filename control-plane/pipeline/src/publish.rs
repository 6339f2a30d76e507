//! Stage 5, the published snapshot → its two sinks: the xDS cache Envoy streams from, and
//! the [`SnapshotStore`] the filters poll (`/v1/snapshot`), with the same version in both.
//!
//! The store serializes each snapshot to JSON once and keeps the bytes, so every
//! `GET /v1/snapshot` of a version serves the same buffer. Each publication is logged with its
//! version and reflected in the snapshot metrics.

use std::sync::Arc;

use bytes::Bytes;
use fulcrum_core::Snapshot;
use fulcrum_xds::SnapshotCache;
use tokio::sync::watch;
use tracing::info;

use crate::metrics::PipelineMetrics;

/// Runs the stage until `input` closes: every new snapshot goes to `cache` (Envoy) and
/// `store` (the filters).
pub async fn run(
    mut input: watch::Receiver<Option<Arc<Snapshot>>>,
    cache: Arc<SnapshotCache>,
    store: SnapshotStore,
    metrics: PipelineMetrics,
) {
    loop {
        let snapshot = input.borrow_and_update().clone();
        if let Some(snapshot) = snapshot {
            let summary = cache.set(&snapshot);
            metrics.observe(&snapshot);
            info!(
                version = %snapshot.version,
                services = snapshot.services.len(),
                policy = snapshot.policy.is_some(),
                encoded = summary.encoded,
                reused = summary.reused,
                "published snapshot"
            );
            store.publish(snapshot);
        }
        if input.changed().await.is_err() {
            return;
        }
    }
}

/// One snapshot with its JSON encoding.
#[derive(Debug)]
pub struct ServedSnapshot {
    /// The snapshot.
    pub snapshot: Arc<Snapshot>,
    /// Its JSON body, as served.
    pub body: Bytes,
    /// The `ETag` header value: the version in quotes.
    pub etag: String,
}

/// The latest snapshot, shared by the pipeline (writer) and the HTTP API (readers).
#[derive(Debug, Clone, Default)]
pub struct SnapshotStore {
    current: Arc<watch::Sender<Option<Arc<ServedSnapshot>>>>,
}

impl SnapshotStore {
    /// Encodes and publishes `snapshot`.
    pub fn publish(&self, snapshot: Arc<Snapshot>) {
        // Plain data over ordered maps: serialization cannot fail.
        let body = Bytes::from(serde_json::to_vec(&*snapshot).unwrap_or_default());
        let etag = format!("\"{}\"", snapshot.version);
        self.current.send_replace(Some(Arc::new(ServedSnapshot {
            snapshot,
            body,
            etag,
        })));
    }

    /// The latest snapshot, if any was built yet.
    pub fn current(&self) -> Option<Arc<ServedSnapshot>> {
        self.current.borrow().clone()
    }
}
