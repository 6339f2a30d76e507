//! Fixtures shared by the stream state machines' unit tests.

use std::sync::Arc;

use fulcrum_core::{Endpoint, ServiceEndpoints, Snapshot, UpstreamProtocol};

use crate::cache::{SnapshotCache, XdsSnapshot};
use crate::resources::ClusterOptions;

/// The cache's snapshot of `services`, each `(name, "IP:port")` with one endpoint.
pub(super) fn snapshot(version: &str, services: &[(&str, &str)]) -> Arc<XdsSnapshot> {
    snapshot_with_http2(version, services, &[])
}

/// [`snapshot`], the services named in `http2` speaking HTTP/2.
pub(super) fn snapshot_with_http2(
    version: &str,
    services: &[(&str, &str)],
    http2: &[&str],
) -> Arc<XdsSnapshot> {
    let cache = SnapshotCache::new(ClusterOptions::default());
    cache.set(&Snapshot {
        version: version.to_owned(),
        services: services
            .iter()
            .map(|(name, address)| {
                let endpoints = vec![Endpoint::new(address.parse().expect("address"))];
                (
                    (*name).to_owned(),
                    Arc::new(ServiceEndpoints {
                        endpoints,
                        protocol: http2.contains(name).then_some(UpstreamProtocol::Http2),
                    }),
                )
            })
            .collect(),
        ..Default::default()
    });
    cache.current().expect("set")
}
