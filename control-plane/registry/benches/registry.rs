//! Registry load benchmark (a plain binary, not criterion: it measures latency
//! distributions under concurrency, which criterion's per-iteration model does not).
//!
//! Over the real gRPC API on loopback, with the in-memory backend and with the etcd backend
//! on a three-member etcd cluster it starts itself:
//! 0. 500 registrations one after the other (latency without queueing);
//! 1. N concurrent registrations (N = 1,000 and 10,000): per-call latency p50 / p99 / max
//!    and the wall time for all of them;
//! 2. Discover at 10,000 registered endpoints (100 services of 100): requests per second
//!    and p50 / p99 with 32 concurrent callers, plain and with `pick`.
//!
//! Every loop is bounded in count and time. Run:
//! `cargo bench -p fulcrum-registry --bench registry` (add `-- --memory-only` to skip etcd).
//! The closing markdown table also goes to the file `FULCRUM_BENCH_OUT` names, when set.

#[path = "../tests/all/etcd_cluster.rs"]
#[allow(
    dead_code,
    reason = "the bench uses part of the tests' cluster fixture"
)]
mod etcd_cluster;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use fulcrum_proto::registry::v1::{self as pb, registry_client::RegistryClient};
use fulcrum_registry::{
    EtcdConfig, Limits, Registry, TokenAuth,
    api::{ApiState, grpc},
};
use tokio::net::TcpListener;
use tonic::transport::{Channel, server::TcpIncoming};

const TOKEN: &str = "bench-token-0123456789";
/// Connections the load spreads over.
const CONNECTIONS: usize = 16;
/// Concurrent Discover callers.
const DISCOVER_CALLERS: usize = 32;
/// Each Discover run stops at this many requests or this much time, whichever first.
const DISCOVER_MAX_REQUESTS: usize = 300_000;
const DISCOVER_MAX_TIME: Duration = Duration::from_secs(5);
/// A registration run gives up after this long.
const REGISTER_MAX_TIME: Duration = Duration::from_secs(120);

fn authed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    request
}

/// Limits explicitly allowing loopback addresses, where the bench's instances live.
fn loopback() -> Limits {
    Limits::allowing(vec!["127.0.0.0/8".parse().expect("range")])
}

/// Serves `registry` over gRPC on loopback; returns its URL.
async fn serve(registry: Arc<Registry>) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let state = ApiState {
        registry,
        auth: Arc::new(TokenAuth::from_pairs([("bench", TOKEN)])),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(grpc::server(state))
            // Small answers must not wait for delayed ACKs (Nagle): as Envoy does, no delay.
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    Ok(url)
}

async fn clients(url: &str) -> Result<Vec<RegistryClient<Channel>>> {
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(RegistryClient::connect(url.to_owned()).await?);
    }
    Ok(clients)
}

fn instance(service: usize, index: usize, run: &str) -> pb::Instance {
    pb::Instance {
        name: format!("svc-{service}"),
        id: format!("{run}-{index}"),
        address: format!(
            "127.{}.{}.{}",
            (index >> 16) & 0xff,
            (index >> 8) & 0xff,
            index & 0xff
        ),
        port: 8080,
        tags: vec![
            if index.is_multiple_of(2) {
                "even"
            } else {
                "odd"
            }
            .into(),
        ],
        ttl_ms: 600_000,
        ..pb::Instance::default()
    }
}

/// The markdown rows of every run so far, written to `FULCRUM_BENCH_OUT` at the end.
static TABLE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The runs as a markdown table; to the file `FULCRUM_BENCH_OUT` names too (`cargo xtask
/// bench` splices it into BENCHMARKS.md).
fn write_table() -> Result<()> {
    let rows = TABLE.lock().expect("no bench task panics holding it");
    let table = format!(
        "| what | calls | errors | wall | rate | p50 | p99 | max |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n{}\n",
        rows.join("\n")
    );
    println!("\n{table}");
    if let Some(path) = std::env::var_os("FULCRUM_BENCH_OUT") {
        std::fs::write(&path, &table)?;
    }
    Ok(())
}

struct Latencies(Vec<Duration>);

impl Latencies {
    fn quantile(&self, q: f64) -> Duration {
        let index = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0.get(index).copied().unwrap_or_default()
    }

    /// Prints the run's line and adds its row to [`TABLE`].
    fn report(mut self, label: &str, wall: Duration, errors: usize) {
        self.0.sort_unstable();
        let ms = |latency: Duration| latency.as_secs_f64() * 1e3;
        let (calls, rate) = (self.0.len(), self.0.len() as f64 / wall.as_secs_f64());
        let (p50, p99) = (ms(self.quantile(0.5)), ms(self.quantile(0.99)));
        let max = ms(self.0.last().copied().unwrap_or_default());
        println!(
            "{label}: n={calls} errors={errors} wall={:.2}s rate={rate:.0}/s p50={p50:.2}ms p99={p99:.2}ms max={max:.2}ms",
            wall.as_secs_f64(),
        );
        TABLE.lock().expect("no bench task panics holding it").push(format!(
            "| {label} | {calls} | {errors} | {:.2} s | {rate:.0}/s | {p50:.2} ms | {p99:.2} ms | {max:.2} ms |",
            wall.as_secs_f64(),
        ));
    }
}

/// Registers `count` instances at once (all calls in flight together) over 100 services.
async fn register_all(url: &str, count: usize, run: &str, label: &str) -> Result<()> {
    let clients = clients(url).await?;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let mut client = clients[index % CONNECTIONS].clone();
        let request = pb::RegisterRequest {
            instance: Some(instance(index % 100, index, run)),
        };
        tasks.push(tokio::spawn(async move {
            let call = Instant::now();
            let result =
                tokio::time::timeout(REGISTER_MAX_TIME, client.register(authed(request))).await;
            let error = match result {
                Ok(Ok(_)) => None,
                Ok(Err(status)) => Some(format!("{:?}: {}", status.code(), status.message())),
                Err(_) => Some(format!("no answer within {REGISTER_MAX_TIME:?}")),
            };
            (call.elapsed(), error)
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let (latency, error) = task.await?;
        match error {
            None => latencies.push(latency),
            Some(error) => {
                errors += 1;
                first_error.get_or_insert(error);
            }
        }
    }
    Latencies(latencies).report(label, started.elapsed(), errors);
    if let Some(error) = first_error {
        println!("  first error: {error}");
    }
    Ok(())
}

/// Registers `count` instances one after the other: the latency of a call that does not
/// queue behind others.
async fn register_sequentially(url: &str, count: usize, run: &str, label: &str) -> Result<()> {
    let mut client = RegistryClient::connect(url.to_owned()).await?;
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(count);
    let mut errors = 0;
    for index in 0..count {
        if started.elapsed() >= REGISTER_MAX_TIME {
            break;
        }
        let request = pb::RegisterRequest {
            instance: Some(instance(index % 100, index, run)),
        };
        let call = Instant::now();
        match client.register(authed(request)).await {
            Ok(_) => latencies.push(call.elapsed()),
            Err(_) => errors += 1,
        }
    }
    Latencies(latencies).report(label, started.elapsed(), errors);
    Ok(())
}

/// Discover load against services `svc-0..svc-99`.
async fn discover_load(url: &str, pick: bool, label: &str) -> Result<()> {
    let clients = clients(url).await?;
    let started = Instant::now();
    let per_caller = DISCOVER_MAX_REQUESTS / DISCOVER_CALLERS;
    let mut tasks = Vec::new();
    for caller in 0..DISCOVER_CALLERS {
        let mut client = clients[caller % CONNECTIONS].clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_caller);
            let mut errors = 0;
            for request in 0..per_caller {
                if started.elapsed() >= DISCOVER_MAX_TIME {
                    break;
                }
                let message = pb::DiscoverRequest {
                    name: format!("svc-{}", (caller * 7 + request) % 100),
                    tags: vec!["even".into()],
                    pick,
                    ..pb::DiscoverRequest::default()
                };
                let call = Instant::now();
                match client.discover(authed(message)).await {
                    Ok(_) => latencies.push(call.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (latencies, failed) = task.await?;
        all.extend(latencies);
        errors += failed;
    }
    Latencies(all).report(label, started.elapsed(), errors);
    Ok(())
}

async fn etcd_registry(cluster: &etcd_cluster::EtcdCluster) -> Result<Arc<Registry>> {
    let mut config = EtcdConfig::new(cluster.endpoints());
    config.request_timeout = Duration::from_secs(10);
    Ok(Registry::on_etcd(config, loopback()).await?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let memory_only = std::env::args().any(|arg| arg == "--memory-only");
    println!("registry bench: gRPC on loopback, {CONNECTIONS} connections");

    let url = serve(Registry::in_memory(loopback())).await?;
    register_sequentially(&url, 500, "s", "memory register sequential x500").await?;
    for count in [1_000, 10_000] {
        let url = serve(Registry::in_memory(loopback())).await?;
        register_all(&url, count, "m", &format!("memory register x{count}")).await?;
        if count == 10_000 {
            discover_load(
                &url,
                false,
                "memory discover (10k endpoints, 100/service, tag filter)",
            )
            .await?;
            discover_load(&url, true, "memory discover pick (10k endpoints)").await?;
        }
    }

    if memory_only {
        return write_table();
    }
    {
        let cluster = etcd_cluster::EtcdCluster::start(3).await?;
        let url = serve(etcd_registry(&cluster).await?).await?;
        register_sequentially(&url, 500, "s", "etcd(3 members) register sequential x500").await?;
    }
    for count in [1_000, 10_000] {
        let cluster = etcd_cluster::EtcdCluster::start(3).await?;
        let url = serve(etcd_registry(&cluster).await?).await?;
        register_all(
            &url,
            count,
            "e",
            &format!("etcd(3 members) register x{count}"),
        )
        .await?;
        if count == 10_000 {
            discover_load(
                &url,
                false,
                "etcd discover (10k endpoints, served from the view)",
            )
            .await?;
        }
    }
    write_table()
}
