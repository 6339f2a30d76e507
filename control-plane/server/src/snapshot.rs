//! The snapshot the filters poll, encoded once per version.
//!
//! The pipeline publishes each new [`Snapshot`]; the store serializes it to JSON right away
//! and keeps the bytes, so every `GET /v1/snapshot` of a version serves the same buffer.

use std::sync::Arc;

use axum::body::Bytes;
use fulcrum_core::Snapshot;
use tokio::sync::watch;

/// One snapshot with its JSON encoding.
#[derive(Debug)]
pub struct ServedSnapshot {
    /// The snapshot.
    pub snapshot: Snapshot,
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
    pub fn publish(&self, snapshot: Snapshot) {
        // Plain data over ordered maps: serialization cannot fail.
        let body = Bytes::from(serde_json::to_vec(&snapshot).unwrap_or_default());
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
