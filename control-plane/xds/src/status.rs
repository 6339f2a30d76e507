//! What every connected Envoy has accepted and rejected, for `/v1/status` and the metrics.
//!
//! One entry per open ADS stream (a node that reconnects gets a new entry; the old one goes
//! when its stream closes). Updated by the stream drivers only; read by the HTTP API.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::cache::ResourceType;

/// The xDS protocol variant of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// `StreamAggregatedResources`: state of the world.
    Sotw,
    /// `DeltaAggregatedResources`: incremental.
    Delta,
}

impl StreamKind {
    /// `sotw` or `delta`, for labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Sotw => "sotw",
            StreamKind::Delta => "delta",
        }
    }
}

/// A rejection reported by Envoy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nack {
    /// The version Envoy refused (SotW `version_info`; delta: the system version sent with
    /// the refused nonce).
    pub rejected_version: String,
    /// The nonce of the refused response.
    pub nonce: String,
    /// `error_detail.code` (a gRPC status code).
    pub code: i32,
    /// `error_detail.message`: Envoy's reason, its first KiB (a longer one is cut, ending in
    /// `…`).
    pub message: String,
    /// When it arrived, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// Per-type progress of one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypeStatus {
    /// The version of the last response sent.
    pub last_sent_version: Option<String>,
    /// The last version Envoy acknowledged: what it runs with. Only a version this stream
    /// sent is recorded: an ACK naming another leaves the previous one.
    pub last_acked_version: Option<String>,
    /// Responses sent.
    pub responses_sent: u64,
    /// NACKs received.
    pub nacks: u64,
    /// The most recent NACK, kept after later ACKs so an operator can still see it.
    pub last_nack: Option<Nack>,
}

/// One connected Envoy stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamStatus {
    /// Process-unique stream number.
    pub stream_id: u64,
    /// `node.id` from the first request, its first 256 bytes (a longer one is cut, ending in
    /// `…`).
    pub node_id: String,
    /// `node.cluster` from the first request, cut as `node_id` is.
    pub node_cluster: String,
    /// SotW or delta.
    pub kind: StreamKind,
    /// When the stream opened, in milliseconds since the Unix epoch.
    pub connected_at_unix_ms: u64,
    /// Progress per resource type, `cds` / `eds`.
    pub types: TypeStatuses,
}

/// Progress of one stream per resource type, each there once the stream served the type: in
/// JSON an object keyed `cds` / `eds`. Two fields rather than a map: a map's first node took
/// a stream about 1.8 KiB, several times both statuses, for every connected Envoy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypeStatuses {
    /// Clusters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cds: Option<TypeStatus>,
    /// Endpoints (cluster load assignments).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eds: Option<TypeStatus>,
}

impl TypeStatuses {
    /// The status of `ty`, if the stream served it.
    pub fn get(&self, ty: ResourceType) -> Option<&TypeStatus> {
        match ty {
            ResourceType::Cluster => self.cds.as_ref(),
            ResourceType::Endpoint => self.eds.as_ref(),
        }
    }

    fn entry(&mut self, ty: ResourceType) -> &mut TypeStatus {
        match ty {
            ResourceType::Cluster => self.cds.get_or_insert_default(),
            ResourceType::Endpoint => self.eds.get_or_insert_default(),
        }
    }
}

pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Status of every open stream.
#[derive(Debug, Clone, Default)]
pub struct NodeRegistry {
    streams: Arc<Mutex<BTreeMap<u64, StreamStatus>>>,
}

impl NodeRegistry {
    /// Every open stream, by stream id.
    pub fn snapshot(&self) -> Vec<StreamStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, StreamStatus>> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn open(&self, status: StreamStatus) {
        self.lock().insert(status.stream_id, status);
    }

    pub(crate) fn close(&self, stream_id: u64) {
        self.lock().remove(&stream_id);
    }

    pub(crate) fn update(
        &self,
        stream_id: u64,
        ty: ResourceType,
        change: impl FnOnce(&mut TypeStatus),
    ) {
        if let Some(stream) = self.lock().get_mut(&stream_id) {
            change(stream.types.entry(ty));
        }
    }
}
