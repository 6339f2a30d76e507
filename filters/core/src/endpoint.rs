//! Endpoints and the versioned snapshot the control plane serves to the filters.
//!
//! One JSON schema, shared by the control plane (which builds snapshots from its sources),
//! the filter (which polls and parses them) and the registry. An endpoint is what Envoy calls
//! an LbEndpoint: an `IP:port` the filter can write into the override header, plus the
//! attributes selection filters on (zone, tags, capabilities, metadata) and its health.
//!
//! An endpoint's region travels in its `metadata` under [`REGION_KEY`], not in a field of its
//! own: endpoints deny unknown fields (a typo is an error), so a new field would make every
//! filter older than it refuse the snapshots of an upgraded control plane, while a metadata
//! entry is data every filter already reads. Filters that know regions rank by it
//! ([`Endpoint::region`]); older ones keep it as one more attribute a policy can match.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
};

use serde::{Deserialize, Serialize};

/// An IPv4 `IP:port` as one integer that sorts as `SocketAddr` sorts IPv4 addresses (IP,
/// then port); `None` for IPv6. Sorted tables of endpoints search these: comparing two
/// `SocketAddr`s is a function call per probe in wasm, comparing integers is not.
pub fn v4_key(address: SocketAddr) -> Option<u64> {
    match address {
        SocketAddr::V4(v4) => Some((u64::from(v4.ip().to_bits()) << 16) | u64::from(v4.port())),
        SocketAddr::V6(_) => None,
    }
}

/// `SocketAddr`'s own order, with two IPv4 addresses compared as their [`v4_key`]s.
pub fn address_cmp(a: &SocketAddr, b: &SocketAddr) -> std::cmp::Ordering {
    match (v4_key(*a), v4_key(*b)) {
        (Some(a), Some(b)) => a.cmp(&b),
        _ => a.cmp(b),
    }
}

/// Health of one endpoint as the control plane sees it (from its source or active checks).
///
/// Mirrors Envoy's `HealthStatus` as Istio maps EndpointSlice conditions onto it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Ready and serving: eligible for new requests.
    #[default]
    Healthy,
    /// Terminating but still serving: finishes sticky sessions, gets no new ones.
    Draining,
    /// Failing its checks or not ready: never picked.
    Unhealthy,
}

/// One upstream instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// The address Envoy knows the endpoint by; the filter writes it as `IP:port`.
    pub address: SocketAddr,
    /// Relative weight for the weighted algorithms; 1 unless set. Must be at least 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Failure domain (Kubernetes `topology.kubernetes.io/zone`), for locality preference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Free-form labels a policy can require (e.g. `canary`, `gpu`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub tags: BTreeSet<String>,
    /// What the instance can do (e.g. `llm.chat`, `tools.search`); a policy can require some.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub capabilities: BTreeSet<String>,
    /// Key/value attributes (labels, node name, version) a policy can match on; the region,
    /// for locality preference, under [`REGION_KEY`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Health as reported by the source and the control plane's active checks.
    #[serde(default)]
    pub health: Health,
}

/// The `metadata` key of an endpoint's region, Kubernetes' well-known node label (Envoy and
/// Istio locality: region, then zone). The control plane sets it for Kubernetes endpoints
/// from their node's label; a static or registered endpoint sets it in its own metadata.
pub const REGION_KEY: &str = "topology.kubernetes.io/region";

/// Keys of an endpoint's attributes as scalar strings under its Envoy `filter_metadata`
/// namespace `fulcrum`, beside the list and struct forms: for readers that see only scalar
/// metadata by key, such as the native module through Envoy's load-balancer ABI. The control
/// plane writes both forms; a tag or capability containing a comma cannot be told apart from
/// two in the joined form.
pub mod scalar_metadata {
    /// The `filter_metadata` namespace an endpoint's fulcrum attributes are published under
    /// in Envoy's configuration (the lists and struct, and these scalars beside them).
    pub const NAMESPACE: &str = "fulcrum";
    /// The endpoint's tags, comma-joined in order.
    pub const TAGS: &str = "tags_csv";
    /// The endpoint's capabilities, comma-joined in order.
    pub const CAPABILITIES: &str = "capabilities_csv";
    /// The prefix of one key per metadata entry: `metadata.<key>` holds its value.
    pub const METADATA_PREFIX: &str = "metadata.";
}

fn default_weight() -> u32 {
    1
}

impl Endpoint {
    /// A healthy endpoint of weight 1 with no attributes.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            weight: default_weight(),
            zone: None,
            tags: BTreeSet::new(),
            capabilities: BTreeSet::new(),
            metadata: BTreeMap::new(),
            health: Health::Healthy,
        }
    }

    /// The endpoint's region: its `metadata` entry [`REGION_KEY`], when set and not empty.
    pub fn region(&self) -> Option<&str> {
        self.metadata
            .get(REGION_KEY)
            .map(String::as_str)
            .filter(|region| !region.is_empty())
    }
}

/// The endpoints of one service (one Envoy cluster).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEndpoints {
    /// Every known instance, in a stable order (sorted by address).
    pub endpoints: Vec<Endpoint>,
    /// The protocol Envoy speaks to these endpoints, when a source says; `None` is HTTP/1.1.
    ///
    /// The control plane's alone: it shapes the Envoy cluster (CDS), and a filter balances
    /// the same whatever it is, so it is never part of the filters' JSON (an older filter
    /// refuses no snapshot for it, and the JSON of a mesh without it did not change).
    #[serde(skip)]
    pub protocol: Option<UpstreamProtocol>,
}

/// The HTTP protocol Envoy speaks to a service's endpoints.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UpstreamProtocol {
    /// HTTP/1.1: what most plaintext backends speak, and the default.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c): gRPC and HTTP/2 backends.
    Http2,
}

impl UpstreamProtocol {
    /// The name in logs, metrics and versions: `http1` or `http2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
        }
    }
}

/// Everything a filter needs at one version: endpoints per service.
///
/// `version` changes whenever any content changes; equal versions mean equal content, so a
/// filter that already holds `version` need not parse the body again.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Opaque version string; compare for equality only.
    pub version: String,
    /// Endpoints keyed by service name (the Envoy cluster name). Each service is shared, not
    /// copied: the control plane's stages and its recent snapshots hold one copy of a
    /// service that did not change, and compare it by pointer first. The JSON is the same
    /// as for plain values.
    #[serde(with = "shared_services")]
    pub services: BTreeMap<String, Arc<ServiceEndpoints>>,
    /// The balancing policy, when the control plane serves one with the endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::policy::Policy>,
}

/// (De)serializes [`Snapshot::services`] as a plain map of services.
mod shared_services {
    use std::{collections::BTreeMap, sync::Arc};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::ServiceEndpoints;

    pub fn serialize<S: Serializer>(
        services: &BTreeMap<String, Arc<ServiceEndpoints>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let plain: BTreeMap<&str, &ServiceEndpoints> = services
            .iter()
            .map(|(name, service)| (name.as_str(), &**service))
            .collect();
        plain.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, Arc<ServiceEndpoints>>, D::Error> {
        let plain = BTreeMap::<String, ServiceEndpoints>::deserialize(deserializer)?;
        Ok(plain
            .into_iter()
            .map(|(name, service)| (name, Arc::new(service)))
            .collect())
    }
}

#[cfg(test)]
mod address_order_tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    use proptest::prelude::*;

    use super::*;

    fn address() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<u32>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from_bits(ip), port))),
            (any::<u128>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
                |(ip, port, flow, scope)| {
                    SocketAddr::V6(SocketAddrV6::new(
                        Ipv6Addr::from_bits(ip),
                        port,
                        flow,
                        scope,
                    ))
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn address_cmp_orders_as_socket_addr_does(a in address(), b in address()) {
            prop_assert_eq!(address_cmp(&a, &b), a.cmp(&b));
            prop_assert_eq!(address_cmp(&a, &a), std::cmp::Ordering::Equal);
        }

        #[test]
        fn v4_keys_order_as_the_addresses_do(a in any::<(u32, u16)>(), b in any::<(u32, u16)>()) {
            let a = SocketAddr::from((Ipv4Addr::from_bits(a.0), a.1));
            let b = SocketAddr::from((Ipv4Addr::from_bits(b.0), b.1));
            prop_assert_eq!(v4_key(a).cmp(&v4_key(b)), a.cmp(&b));
        }
    }
}
