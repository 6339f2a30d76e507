//! Shared fixtures: the API served on loopback, tokens, clients, bounded waits.

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use fulcrum_core::Snapshot;
use fulcrum_pipeline::{Debounce, policy::attach};
use fulcrum_proto::registry::v1::{self as pb, registry_client::RegistryClient};
use fulcrum_registry::{
    Limits, Query, Registry, TokenAuth,
    api::{ApiState, grpc, rest},
};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::watch,
    task::JoinHandle,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;

/// Limits explicitly allowing loopback addresses, where the tests' instances live.
pub fn loopback() -> Limits {
    Limits::allowing(vec!["127.0.0.0/8".parse().expect("range")])
}

/// Alice's token (identity `alice`).
pub const ALICE: &str = "alice-token-0123456789";
/// Bob's token (identity `bob`).
pub const BOB: &str = "bob-token-0123456789ab";

/// The registry served over REST and gRPC on loopback, with the source's snapshots.
pub struct Served {
    pub registry: Arc<Registry>,
    /// `http://127.0.0.1:PORT`
    pub rest: String,
    /// `http://127.0.0.1:PORT`
    pub grpc: String,
    /// The latest merged snapshot of the registry source.
    pub snapshots: watch::Receiver<Option<Snapshot>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub fn auth() -> Arc<TokenAuth> {
    Arc::new(TokenAuth::from_pairs([("alice", ALICE), ("bob", BOB)]))
}

/// A loopback listener that takes a burst of hundreds of connections at once:
/// `TcpListener::bind` keeps a backlog of 128, and a connection beyond it waits a second for
/// its SYN to be sent again.
fn listener() -> Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    Ok(socket.listen(1024)?)
}

/// Serves `registry` with Alice's and Bob's tokens and runs its source through the snapshot
/// pipeline.
pub async fn serve(registry: Arc<Registry>) -> Result<Served> {
    serve_with(registry, auth()).await
}

/// [`serve`] with the tokens of `auth`.
pub async fn serve_with(registry: Arc<Registry>, auth: Arc<TokenAuth>) -> Result<Served> {
    let state = ApiState {
        registry: registry.clone(),
        auth,
    };
    let rest_listener = listener()?;
    let grpc_listener = listener()?;
    let rest_url = format!("http://{}", rest_listener.local_addr()?);
    let grpc_url = format!("http://{}", grpc_listener.local_addr()?);
    let router = rest::router(state.clone());
    let grpc_service = grpc::server(state);
    let (snapshot_sender, snapshots) = watch::channel(None);
    let source = registry.source();
    let tasks = vec![
        tokio::spawn(async move {
            let _ = axum::serve(rest_listener, router).await;
        }),
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(grpc_service)
                .serve_with_incoming(TcpListenerStream::new(grpc_listener))
                .await;
        }),
        tokio::spawn(async move {
            let (merged, mut merges) = watch::channel(None);
            let merge = fulcrum_pipeline::merge::run(
                vec![Box::new(source)],
                Debounce::new(Duration::from_millis(10)),
                merged,
                fulcrum_pipeline::PipelineMetrics::default(),
            );
            let forward = async move {
                while merges.changed().await.is_ok() {
                    let services = merges.borrow_and_update().clone();
                    if let Some(services) = services {
                        let _ = snapshot_sender.send(Some(attach(&services, None)));
                    }
                }
            };
            tokio::join!(merge, forward);
        }),
    ];
    Ok(Served {
        registry,
        rest: rest_url,
        grpc: grpc_url,
        snapshots,
        tasks,
    })
}

/// A plain HTTP client that never uses a proxy.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// A registration body for `name`/`id` at 127.0.0.1:`port`.
pub fn instance(name: &str, id: &str, port: u16) -> serde_json::Value {
    serde_json::json!({ "name": name, "id": id, "address": "127.0.0.1", "port": port })
}

/// A gRPC client of the served API.
pub async fn grpc_client(served: &Served) -> Result<RegistryClient<Channel>> {
    Ok(RegistryClient::connect(served.grpc.clone()).await?)
}

/// `message` with `authorization: Bearer token`.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

/// Registers `body` over REST with `token`; the answer, whatever its status.
pub async fn post_instance(
    served: &Served,
    token: &str,
    body: &serde_json::Value,
) -> Result<reqwest::Response> {
    Ok(http()
        .post(format!("{}/v1/registry/instances", served.rest))
        .bearer_auth(token)
        .json(body)
        .send()
        .await?)
}

/// A gRPC register request of `instance` with `token`.
pub fn register_request(
    instance: pb::Instance,
    token: &str,
) -> tonic::Request<pb::RegisterRequest> {
    authed(
        pb::RegisterRequest {
            instance: Some(instance),
        },
        token,
    )
}

/// A proto instance of `name`/`id` at 127.0.0.1:`port`.
pub fn pb_instance(name: &str, id: &str, port: u16) -> pb::Instance {
    pb::Instance {
        name: name.into(),
        id: id.into(),
        address: "127.0.0.1".into(),
        port: u32::from(port),
        ..pb::Instance::default()
    }
}

/// The ports of `service`'s endpoints in the latest snapshot, with their health.
pub fn published(served: &Served, service: &str) -> Vec<(u16, fulcrum_core::Health)> {
    served
        .snapshots
        .borrow()
        .as_ref()
        .and_then(|snapshot| snapshot.services.get(service))
        .map(|endpoints| {
            endpoints
                .endpoints
                .iter()
                .map(|e| (e.address.port(), e.health))
                .collect()
        })
        .unwrap_or_default()
}

/// The registry's metrics in Prometheus text format.
pub fn scrape(served: &Served) -> Result<String> {
    let mut metrics = prometheus_client::registry::Registry::default();
    served.registry.metrics().register(&mut metrics);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics)?;
    Ok(text)
}

/// The value of exactly `series` (name and labels as exposed), if present.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|number| number.trim().parse().ok())
    })
}

/// The registrations a discovery of service `svc` answers, as `(id, address)`.
pub fn discovered(registry: &Registry) -> Vec<(String, String)> {
    let query = Query {
        service: "svc".into(),
        ..Query::default()
    };
    registry
        .discover(&query)
        .expect("valid query")
        .entries
        .iter()
        .map(|entry| {
            let registration = &entry.record.registration;
            (
                registration.id.to_string(),
                registration.address().to_string(),
            )
        })
        .collect()
}

/// The ids of the registrations a discovery of service `svc` answers.
pub fn discovered_ids(registry: &Registry) -> Vec<String> {
    discovered(registry).into_iter().map(|(id, _)| id).collect()
}
