//! The registry as an endpoint source: every registration, with its health, reaches the
//! control plane's snapshot (EDS and the filters) like the static file's endpoints do.
//!
//! It publishes the view's full state at start and after every change of the view;
//! bursts (a thousand instances registering at once) fold into one publish because it reads
//! the latest state after each wake-up, and the pipeline's debounce folds further. Each
//! publish sets `fulcrum_registry_protocol_conflicts`: the services whose registrations
//! name different protocols.

use std::sync::Arc;

use fulcrum_sources::{Source, SourceFuture, SourceSink};
use prometheus_client::metrics::gauge::Gauge;
use tracing::debug;

use crate::view::{RegistryServices, View};

/// See the module docs.
#[derive(Debug, Clone)]
pub struct RegistrySource {
    view: Arc<View>,
    protocol_conflicts: Gauge,
}

impl RegistrySource {
    /// A source reading `view`, setting `protocol_conflicts` on every publish.
    pub fn new(view: Arc<View>, protocol_conflicts: Gauge) -> Self {
        Self {
            view,
            protocol_conflicts,
        }
    }
}

impl Source for RegistrySource {
    fn name(&self) -> String {
        "registry".to_owned()
    }

    fn run(self: Box<Self>, sink: SourceSink) -> SourceFuture {
        Box::pin(async move {
            let mut revisions = self.view.subscribe();
            loop {
                revisions.borrow_and_update();
                let RegistryServices {
                    services,
                    protocol_conflicts,
                } = self.view.services();
                self.protocol_conflicts
                    .set(i64::try_from(protocol_conflicts).unwrap_or(i64::MAX));
                debug!(services = services.len(), "registry publishes");
                if sink.publish(services).await.is_err() {
                    return;
                }
                if revisions.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}
