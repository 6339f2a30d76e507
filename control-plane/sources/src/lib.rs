//! Endpoint sources for fulcrum's control plane: the [`Source`] trait, the sink a source
//! publishes through, and the static file source.
//!
//! A [`Source`] publishes the full set of services it knows whenever it changes: the static
//! file (here), Kubernetes EndpointSlices (`fulcrum-kube-source`) and the self-registration
//! registry (`fulcrum-registry`). The first stage of the endpoint-change flow
//! (`fulcrum-pipeline`'s `merge`) runs them and merges their states. A source that hits bad
//! input logs it and keeps publishing its last good state, so one bad edit never empties a
//! cluster.

pub mod static_file;

use std::{collections::BTreeMap, future::Future, pin::Pin, sync::Arc};

use fulcrum_core::ServiceEndpoints;
use tokio::sync::mpsc;

pub use static_file::{StaticFileError, StaticFileMetrics, StaticFileSource, parse_static_file};

/// Services by name, each with its endpoints: the state one source publishes, and the shape
/// of every stage's state after it.
///
/// Each service is behind an [`Arc`] so that a change of one service leaves the others
/// shared: a source republishing its state, and every stage passing on what it did not
/// touch, hands on the same allocation, and a stage tells an unchanged service by
/// [`Arc::ptr_eq`] instead of comparing its endpoints. Build per-service output anew only for
/// a service whose input changed.
pub type Services = BTreeMap<String, Arc<ServiceEndpoints>>;

/// A boxed future a source runs as.
pub type SourceFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Something that knows endpoints and tells when they change.
///
/// Contract: [`run`](Source::run) publishes the source's *full* current state through the
/// sink after it first has one and after every change, and returns once the sink is closed.
/// It reports its own errors (with `tracing`) and keeps its last good state rather than
/// publishing a partial one.
pub trait Source: Send + 'static {
    /// A name for logs and status, e.g. `static-file:/etc/fulcrum/endpoints.yaml`.
    fn name(&self) -> String;

    /// Runs the source until `sink` closes.
    fn run(self: Box<Self>, sink: SourceSink) -> SourceFuture;
}

/// One source's state at one moment, as sent to the pipeline.
#[derive(Debug, Clone)]
pub struct SourceUpdate {
    /// The source's index in the pipeline's list.
    pub source: usize,
    /// Its full state.
    pub services: Arc<Services>,
}

/// Where a source publishes its state.
#[derive(Debug, Clone)]
pub struct SourceSink {
    source: usize,
    updates: mpsc::Sender<SourceUpdate>,
}

/// The pipeline stopped listening; the source should return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the snapshot pipeline stopped; the source should stop too")]
pub struct SinkClosed;

impl SourceSink {
    /// The sink of source number `source`, sending into `updates`.
    pub fn new(source: usize, updates: mpsc::Sender<SourceUpdate>) -> Self {
        Self { source, updates }
    }

    /// Publishes the source's full current state.
    pub async fn publish(&self, services: Services) -> Result<(), SinkClosed> {
        self.updates
            .send(SourceUpdate {
                source: self.source,
                services: Arc::new(services),
            })
            .await
            .map_err(|_| SinkClosed)
    }

    /// Whether the pipeline stopped listening.
    pub fn is_closed(&self) -> bool {
        self.updates.is_closed()
    }
}
