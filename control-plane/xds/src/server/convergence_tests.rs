//! Property: whatever sequence of snapshots the cache publishes, a client that applies every
//! response and subscribes to the endpoints of every cluster it holds (as Envoy does) ends up
//! holding exactly the current snapshot, in both protocol variants, and its ACKs never
//! trigger a resend.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use fulcrum_core::{Endpoint, ServiceEndpoints, Snapshot};
use proptest::prelude::*;

use super::{delta::DeltaState, sotw::SotwState, wire::Push};
use crate::{
    cache::{ResourceType, SnapshotCache, XdsSnapshot},
    resources::ClusterOptions,
};

type Held = BTreeMap<String, String>;

fn versions(snapshot: &XdsSnapshot, ty: ResourceType) -> Held {
    snapshot
        .resources(ty)
        .values()
        .map(|resource| (resource.name.to_string(), resource.version.to_string()))
        .collect()
}

fn services() -> impl Strategy<Value = BTreeMap<String, u16>> {
    proptest::collection::btree_map(
        prop_oneof![Just("a"), Just("b"), Just("c"), Just("d")].prop_map(str::to_owned),
        1u16..4,
        0..4,
    )
}

fn publish(cache: &SnapshotCache, index: usize, services: &BTreeMap<String, u16>) {
    cache.set(&Snapshot {
        version: format!("v{index}"),
        services: services
            .iter()
            .map(|(name, port)| {
                let address = std::net::SocketAddr::from(([127, 0, 0, 1], *port));
                let endpoints = vec![Endpoint::new(address)];
                (
                    name.clone(),
                    Arc::new(ServiceEndpoints {
                        endpoints,
                        protocol: None,
                    }),
                )
            })
            .collect(),
        ..Default::default()
    });
}

/// Envoy's side of a delta stream, reduced to what it holds.
#[derive(Default)]
struct DeltaClient {
    held: BTreeMap<ResourceType, Held>,
    eds_names: BTreeSet<String>,
}

impl DeltaClient {
    fn apply(&mut self, state: &mut DeltaState, push: Push, snapshot: &XdsSnapshot) {
        let response = push.decoded_delta();
        let ty = ResourceType::from_type_url(&response.type_url).expect("served type");
        let held = self.held.entry(ty).or_default();
        for resource in &response.resources {
            held.insert(resource.name.clone(), resource.version.clone());
        }
        for name in &response.removed_resources {
            held.remove(name);
        }
        let ack = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        let (_, resend) = state
            .on_request(ty, &ack, Some(snapshot))
            .expect("within the subscription limits");
        assert!(resend.is_none(), "an ACK triggered a response");
        if ty == ResourceType::Cluster {
            self.follow_clusters(state, snapshot);
        }
    }

    /// Subscribes to the endpoints of every held cluster, as Envoy's EDS clusters do.
    fn follow_clusters(&mut self, state: &mut DeltaState, snapshot: &XdsSnapshot) {
        let clusters: BTreeSet<String> = self
            .held
            .get(&ResourceType::Cluster)
            .map(|held| held.keys().cloned().collect())
            .unwrap_or_default();
        let request = DeltaDiscoveryRequest {
            type_url: ResourceType::Endpoint.type_url().to_owned(),
            resource_names_subscribe: clusters.difference(&self.eds_names).cloned().collect(),
            resource_names_unsubscribe: self.eds_names.difference(&clusters).cloned().collect(),
            ..Default::default()
        };
        if let Some(eds) = self.held.get_mut(&ResourceType::Endpoint) {
            eds.retain(|name, _| clusters.contains(name));
        }
        self.eds_names = clusters;
        let (_, response) = state
            .on_request(ResourceType::Endpoint, &request, Some(snapshot))
            .expect("within the subscription limits");
        if let Some(response) = response {
            self.apply(state, response, snapshot);
        }
    }
}

/// Envoy's side of a SotW stream, reduced to what it holds.
#[derive(Default)]
struct SotwClient {
    held: BTreeMap<ResourceType, Held>,
    eds_names: BTreeSet<String>,
}

impl SotwClient {
    fn apply(&mut self, state: &mut SotwState, push: Push, snapshot: &XdsSnapshot) {
        let response = push.decoded_sotw();
        use envoy_types::pb::envoy::config::{
            cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment,
        };
        use prost::Message;
        let ty = ResourceType::from_type_url(&response.type_url).expect("served type");
        let received: Vec<String> = response
            .resources
            .iter()
            .map(|any| match ty {
                ResourceType::Cluster => {
                    Cluster::decode(any.value.as_slice()).expect("cluster").name
                }
                ResourceType::Endpoint => {
                    ClusterLoadAssignment::decode(any.value.as_slice())
                        .expect("cla")
                        .cluster_name
                }
            })
            .collect();
        let current = versions(snapshot, ty);
        let held = self.held.entry(ty).or_default();
        if ty.is_wildcard() {
            held.clear();
        }
        for name in received {
            held.insert(name.clone(), current[&name].clone());
        }
        let ack = DiscoveryRequest {
            type_url: response.type_url.clone(),
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            resource_names: match ty {
                ResourceType::Cluster => Vec::new(),
                ResourceType::Endpoint => self.eds_names.iter().cloned().collect(),
            },
            ..Default::default()
        };
        let (_, resend) = state.on_request(ty, &ack, Some(snapshot));
        assert!(resend.is_none(), "an ACK triggered a response");
        if ty == ResourceType::Cluster {
            self.follow_clusters(state, snapshot);
        }
    }

    fn follow_clusters(&mut self, state: &mut SotwState, snapshot: &XdsSnapshot) {
        let clusters: BTreeSet<String> = self
            .held
            .get(&ResourceType::Cluster)
            .map(|held| held.keys().cloned().collect())
            .unwrap_or_default();
        if clusters == self.eds_names {
            return;
        }
        if let Some(eds) = self.held.get_mut(&ResourceType::Endpoint) {
            eds.retain(|name, _| clusters.contains(name));
        }
        self.eds_names = clusters;
        let request = DiscoveryRequest {
            type_url: ResourceType::Endpoint.type_url().to_owned(),
            resource_names: self.eds_names.iter().cloned().collect(),
            ..Default::default()
        };
        let (_, response) = state.on_request(ResourceType::Endpoint, &request, Some(snapshot));
        if let Some(response) = response {
            self.apply(state, response, snapshot);
        }
    }
}

proptest! {
    #[test]
    fn delta_client_converges_to_every_snapshot(sequence in proptest::collection::vec(services(), 1..8)) {
        let cache = SnapshotCache::new(ClusterOptions::default());
        publish(&cache, 0, &sequence[0]);
        let mut snapshot = cache.current().expect("set");
        let mut state = DeltaState::default();
        let mut client = DeltaClient::default();
        let first = DeltaDiscoveryRequest { type_url: ResourceType::Cluster.type_url().to_owned(), ..Default::default() };
        let (_, response) = state.on_request(ResourceType::Cluster, &first, Some(&snapshot))
.expect("within the subscription limits");
        client.apply(&mut state, response.expect("first CDS response"), &snapshot);
        for (index, services) in sequence.iter().enumerate().skip(1) {
            publish(&cache, index, services);
            snapshot = cache.current().expect("set");
            for response in state.on_snapshot(&snapshot) {
                client.apply(&mut state, response, &snapshot);
            }
            prop_assert_eq!(&client.held[&ResourceType::Cluster], &versions(&snapshot, ResourceType::Cluster));
            prop_assert_eq!(client.held.get(&ResourceType::Endpoint).cloned().unwrap_or_default(), versions(&snapshot, ResourceType::Endpoint));
        }
    }

    #[test]
    fn sotw_client_converges_to_every_snapshot(sequence in proptest::collection::vec(services(), 1..8)) {
        let cache = SnapshotCache::new(ClusterOptions::default());
        publish(&cache, 0, &sequence[0]);
        let mut snapshot = cache.current().expect("set");
        let mut state = SotwState::default();
        let mut client = SotwClient::default();
        let first = DiscoveryRequest { type_url: ResourceType::Cluster.type_url().to_owned(), ..Default::default() };
        let (_, response) = state.on_request(ResourceType::Cluster, &first, Some(&snapshot));
        client.apply(&mut state, response.expect("first CDS response"), &snapshot);
        for (index, services) in sequence.iter().enumerate().skip(1) {
            publish(&cache, index, services);
            snapshot = cache.current().expect("set");
            for response in state.on_snapshot(&snapshot) {
                client.apply(&mut state, response, &snapshot);
            }
            prop_assert_eq!(&client.held[&ResourceType::Cluster], &versions(&snapshot, ResourceType::Cluster));
            prop_assert_eq!(client.held.get(&ResourceType::Endpoint).cloned().unwrap_or_default(), versions(&snapshot, ResourceType::Endpoint));
        }
    }
}
