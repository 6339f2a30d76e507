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
//! - **Protocol** of a cluster, as Istio selects it ([`port_protocol`]): the Service port's
//!   `appProtocol` (else its EndpointSlice port's) when set — `grpc`, `http2` and
//!   `kubernetes.io/h2c` make the cluster HTTP/2, `http` HTTP/1.1, any other names none —
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

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
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

/// The label the EndpointSlice controller puts on every slice: the owning Service's name.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Metadata key of the node an endpoint runs on (the slice's `nodeName`).
pub const NODE_NAME_KEY: &str = "node_name";
/// The node label Kubernetes (and the cloud's node controller) puts the node's region in;
/// fulcrum's endpoint metadata uses the same key ([`REGION_KEY`]).
pub const NODE_REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Metadata key of the pod behind an endpoint (its `targetRef` when that is a Pod).
pub const POD_NAME_KEY: &str = "pod_name";

/// How Kubernetes objects become clusters. Defaults: `cluster.local`, unhealthy endpoints left
/// out (Istio's `PILOT_SEND_UNHEALTHY_ENDPOINTS=false`).
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
        }
    }
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
/// `serving` and `terminating` are read as the API defines them (serving defers to ready,
/// terminating is false), where Istio reads both as true.
pub fn endpoint_health(
    conditions: Option<&EndpointConditions>,
    send_unhealthy_endpoints: bool,
) -> Option<Health> {
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    if ready {
        return Some(Health::Healthy);
    }
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    match (serving, terminating) {
        (true, true) => Some(Health::Draining),
        (false, true) => None,
        (_, false) => send_unhealthy_endpoints.then_some(Health::Unhealthy),
    }
}

impl Mapping {
    /// Every cluster of `services` with its endpoints from `slices`, labelled from `pods`
    /// and placed in the regions of `nodes`.
    pub fn services(
        &self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        pods: &[Arc<Pod>],
        nodes: &[Arc<Node>],
    ) -> Services {
        let pod_labels = self.labels_by_pod(pods);
        let node_regions = regions_by_node(nodes);
        let mut slices_by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for slice in slices {
            let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
            let owner = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(SERVICE_NAME_LABEL));
            match owner {
                Some(owner) if slice.address_type != "FQDN" => slices_by_service
                    .entry((namespace, owner.as_str()))
                    .or_default()
                    .push(slice),
                _ => {}
            }
        }
        let mut out = Services::new();
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
            for port in spec
                .ports
                .iter()
                .flatten()
                .filter(|port| is_tcp(&port.protocol))
            {
                let cluster = cluster_name(name, namespace, port.port, &self.cluster_domain);
                let endpoints = self.endpoints(service, port, slices, &pod_labels, &node_regions);
                let slice_port = slices.iter().find_map(|slice| {
                    matching_slice_port(port, slice.ports.as_deref().unwrap_or_default())
                });
                let protocol = port_protocol(port, slice_port);
                out.insert(
                    cluster,
                    std::sync::Arc::new(ServiceEndpoints {
                        endpoints,
                        protocol,
                    }),
                );
            }
        }
        out
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

    /// The endpoints of one Service port, sorted by address, each address once.
    fn endpoints(
        &self,
        service: &Service,
        port: &ServicePort,
        slices: &[&EndpointSlice],
        pod_labels: &PodLabels<'_>,
        node_regions: &NodeRegions<'_>,
    ) -> Vec<Endpoint> {
        let mut endpoints: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
        for slice in slices {
            let Some(target_port) = matching_port(port, slice.ports.as_deref().unwrap_or_default())
            else {
                continue;
            };
            for endpoint in &slice.endpoints {
                let Some(health) =
                    endpoint_health(endpoint.conditions.as_ref(), self.send_unhealthy_endpoints)
                else {
                    continue;
                };
                let Some(ip) = endpoint.addresses.first().and_then(|a| parse_ip(a, slice)) else {
                    continue;
                };
                let address = SocketAddr::new(ip, target_port);
                let mapped =
                    Endpoint::new(address)
                        .with_health(health)
                        .with_attributes(Attributes {
                            zone: endpoint.zone.clone(),
                            metadata: metadata(service, slice, endpoint, pod_labels, node_regions),
                            ..Attributes::default()
                        });
                match endpoints.get(&address) {
                    Some(kept) if health_rank(kept.health) <= health_rank(health) => {}
                    _ => {
                        endpoints.insert(address, mapped);
                    }
                }
            }
        }
        endpoints.into_values().collect()
    }
}

/// Whether a port's protocol is TCP (unset means TCP).
fn is_tcp(protocol: &Option<String>) -> bool {
    protocol.as_deref().is_none_or(|protocol| protocol == "TCP")
}

/// The slice port serving `port`: same name (unset and empty alike), same protocol.
fn matching_slice_port<'a>(
    port: &ServicePort,
    slice_ports: &'a [EndpointPort],
) -> Option<&'a EndpointPort> {
    let name = port.name.as_deref().unwrap_or_default();
    slice_ports.iter().find(|candidate| {
        candidate.name.as_deref().unwrap_or_default() == name && is_tcp(&candidate.protocol)
    })
}

/// The slice port serving `port`, as a socket port number.
fn matching_port(port: &ServicePort, slice_ports: &[EndpointPort]) -> Option<u16> {
    matching_slice_port(port, slice_ports)
        .and_then(|candidate| candidate.port)
        .and_then(|number| u16::try_from(number).ok())
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
        let protocol = match value {
            "grpc" | "http2" | "kubernetes.io/h2c" => Some(UpstreamProtocol::Http2),
            "http" => Some(UpstreamProtocol::Http1),
            _ => None,
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

fn parse_ip(address: &str, slice: &EndpointSlice) -> Option<IpAddr> {
    let parsed = address.parse().ok();
    if parsed.is_none() {
        debug!(
            slice = slice.metadata.name.as_deref().unwrap_or_default(),
            address, "skipping an endpoint address that is not an IP"
        );
    }
    parsed
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
    service: &Service,
    slice: &EndpointSlice,
    endpoint: &k8s_openapi::api::discovery::v1::Endpoint,
    pod_labels: &PodLabels<'_>,
    node_regions: &NodeRegions<'_>,
) -> BTreeMap<String, String> {
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
