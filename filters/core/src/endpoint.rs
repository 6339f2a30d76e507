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

use serde::{Deserialize, Serialize, Serializer, ser::SerializeStruct};

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
///
/// 48 bytes on 64-bit targets: the address, weight and health inline, and the attributes a
/// policy matches on (zone, tags, capabilities, metadata) in one shared allocation made only
/// when one is set, since most endpoints have none. The control plane holds one per
/// endpoint of the mesh, and every filter VM one per endpoint of the services it balances;
/// a copy of an endpoint (the control plane's stages, the registry's record and its
/// endpoint) shares the attributes instead of copying them. Read the
/// attributes through [`Endpoint::zone`], [`Endpoint::tags`], [`Endpoint::capabilities`] and
/// [`Endpoint::metadata`]; set them with [`Endpoint::with_attributes`] or
/// [`Endpoint::attributes_mut`].
///
/// The JSON is that of its fields, attributes included, exactly as when they were fields of
/// their own: unknown fields are refused, absent ones take their defaults, empty attributes
/// are left out.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "EndpointFields")]
pub struct Endpoint {
    /// The address Envoy knows the endpoint by; the filter writes it as `IP:port`.
    pub address: SocketAddr,
    /// Relative weight for the weighted algorithms; 1 unless set. Must be at least 1.
    pub weight: u32,
    /// Health as reported by the source and the control plane's active checks.
    pub health: Health,
    /// `None` when the endpoint has no attribute (they may also be empty, after
    /// [`Endpoint::attributes_mut`] removed them all).
    attributes: Option<Arc<Attributes>>,
}

/// What a policy matches an endpoint on, besides its address and health: its zone, tags,
/// capabilities and metadata. Empty by default.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// Failure domain (Kubernetes `topology.kubernetes.io/zone`), for locality preference.
    pub zone: Option<String>,
    /// Free-form labels a policy can require (e.g. `canary`, `gpu`).
    pub tags: BTreeSet<String>,
    /// What the instance can do (e.g. `llm.chat`, `tools.search`); a policy can require some.
    pub capabilities: BTreeSet<String>,
    /// Key/value attributes (labels, node name, version) a policy can match on; the region,
    /// for locality preference, under [`REGION_KEY`].
    pub metadata: BTreeMap<String, String>,
}

impl Attributes {
    /// No attribute: what [`Endpoint::attributes`] reads for an endpoint that has none.
    pub fn none() -> &'static Self {
        &NO_ATTRIBUTES
    }

    /// Whether no attribute is set.
    pub fn is_empty(&self) -> bool {
        self.zone.is_none()
            && self.tags.is_empty()
            && self.capabilities.is_empty()
            && self.metadata.is_empty()
    }

    /// These attributes as endpoints hold them: one allocation to share, or `None` when
    /// none is set, so that most endpoints allocate nothing for them.
    pub fn into_shared(self) -> Option<Arc<Self>> {
        (!self.is_empty()).then(|| Arc::new(self))
    }
}

/// The attributes of an endpoint that has none.
static NO_ATTRIBUTES: Attributes = Attributes {
    zone: None,
    tags: BTreeSet::new(),
    capabilities: BTreeSet::new(),
    metadata: BTreeMap::new(),
};

/// An endpoint's JSON as it is read: every field of its own, as the schema has always had
/// them. [`Endpoint`]'s `Serialize` writes the same fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFields {
    address: SocketAddr,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    tags: BTreeSet<String>,
    #[serde(default)]
    capabilities: BTreeSet<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    health: Health,
}

impl Serialize for Endpoint {
    /// The fields of `EndpointFields`, in its order and with its omissions, written
    /// straight from the endpoint (serializing a whole mesh copies no attribute).
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let attributes = self.attributes();
        let present = [
            attributes.zone.is_some(),
            !attributes.tags.is_empty(),
            !attributes.capabilities.is_empty(),
            !attributes.metadata.is_empty(),
        ];
        let fields = 3 + present.iter().filter(|present| **present).count();
        let mut state = serializer.serialize_struct("Endpoint", fields)?;
        state.serialize_field("address", &self.address)?;
        state.serialize_field("weight", &self.weight)?;
        match &attributes.zone {
            Some(zone) => state.serialize_field("zone", zone)?,
            None => state.skip_field("zone")?,
        }
        for (name, set) in [
            ("tags", &attributes.tags),
            ("capabilities", &attributes.capabilities),
        ] {
            if set.is_empty() {
                state.skip_field(name)?;
            } else {
                state.serialize_field(name, set)?;
            }
        }
        if attributes.metadata.is_empty() {
            state.skip_field("metadata")?;
        } else {
            state.serialize_field("metadata", &attributes.metadata)?;
        }
        state.serialize_field("health", &self.health)?;
        state.end()
    }
}

impl From<EndpointFields> for Endpoint {
    fn from(fields: EndpointFields) -> Self {
        let EndpointFields {
            address,
            weight,
            zone,
            tags,
            capabilities,
            metadata,
            health,
        } = fields;
        Self {
            address,
            weight,
            health,
            attributes: None,
        }
        .with_attributes(Attributes {
            zone,
            tags,
            capabilities,
            metadata,
        })
    }
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
            health: Health::Healthy,
            attributes: None,
        }
    }

    /// The endpoint with this weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The endpoint with this health.
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// The endpoint with these attributes (replacing any it had); empty ones take no
    /// allocation.
    pub fn with_attributes(mut self, attributes: Attributes) -> Self {
        self.attributes = attributes.into_shared();
        self
    }

    /// The endpoint with these attributes, shared with their other holders (`None`: none).
    pub fn with_shared_attributes(mut self, attributes: Option<Arc<Attributes>>) -> Self {
        self.attributes = attributes.filter(|attributes| !attributes.is_empty());
        self
    }

    /// The endpoint's attributes to change in place: allocated when it had none, copied
    /// when they are shared.
    pub fn attributes_mut(&mut self) -> &mut Attributes {
        Arc::make_mut(self.attributes.get_or_insert_default())
    }

    /// The endpoint's attributes as shared, `None` when it has none: to share them with
    /// another endpoint ([`Endpoint::with_shared_attributes`]).
    pub fn shared_attributes(&self) -> Option<&Arc<Attributes>> {
        self.attributes.as_ref()
    }

    /// The endpoint's attributes; empty when it has none.
    pub fn attributes(&self) -> &Attributes {
        self.attributes.as_deref().unwrap_or(Attributes::none())
    }

    /// Failure domain (Kubernetes `topology.kubernetes.io/zone`), for locality preference.
    pub fn zone(&self) -> Option<&str> {
        self.attributes().zone.as_deref()
    }

    /// Free-form labels a policy can require (e.g. `canary`, `gpu`).
    pub fn tags(&self) -> &BTreeSet<String> {
        &self.attributes().tags
    }

    /// What the instance can do (e.g. `llm.chat`, `tools.search`); a policy can require some.
    pub fn capabilities(&self) -> &BTreeSet<String> {
        &self.attributes().capabilities
    }

    /// Key/value attributes (labels, node name, version) a policy can match on; the region,
    /// for locality preference, under [`REGION_KEY`].
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.attributes().metadata
    }

    /// The endpoint's region: its `metadata` entry [`REGION_KEY`], when set and not empty.
    pub fn region(&self) -> Option<&str> {
        self.metadata()
            .get(REGION_KEY)
            .map(String::as_str)
            .filter(|region| !region.is_empty())
    }
}

impl PartialEq for Endpoint {
    fn eq(&self, other: &Self) -> bool {
        self.address == other.address
            && self.weight == other.weight
            && self.health == other.health
            && self.attributes() == other.attributes()
    }
}

impl Eq for Endpoint {}

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

#[cfg(test)]
mod compact_endpoint_tests {
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::*;

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn an_endpoint_takes_48_bytes_inline() {
        assert!(
            std::mem::size_of::<Endpoint>() <= 48,
            "{} bytes",
            std::mem::size_of::<Endpoint>()
        );
    }

    #[test]
    fn an_endpoint_without_attributes_allocates_none() {
        let plain: Endpoint = serde_json::from_value(json!({"address": "10.0.0.1:80"})).unwrap();
        assert!(plain.shared_attributes().is_none());
        let empty = json!({"address": "10.0.0.1:80", "tags": [], "metadata": {}});
        let empty: Endpoint = serde_json::from_value(empty).unwrap();
        assert!(empty.shared_attributes().is_none());
        let built = Endpoint::new(plain.address).with_attributes(Attributes::default());
        assert!(built.shared_attributes().is_none());
        assert_eq!(plain.attributes(), Attributes::none());
    }

    #[test]
    fn endpoints_compare_by_their_attributes_however_they_are_held() {
        let plain = Endpoint::new("10.0.0.1:80".parse().unwrap());
        let mut emptied = plain.clone();
        emptied.attributes_mut().tags.insert("gpu".into());
        assert_ne!(emptied, plain);
        emptied.attributes_mut().tags.clear();
        assert_eq!(emptied, plain, "empty attributes equal none");
    }

    #[test]
    fn changing_a_copys_attributes_leaves_the_original_alone() {
        let original = Endpoint::new("10.0.0.1:80".parse().unwrap()).with_attributes(Attributes {
            zone: Some("z1".into()),
            ..Attributes::default()
        });
        let mut copy = original.clone();
        assert!(Arc::ptr_eq(
            copy.shared_attributes().unwrap(),
            original.shared_attributes().unwrap()
        ));
        copy.attributes_mut().zone = Some("z2".into());
        assert_eq!(original.zone(), Some("z1"));
        assert_eq!(copy.zone(), Some("z2"));
    }

    #[test]
    fn unknown_and_misspelled_fields_are_refused() {
        for field in ["zones", "tag", "Weight", "region"] {
            let mut value = json!({"address": "10.0.0.1:80"});
            value[field] = json!("x");
            let error = serde_json::from_value::<Endpoint>(value).unwrap_err();
            assert!(
                error.to_string().contains("unknown field"),
                "{field}: {error}"
            );
        }
    }

    fn words() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec("[a-z.]{1,6}", 0..3)
    }

    proptest! {
        /// The JSON is the one the fields had when they were the struct's own: every field
        /// read back, absent ones defaulted, empty attributes left out, in the old order.
        #[test]
        fn the_json_is_what_the_fields_alone_write(
            weight in proptest::option::of(1u32..100),
            zone in proptest::option::of("[a-z0-9-]{0,6}"),
            tags in words(),
            capabilities in words(),
            metadata in proptest::collection::btree_map("[a-z/.]{1,8}", "[a-z0-9]{0,4}", 0..3),
            health in proptest::option::of(prop_oneof![
                Just("healthy"), Just("draining"), Just("unhealthy")
            ]),
        ) {
            let mut input = Map::new();
            input.insert("address".into(), json!("10.1.2.3:8080"));
            if let Some(weight) = weight {
                input.insert("weight".into(), json!(weight));
            }
            if let Some(zone) = &zone {
                input.insert("zone".into(), json!(zone));
            }
            input.insert("tags".into(), json!(tags));
            input.insert("capabilities".into(), json!(capabilities));
            input.insert("metadata".into(), json!(metadata));
            if let Some(health) = health {
                input.insert("health".into(), json!(health));
            }
            let endpoint: Endpoint = serde_json::from_value(Value::Object(input)).unwrap();

            let tags: BTreeSet<String> = tags.into_iter().collect();
            let capabilities: BTreeSet<String> = capabilities.into_iter().collect();
            let mut expected = vec![
                ("address", json!("10.1.2.3:8080")),
                ("weight", json!(weight.unwrap_or(1))),
            ];
            if let Some(zone) = zone {
                expected.push(("zone", json!(zone)));
            }
            if !tags.is_empty() {
                expected.push(("tags", json!(tags)));
            }
            if !capabilities.is_empty() {
                expected.push(("capabilities", json!(capabilities)));
            }
            if !metadata.is_empty() {
                expected.push(("metadata", json!(metadata)));
            }
            expected.push(("health", json!(health.unwrap_or("healthy"))));
            let expected = format!(
                "{{{}}}",
                expected
                    .iter()
                    .map(|(key, value)| format!("\"{key}\":{value}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let written = serde_json::to_string(&endpoint).unwrap();
            prop_assert_eq!(&written, &expected);
            let read_back: Endpoint = serde_json::from_str(&written).unwrap();
            prop_assert_eq!(read_back, endpoint);
        }
    }
}
