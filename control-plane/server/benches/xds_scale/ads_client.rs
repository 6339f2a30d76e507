//! ADS clients that behave as Envoy does on an ADS stream, state of the world or delta:
//! CDS as a wildcard first, then EDS for the cluster names CDS brought, every response ACKed
//! with its version and nonce. Each client holds the endpoints it received, per cluster, and
//! reports the instant it first holds everything (initial sync) and the instant it first
//! holds what the current [`Expectation`] says (one change, seen).
//!
//! Real tonic clients on their own HTTP/2 connection each, like a fleet of Envoys; they
//! decode every resource, so their cost is real too, but it is the bench process's, not the
//! control plane's.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context, Result, bail};
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster,
            core::v3::{Node, address, socket_address},
            endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
        },
        service::discovery::v3::{
            DeltaDiscoveryRequest, DiscoveryRequest,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::protobuf::Any,
};
use prost::Message;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Largest response a client accepts: the initial EDS answer carries every endpoint.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// The ADS variant a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// `StreamAggregatedResources`.
    Sotw,
    /// `DeltaAggregatedResources`.
    Delta,
}

impl Variant {
    /// The name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Variant::Sotw => "SotW",
            Variant::Delta => "delta",
        }
    }
}

/// One change a client waits to see: `address` present in (or absent from) `cluster`.
#[derive(Debug)]
pub struct Expectation {
    /// The change's number, from 1.
    pub change: u32,
    /// The cluster it touches.
    pub cluster: String,
    /// The endpoint, `IP:port`.
    pub address: String,
    /// Whether the endpoint is added (`true`) or removed.
    pub present: bool,
}

/// What a client reports.
#[derive(Debug)]
pub enum Event {
    /// A client holds every expected cluster and endpoint since `at`.
    Synced { at: Instant },
    /// A client holds what change `change` made since `at`.
    Saw { change: u32, at: Instant },
    /// Client `client`'s stream failed.
    Failed { client: usize, error: String },
}

/// What every client shares with the bench.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Clusters a synced client holds.
    pub clusters: usize,
    /// Endpoints a synced client holds.
    pub endpoints: usize,
    /// The change being waited for, if any.
    pub expectation: watch::Receiver<Option<Arc<Expectation>>>,
    /// Where clients report.
    pub events: mpsc::UnboundedSender<Event>,
    /// Encoded bytes of every response received, all clients together.
    pub bytes: Arc<AtomicU64>,
    /// Responses received, all clients together.
    pub responses: Arc<AtomicU64>,
}

/// Runs client `client` against the ADS server at `xds` until its stream ends or the task
/// is aborted; a failure is reported as [`Event::Failed`].
pub async fn run(variant: Variant, client: usize, xds: SocketAddr, shared: Shared) {
    let result = match variant {
        Variant::Sotw => sotw(client, xds, &shared).await,
        Variant::Delta => delta(client, xds, &shared).await,
    };
    let error = match result {
        Ok(()) => "the stream ended".to_owned(),
        Err(error) => format!("{error:#}"),
    };
    // The bench may have stopped listening; nothing else to do then.
    let _ = shared.events.send(Event::Failed { client, error });
}

/// What one client holds, and what it reported.
#[derive(Debug, Default)]
struct Held {
    /// Cluster names from CDS.
    clusters: BTreeSet<String>,
    /// Cluster name → endpoint addresses, from EDS.
    endpoints: HashMap<String, HashSet<String>>,
    synced: bool,
    /// The last change reported seen (0: none).
    seen: u32,
}

impl Held {
    fn set_assignment(&mut self, assignment: &ClusterLoadAssignment) {
        let addresses = assignment
            .endpoints
            .iter()
            .flat_map(|locality| &locality.lb_endpoints)
            .filter_map(|lb_endpoint| match &lb_endpoint.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) => endpoint.address.as_ref(),
                _ => None,
            })
            .filter_map(|address| match &address.address {
                Some(address::Address::SocketAddress(socket)) => Some(socket),
                _ => None,
            })
            .map(|socket| match socket.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(port)) => {
                    format!("{}:{port}", socket.address)
                }
                _ => socket.address.clone(),
            })
            .collect();
        self.endpoints
            .insert(assignment.cluster_name.clone(), addresses);
    }

    /// Reports what became true with the last response.
    fn report(&mut self, shared: &Shared) {
        let at = Instant::now();
        if !self.synced
            && self.clusters.len() == shared.clusters
            && self.endpoints.len() == shared.clusters
            && self.endpoints.values().map(HashSet::len).sum::<usize>() == shared.endpoints
        {
            self.synced = true;
            let _ = shared.events.send(Event::Synced { at });
        }
        let expectation = shared.expectation.borrow().clone();
        if let Some(expected) = expectation
            && expected.change > self.seen
            && self
                .endpoints
                .get(&expected.cluster)
                .is_some_and(|held| held.contains(&expected.address) == expected.present)
        {
            self.seen = expected.change;
            let _ = shared.events.send(Event::Saw {
                change: expected.change,
                at,
            });
        }
    }
}

fn node(client: usize) -> Node {
    Node {
        id: format!("bench-{client}"),
        cluster: "xds-scale-bench".to_owned(),
        ..Node::default()
    }
}

async fn connect(xds: SocketAddr) -> Result<AggregatedDiscoveryServiceClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{xds}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to the ADS server at {xds}"))?;
    Ok(
        AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES),
    )
}

fn cluster_name(any: &Any) -> Result<String> {
    Ok(Cluster::decode(any.value.as_slice())
        .context("decoding a Cluster")?
        .name)
}

fn assignment(any: &Any) -> Result<ClusterLoadAssignment> {
    ClusterLoadAssignment::decode(any.value.as_slice()).context("decoding a ClusterLoadAssignment")
}

/// A state of the world stream: CDS wildcard, then EDS naming every known cluster; each
/// response ACKed with its `version_info` and `nonce`.
async fn sotw(client: usize, xds: SocketAddr, shared: &Shared) -> Result<()> {
    let mut ads = connect(xds).await?;
    let (requests, receiver) = mpsc::unbounded_channel();
    requests.send(DiscoveryRequest {
        node: Some(node(client)),
        type_url: CLUSTER_TYPE.to_owned(),
        ..DiscoveryRequest::default()
    })?;
    let mut responses = ads
        .stream_aggregated_resources(UnboundedReceiverStream::new(receiver))
        .await?
        .into_inner();
    let mut held = Held::default();
    // EDS: the names subscribed, and the last accepted version and nonce.
    let mut eds_names: Vec<String> = Vec::new();
    let (mut eds_version, mut eds_nonce) = (String::new(), String::new());
    while let Some(response) = responses.message().await? {
        shared
            .bytes
            .fetch_add(response.encoded_len() as u64, Ordering::Relaxed);
        shared.responses.fetch_add(1, Ordering::Relaxed);
        match response.type_url.as_str() {
            CLUSTER_TYPE => {
                held.clusters = response
                    .resources
                    .iter()
                    .map(cluster_name)
                    .collect::<Result<_>>()?;
                held.endpoints
                    .retain(|name, _| held.clusters.contains(name));
                let names: Vec<String> = held.clusters.iter().cloned().collect();
                // As Envoy: the new EDS subscription first (the clusters warm on it), then the
                // CDS ACK.
                if names != eds_names {
                    eds_names = names;
                    requests.send(DiscoveryRequest {
                        type_url: ENDPOINT_TYPE.to_owned(),
                        resource_names: eds_names.clone(),
                        version_info: eds_version.clone(),
                        response_nonce: eds_nonce.clone(),
                        ..DiscoveryRequest::default()
                    })?;
                }
                requests.send(DiscoveryRequest {
                    type_url: CLUSTER_TYPE.to_owned(),
                    version_info: response.version_info,
                    response_nonce: response.nonce,
                    ..DiscoveryRequest::default()
                })?;
            }
            ENDPOINT_TYPE => {
                for any in &response.resources {
                    held.set_assignment(&assignment(any)?);
                }
                eds_version = response.version_info;
                eds_nonce = response.nonce;
                requests.send(DiscoveryRequest {
                    type_url: ENDPOINT_TYPE.to_owned(),
                    resource_names: eds_names.clone(),
                    version_info: eds_version.clone(),
                    response_nonce: eds_nonce.clone(),
                    ..DiscoveryRequest::default()
                })?;
            }
            other => bail!("a response of a type never asked for: {other}"),
        }
        held.report(shared);
    }
    Ok(())
}

/// A delta stream: CDS wildcard, then EDS subscribing to the clusters CDS added and
/// unsubscribing from those it removed; each response ACKed with its `nonce`.
async fn delta(client: usize, xds: SocketAddr, shared: &Shared) -> Result<()> {
    let mut ads = connect(xds).await?;
    let (requests, receiver) = mpsc::unbounded_channel();
    requests.send(DeltaDiscoveryRequest {
        node: Some(node(client)),
        type_url: CLUSTER_TYPE.to_owned(),
        ..DeltaDiscoveryRequest::default()
    })?;
    let mut responses = ads
        .delta_aggregated_resources(UnboundedReceiverStream::new(receiver))
        .await?
        .into_inner();
    let mut held = Held::default();
    while let Some(response) = responses.message().await? {
        shared
            .bytes
            .fetch_add(response.encoded_len() as u64, Ordering::Relaxed);
        shared.responses.fetch_add(1, Ordering::Relaxed);
        match response.type_url.as_str() {
            CLUSTER_TYPE => {
                let mut added = Vec::new();
                for resource in &response.resources {
                    let any = resource
                        .resource
                        .as_ref()
                        .with_context(|| format!("cluster {} without a body", resource.name))?;
                    let name = cluster_name(any)?;
                    if held.clusters.insert(name.clone()) {
                        added.push(name);
                    }
                }
                let mut removed = Vec::new();
                for name in &response.removed_resources {
                    if held.clusters.remove(name) {
                        held.endpoints.remove(name);
                        removed.push(name.clone());
                    }
                }
                if !added.is_empty() || !removed.is_empty() {
                    requests.send(DeltaDiscoveryRequest {
                        type_url: ENDPOINT_TYPE.to_owned(),
                        resource_names_subscribe: added,
                        resource_names_unsubscribe: removed,
                        ..DeltaDiscoveryRequest::default()
                    })?;
                }
                requests.send(DeltaDiscoveryRequest {
                    type_url: CLUSTER_TYPE.to_owned(),
                    response_nonce: response.nonce,
                    ..DeltaDiscoveryRequest::default()
                })?;
            }
            ENDPOINT_TYPE => {
                for resource in &response.resources {
                    let any = resource
                        .resource
                        .as_ref()
                        .with_context(|| format!("assignment {} without a body", resource.name))?;
                    held.set_assignment(&assignment(any)?);
                }
                for name in &response.removed_resources {
                    held.endpoints.remove(name);
                }
                requests.send(DeltaDiscoveryRequest {
                    type_url: ENDPOINT_TYPE.to_owned(),
                    response_nonce: response.nonce,
                    ..DeltaDiscoveryRequest::default()
                })?;
            }
            other => bail!("a response of a type never asked for: {other}"),
        }
        held.report(shared);
    }
    Ok(())
}
