//! Maps Kubernetes Services and EndpointSlices to fulcrum services, the way Istio does.
//!
//! Pure: takes the objects the reflector stores hold and returns the full state the source
//! publishes, so every rule here is tested without a watcher.
//!
//! - **One cluster per Service port**, named as Istio names its outbound clusters,
//!   `outbound|<port>||<service>.<namespace>.svc.<cluster domain>` (see [`cluster_name`]), so a
//!   policy written for an Istio mesh keys the same services. Only TCP ports (the default
//!   protocol) map; `ExternalName` Services have no endpoints and are skipped. A Service port
//!   with no endpoints still yields its cluster, empty, as Istio sends it.
//! - **Endpoints** come from every EndpointSlice labelled `kubernetes.io/service-name` with the
//!   Service's name in its namespace (slices of one Service are merged). A Service port is
//!   matched to a slice port by name (an unnamed single port matches the unnamed slice port)
//!   and protocol; the endpoint's address is its first address (the API says they are
//!   fungible) with the slice port's number (the target port). `FQDN` slices are skipped.
//!   Slices are read in name order, so what they disagree on (an `appProtocol`, the zone of
//!   an address listed twice) does not depend on the order the store lists them in.
//! - **Protocol** of a cluster, as Istio selects it ([`port_protocol`]): the Service port's
//!   `appProtocol` (else its EndpointSlice port's) when set — `grpc`, `http2` and
//!   `kubernetes.io/h2c` make the cluster HTTP/2, `http` HTTP/1.1, any other names none
//!   (compared case-insensitively, as service names are, RFC 6335) —
//!   else the port name's prefix before the first `-` (`grpc`, `grpc-*`, `http2`, `http2-*`
//!   HTTP/2; `http`, `http-*` HTTP/1.1), case-insensitive. A cluster with no protocol named
//!   is HTTP/1.1.
//! - **Health** follows Istio's `endpointHealthStatus` ([`endpoint_health`]).
//! - **Attributes**: `zone` becomes the endpoint's zone; the Service's labels, then the slice's
//!   (which the EndpointSlice controller copies from the Service), then the labels of the pod
//!   behind the endpoint that are on [`Mapping::pod_labels`] (so a policy's
//!   `endpoint_selector.metadata` selects DestinationRule-style subsets such as `version: v2`),
//!   then `node_name` and `pod_name` become its metadata, later keys overriding earlier ones.
//!   Pod labels are an allow-list: a pod's labels are set by whoever deploys it, and every key
//!   published lands in every filter's snapshot.
//! - **Region**: the `topology.kubernetes.io/region` label of the endpoint's node (the slice's
//!   `nodeName`) becomes its metadata entry [`REGION_KEY`], which the filters rank by (a
//!   metadata entry rather than a field, so filters from before regions still read the
//!   snapshot). Only the node says where an endpoint runs: the key is never taken from a
//!   Service, slice or pod label, and an endpoint whose node's region is unknown has none.
//! - An address listed twice for one cluster (an endpoint moving between slices) is kept once,
//!   with its healthiest state.
//! - **Untrusted input** ([`crate::left_out`]): an address, slice port or slice Kubernetes
//!   would not admit is left out on its own, as is a slice over the API's limits
//!   ([`MAX_SLICE_ENDPOINTS`], [`MAX_SLICE_PORTS`]), and each is reported in
//!   [`Mapped::left_out`]. Every label of a Service and of its slices is copied into each of
//!   its endpoints, for each of its ports, so one Service could grow the snapshot of the
//!   whole mesh past its budget: a Service whose clusters would take more than
//!   [`Mapping::max_service_bytes`] is left out whole (its last published clusters stay,
//!   [`Mapped::published_after`]), and building it stops there, so its cost is
//!   bounded too.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use fulcrum_core::{
    Attributes, Endpoint, Health, ServiceEndpoints, UpstreamProtocol, endpoint::REGION_KEY,
};
use fulcrum_sources::Services;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service, ServicePort},
    discovery::v1::{EndpointConditions, EndpointPort, EndpointSlice},
};
use tracing::debug;

use crate::left_out::{self, Family, LeftOut, Reason, is_tcp, serves};

/// The label the EndpointSlice controller puts on every slice: the owning Service's name.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Metadata key of the node an endpoint runs on (the slice's `nodeName`).
pub const NODE_NAME_KEY: &str = "node_name";
/// The node label Kubernetes (and the cloud's node controller) puts the node's region in;
/// fulcrum's endpoint metadata uses the same key ([`REGION_KEY`]).
pub const NODE_REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Metadata key of the pod behind an endpoint (its `targetRef` when that is a Pod).
pub const POD_NAME_KEY: &str = "pod_name";
/// The most endpoints the EndpointSlice API admits in one slice; a slice with more is left out.
pub const MAX_SLICE_ENDPOINTS: usize = 1000;
/// The most ports the EndpointSlice API admits in one slice; a slice with more is left out.
pub const MAX_SLICE_PORTS: usize = 100;
/// Default of [`Mapping::max_service_bytes`]: a quarter of the pipeline's default snapshot
/// budget (16 MiB), so no one Service can push the mesh's snapshot over it alone.
pub const DEFAULT_MAX_SERVICE_BYTES: usize = 4 << 20;
/// JSON bytes of an endpoint besides its address, zone and metadata strings (field names,
/// quotes, weight, health).
const ENDPOINT_JSON_BYTES: usize = 64;
/// JSON bytes of a metadata entry besides its key and value (quotes, colon, comma).
const ENTRY_JSON_BYTES: usize = 6;

/// How Kubernetes objects become clusters. Defaults: `cluster.local`, unhealthy endpoints left
/// out (Istio's `PILOT_SEND_UNHEALTHY_ENDPOINTS=false`), [`DEFAULT_MAX_SERVICE_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The cluster's DNS domain, the suffix of `<svc>.<ns>.svc.<domain>`.
    pub cluster_domain: String,
    /// Publish not-ready (and not terminating) endpoints as `unhealthy` instead of leaving
    /// them out, as Istio's `PILOT_SEND_UNHEALTHY_ENDPOINTS` does.
    pub send_unhealthy_endpoints: bool,
    /// Pod labels copied into the metadata of the pod's endpoints; empty watches no pods.
    /// Default: `version` and `app.kubernetes.io/version`, what DestinationRule subsets key on.
    pub pod_labels: BTreeSet<String>,
    /// Watch Nodes for their region label, which becomes the metadata [`REGION_KEY`] of the
    /// endpoints on them. Default: true. Needs list/watch on nodes.
    pub node_regions: bool,
    /// The most bytes of snapshot JSON the clusters of one Service may take, estimated from
    /// the lengths of their endpoints' addresses, zones and metadata; a Service over it is
    /// left out (see the module docs).
    pub max_service_bytes: usize,
}

impl Default for Mapping {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".to_owned(),
            send_unhealthy_endpoints: false,
            pod_labels: ["version", "app.kubernetes.io/version"]
                .into_iter()
                .map(str::to_owned)
                .collect(),
            node_regions: true,
            max_service_bytes: DEFAULT_MAX_SERVICE_BYTES,
        }
    }
}

/// What [`Mapping::map`] made of the objects.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mapped {
    /// Every cluster, without what was left out.
    pub services: Services,
    /// What was left out and why, sorted, each entry once.
    pub left_out: Vec<LeftOut>,
    /// The clusters of the Services left out whole.
    refused_clusters: Vec<String>,
}

impl Mapped {
    /// What to publish after `previous`: [`Mapped::services`], each cluster equal to its
    /// previous one shared with it (the pipeline screens and encodes again only the clusters
    /// whose [`Arc`] changed), and the previous clusters of every Service left out whole (its
    /// last good state stays while it is refused).
    pub fn published_after(&self, previous: Option<&Services>) -> Services {
        let mut services = self.services.clone();
        let Some(previous) = previous else {
            return services;
        };
        for (cluster, endpoints) in &mut services {
            match previous.get(cluster) {
                Some(kept) if kept == endpoints => *endpoints = Arc::clone(kept),
                _ => {}
            }
        }
        for cluster in &self.refused_clusters {
            if let Some(kept) = previous.get(cluster) {
                services.insert(cluster.clone(), Arc::clone(kept));
            }
        }
        services
    }
}

/// The snapshot bytes a Service's clusters may still take.
struct Budget {
    left: usize,
}

impl Budget {
    /// Takes `bytes`; false once the budget is spent.
    fn take(&mut self, bytes: usize) -> bool {
        match self.left.checked_sub(bytes) {
            Some(left) => {
                self.left = left;
                true
            }
            None => false,
        }
    }
}

/// The estimated JSON bytes of `endpoint` (see [`Mapping::max_service_bytes`]).
fn endpoint_bytes(endpoint: &Endpoint) -> usize {
    let metadata: usize = endpoint
        .metadata()
        .iter()
        .map(|(key, value)| key.len() + value.len() + ENTRY_JSON_BYTES)
        .sum();
    ENDPOINT_JSON_BYTES
        + endpoint.address.to_string().len()
        + endpoint.zone().map_or(0, str::len)
        + metadata
}

/// The bytes the labels of an object take in each endpoint's metadata.
fn labels_bytes(labels: Option<&BTreeMap<String, String>>) -> usize {
    labels
        .into_iter()
        .flatten()
        .map(|(key, value)| key.len() + value.len() + ENTRY_JSON_BYTES)
        .sum()
}

/// Istio's outbound cluster name for one Service port:
/// `outbound|8080||checkout.shop.svc.cluster.local`.
pub fn cluster_name(service: &str, namespace: &str, port: i32, cluster_domain: &str) -> String {
    format!("outbound|{port}||{service}.{namespace}.svc.{cluster_domain}")
}

/// The health an endpoint is published with, or `None` to leave it out.
///
/// As Istio: `ready` (unset counts as ready) is healthy; not ready but still `serving` while
/// `terminating` is draining (it finishes sticky sessions and gets no new ones); terminating
/// and no longer serving is left out (Istio never sends terminating endpoints); any other
/// not-ready endpoint is unhealthy, left out unless `send_unhealthy_endpoints`. Unset
/// conditions are read as the API defines them (`ready` and `serving` true, `terminating`
/// false), where Istio reads an unset `terminating` as true.
pub fn endpoint_health(
    conditions: Option<&EndpointConditions>,
    send_unhealthy_endpoints: bool,
) -> Option<Health> {
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    if ready {
        return Some(Health::Healthy);
    }
    let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    match (serving, terminating) {
        (true, true) => Some(Health::Draining),
        (false, true) => None,
        (_, false) => send_unhealthy_endpoints.then_some(Health::Unhealthy),
    }
}

impl Mapping {
    /// Every cluster of `services` with its endpoints from `slices`, labelled from `pods`
    /// and placed in the regions of `nodes` ([`Mapping::map`] without what it left out).
    pub fn services(
        &self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        pods: &[Arc<Pod>],
        nodes: &[Arc<Node>],
    ) -> Services {
        self.map(services, slices, pods, nodes).services
    }

    /// Every cluster of `services` with its endpoints from `slices`, labelled from `pods`
    /// and placed in the regions of `nodes`, and what was left out.
    pub fn map(
        &self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        pods: &[Arc<Pod>],
        nodes: &[Arc<Node>],
    ) -> Mapped {
        let pod_labels = self.labels_by_pod(pods);
        let node_regions = regions_by_node(nodes);
        let mut left_out = BTreeSet::new();
        let slices_by_service = slices_by_service(slices, &mut left_out);
        let mut out = Services::new();
        let mut refused_clusters = Vec::new();
        for service in services {
            let (Some(name), Some(spec)) = (service.metadata.name.as_deref(), &service.spec) else {
                continue;
            };
            if spec.type_.as_deref() == Some("ExternalName") {
                continue;
            }
            let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
            let slices = slices_by_service
                .get(&(namespace, name))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let ports: Vec<&ServicePort> = spec
                .ports
                .iter()
                .flatten()
                .filter(|port| is_tcp(&port.protocol))
                .collect();
            let mut budget = Budget {
                left: self.max_service_bytes,
            };
            let mut clusters = Vec::with_capacity(ports.len());
            let mut over_budget = None;
            for port in &ports {
                let cluster = cluster_name(name, namespace, port.port, &self.cluster_domain);
                let context = EndpointContext {
                    service,
                    port,
                    pod_labels: &pod_labels,
                    node_regions: &node_regions,
                };
                let endpoints = match self.endpoints(&context, slices, &mut budget, &mut left_out) {
                    Ok(endpoints) => endpoints,
                    Err(endpoint_bytes) => {
                        over_budget = Some(endpoint_bytes);
                        break;
                    }
                };
                let slice_port = slices.iter().find_map(|(slice, _)| {
                    slice
                        .ports
                        .iter()
                        .flatten()
                        .find(|candidate| serves(candidate, port))
                });
                let protocol = port_protocol(port, slice_port);
                clusters.push((
                    cluster,
                    Arc::new(ServiceEndpoints {
                        endpoints,
                        protocol,
                    }),
                ));
            }
            let Some(endpoint_bytes) = over_budget else {
                out.extend(clusters);
                continue;
            };
            left_out.insert(self.over_budget(service, ports.len(), endpoint_bytes));
            refused_clusters.extend(
                ports
                    .iter()
                    .map(|port| cluster_name(name, namespace, port.port, &self.cluster_domain)),
            );
        }
        Mapped {
            services: out,
            left_out: left_out.into_iter().collect(),
            refused_clusters,
        }
    }

    /// What is reported for `service`, with `ports` TCP ports, over its budget at an
    /// endpoint of `endpoint_bytes`: its labels when they are most of each endpoint.
    fn over_budget(&self, service: &Service, ports: usize, endpoint_bytes: usize) -> LeftOut {
        let labels = service.metadata.labels.as_ref();
        let label_bytes = labels_bytes(labels);
        let (field, cause) = if label_bytes * 2 >= endpoint_bytes {
            (
                "metadata.labels",
                format!(
                    "each endpoint carries its {} labels ({label_bytes} bytes); remove labels from the Service (every one is copied into each endpoint of each port)",
                    labels.map_or(0, BTreeMap::len)
                ),
            )
        } else {
            (
                "spec.ports",
                "its EndpointSlices list that many endpoints or carry that many labels; split the Service or trim its slices' labels".to_owned(),
            )
        };
        LeftOut {
            kind: "Service",
            namespace: service.metadata.namespace.clone().unwrap_or_default(),
            name: service.metadata.name.clone().unwrap_or_default(),
            field: field.to_owned(),
            reason: Reason::OverBudget,
            message: format!(
                "its {ports} clusters would take over {} bytes of the snapshot: {cause}, or raise the Kubernetes source's max_service_bytes; the Service is left out and its last published clusters stay",
                self.max_service_bytes
            ),
        }
    }

    /// The allowed labels of every pod that has some, by namespace and name.
    fn labels_by_pod<'a>(&self, pods: &'a [Arc<Pod>]) -> PodLabels<'a> {
        if self.pod_labels.is_empty() {
            return PodLabels::new();
        }
        pods.iter()
            .filter_map(|pod| {
                let meta = &pod.metadata;
                let allowed: Vec<(&str, &str)> = meta
                    .labels
                    .iter()
                    .flatten()
                    .filter(|(key, _)| self.pod_labels.contains(*key))
                    .map(|(key, value)| (key.as_str(), value.as_str()))
                    .collect();
                let key = (
                    meta.namespace.as_deref().unwrap_or_default(),
                    meta.name.as_deref()?,
                );
                (!allowed.is_empty()).then_some((key, allowed))
            })
            .collect()
    }

    /// The endpoints of one Service port, sorted by address, each address once; once the
    /// Service's `budget` is spent, the size of the endpoint that did not fit.
    fn endpoints(
        &self,
        context: &EndpointContext<'_>,
        slices: &[(&EndpointSlice, Family)],
        budget: &mut Budget,
        left_out: &mut BTreeSet<LeftOut>,
    ) -> Result<Vec<Endpoint>, usize> {
        let mut endpoints: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
        for (slice, family) in slices {
            let target_port = match left_out::target_port(slice, context.port) {
                Ok(Some(target_port)) => target_port,
                Ok(None) => continue,
                Err(problem) => {
                    left_out.insert(problem);
                    continue;
                }
            };
            for (index, endpoint) in slice.endpoints.iter().enumerate() {
                let Some(health) =
                    endpoint_health(endpoint.conditions.as_ref(), self.send_unhealthy_endpoints)
                else {
                    continue;
                };
                // The API requires at least one address; the first stands for all.
                let Some(address) = endpoint.addresses.first() else {
                    continue;
                };
                let ip = match left_out::endpoint_ip(slice, *family, index, address) {
                    Ok(ip) => ip,
                    Err(problem) => {
                        left_out.insert(problem);
                        continue;
                    }
                };
                let address = SocketAddr::new(ip, target_port);
                let mapped =
                    Endpoint::new(address)
                        .with_health(health)
                        .with_attributes(Attributes {
                            zone: endpoint.zone.clone(),
                            metadata: metadata(context, slice, endpoint),
                            ..Attributes::default()
                        });
                let bytes = endpoint_bytes(&mapped);
                if !budget.take(bytes) {
                    return Err(bytes);
                }
                match endpoints.get(&address) {
                    Some(kept) if health_rank(kept.health) <= health_rank(health) => {}
                    _ => {
                        endpoints.insert(address, mapped);
                    }
                }
            }
        }
        Ok(endpoints.into_values().collect())
    }
}

/// What every endpoint of one Service port is mapped with.
struct EndpointContext<'a> {
    service: &'a Service,
    port: &'a ServicePort,
    pod_labels: &'a PodLabels<'a>,
    node_regions: &'a NodeRegions<'a>,
}

/// The slices of every Service, by namespace and Service name, each with its family and in
/// name order; slices of no Service (no [`SERVICE_NAME_LABEL`]) and `FQDN` slices are not
/// mapped, and a slice of an unknown address type or over the API's limits is left out.
fn slices_by_service<'a>(
    slices: &'a [Arc<EndpointSlice>],
    left_out: &mut BTreeSet<LeftOut>,
) -> HashMap<(&'a str, &'a str), Vec<(&'a EndpointSlice, Family)>> {
    let mut by_service: HashMap<(&str, &str), Vec<(&EndpointSlice, Family)>> = HashMap::new();
    for slice in slices {
        let Some(owner) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let family = match Family::of(slice) {
            Ok(Some(family)) => family,
            Ok(None) => continue,
            Err(problem) => {
                left_out.insert(problem);
                continue;
            }
        };
        let ports = slice.ports.as_ref().map_or(0, Vec::len);
        if slice.endpoints.len() > MAX_SLICE_ENDPOINTS || ports > MAX_SLICE_PORTS {
            left_out.insert(LeftOut::slice(
                slice,
                if ports > MAX_SLICE_PORTS { "ports" } else { "endpoints" }.to_owned(),
                Reason::TooManyEndpoints,
                format!(
                    "{} endpoints and {ports} ports, over the API's limits of {MAX_SLICE_ENDPOINTS} and {MAX_SLICE_PORTS} a slice; the slice is left out, split it (the API server this came from is not enforcing Kubernetes' validation)",
                    slice.endpoints.len()
                ),
            ));
            continue;
        }
        let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
        by_service
            .entry((namespace, owner.as_str()))
            .or_default()
            .push((slice, family));
    }
    for slices in by_service.values_mut() {
        slices.sort_by(|(a, _), (b, _)| a.metadata.name.cmp(&b.metadata.name));
    }
    by_service
}

/// The protocol Envoy speaks to the endpoints of Service port `port`, whose EndpointSlice
/// port is `slice_port`, when they name one. See the module docs for the rules.
///
/// Both fields are anyone's text: a value that is not a known protocol names none (the
/// cluster stays HTTP/1.1) and is logged at debug level with the field it came from.
pub fn port_protocol(
    port: &ServicePort,
    slice_port: Option<&EndpointPort>,
) -> Option<UpstreamProtocol> {
    let port_name = port.name.as_deref().unwrap_or_default();
    let app_protocol = port
        .app_protocol
        .as_deref()
        .map(|value| ("spec.ports[].appProtocol", value))
        .or_else(|| {
            slice_port
                .and_then(|slice_port| slice_port.app_protocol.as_deref())
                .map(|value| ("ports[].appProtocol", value))
        });
    if let Some((field, value)) = app_protocol {
        let is = |name: &str| value.eq_ignore_ascii_case(name);
        let protocol = if is("grpc") || is("http2") || is("kubernetes.io/h2c") {
            Some(UpstreamProtocol::Http2)
        } else if is("http") {
            Some(UpstreamProtocol::Http1)
        } else {
            None
        };
        if protocol.is_none() {
            debug!(
                port = port_name,
                field,
                value,
                "an appProtocol other than grpc, http2, kubernetes.io/h2c or http names no protocol; the cluster is HTTP/1.1"
            );
        }
        return protocol;
    }
    let prefix = port_name.split('-').next().unwrap_or_default();
    if prefix.eq_ignore_ascii_case("grpc") || prefix.eq_ignore_ascii_case("http2") {
        Some(UpstreamProtocol::Http2)
    } else if prefix.eq_ignore_ascii_case("http") {
        Some(UpstreamProtocol::Http1)
    } else {
        None
    }
}

/// Allowed pod labels by (namespace, pod name).
type PodLabels<'a> = HashMap<(&'a str, &'a str), Vec<(&'a str, &'a str)>>;

/// The region of every node that has one, by node name.
type NodeRegions<'a> = HashMap<&'a str, &'a str>;

/// The non-empty region label of every node.
fn regions_by_node(nodes: &[Arc<Node>]) -> NodeRegions<'_> {
    nodes
        .iter()
        .filter_map(|node| {
            let meta = &node.metadata;
            let region = meta.labels.as_ref()?.get(NODE_REGION_LABEL)?;
            Some((meta.name.as_deref()?, region.as_str()))
        })
        .filter(|(_, region)| !region.is_empty())
        .collect()
}

/// Service labels, then slice labels, then the allowed labels of the endpoint's pod, then its
/// node and pod names and its node's region (the region only from the node).
fn metadata(
    context: &EndpointContext<'_>,
    slice: &EndpointSlice,
    endpoint: &k8s_openapi::api::discovery::v1::Endpoint,
) -> BTreeMap<String, String> {
    let EndpointContext {
        service,
        pod_labels,
        node_regions,
        ..
    } = context;
    let mut metadata: BTreeMap<String, String> = service
        .metadata
        .labels
        .iter()
        .chain(slice.metadata.labels.iter())
        .flatten()
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let pod = endpoint
        .target_ref
        .as_ref()
        .filter(|target| target.kind.as_deref() == Some("Pod"));
    if let Some(target) = pod {
        // A targetRef without a namespace is in the slice's.
        let namespace = target
            .namespace
            .as_deref()
            .or(slice.metadata.namespace.as_deref())
            .unwrap_or_default();
        let labels = target
            .name
            .as_deref()
            .and_then(|name| pod_labels.get(&(namespace, name)));
        for (key, value) in labels.into_iter().flatten() {
            metadata.insert((*key).to_owned(), (*value).to_owned());
        }
    }
    if let Some(node) = &endpoint.node_name {
        metadata.insert(NODE_NAME_KEY.to_owned(), node.clone());
    }
    if let Some(name) = pod.and_then(|target| target.name.clone()) {
        metadata.insert(POD_NAME_KEY.to_owned(), name);
    }
    metadata.remove(REGION_KEY);
    let region = endpoint
        .node_name
        .as_deref()
        .and_then(|node| node_regions.get(node));
    if let Some(region) = region {
        metadata.insert(REGION_KEY.to_owned(), (*region).to_owned());
    }
    metadata
}

/// Lower is healthier.
fn health_rank(health: Health) -> u8 {
    match health {
        Health::Healthy => 0,
        Health::Draining => 1,
        Health::Unhealthy => 2,
    }
}
