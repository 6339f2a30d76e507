//! Endpoint sources for fulcrum's control plane, and their merging into one snapshot.
//!
//! A [`Source`] publishes the full set of services it knows whenever it changes (the static
//! file now; the Kubernetes EndpointSlice watcher and the registry later, behind the same
//! trait). [`pipeline::run`] folds bursts of updates with a short debounce and
//! [`merge::merge`] combines the latest state of every source into one
//! [`fulcrum_core::Snapshot`] with a content-derived version. A source that hits bad input
//! logs it and keeps publishing its last good state, so one bad edit never empties a cluster.

pub mod merge;
pub mod pipeline;
pub mod static_file;

use std::{collections::BTreeMap, future::Future, pin::Pin, sync::Arc};

use fulcrum_core::ServiceEndpoints;
use tokio::sync::mpsc;

pub use merge::merge;
pub use pipeline::{Debounce, run};
pub use static_file::{StaticFileError, StaticFileSource, parse_static_file};

/// Services by name, each with its endpoints: the state one source publishes.
pub type Services = BTreeMap<String, ServiceEndpoints>;

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
pub(crate) struct SourceUpdate {
    pub(crate) source: usize,
    pub(crate) services: Arc<Services>,
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
    pub(crate) fn new(source: usize, updates: mpsc::Sender<SourceUpdate>) -> Self {
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
