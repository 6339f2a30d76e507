//! A sample gRPC backend for the end-to-end tests and the comparison benchmark: tonic serving
//! `grpc.health.v1.Health/Check` (the standard health API, so no proto of our own), whose calls
//! can fail with `UNAVAILABLE` on a fixed share, and a client of it through Envoy.
//!
//! Failures are deterministic and evenly spread: call `n` (from 0) fails when
//! `⌊(n + 1) · p / 100⌋ > ⌊n · p / 100⌋` for `p = unavailable_percent`, so every 100 calls hold
//! exactly `p` failures, never bunched at the start, and a run's count is exact. Every
//! reply carries the backend's name in the `x-backend` metadata, so a test counts who served
//! each call from the client side too. tonic serves HTTP/2 only (h2c): a call reaches it only
//! over an HTTP/2 cluster.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{net::TcpListener, task::JoinHandle};
use tonic::{
    Request, Response, Status,
    metadata::MetadataValue,
    transport::{Channel, server::TcpIncoming},
};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus,
    health_client::HealthClient,
    health_server::{Health, HealthServer},
};

/// The metadata key naming the backend that answered.
pub const BACKEND_METADATA: &str = "x-backend";

/// A running gRPC backend. Dropping it stops the server.
#[derive(Debug)]
pub struct GrpcBackend {
    /// Its name, sent in [`BACKEND_METADATA`].
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    name: String,
    unavailable_percent: u64,
    calls: AtomicU64,
}

impl GrpcBackend {
    /// Serves on a free loopback port; `unavailable_percent` (0..=100) of its calls fail
    /// with `UNAVAILABLE`.
    pub async fn start(name: &str, unavailable_percent: u64) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            unavailable_percent: unavailable_percent.min(100),
            calls: AtomicU64::new(0),
        });
        let service = HealthServer::new(Checks(Arc::clone(&shared)));
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
                .await;
            if let Err(error) = served {
                eprintln!("gRPC backend stopped: {error}");
            }
        });
        Ok(Self {
            name: name.to_owned(),
            addr,
            shared,
            task,
        })
    }

    /// Calls it received, answered or failed.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::Relaxed)
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Checks(Arc<Shared>);

#[tonic::async_trait]
impl Health for Checks {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let call = self.0.calls.fetch_add(1, Ordering::Relaxed);
        let name = MetadataValue::try_from(self.0.name.as_str())
            .map_err(|_| Status::internal("backend name is not ASCII"))?;
        let percent = self.0.unavailable_percent;
        if (call + 1) * percent / 100 > call * percent / 100 {
            let mut status = Status::unavailable("injected: this backend fails a share of calls");
            status.metadata_mut().insert(BACKEND_METADATA, name);
            return Err(status);
        }
        let mut response = Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        });
        response.metadata_mut().insert(BACKEND_METADATA, name);
        Ok(response)
    }

    type WatchStream = futures::stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("the test backend answers Check only"))
    }
}

/// A gRPC client through Envoy's listener `listener` (h2c, one connection), whose every call
/// the listener routes to the test service.
pub async fn client(
    listener: SocketAddr,
) -> Result<HealthClient<Channel>, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{listener}"))?
        .connect()
        .await?;
    Ok(HealthClient::new(channel))
}

/// One `Check` through Envoy: the backend that answered (from the metadata) and the call's
/// status code.
pub async fn check(client: &mut HealthClient<Channel>) -> (Option<String>, tonic::Code) {
    let backend = |metadata: &tonic::metadata::MetadataMap| {
        metadata
            .get(BACKEND_METADATA)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    match client.check(HealthCheckRequest::default()).await {
        Ok(response) => (backend(response.metadata()), tonic::Code::Ok),
        Err(status) => (backend(status.metadata()), status.code()),
    }
}
