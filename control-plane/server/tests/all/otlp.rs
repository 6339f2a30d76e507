//! The control plane's spans over OTLP, received by a real gRPC collector in the test
//! (`opentelemetry-proto`'s `TraceService` on 127.0.0.1): one change of the endpoints file is
//! one trace from the change to the ADS client's ACK of its version; a collector that is
//! down costs spans, never pushes.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use fulcrum_control_plane::telemetry::{
    DEFAULT_SERVICE_NAME, Otlp, OtlpConfig, OtlpMetrics, SHUTDOWN_TIMEOUT,
};
use fulcrum_test_support::eventually;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value as AttributeValue,
    trace::v1::Span,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tracing_subscriber::layer::SubscriberExt;

use crate::support::{Fixture, PATIENCE, endpoint, endpoints_file};

const NODE: &str = "sidecar~10.0.0.7~web-1.shop~shop.svc.cluster.local";
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Every span the collector received, with its resource's `service.name`.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collected {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|resource| {
                    resource
                        .attributes
                        .iter()
                        .find(|attribute| attribute.key == "service.name")
                })
                .and_then(string_value)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collected {
    /// The spans named `name` whose `version` attribute is `version`.
    fn named(&self, name: &str, version: &str) -> Vec<Span> {
        self.0
            .lock()
            .expect("collector lock")
            .iter()
            .map(|(_, span)| span)
            .filter(|span| span.name == name && attribute(span, "version") == Some(version))
            .cloned()
            .collect()
    }

    fn by_id(&self, span_id: &[u8]) -> Option<Span> {
        self.0
            .lock()
            .expect("collector lock")
            .iter()
            .map(|(_, span)| span)
            .find(|span| span.span_id == span_id)
            .cloned()
    }

    fn services(&self) -> Vec<String> {
        let mut services: Vec<String> = self
            .0
            .lock()
            .expect("collector lock")
            .iter()
            .map(|(service, _)| service.clone())
            .collect();
        services.dedup();
        services
    }
}

fn string_value(attribute: &opentelemetry_proto::tonic::common::v1::KeyValue) -> Option<String> {
    match attribute.value.as_ref()?.value.as_ref()? {
        AttributeValue::StringValue(value) => Some(value.clone()),
        _ => None,
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(
            |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                AttributeValue::StringValue(value) => Some(value.as_str()),
                _ => None,
            },
        )
}

/// A collector on a free loopback port, serving until the test's runtime ends.
async fn collector() -> (SocketAddr, Collected) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the collector");
    let address = listener.local_addr().expect("collector address");
    let collected = Collected::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collected.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (address, collected)
}

fn config(endpoint: String) -> OtlpConfig {
    OtlpConfig {
        endpoint,
        service_name: DEFAULT_SERVICE_NAME.to_owned(),
        instance: "otlp-test".to_owned(),
    }
}

/// A state-of-the-world ADS stream of node [`NODE`], as Envoy opens one.
struct AdsClient {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
}

impl AdsClient {
    async fn connect(address: SocketAddr) -> Self {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{address}"))
            .await
            .expect("connect to ADS");
        let (requests, receiver) = mpsc::channel(8);
        let client_requests = requests.clone();
        let ads = Self {
            requests,
            responses: tokio::spawn(async move {
                client
                    .stream_aggregated_resources(ReceiverStream::new(receiver))
                    .await
                    .expect("ADS stream")
                    .into_inner()
            })
            .await
            .expect("stream task"),
        };
        drop(client_requests);
        ads
    }

    async fn request(&self, type_url: &str, names: &[&str], version: &str, nonce: &str) {
        self.requests
            .send(DiscoveryRequest {
                node: Some(Node {
                    id: NODE.to_owned(),
                    cluster: "web.shop".to_owned(),
                    ..Node::default()
                }),
                type_url: type_url.to_owned(),
                resource_names: names.iter().map(|name| (*name).to_owned()).collect(),
                version_info: version.to_owned(),
                response_nonce: nonce.to_owned(),
                ..DiscoveryRequest::default()
            })
            .await
            .expect("send a request");
    }

    async fn next(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(PATIENCE, self.responses.message())
            .await
            .expect("a response within patience")
            .expect("stream open")
            .expect("a response")
    }

    /// Subscribes to every cluster and to `checkout`'s endpoints, ACKing both; the version.
    async fn subscribe(&mut self) -> String {
        self.request(CLUSTER_TYPE, &[], "", "").await;
        let clusters = self.next().await;
        self.request(CLUSTER_TYPE, &[], &clusters.version_info, &clusters.nonce)
            .await;
        self.request(ENDPOINT_TYPE, &["checkout"], "", "").await;
        let endpoints = self.next().await;
        self.request(
            ENDPOINT_TYPE,
            &["checkout"],
            &endpoints.version_info,
            &endpoints.nonce,
        )
        .await;
        endpoints.version_info
    }
}

fn checkout(port: u16) -> String {
    endpoints_file(&[("checkout", vec![endpoint(&format!("127.0.0.1:{port}"), "")])])
}

#[tokio::test]
async fn an_endpoint_change_is_one_trace_from_the_change_to_the_proxys_ack_of_its_version() {
    let (collector_address, collected) = collector().await;
    let metrics = OtlpMetrics::default();
    let otlp = Otlp::start(
        &config(format!("http://{collector_address}")),
        metrics.clone(),
    )
    .expect("exporter starts");
    // The test's runtime runs on this thread only: every task of the control plane reports
    // to this subscriber.
    let _subscriber =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(otlp.layer()));
    let fixture = Fixture::start(&checkout(19101)).await;
    let first = fixture.snapshot_version().await;
    let mut ads = AdsClient::connect(fixture.control_plane.xds_address()).await;
    assert_eq!(ads.subscribe().await, first);

    let version = fixture.next_version(&checkout(19102), &first).await;
    let push = ads.next().await;
    assert_eq!(
        (push.type_url.as_str(), push.version_info.as_str()),
        (ENDPOINT_TYPE, version.as_str())
    );
    ads.request(ENDPOINT_TYPE, &["checkout"], &version, &push.nonce)
        .await;

    let ack = eventually(PATIENCE, "the ACK's span at the collector", || async {
        otlp.flush().await.expect("flush");
        collected.named("xds_ack", &version).pop()
    })
    .await
    .expect("the ACK is traced");
    assert_eq!(attribute(&ack, "node"), Some(NODE));
    assert_eq!(attribute(&ack, "resource_type"), Some("eds"));

    // ACK → push → publish → the change, each the parent of the one before, one trace id.
    let push_span = collected
        .by_id(&ack.parent_span_id)
        .expect("the ACK's parent was exported");
    assert_eq!(push_span.name, "xds_push");
    assert_eq!(attribute(&push_span, "version"), Some(version.as_str()));
    assert_eq!(attribute(&push_span, "node"), Some(NODE));
    assert_eq!(attribute(&push_span, "cause"), Some("snapshot"));
    let publish = collected
        .by_id(&push_span.parent_span_id)
        .expect("the push's parent was exported");
    assert_eq!(publish.name, "publish");
    assert_eq!(attribute(&publish, "version"), Some(version.as_str()));
    let change = collected
        .by_id(&publish.parent_span_id)
        .expect("the publish's parent was exported");
    assert_eq!(change.name, "endpoint_change");
    assert!(change.parent_span_id.is_empty(), "the change is the root");
    assert_eq!(
        attribute(&change, "source"),
        Some(format!("static-file:{}", fixture.file.display()).as_str())
    );
    for span in [&ack, &push_span, &publish] {
        assert_eq!(
            span.trace_id, change.trace_id,
            "{} in the change's trace",
            span.name
        );
    }
    let version_span = collected
        .named("version", &version)
        .pop()
        .expect("the versioning stage is traced");
    assert_eq!(version_span.trace_id, change.trace_id);
    assert_eq!(collected.services(), [DEFAULT_SERVICE_NAME]);
    assert!(metrics.exported.get() > 0);
    assert_eq!(metrics.failed.get(), 0);

    fixture.control_plane.shutdown().await;
    otlp.shutdown().await;
}

#[tokio::test]
async fn a_collector_that_is_down_costs_spans_and_never_a_push() {
    let unreachable = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    };
    let metrics = OtlpMetrics::default();
    let otlp = Otlp::start(&config(format!("http://{unreachable}")), metrics.clone())
        .expect("an unreachable collector is no error at start");
    let _subscriber =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(otlp.layer()));
    let fixture = Fixture::start(&checkout(19201)).await;
    let mut ads = AdsClient::connect(fixture.control_plane.xds_address()).await;
    let first = ads.subscribe().await;
    otlp.flush().await.expect_err("the collector is down");

    for port in 19202..19205 {
        let previous = fixture.snapshot_version().await;
        let version = fixture.next_version(&checkout(port), &previous).await;
        let push = ads.next().await;
        assert_eq!(
            push.version_info, version,
            "pushed while the collector is down"
        );
        assert_ne!(version, first);
        ads.request(ENDPOINT_TYPE, &["checkout"], &version, &push.nonce)
            .await;
    }
    otlp.flush().await.expect_err("the collector is still down");
    assert!(metrics.failed.get() > 0, "failed exports are counted");
    assert_eq!(metrics.exported.get(), 0);

    fixture.control_plane.shutdown().await;
    // The flush's own bound, and slack for a loaded machine.
    let bound = SHUTDOWN_TIMEOUT + std::time::Duration::from_secs(5);
    tokio::time::timeout(bound, otlp.shutdown())
        .await
        .expect("shutdown is bounded with the collector down");
}
