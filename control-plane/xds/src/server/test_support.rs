//! Fixtures shared by the stream state machines' unit tests.

use std::sync::Arc;

use fulcrum_core::{Endpoint, ServiceEndpoints, Snapshot, UpstreamProtocol};

use crate::cache::{ResourceType, SnapshotCache, XdsSnapshot};
use crate::resources::ClusterOptions;
use crate::server::held::Held;

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

/// Asserts that a stream's memory of what its Envoy holds of type `ty`, every resource of
/// `snapshot`, is the snapshot's own map (not a copy of its names and versions), and that every
/// name it subscribed to (`subscribed`) is the snapshot's own allocation; a subscribed name
/// the snapshot does not serve is kept as its own.
pub(super) fn assert_shares_the_snapshots_allocations<'a>(
    snapshot: &XdsSnapshot,
    ty: ResourceType,
    held: &Held,
    subscribed: impl IntoIterator<Item = &'a Arc<str>>,
) {
    let resources = snapshot.resources(ty);
    assert!(
        held.is_whole(resources),
        "{ty:?}: the snapshot's map is held"
    );
    for name in subscribed {
        if let Some(resource) = resources.get(&**name) {
            assert!(Arc::ptr_eq(name, &resource.name), "{ty:?} {name}");
        }
    }
}
