//! Whole streams through the tonic service: what a client's oversized strings and
//! subscriptions leave in `/v1/status`, the metrics and the logs.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    thread::ThreadId,
};

use bytes::Bytes;
use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse},
    },
    google::rpc::Status as RpcStatus,
};
use fulcrum_core::{Endpoint, ServiceEndpoints, Snapshot};
use http_body::{Body as _, Frame};
use prost::Message;
use tokio::sync::mpsc;
use tonic::codegen::{Service, http};

use super::{
    AdsServer, DELTA_PATH, MAX_NACK_MESSAGE_BYTES, MAX_NODE_FIELD_BYTES, SOTW_PATH, bounded,
    delta::MAX_UNSERVED_NAMES,
};
use crate::{
    cache::{ResourceType, SnapshotCache},
    metrics::{RefusalLabels, XdsMetrics},
    resources::ClusterOptions,
    status::{NodeRegistry, StreamStatus, TypeStatus},
};

/// A request body the test writes gRPC messages into.
struct Requests(mpsc::UnboundedReceiver<Bytes>);

impl http_body::Body for Requests {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(context)
            .map(|message| message.map(|message| Ok(Frame::data(message))))
    }
}

/// One open stream: the client's end.
struct Client {
    requests: mpsc::UnboundedSender<Bytes>,
    responses: tonic::body::Body,
    received: Vec<u8>,
}

impl Client {
    fn send(&self, request: &impl Message) {
        let message = request.encode_to_vec();
        let mut frame = vec![0];
        frame.extend(u32::try_from(message.len()).expect("small").to_be_bytes());
        frame.extend(message);
        self.requests.send(frame.into()).expect("stream open");
    }

    /// The next response message, or the trailers if the stream ended.
    async fn next(&mut self) -> Result<Vec<u8>, http::HeaderMap> {
        loop {
            if self.received.len() >= 5 {
                let length = u32::from_be_bytes(self.received[1..5].try_into().expect("4"));
                let end = 5 + usize::try_from(length).expect("fits");
                if self.received.len() >= end {
                    let message = self.received[5..end].to_vec();
                    self.received.drain(..end);
                    return Ok(message);
                }
            }
            let frame =
                std::future::poll_fn(|context| Pin::new(&mut self.responses).poll_frame(context))
                    .await
                    .expect("a frame before the end")
                    .expect("no error");
            match frame.into_data() {
                Ok(data) => self.received.extend_from_slice(&data),
                Err(frame) => return Err(frame.into_trailers().expect("trailers")),
            }
        }
    }

    async fn sotw_response(&mut self) -> DiscoveryResponse {
        let message = self.next().await.expect("a response");
        DiscoveryResponse::decode(message.as_slice()).expect("a DiscoveryResponse")
    }
}

/// A server over a cache holding services `a` and `b`, and what it records.
struct Fixture {
    server: AdsServer,
    registry: NodeRegistry,
    metrics: XdsMetrics,
    /// Kept open: streams end when the cache goes.
    _cache: SnapshotCache,
}

fn server() -> Fixture {
    let cache = SnapshotCache::new(ClusterOptions::default());
    cache.set(&Snapshot {
        version: "v1".to_owned(),
        services: [("a", 1), ("b", 2)]
            .into_iter()
            .map(|(name, port)| {
                let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                let endpoints = vec![Endpoint::new(address)];
                let service = ServiceEndpoints {
                    endpoints,
                    protocol: None,
                };
                (name.to_owned(), Arc::new(service))
            })
            .collect(),
        ..Default::default()
    });
    let (registry, metrics) = (NodeRegistry::default(), XdsMetrics::default());
    let server = AdsServer::new(&cache, registry.clone(), metrics.clone());
    Fixture {
        server,
        registry,
        metrics,
        _cache: cache,
    }
}

async fn open(server: &AdsServer, path: &str) -> Client {
    let (requests, receiver) = mpsc::unbounded_channel();
    let request = http::Request::builder()
        .uri(path)
        .body(Requests(receiver))
        .expect("request");
    let response = server
        .clone()
        .into_service()
        .call(request)
        .await
        .expect("infallible");
    Client {
        requests,
        responses: response.into_body(),
        received: Vec::new(),
    }
}

fn node(id: String, cluster: String) -> Option<Node> {
    Some(Node {
        id,
        cluster,
        ..Default::default()
    })
}

fn sotw_request(ty: ResourceType, names: &[&str], nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: ty.type_url().to_owned(),
        resource_names: names.iter().map(|name| (*name).to_owned()).collect(),
        response_nonce: nonce.to_owned(),
        ..Default::default()
    }
}

/// The clusters' status of a stream that served them.
fn clusters_status(stream: &StreamStatus) -> &TypeStatus {
    stream
        .types
        .get(ResourceType::Cluster)
        .expect("clusters served")
}

/// Opens a SotW stream as `node`, takes its clusters, NACKs them with `reason` and then asks
/// for endpoints of `a` (whose answer shows the NACK was handled).
async fn nack_clusters(server: &AdsServer, node: Option<Node>, reason: &str) -> Client {
    let mut client = open(server, SOTW_PATH).await;
    let mut first = sotw_request(ResourceType::Cluster, &[], "");
    first.node = node;
    client.send(&first);
    let clusters = client.sotw_response().await;
    let mut nack = sotw_request(ResourceType::Cluster, &[], &clusters.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: reason.to_owned(),
        details: vec![],
    });
    client.send(&nack);
    client.send(&sotw_request(ResourceType::Endpoint, &["a"], ""));
    client.sotw_response().await;
    client
}

#[tokio::test]
async fn status_shows_the_node_and_the_nack_reason_of_an_ordinary_stream() {
    let Fixture {
        server,
        registry,
        _cache,
        ..
    } = server();
    let node = node("sidecar~10.0.0.7~cart-1.shop".to_owned(), "cart".to_owned());
    let _client = nack_clusters(&server, node, "weight must be at least 1").await;
    let streams = registry.snapshot();
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0].node_id, "sidecar~10.0.0.7~cart-1.shop");
    assert_eq!(streams[0].node_cluster, "cart");
    let nack = clusters_status(&streams[0])
        .last_nack
        .as_ref()
        .expect("a NACK");
    assert_eq!(nack.message, "weight must be at least 1");
}

#[tokio::test]
async fn a_megabyte_node_id_and_nack_reason_leave_bounded_status() {
    let Fixture {
        server,
        registry,
        _cache,
        ..
    } = server();
    let huge = "n".repeat(1 << 20);
    let node = node(huge.clone(), huge.clone());
    let _client = nack_clusters(&server, node, &huge).await;
    let streams = registry.snapshot();
    let stream = &streams[0];
    assert!(stream.node_id.len() <= MAX_NODE_FIELD_BYTES, "node id cut");
    assert!(stream.node_id.starts_with("nnn") && stream.node_id.ends_with('…'));
    assert!(
        stream.node_cluster.len() <= MAX_NODE_FIELD_BYTES,
        "cluster cut"
    );
    let nack = clusters_status(stream).last_nack.as_ref().expect("a NACK");
    assert!(
        nack.message.len() <= MAX_NACK_MESSAGE_BYTES,
        "NACK reason cut"
    );
    assert!(nack.message.ends_with('…'));
}

#[tokio::test]
async fn status_keeps_the_acked_version_when_an_ack_names_one_never_sent() {
    let Fixture {
        server,
        registry,
        _cache,
        ..
    } = server();
    let mut client = open(&server, SOTW_PATH).await;
    client.send(&sotw_request(ResourceType::Cluster, &[], ""));
    let clusters = client.sotw_response().await;
    let mut ack = sotw_request(ResourceType::Cluster, &[], &clusters.nonce);
    ack.version_info = clusters.version_info.clone();
    client.send(&ack);
    ack.version_info = "v".repeat(1 << 20);
    client.send(&ack);
    client.send(&sotw_request(ResourceType::Endpoint, &["a"], ""));
    client.sotw_response().await;
    let streams = registry.snapshot();
    assert_eq!(
        clusters_status(&streams[0]).last_acked_version.as_deref(),
        Some(clusters.version_info.as_str())
    );
}

#[tokio::test]
async fn a_delta_stream_subscribing_past_the_limit_ends_resource_exhausted_and_is_counted() {
    let Fixture {
        server,
        registry,
        metrics,
        _cache,
    } = server();
    let mut client = open(&server, DELTA_PATH).await;
    client.send(&DeltaDiscoveryRequest {
        type_url: ResourceType::Endpoint.type_url().to_owned(),
        resource_names_subscribe: (0..=MAX_UNSERVED_NAMES)
            .map(|index| format!("made-up-{index}"))
            .collect(),
        ..Default::default()
    });
    let trailers = client.next().await.expect_err("the stream ends");
    assert_eq!(trailers["grpc-status"], "8", "RESOURCE_EXHAUSTED");
    let message = trailers["grpc-message"].to_str().expect("ascii");
    assert!(
        message.contains(&MAX_UNSERVED_NAMES.to_string()),
        "names the limit: {message}"
    );
    let refused = metrics.streams_refused.get_or_create(&RefusalLabels {
        reason: "subscriptions",
    });
    assert_eq!(refused.get(), 1);
    // The driver removes the stream from the registry as it ends.
    for _ in 0..100 {
        if registry.snapshot().is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(registry.snapshot().is_empty(), "the stream is gone");
}

/// Counts WARN events per thread, as the test binary's global subscriber. A thread-local
/// default subscriber missed events now and then (one run in five to ten of the suite):
/// tracing-core caches each callsite's interest, and a callsite another test thread
/// registered while that subscriber was being set kept an interest computed without it.
/// The global subscriber is consulted for every callsite.
struct CountWarnings;

/// WARN events counted, per thread.
static WARNINGS: Mutex<Vec<(ThreadId, usize)>> = Mutex::new(Vec::new());

impl CountWarnings {
    /// WARN events on this thread so far, the subscriber installed if it was not.
    fn on_this_thread() -> usize {
        static INSTALLED: std::sync::Once = std::sync::Once::new();
        INSTALLED.call_once(|| {
            tracing::subscriber::set_global_default(CountWarnings)
                .expect("no other global subscriber in this test binary");
        });
        let here = std::thread::current().id();
        let warnings = WARNINGS.lock().unwrap_or_else(PoisonError::into_inner);
        warnings
            .iter()
            .find(|(thread, _)| *thread == here)
            .map_or(0, |(_, count)| *count)
    }
}

impl tracing::Subscriber for CountWarnings {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let here = std::thread::current().id();
            let mut warnings = WARNINGS.lock().unwrap_or_else(PoisonError::into_inner);
            match warnings.iter_mut().find(|(thread, _)| *thread == here) {
                Some((_, count)) => *count += 1,
                None => warnings.push((here, 1)),
            }
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Runs on one thread (the stream's tasks included), whose WARN events it counts.
#[tokio::test(flavor = "current_thread")]
async fn a_nack_repeated_with_the_same_nonce_is_logged_once() {
    let before = CountWarnings::on_this_thread();
    let Fixture {
        server,
        registry,
        _cache,
        ..
    } = server();
    let mut client = nack_clusters(&server, None, "weight must be at least 1").await;
    assert_eq!(
        CountWarnings::on_this_thread() - before,
        1,
        "the first NACK"
    );
    // Envoy repeats its NACK with each request until it accepts a response.
    let clusters_nonce = clusters_status(&registry.snapshot()[0])
        .last_nack
        .as_ref()
        .expect("a NACK")
        .nonce
        .clone();
    let mut again = sotw_request(ResourceType::Cluster, &[], &clusters_nonce);
    again.error_detail = Some(RpcStatus {
        code: 3,
        message: "weight must be at least 1".to_owned(),
        details: vec![],
    });
    client.send(&again);
    client.send(&sotw_request(ResourceType::Endpoint, &["a", "b"], ""));
    client.sotw_response().await;
    assert_eq!(
        CountWarnings::on_this_thread() - before,
        1,
        "not logged again"
    );
    assert_eq!(
        clusters_status(&registry.snapshot()[0]).nacks,
        2,
        "still counted as received"
    );
}

#[test]
fn bounded_keeps_short_text_and_cuts_long_text_on_a_character_boundary_with_a_mark() {
    assert_eq!(bounded("sidecar~10.0.0.7", 256), "sidecar~10.0.0.7");
    assert_eq!(bounded(&"a".repeat(256), 256), "a".repeat(256));
    let cut = bounded(&"é".repeat(200), 256);
    assert!(cut.len() <= 256, "{} bytes", cut.len());
    assert_eq!(cut, format!("{}…", "é".repeat(126)));
}
