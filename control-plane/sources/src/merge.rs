//! Merges the latest state of every source into one snapshot with a content-derived version.
//!
//! A service known to several sources gets the union of their endpoints; when two sources
//! list the same address for a service, the earlier source (in configuration order) wins.
//! The version is a hash of the merged content, so equal content always has equal versions
//! (across restarts too) and the filters and Envoy skip what they already hold.

use std::collections::BTreeMap;

use fulcrum_core::{Endpoint, ServiceEndpoints, Snapshot};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::Services;

/// Merges `sources` (name, state), earlier sources taking precedence on conflicts.
/// Endpoints come out sorted by address.
pub fn merge<'a>(sources: impl IntoIterator<Item = (&'a str, &'a Services)>) -> Snapshot {
    let mut merged: BTreeMap<String, BTreeMap<std::net::SocketAddr, (&str, &Endpoint)>> =
        BTreeMap::new();
    for (source, services) in sources {
        for (service, endpoints) in services {
            let entry = merged.entry(service.clone()).or_default();
            for endpoint in &endpoints.endpoints {
                match entry.get(&endpoint.address) {
                    Some((winner, existing)) if *existing != endpoint => warn!(
                        service = %service,
                        address = %endpoint.address,
                        kept_from = %winner,
                        ignored_from = %source,
                        "two sources disagree about one endpoint; keeping the earlier source's"
                    ),
                    Some(_) => {}
                    None => {
                        entry.insert(endpoint.address, (source, endpoint));
                    }
                }
            }
        }
    }
    let services: Services = merged
        .into_iter()
        .map(|(name, endpoints)| {
            let endpoints = endpoints.into_values().map(|(_, e)| e.clone()).collect();
            (name, ServiceEndpoints { endpoints })
        })
        .collect();
    Snapshot {
        version: content_version(&services),
        services,
        // Policies come from the policy source, not from endpoint sources.
        policy: None,
    }
}

/// A short hex hash of the services' canonical JSON.
pub fn content_version(services: &Services) -> String {
    // Plain structs over ordered collections: serialization cannot fail and is canonical.
    let canonical = serde_json::to_vec(services).unwrap_or_default();
    let digest = Sha256::digest(&canonical);
    digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use fulcrum_core::Health;
    use proptest::prelude::*;

    use super::*;

    fn services(entries: &[(&str, &[&str])]) -> Services {
        entries
            .iter()
            .map(|(name, addresses)| {
                let endpoints = addresses
                    .iter()
                    .map(|address| Endpoint::new(address.parse().expect("address")))
                    .collect();
                ((*name).to_owned(), ServiceEndpoints { endpoints })
            })
            .collect()
    }

    fn addresses(snapshot: &Snapshot, service: &str) -> Vec<String> {
        snapshot.services[service]
            .endpoints
            .iter()
            .map(|endpoint| endpoint.address.to_string())
            .collect()
    }

    #[test]
    fn union_of_endpoints_sorted_by_address() {
        let file = services(&[("a", &["127.0.0.2:80"]), ("b", &["127.0.0.9:80"])]);
        let registry = services(&[("a", &["127.0.0.1:80"])]);
        let snapshot = merge([("file", &file), ("registry", &registry)]);
        assert_eq!(addresses(&snapshot, "a"), ["127.0.0.1:80", "127.0.0.2:80"]);
        assert_eq!(addresses(&snapshot, "b"), ["127.0.0.9:80"]);
    }

    #[test]
    fn earlier_source_wins_a_conflicting_endpoint() {
        let file = services(&[("a", &["127.0.0.1:80"])]);
        let mut registry = services(&[("a", &["127.0.0.1:80"])]);
        registry.get_mut("a").expect("a").endpoints[0].health = Health::Unhealthy;
        let snapshot = merge([("file", &file), ("registry", &registry)]);
        assert_eq!(snapshot.services["a"].endpoints[0].health, Health::Healthy);
    }

    #[test]
    fn version_changes_with_content_only() {
        let a = services(&[("a", &["127.0.0.1:80"])]);
        let b = services(&[("a", &["127.0.0.1:81"])]);
        assert_eq!(merge([("x", &a)]).version, merge([("y", &a)]).version);
        assert_ne!(merge([("x", &a)]).version, merge([("x", &b)]).version);
    }

    proptest! {
        #[test]
        fn source_order_does_not_change_content_without_conflicts(
            left in proptest::collection::btree_set(1u16..500, 0..8),
            right in proptest::collection::btree_set(500u16..1000, 0..8),
        ) {
            let to_services = |ports: &std::collections::BTreeSet<u16>| -> Services {
                let endpoints = ports
                    .iter()
                    .map(|port| Endpoint::new(std::net::SocketAddr::from(([127, 0, 0, 1], *port))))
                    .collect();
                BTreeMap::from([("svc".to_owned(), ServiceEndpoints { endpoints })])
            };
            let (left, right) = (to_services(&left), to_services(&right));
            let forward = merge([("l", &left), ("r", &right)]);
            let backward = merge([("r", &right), ("l", &left)]);
            prop_assert_eq!(forward, backward);
        }
    }
}
