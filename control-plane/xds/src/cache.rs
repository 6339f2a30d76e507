//! The snapshot cache: turns a [`fulcrum_core::Snapshot`] into encoded Envoy resources, each
//! with its own content version, and publishes the result to the streams.
//!
//! Follows go-control-plane's `pkg/cache/v3`: the cache builds and versions resources and
//! never touches a stream; the server only reads what the cache published. Each resource is
//! encoded once into an `Any`'s bytes behind an `Arc`, and a resource whose content did not
//! change keeps the very same `Arc` across snapshots, so churn in one service neither rebuilds
//! nor resends the others. The streams send those bytes themselves (`server::wire`): a
//! resource is in memory once however many Envoys receive it.

use std::{
    collections::BTreeMap,
    sync::{Arc, OnceLock},
};

use bytes::Bytes;
use envoy_types::{pb::envoy::service::discovery::v3::Resource, util::pack_any};
use fulcrum_core::{DataPlane, Policy, ServiceEndpoints, Snapshot, version::content_version};
use tokio::{sync::watch, time::Instant};

use prost::Message;

use crate::{
    resources::{self, Balancing, ClusterOptions},
    trace::ChangeTrace,
};

/// The xDS resource types fulcrum serves, in the order a push sends them (clusters before
/// endpoints: make before break).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    /// CDS: `envoy.config.cluster.v3.Cluster`.
    Cluster,
    /// EDS: `envoy.config.endpoint.v3.ClusterLoadAssignment`.
    Endpoint,
}

impl ResourceType {
    /// Every served type, clusters first.
    pub const ALL: [ResourceType; 2] = [ResourceType::Cluster, ResourceType::Endpoint];

    /// The type URL used on the wire.
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
        }
    }

    /// The type for a type URL, if served.
    pub fn from_type_url(type_url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|ty| ty.type_url() == type_url)
    }

    /// Short name for logs, metrics and the status API: `cds` or `eds`.
    pub fn short_name(self) -> &'static str {
        match self {
            ResourceType::Cluster => "cds",
            ResourceType::Endpoint => "eds",
        }
    }

    /// Whether Envoy subscribes to every resource of the type (CDS) rather than by name (EDS).
    pub fn is_wildcard(self) -> bool {
        self == ResourceType::Cluster
    }
}

/// One `T` per [`ResourceType`]: what a stream keeps per type, in two fields where a map of
/// two entries allocated a node of eleven for every connected Envoy.
#[derive(Debug, Default)]
pub(crate) struct PerType<T> {
    clusters: T,
    endpoints: T,
}

impl<T> PerType<T> {
    pub(crate) fn get(&self, ty: ResourceType) -> &T {
        match ty {
            ResourceType::Cluster => &self.clusters,
            ResourceType::Endpoint => &self.endpoints,
        }
    }

    pub(crate) fn get_mut(&mut self, ty: ResourceType) -> &mut T {
        match ty {
            ResourceType::Cluster => &mut self.clusters,
            ResourceType::Endpoint => &mut self.endpoints,
        }
    }
}

/// One resource, encoded once and shared by every stream that sends it.
#[derive(Debug)]
pub struct EncodedResource {
    /// The resource name (the service name for both types). Shared: every stream that
    /// remembers what it sent holds this allocation, not a copy, so a stream's state costs
    /// no string per resource however many Envoys connect.
    pub name: Arc<str>,
    /// Content version: a hash of what the resource was built from. Equal versions mean
    /// equal resources. Shared with the streams like [`name`](Self::name).
    pub version: Arc<str>,
    /// The resource as an encoded `google.protobuf.Any` (type URL and value): the tail of
    /// [`entry`](Self::entry), the same allocation.
    pub any: Bytes,
    /// [`any`](Self::any) as a length-delimited field 2, its key and length first: one
    /// element of `DiscoveryResponse.resources` and the `resource` field of a delta
    /// `Resource`, as prost encodes them. Streams send these bytes themselves.
    pub entry: Bytes,
    /// The delta form, built by the first delta stream that sends the resource: see
    /// [`delta_entry`](Self::delta_entry).
    delta_entry: OnceLock<Bytes>,
}

/// Equal when name, version and bytes are (the delta form follows from them).
impl PartialEq for EncodedResource {
    fn eq(&self, other: &Self) -> bool {
        (&self.name, &self.version, &self.entry) == (&other.name, &other.version, &other.entry)
    }
}

impl EncodedResource {
    /// Resource `name` at `version`, `any` being its encoded `Any`.
    pub fn new(name: impl Into<Arc<str>>, version: impl Into<Arc<str>>, any: &[u8]) -> Self {
        let mut entry = Vec::with_capacity(1 + prost::length_delimiter_len(any.len()) + any.len());
        entry.push(FIELD_2_KEY);
        // A `Vec` grows as needed: encoding the length cannot run out of room.
        let _ = prost::encode_length_delimiter(any.len(), &mut entry);
        let offset = entry.len();
        entry.extend_from_slice(any);
        let entry = Bytes::from(entry);
        Self {
            name: name.into(),
            version: version.into(),
            any: entry.slice(offset..),
            entry,
            delta_entry: OnceLock::new(),
        }
    }

    /// The resource as one element of `DeltaDiscoveryResponse.resources`, key and length
    /// first: a `Resource` of this name and version whose field 2 is [`entry`](Self::entry),
    /// as prost encodes it. Built once, by the first delta stream that needs it, so a fleet
    /// of SotW Envoys never pays for it and a fleet of delta ones shares one copy; a delta
    /// response is then one frame per large resource, as a SotW one is.
    pub fn delta_entry(&self) -> &Bytes {
        self.delta_entry.get_or_init(|| {
            let version = Resource {
                version: self.version.to_string(),
                ..Default::default()
            };
            let name = Resource {
                name: self.name.to_string(),
                ..Default::default()
            };
            let inner = version.encoded_len() + self.entry.len() + name.encoded_len();
            let mut element = Vec::with_capacity(1 + prost::length_delimiter_len(inner) + inner);
            element.push(FIELD_2_KEY);
            // A `Vec` grows as needed: encoding cannot run out of room.
            let _ = prost::encode_length_delimiter(inner, &mut element);
            let _ = version.encode(&mut element);
            element.extend_from_slice(&self.entry);
            let _ = name.encode(&mut element);
            Bytes::from(element)
        })
    }
}

#[cfg(test)]
impl EncodedResource {
    /// The `Any`, decoded (tests read what streams send).
    pub(crate) fn unpacked(&self) -> envoy_types::pb::google::protobuf::Any {
        prost::Message::decode(self.any.clone()).expect("the cache encodes an Any")
    }
}

/// Encoded resources of one type, by name.
pub type Resources = BTreeMap<String, Arc<EncodedResource>>;

/// Every resource of one snapshot. Immutable once built; replaced whole on change.
#[derive(Debug, PartialEq)]
pub struct XdsSnapshot {
    /// The version of the [`Snapshot`] this was built from. Shared with every stream that
    /// remembers having sent it.
    pub version: Arc<str>,
    /// When the cache published it (push latency is measured from here).
    pub published_at: Instant,
    /// One `Cluster` per service. Shared with the streams up to date with it, as what their
    /// Envoy holds, and with the next snapshot when that one changes no cluster.
    pub clusters: Arc<Resources>,
    /// One `ClusterLoadAssignment` per service, shared as [`clusters`](Self::clusters) is.
    pub endpoints: Arc<Resources>,
    /// The trace of the change that made this version: the streams' pushes of it are its
    /// children ([`crate::trace`]).
    pub trace: ChangeTrace,
    /// The services these resources were built from: a service that is the same [`Arc`] in
    /// the next snapshot keeps its resources without being looked at.
    built_from: BTreeMap<String, Arc<ServiceEndpoints>>,
    /// The policy these resources were built with: it decides each cluster's data plane.
    built_with_policy: Option<Policy>,
}

impl XdsSnapshot {
    /// The resources of one type.
    pub fn resources(&self, ty: ResourceType) -> &Arc<Resources> {
        match ty {
            ResourceType::Cluster => &self.clusters,
            ResourceType::Endpoint => &self.endpoints,
        }
    }
}

/// What one [`SnapshotCache::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpdateSummary {
    /// Resources encoded anew (new or changed content).
    pub encoded: usize,
    /// Resources carried over from the previous snapshot unchanged.
    pub reused: usize,
}

/// Builds the snapshot for `core`, reusing every resource of `previous` whose service is
/// the same `Arc` or whose version is unchanged.
fn build(
    core: &Snapshot,
    trace: ChangeTrace,
    options: &ClusterOptions,
    previous: Option<&XdsSnapshot>,
    summary: &mut UpdateSummary,
) -> XdsSnapshot {
    // The cluster depends on its name, its protocol, the shared options and, on the native
    // data plane, the service's policy. Plain data: serialization cannot fail and is stable.
    let options_key = serde_json::to_vec(options).unwrap_or_default();
    let mut clusters = Resources::new();
    let mut endpoints = Resources::new();
    // A policy change can move a service between data planes, which changes its cluster:
    // the shortcut by pointer holds only under the policy the previous resources were built
    // with.
    let same_policy = previous.is_some_and(|previous| previous.built_with_policy == core.policy);
    for (name, service) in &core.services {
        if same_policy
            && let Some(previous) = previous
            && let Some(built) = previous.built_from.get(name)
            && Arc::ptr_eq(built, service)
            && let (Some(cluster), Some(assignment)) =
                (previous.clusters.get(name), previous.endpoints.get(name))
        {
            summary.reused += 2;
            clusters.insert(name.clone(), Arc::clone(cluster));
            endpoints.insert(name.clone(), Arc::clone(assignment));
            continue;
        }
        let protocol = service.protocol.unwrap_or_default();
        let native_policy = native_policy(core.policy.as_ref(), name);
        let balancing = match &native_policy {
            Some(policy) => Balancing::Native { policy },
            None => Balancing::OverrideHost,
        };
        let cluster_version = content_version(&[
            name.as_bytes(),
            &options_key,
            protocol.as_str().as_bytes(),
            native_policy.as_deref().unwrap_or_default().as_bytes(),
        ]);
        clusters.insert(
            name.clone(),
            reuse_or_encode(
                previous.map(|p| &*p.clusters),
                name,
                cluster_version,
                summary,
                || encode_any(resources::cluster(name, options, protocol, balancing)),
            ),
        );
        let endpoints_version = content_version(&[name.as_bytes(), &service_key(service)]);
        endpoints.insert(
            name.clone(),
            reuse_or_encode(
                previous.map(|p| &*p.endpoints),
                name,
                endpoints_version,
                summary,
                || encode_any(resources::load_assignment(name, service)),
            ),
        );
    }
    XdsSnapshot {
        version: Arc::from(core.version.as_str()),
        published_at: Instant::now(),
        clusters: same_or_new(previous.map(|previous| &previous.clusters), clusters),
        endpoints: same_or_new(previous.map(|previous| &previous.endpoints), endpoints),
        trace,
        built_from: core.services.clone(),
        built_with_policy: core.policy.clone(),
    }
}

/// `previous` when `built` holds the same resources (each the same allocation), else `built`:
/// a change to endpoints alone keeps the clusters' map, which the streams that hold it then
/// find unchanged at a glance.
fn same_or_new(previous: Option<&Arc<Resources>>, built: Resources) -> Arc<Resources> {
    match previous {
        Some(previous)
            if previous.len() == built.len()
                && previous
                    .iter()
                    .zip(&built)
                    .all(|((name, old), (new_name, new))| {
                        name == new_name && Arc::ptr_eq(old, new)
                    }) =>
        {
            Arc::clone(previous)
        }
        _ => Arc::new(built),
    }
}

/// The policy JSON of service `name` when its policy puts it on the native data plane; `None`
/// for the wasm filter's services (and when no policy is served: the default is wasm).
fn native_policy(policy: Option<&Policy>, name: &str) -> Option<String> {
    let policy = policy?.for_service(name);
    // A policy is plain data: serialization cannot fail.
    (policy.data_plane == DataPlane::Native)
        .then(|| serde_json::to_string(policy).unwrap_or_default())
}

/// `message` packed in an `Any` and encoded.
fn encode_any(message: impl prost::Name) -> Vec<u8> {
    pack_any(message).encode_to_vec()
}

/// The key of field 2, length-delimited (protobuf wire format: number << 3 | type 2).
pub(crate) const FIELD_2_KEY: u8 = (2 << 3) | 2;

fn service_key(service: &ServiceEndpoints) -> Vec<u8> {
    // Serializing plain structs of BTree collections cannot fail, and the bytes are stable.
    serde_json::to_vec(service).unwrap_or_default()
}

fn reuse_or_encode(
    previous: Option<&Resources>,
    name: &str,
    version: String,
    summary: &mut UpdateSummary,
    encode: impl FnOnce() -> Vec<u8>,
) -> Arc<EncodedResource> {
    let existing = previous.and_then(|resources| resources.get(name));
    if let Some(existing) = existing.filter(|existing| *existing.version == *version) {
        summary.reused += 1;
        return Arc::clone(existing);
    }
    summary.encoded += 1;
    // A changed resource keeps its name's allocation, which the streams hold.
    let name = existing.map_or_else(|| Arc::from(name), |existing| Arc::clone(&existing.name));
    Arc::new(EncodedResource::new(name, version, &encode()))
}

/// Holds the current [`XdsSnapshot`] and tells the streams when it changes.
///
/// `None` until the first [`set`](Self::set): streams answer nothing before that, so an Envoy
/// that connects early never sees an empty cluster list that would remove its clusters.
#[derive(Debug)]
pub struct SnapshotCache {
    options: ClusterOptions,
    current: watch::Sender<Option<Arc<XdsSnapshot>>>,
}

impl SnapshotCache {
    /// An empty cache building clusters with `options`.
    pub fn new(options: ClusterOptions) -> Self {
        Self {
            options,
            current: watch::Sender::new(None),
        }
    }

    /// Replaces the snapshot with one built from `core`. Resources whose content did not
    /// change keep their encoding; a `core` with the current version changes nothing.
    pub fn set(&self, core: &Snapshot) -> UpdateSummary {
        self.set_traced(core, ChangeTrace::NONE)
    }

    /// [`set`](Self::set), the new snapshot carrying `trace`, the change that made it, to
    /// every stream that pushes it.
    pub fn set_traced(&self, core: &Snapshot, trace: ChangeTrace) -> UpdateSummary {
        let mut summary = UpdateSummary::default();
        self.current.send_if_modified(|current| {
            if current
                .as_ref()
                .is_some_and(|snapshot| *snapshot.version == *core.version)
            {
                return false;
            }
            let next = build(core, trace, &self.options, current.as_deref(), &mut summary);
            *current = Some(Arc::new(next));
            true
        });
        summary
    }

    /// The current snapshot, if one was set.
    pub fn current(&self) -> Option<Arc<XdsSnapshot>> {
        self.current.borrow().clone()
    }

    /// A receiver that sees every new snapshot (streams watch it).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<XdsSnapshot>>> {
        self.current.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use envoy_types::pb::envoy::{
        config::{
            cluster::v3::Cluster, core::v3::HealthStatus, endpoint::v3::ClusterLoadAssignment,
        },
        extensions::upstreams::http::v3::{
            HttpProtocolOptions,
            http_protocol_options::{
                UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
            },
        },
    };
    use envoy_types::pb::{
        envoy::extensions::load_balancing_policies::dynamic_modules::v3::DynamicModulesLoadBalancerConfig,
        google::protobuf::{Any, StringValue, value::Kind},
    };
    use fulcrum_core::{Endpoint, Health, ServicePolicy, UpstreamProtocol};
    use prost::Message;

    use super::*;

    fn service(addresses: &[&str]) -> ServiceEndpoints {
        ServiceEndpoints {
            endpoints: addresses
                .iter()
                .map(|address| Endpoint::new(address.parse().expect("test address")))
                .collect(),
            protocol: None,
        }
    }

    fn snapshot(version: &str, services: &[(&str, ServiceEndpoints)]) -> Snapshot {
        Snapshot {
            version: version.to_owned(),
            services: services
                .iter()
                .map(|(name, service)| ((*name).to_owned(), Arc::new(service.clone())))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        }
    }

    #[test]
    fn builds_one_cluster_and_one_assignment_per_service() {
        let cache = SnapshotCache::new(ClusterOptions::default());
        let summary = cache.set(&snapshot(
            "v1",
            &[
                ("a", service(&["127.0.0.1:1"])),
                ("b", service(&["127.0.0.1:2"])),
            ],
        ));
        assert_eq!(
            summary,
            UpdateSummary {
                encoded: 4,
                reused: 0
            }
        );
        let current = cache.current().expect("set");
        assert_eq!(&*current.version, "v1");
        assert_eq!(current.clusters.keys().collect::<Vec<_>>(), ["a", "b"]);
        let cluster =
            Cluster::decode(current.clusters["a"].unpacked().value.as_slice()).expect("cluster");
        assert_eq!(cluster.name, "a");
        assert_eq!(
            current.clusters["a"].unpacked().type_url,
            ResourceType::Cluster.type_url()
        );
        assert_eq!(
            current.endpoints["b"].unpacked().type_url,
            ResourceType::Endpoint.type_url()
        );
    }

    #[test]
    fn churn_in_one_service_reuses_every_other_resource() {
        let cache = SnapshotCache::new(ClusterOptions::default());
        cache.set(&snapshot(
            "v1",
            &[
                ("a", service(&["127.0.0.1:1"])),
                ("b", service(&["127.0.0.1:2"])),
            ],
        ));
        let before = cache.current().expect("set");
        let summary = cache.set(&snapshot(
            "v2",
            &[
                ("a", service(&["127.0.0.1:1", "127.0.0.1:3"])),
                ("b", service(&["127.0.0.1:2"])),
            ],
        ));
        assert_eq!(
            summary,
            UpdateSummary {
                encoded: 1,
                reused: 3
            }
        );
        let after = cache.current().expect("set");
        assert!(Arc::ptr_eq(&before.clusters["a"], &after.clusters["a"]));
        assert!(Arc::ptr_eq(&before.endpoints["b"], &after.endpoints["b"]));
        assert_ne!(before.endpoints["a"].version, after.endpoints["a"].version);
        assert!(
            Arc::ptr_eq(&before.endpoints["a"].name, &after.endpoints["a"].name),
            "a re-encoded resource keeps the name allocation the streams hold"
        );
        assert!(
            Arc::ptr_eq(&before.clusters, &after.clusters),
            "no cluster changed: the streams' clusters map is kept"
        );
        assert!(!Arc::ptr_eq(&before.endpoints, &after.endpoints));
        cache.set(&snapshot(
            "v3",
            &[
                ("a", service(&["127.0.0.1:1", "127.0.0.1:3"])),
                ("b", service(&["127.0.0.1:2"])),
                ("c", service(&["127.0.0.1:4"])),
            ],
        ));
        let grown = cache.current().expect("set");
        assert!(
            !Arc::ptr_eq(&after.clusters, &grown.clusters),
            "a cluster added"
        );
    }

    #[test]
    fn same_snapshot_version_changes_nothing() {
        let cache = SnapshotCache::new(ClusterOptions::default());
        let mut updates = cache.subscribe();
        cache.set(&snapshot("v1", &[("a", service(&["127.0.0.1:1"]))]));
        assert!(updates.has_changed().expect("open"));
        updates.mark_unchanged();
        assert_eq!(
            cache.set(&snapshot("v1", &[("a", service(&["127.0.0.1:1"]))])),
            UpdateSummary::default()
        );
        assert!(!updates.has_changed().expect("open"));
    }

    #[test]
    fn resource_versions_depend_on_content_only() {
        let first = SnapshotCache::new(ClusterOptions::default());
        let second = SnapshotCache::new(ClusterOptions::default());
        first.set(&snapshot("v1", &[("a", service(&["127.0.0.1:1"]))]));
        second.set(&snapshot("other", &[("a", service(&["127.0.0.1:1"]))]));
        let (first, second) = (
            first.current().expect("set"),
            second.current().expect("set"),
        );
        assert_eq!(first.endpoints["a"].version, second.endpoints["a"].version);
        assert_eq!(first.clusters["a"].version, second.clusters["a"].version);
    }

    /// The `HttpProtocolOptions` of the encoded cluster of `name`.
    fn protocol_options(snapshot: &XdsSnapshot, name: &str) -> HttpProtocolOptions {
        let cluster =
            Cluster::decode(snapshot.clusters[name].unpacked().value.as_slice()).expect("cluster");
        HttpProtocolOptions::decode(
            cluster.typed_extension_protocol_options
                ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
                .value
                .as_slice(),
        )
        .expect("http protocol options")
    }

    /// The protocol `explicit_http_config` of the encoded cluster of `name`.
    fn cluster_protocol(snapshot: &XdsSnapshot, name: &str) -> ProtocolConfig {
        match protocol_options(snapshot, name).upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) => {
                explicit.protocol_config.expect("protocol config")
            }
            other => panic!("expected an explicit HTTP config, got {other:?}"),
        }
    }

    #[test]
    fn an_http2_service_gets_an_http2_cluster_and_every_other_http1() {
        let mut grpc = service(&["127.0.0.1:1"]);
        grpc.protocol = Some(UpstreamProtocol::Http2);
        let mut http = service(&["127.0.0.1:2"]);
        http.protocol = Some(UpstreamProtocol::Http1);
        let cache = SnapshotCache::new(ClusterOptions::default());
        cache.set(&snapshot(
            "v1",
            &[
                ("grpc", grpc),
                ("http", http),
                ("unnamed", service(&["127.0.0.1:3"])),
            ],
        ));
        let current = cache.current().expect("set");
        assert!(matches!(
            cluster_protocol(&current, "grpc"),
            ProtocolConfig::Http2ProtocolOptions(_)
        ));
        for name in ["http", "unnamed"] {
            assert!(
                matches!(
                    cluster_protocol(&current, name),
                    ProtocolConfig::HttpProtocolOptions(_)
                ),
                "{name} is HTTP/1.1"
            );
        }
    }

    #[test]
    fn every_cluster_carries_a_retry_budget_unless_it_is_turned_off() {
        let cache = SnapshotCache::new(ClusterOptions::default());
        cache.set(&snapshot("v1", &[("a", service(&["127.0.0.1:1"]))]));
        let current = cache.current().expect("set");
        let cluster =
            Cluster::decode(current.clusters["a"].unpacked().value.as_slice()).expect("cluster");
        let thresholds = &cluster
            .circuit_breakers
            .expect("circuit breakers")
            .thresholds;
        let budget = thresholds[0].retry_budget.as_ref().expect("a retry budget");
        assert_eq!(budget.budget_percent.as_ref().map(|p| p.value), Some(20.0));
        assert_eq!(budget.min_retry_concurrency.map(|m| m.value), Some(3));

        let off = SnapshotCache::new(ClusterOptions {
            retry_budget_percent: 0,
            ..ClusterOptions::default()
        });
        off.set(&snapshot("v1", &[("a", service(&["127.0.0.1:1"]))]));
        let current = off.current().expect("set");
        let cluster =
            Cluster::decode(current.clusters["a"].unpacked().value.as_slice()).expect("cluster");
        assert_eq!(cluster.circuit_breakers, None);
    }

    /// The name and decoded config of the load-balancing policy of the cluster of `name`.
    fn cluster_policy(snapshot: &XdsSnapshot, name: &str) -> (String, Any) {
        let cluster =
            Cluster::decode(snapshot.clusters[name].unpacked().value.as_slice()).expect("cluster");
        let policy = cluster
            .load_balancing_policy
            .expect("a load-balancing policy")
            .policies
            .remove(0)
            .typed_extension_config
            .expect("a typed policy");
        (policy.name, policy.typed_config.expect("config"))
    }

    fn native_policy_for(service: &str) -> Policy {
        let mut policy = Policy::default();
        policy.services.insert(
            service.to_owned(),
            ServicePolicy {
                data_plane: DataPlane::Native,
                retry: 2,
                ..ServicePolicy::default()
            },
        );
        policy
    }

    #[test]
    fn a_native_service_gets_the_module_as_its_policy_configured_with_its_policy_json() {
        let cache = SnapshotCache::new(ClusterOptions::default());
        let mut core = snapshot(
            "v1",
            &[
                ("native", service(&["127.0.0.1:1"])),
                ("wasm", service(&["127.0.0.1:2"])),
            ],
        );
        core.policy = Some(native_policy_for("native"));
        cache.set(&core);
        let current = cache.current().expect("set");

        let (name, config) = cluster_policy(&current, "native");
        assert_eq!(name, "envoy.load_balancing_policies.dynamic_modules");
        let config =
            DynamicModulesLoadBalancerConfig::decode(config.value.as_slice()).expect("config");
        assert_eq!(
            config.dynamic_module_config.expect("module").name,
            fulcrum_core::NATIVE_MODULE
        );
        assert_eq!(config.lb_policy_name, fulcrum_core::NATIVE_LB_POLICY);
        let json = config.lb_policy_config.expect("policy config");
        assert_eq!(
            json.type_url,
            "type.googleapis.com/google.protobuf.StringValue"
        );
        let json = StringValue::decode(json.value.as_slice()).expect("a string");
        let parsed: ServicePolicy = serde_json::from_str(&json.value).expect("policy JSON");
        assert_eq!(
            &parsed,
            core.policy.as_ref().expect("policy").for_service("native")
        );
        let options = protocol_options(&current, "native");
        assert!(
            options.http_filters.is_empty(),
            "no upstream filter edits the request's headers: a retry's host selection reads the \
             stream header from them: {:?}",
            options.http_filters
        );

        let (name, _) = cluster_policy(&current, "wasm");
        assert_eq!(name, "envoy.load_balancing_policies.override_host");
    }

    #[test]
    fn moving_a_service_to_the_native_data_plane_re_encodes_its_cluster_only() {
        let cache = SnapshotCache::new(ClusterOptions::default());
        let services = [
            ("a", service(&["127.0.0.1:1"])),
            ("b", service(&["127.0.0.1:2"])),
        ];
        let first = snapshot("v1", &services);
        cache.set(&first);
        // The same services (the same `Arc`s), another policy.
        let mut second = Snapshot {
            version: "v2".to_owned(),
            ..first.clone()
        };
        second.policy = Some(native_policy_for("a"));
        let summary = cache.set(&second);
        assert_eq!(
            summary,
            UpdateSummary {
                encoded: 1,
                reused: 3
            }
        );
        let current = cache.current().expect("set");
        assert_eq!(
            cluster_policy(&current, "a").0,
            "envoy.load_balancing_policies.dynamic_modules"
        );
        assert_eq!(
            cluster_policy(&current, "b").0,
            "envoy.load_balancing_policies.override_host"
        );
    }

    #[test]
    fn a_protocol_change_alone_re_encodes_that_cluster_only() {
        let cache = SnapshotCache::new(ClusterOptions::default());
        cache.set(&snapshot("v1", &[("a", service(&["127.0.0.1:1"]))]));
        let mut http2 = service(&["127.0.0.1:1"]);
        http2.protocol = Some(UpstreamProtocol::Http2);
        let summary = cache.set(&snapshot("v2", &[("a", http2)]));
        assert_eq!(
            summary,
            UpdateSummary {
                encoded: 1,
                reused: 1
            },
            "the cluster changes, the assignment does not"
        );
        assert!(matches!(
            cluster_protocol(&cache.current().expect("set"), "a"),
            ProtocolConfig::Http2ProtocolOptions(_)
        ));
    }

    #[test]
    fn assignment_maps_health_weight_zone_and_metadata() {
        let mut draining = Endpoint::new("10.0.0.2:80".parse().expect("address"));
        draining.health = Health::Draining;
        draining.weight = 3;
        draining.attributes_mut().zone = Some("zone-b".to_owned());
        draining.attributes_mut().tags.insert("canary".to_owned());
        draining.attributes_mut().tags.insert("gpu".to_owned());
        draining
            .attributes_mut()
            .capabilities
            .insert("llm.chat".to_owned());
        draining
            .attributes_mut()
            .metadata
            .insert("version".to_owned(), "v2".to_owned());
        let mut unhealthy = Endpoint::new("10.0.0.1:80".parse().expect("address"));
        unhealthy.health = Health::Unhealthy;
        let cache = SnapshotCache::new(ClusterOptions::default());
        cache.set(&Snapshot {
            version: "v1".to_owned(),
            services: BTreeMap::from([(
                "a".to_owned(),
                Arc::new(ServiceEndpoints {
                    endpoints: vec![unhealthy, draining],
                    protocol: None,
                }),
            )]),
            ..Default::default()
        });
        let current = cache.current().expect("set");
        let assignment =
            ClusterLoadAssignment::decode(current.endpoints["a"].unpacked().value.as_slice())
                .expect("assignment");
        let zones: Vec<_> = assignment
            .endpoints
            .iter()
            .map(|locality| locality.locality.as_ref().expect("locality").zone.as_str())
            .collect();
        assert_eq!(zones, ["", "zone-b"]);
        let unhealthy = &assignment.endpoints[0].lb_endpoints[0];
        assert_eq!(unhealthy.health_status, HealthStatus::Unhealthy as i32);
        assert!(unhealthy.metadata.is_none());
        let draining = &assignment.endpoints[1].lb_endpoints[0];
        assert_eq!(draining.health_status, HealthStatus::Draining as i32);
        assert_eq!(
            draining.load_balancing_weight.as_ref().map(|w| w.value),
            Some(3)
        );
        let fulcrum = &draining
            .metadata
            .as_ref()
            .expect("metadata")
            .filter_metadata["fulcrum"];
        assert!(fulcrum.fields.contains_key("tags"));
        assert!(fulcrum.fields.contains_key("metadata"));
        // The scalar form the native module reads through Envoy's load-balancer ABI.
        let string = |key: &str| match fulcrum.fields.get(key).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(value)) => Some(value.as_str()),
            _ => None,
        };
        assert_eq!(string("tags_csv"), Some("canary,gpu"));
        assert_eq!(string("capabilities_csv"), Some("llm.chat"));
        assert_eq!(string("metadata.version"), Some("v2"));
    }
}
