//! Fixtures for fulcrum's end-to-end tests: real Envoy (through `fulcrum-test-support`) with
//! the release filter, in-process sample backends and control plane, and a small client.
//!
//! An Envoy here runs one worker thread unless a test asks for more
//! ([`Proxy::start_with_workers`]): per-worker balancing state then makes exact, repeatable
//! counts. The tests with two workers check what must hold across workers (the per-proxy rate
//! limit, outcome attribution) and that both workers served. Their ingress listener balances
//! connections exactly over the workers ([`balance_ingress_connections_exactly`]), so "both
//! workers served" follows from opening two connections at once, not from the kernel's hash
//! of the client's ports.

pub mod native;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fulcrum_example_backend::Backend;
use fulcrum_test_support::{
    AdsApi, Bootstrap, ClusterBalancing, ClusterOptions, Endpoints, Envoy, EnvoyOptions,
    FailurePolicy, FilterSetup, Ingress, NodeLocality, RETRY_ON_GRPC, RETRY_ON_HTTP,
    envoy::{CONTROL_PLANE_CLUSTER, INGRESS_LISTENER},
};
use serde_json::{Value, json};

/// The service every test sends its requests to.
pub const SERVICE: &str = "shop";

/// How long [`Proxy::picks`] waits for the filter's tick (every second) to have flushed every
/// worker's pick counts: two tick periods and a margin for a busy machine.
pub const PICKS_FLUSH_WAIT: Duration = Duration::from_millis(2500);

/// The release filter: `FULCRUM_FILTER_WASM` (set by `cargo xtask test` after building it).
pub fn filter_wasm() -> Result<PathBuf> {
    let path = std::env::var_os("FULCRUM_FILTER_WASM").map(PathBuf::from).context(
        "FULCRUM_FILTER_WASM is not set: run the end-to-end tests with `cargo xtask test`, which builds the release filter",
    )?;
    if !path.is_file() {
        bail!(
            "FULCRUM_FILTER_WASM={} does not exist; run `cargo xtask build-wasm`",
            path.display()
        );
    }
    Ok(path)
}

/// A loopback address nothing listens on: bound, then released, so a connection to it is
/// refused (a dead endpoint).
pub async fn dead_address() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a free loopback port")?;
    listener.local_addr().context("the free port's address")
}

/// `n` in-process backends named `b1`…`bn` on free loopback ports.
pub async fn backends(n: usize) -> Result<Vec<Backend>> {
    let mut started = Vec::new();
    for index in 1..=n {
        started.push(Backend::bind(&format!("b{index}"), 0, 0).await?);
    }
    Ok(started)
}

/// `addresses` as a static endpoint list, in the snapshot's and the filter configuration's
/// form: `[{"address": "IP:port"}, …]`.
pub fn endpoints_json(addresses: &[SocketAddr]) -> Value {
    addresses
        .iter()
        .map(|a| json!({"address": a.to_string()}))
        .collect()
}

/// Envoy with the release filter in front of `backends` listed statically in both the
/// cluster and the filter's configuration, under `policy` (the `default` service policy).
pub async fn envoy_with_static_endpoints(backends: &[Backend], policy: Value) -> Result<Proxy> {
    envoy_with_static_filter(backends, policy, filter_wasm()?, FailurePolicy::default()).await
}

/// [`envoy_with_static_endpoints`] with another build of the filter (`wasm`) and VM failure
/// policy.
pub async fn envoy_with_static_filter(
    backends: &[Backend],
    policy: Value,
    wasm: PathBuf,
    failure_policy: FailurePolicy,
) -> Result<Proxy> {
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let endpoints = endpoints_json(&addresses);
    Proxy::start_with_filter(
        Endpoints::Static(addresses),
        FilterSetup {
            wasm,
            config: json!({"endpoints": {SERVICE: endpoints}, "policy": {"default": policy}}),
            failure_policy,
        },
    )
    .await
}

/// Envoy getting its cluster over ADS from `xds` and the filter polling `snapshot_http`.
pub async fn envoy_with_control_plane(
    xds: SocketAddr,
    snapshot_http: SocketAddr,
    policy: Value,
) -> Result<Proxy> {
    envoy_with_control_plane_retrying(xds, snapshot_http, policy, RETRY_ON_HTTP).await
}

/// [`envoy_with_control_plane`] in front of a gRPC service: the route also retries calls that
/// end `UNAVAILABLE` ([`RETRY_ON_GRPC`]).
pub async fn envoy_with_control_plane_for_grpc(
    xds: SocketAddr,
    snapshot_http: SocketAddr,
    policy: Value,
) -> Result<Proxy> {
    envoy_with_control_plane_retrying(xds, snapshot_http, policy, RETRY_ON_GRPC).await
}

async fn envoy_with_control_plane_retrying(
    xds: SocketAddr,
    snapshot_http: SocketAddr,
    policy: Value,
    retry_on: &'static str,
) -> Result<Proxy> {
    let filter_config = json!({
        "control_plane": {"cluster": CONTROL_PLANE_CLUSTER, "poll_interval": "200ms"},
        "only_services": [SERVICE],
        "policy": {"default": policy},
    });
    let endpoints = Endpoints::Ads {
        xds,
        api: AdsApi::Sotw,
        snapshot_http: Some(snapshot_http),
    };
    let filter = FilterSetup {
        wasm: filter_wasm()?,
        config: filter_config,
        failure_policy: FailurePolicy::default(),
    };
    let options = EnvoyOptions {
        concurrency: 1,
        ..EnvoyOptions::default()
    };
    Proxy::start(
        endpoints,
        filter,
        &options,
        retry_on,
        NodeLocality::default(),
        &json!({}),
    )
    .await
}

/// A running Envoy and a client for its listener.
#[derive(Debug)]
pub struct Proxy {
    pub envoy: Envoy,
    pub listener: SocketAddr,
    client: Client,
}

/// A client of a proxy's listener, with its own connection pool.
#[derive(Debug, Clone)]
pub struct Client {
    client: reqwest::Client,
    listener: SocketAddr,
}

/// What one request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `x-backend` of the response; `None` for Envoy's own replies and failures.
    pub backend: Option<String>,
    /// `None` when no response arrived.
    pub status: Option<u16>,
    /// `x-fulcrum-pick` of the response: why the filter picked where it did, under the
    /// filter's `explain_picks`.
    pub explanation: Option<String>,
}

/// The filter built with the `fault-injection` feature: `FULCRUM_FAULT_WASM` (set by
/// `cargo xtask test`). A request with `x-fulcrum-test-fault: panic` panics its VM.
pub fn fault_wasm() -> Result<PathBuf> {
    let path = std::env::var_os("FULCRUM_FAULT_WASM").map(PathBuf::from).context(
        "FULCRUM_FAULT_WASM is not set: run the end-to-end tests with `cargo xtask test`, which builds the fault-injection filter",
    )?;
    if !path.is_file() {
        bail!("FULCRUM_FAULT_WASM={} does not exist", path.display());
    }
    Ok(path)
}

impl Proxy {
    /// Envoy (one worker) with the release filter under `filter_config`, in front of
    /// `endpoints`, with the shipped failure policy (`FAIL_RELOAD`).
    pub async fn start_for_test(endpoints: Endpoints, filter_config: Value) -> Result<Self> {
        Self::start_with_filter(
            endpoints,
            FilterSetup {
                wasm: filter_wasm()?,
                config: filter_config,
                failure_policy: FailurePolicy::default(),
            },
        )
        .await
    }

    /// Envoy (one worker) with `filter` in front of `endpoints`.
    pub async fn start_with_filter(endpoints: Endpoints, filter: FilterSetup) -> Result<Self> {
        Self::start_with_workers(endpoints, filter, 1).await
    }

    /// Envoy with `workers` worker threads (`--concurrency`) and `filter` in front of
    /// `endpoints`.
    pub async fn start_with_workers(
        endpoints: Endpoints,
        filter: FilterSetup,
        workers: u32,
    ) -> Result<Self> {
        let options = EnvoyOptions {
            concurrency: workers,
            ..EnvoyOptions::default()
        };
        Self::start_with_options(endpoints, filter, &options).await
    }

    /// Envoy started with `options` (workers, extra arguments such as `--service-zone`) and
    /// `filter` in front of `endpoints`.
    pub async fn start_with_options(
        endpoints: Endpoints,
        filter: FilterSetup,
        options: &EnvoyOptions,
    ) -> Result<Self> {
        Self::start(
            endpoints,
            filter,
            options,
            RETRY_ON_HTTP,
            NodeLocality::default(),
            &json!({}),
        )
        .await
    }

    /// Envoy (one worker) with `filter` in front of `endpoints`, its ingress listener's
    /// `HttpConnectionManager` with `settings` besides ([`set_ingress_settings`]).
    pub async fn start_with_ingress_settings(
        endpoints: Endpoints,
        filter: FilterSetup,
        settings: &Value,
    ) -> Result<Self> {
        Self::start(
            endpoints,
            filter,
            &EnvoyOptions::default(),
            RETRY_ON_HTTP,
            NodeLocality::default(),
            settings,
        )
        .await
    }

    /// Envoy whose node runs in `locality` (`node.locality` of its bootstrap, where Istio
    /// puts the pod's node region and zone), with `filter` in front of `endpoints`.
    pub async fn start_in(
        locality: NodeLocality,
        endpoints: Endpoints,
        filter: FilterSetup,
    ) -> Result<Self> {
        Self::start(
            endpoints,
            filter,
            &EnvoyOptions::default(),
            RETRY_ON_HTTP,
            locality,
            &json!({}),
        )
        .await
    }

    /// [`Proxy::start_with_options`] whose route retries on `retry_on`, its node in
    /// `locality`, its ingress `HttpConnectionManager` with `settings` besides.
    async fn start(
        endpoints: Endpoints,
        filter: FilterSetup,
        options: &EnvoyOptions,
        retry_on: &'static str,
        locality: NodeLocality,
        settings: &Value,
    ) -> Result<Self> {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let started = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bootstrap = Bootstrap {
            node_id: format!("e2e-{}-{started}", std::process::id()),
            endpoints,
            ingress: Some(Ingress {
                service: SERVICE.to_owned(),
                balancing: ClusterBalancing::Fulcrum,
                filter: Some(filter),
                route_timeout_ms: 2000,
                retries: 2,
                retry_on,
                cluster: ClusterOptions::default(),
            }),
            locality,
        };
        let mut bootstrap = bootstrap.to_json();
        set_ingress_settings(&mut bootstrap, settings)?;
        balance_ingress_connections_exactly(&mut bootstrap)?;
        let envoy = Envoy::start_json(&bootstrap, options).await?;
        let listener = envoy.ingress_address().await?;
        let client = Client::new(listener, usize::MAX);
        Ok(Self {
            envoy,
            listener,
            client,
        })
    }

    /// Sends one `GET /` for the service, with extra headers.
    pub async fn send_with(&self, headers: &[(&str, &str)]) -> Reply {
        self.client.send_with(headers).await
    }

    /// Sends one `GET /` for the service with header values as raw bytes, as any client can
    /// (bytes 0x80–0xFF included; a name may repeat). A header the client library itself
    /// refuses to send (control characters) is left out.
    pub async fn send_raw(&self, headers: &[(&str, &[u8])]) -> Reply {
        self.client.send_raw(headers).await
    }

    /// Offers `rate` requests per second for `duration`, spread over `connections` clients
    /// that each send at `rate / connections` per second on a connection of their own (so
    /// Envoy spreads them over its workers). Returns each reply with the time it was sent,
    /// in sending order.
    pub async fn offer_load(
        &self,
        rate: f64,
        connections: usize,
        duration: Duration,
    ) -> Vec<(Instant, Reply)> {
        let interval = Duration::from_secs_f64(connections as f64 / rate);
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for connection in 0..connections {
            let client = Client::new(self.listener, 1);
            tasks.spawn(async move {
                // Staggered, so the clients do not send in lock step.
                let offset = interval.mul_f64(connection as f64 / connections as f64);
                let mut ticks = tokio::time::interval_at((start + offset).into(), interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut replies = Vec::new();
                while start.elapsed() < duration {
                    ticks.tick().await;
                    let sent = Instant::now();
                    replies.push((sent, client.send_with(&[]).await));
                }
                replies
            });
        }
        let mut replies: Vec<(Instant, Reply)> = tasks.join_all().await.concat();
        replies.sort_by_key(|(sent, _)| *sent);
        replies
    }

    /// Connections each Envoy worker accepted on the listener, in worker order
    /// ([`connections_per_worker`]).
    pub async fn connections_per_worker(&self) -> Result<Vec<u64>> {
        connections_per_worker(&self.envoy).await
    }

    /// Sends `n` requests one after another.
    pub async fn send(&self, n: usize) -> Vec<Reply> {
        let mut replies = Vec::with_capacity(n);
        for _ in 0..n {
            replies.push(self.send_with(&[]).await);
        }
        replies
    }

    /// Waits until Envoy knows the service's cluster with exactly `endpoints` as members.
    pub async fn wait_for_endpoints(
        &self,
        endpoints: &[SocketAddr],
        timeout: Duration,
    ) -> Result<()> {
        Ok(self
            .envoy
            .wait_for_endpoints(SERVICE, endpoints, timeout)
            .await?)
    }

    /// The filter's per-endpoint stat `fulcrum_endpoint_<name>` for the service.
    pub async fn endpoint_stat(&self, name: &str, endpoint: SocketAddr) -> Result<u64> {
        let stat =
            format!("wasmcustom.fulcrum_endpoint_{name}.service.{SERVICE}.endpoint.{endpoint}");
        Ok(self.envoy.stat(&stat).await?.unwrap_or(0))
    }

    /// `fulcrum_endpoint_picks_total` for the endpoint, with every pick made so far in it:
    /// each worker's filter counts picks in its VM and hands them to Envoy on its tick (every
    /// second), so this first waits out [`PICKS_FLUSH_WAIT`].
    pub async fn picks(&self, endpoint: SocketAddr) -> Result<u64> {
        tokio::time::sleep(PICKS_FLUSH_WAIT).await;
        self.endpoint_stat("picks_total", endpoint).await
    }
}

impl Client {
    /// A client of `listener` keeping at most `idle_connections` idle connections.
    pub(crate) fn new(listener: SocketAddr, idle_connections: usize) -> Self {
        // Title-Case header names on the wire, as some clients send them.
        let client = reqwest::Client::builder()
            .http1_title_case_headers()
            .resolve(SERVICE, listener)
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(idle_connections)
            .build()
            .expect("a reqwest client with these options builds");
        Self { client, listener }
    }

    /// Sends one `GET /` for the service, with extra headers.
    pub async fn send_with(&self, headers: &[(&str, &str)]) -> Reply {
        let bytes: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(name, value)| (*name, value.as_bytes()))
            .collect();
        self.send_raw(&bytes).await
    }

    /// Sends one `GET /` for the service with header values as raw bytes, as any client can
    /// (bytes 0x80–0xFF included; a name may repeat). A header the client library itself
    /// refuses to send (control characters) is left out.
    pub async fn send_raw(&self, headers: &[(&str, &[u8])]) -> Reply {
        let mut request = self
            .client
            .get(format!("http://{SERVICE}:{}/", self.listener.port()));
        let mut map = reqwest::header::HeaderMap::new();
        for (name, value) in headers {
            if let (Ok(name), Ok(value)) = (
                reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                reqwest::header::HeaderValue::from_bytes(value),
            ) {
                map.append(name, value);
            }
        }
        request = request.headers(map);
        match request.send().await {
            Ok(response) => {
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                Reply {
                    backend: header("x-backend"),
                    status: Some(response.status().as_u16()),
                    explanation: header("x-fulcrum-pick"),
                }
            }
            Err(_) => Reply {
                backend: None,
                status: None,
                explanation: None,
            },
        }
    }
}

/// Gives the ingress listener in `bootstrap` JSON Envoy's exact connection balancer: a new
/// connection goes to the worker with the fewest active ones. Without it the kernel's
/// `SO_REUSEPORT` hash of each connection's ports picks the worker, and a test's 8 connections
/// all land on one of two workers once in 128 runs.
pub fn balance_ingress_connections_exactly(bootstrap: &mut Value) -> Result<()> {
    ingress_listener(bootstrap)?.insert(
        "connection_balance_config".to_owned(),
        json!({"exact_balance": {}}),
    );
    Ok(())
}

/// The ingress listener in `bootstrap` JSON.
fn ingress_listener(bootstrap: &mut Value) -> Result<&mut serde_json::Map<String, Value>> {
    bootstrap["static_resources"]["listeners"]
        .as_array_mut()
        .and_then(|listeners| {
            listeners
                .iter_mut()
                .find(|listener| listener["name"] == INGRESS_LISTENER)
        })
        .and_then(Value::as_object_mut)
        .context("the bootstrap has an ingress listener")
}

/// Sets `settings` (an object: fields of an `HttpConnectionManager`, such as
/// `stream_idle_timeout`) on the ingress listener's connection manager in `bootstrap` JSON.
pub fn set_ingress_settings(bootstrap: &mut Value, settings: &Value) -> Result<()> {
    let Some(settings) = settings.as_object().filter(|settings| !settings.is_empty()) else {
        return Ok(());
    };
    let manager = ingress_listener(bootstrap)?
        .get_mut("filter_chains")
        .and_then(|chains| chains[0]["filters"][0]["typed_config"].as_object_mut())
        .context("the bootstrap's ingress listener has a connection manager")?;
    for (field, value) in settings {
        manager.insert(field.clone(), value.clone());
    }
    Ok(())
}

/// Connections to the service's endpoints that failed to open (Envoy's
/// `cluster.<service>.upstream_cx_connect_fail`): what a dead endpoint costs.
pub async fn connect_failures(envoy: &Envoy) -> Result<u64> {
    Ok(envoy
        .stat(&format!("cluster.{SERVICE}.upstream_cx_connect_fail"))
        .await?
        .unwrap_or(0))
}

/// Connections each of `envoy`'s workers accepted on its listeners
/// (`worker_<i>.downstream_cx_total`), in worker order.
pub async fn connections_per_worker(envoy: &Envoy) -> Result<Vec<u64>> {
    let stats = envoy.admin_get("/stats?filter=downstream_cx_total").await?;
    let mut per_worker: BTreeMap<u32, u64> = BTreeMap::new();
    for line in stats.lines() {
        let Some((name, value)) = line.split_once(": ") else {
            continue;
        };
        let Some(worker) = name
            .strip_prefix("listener.")
            .and_then(|rest| rest.split_once(".worker_"))
            .and_then(|(_, rest)| rest.strip_suffix(".downstream_cx_total"))
            .and_then(|worker| worker.parse().ok())
        else {
            continue;
        };
        *per_worker.entry(worker).or_default() += value.trim().parse::<u64>()?;
    }
    Ok(per_worker.into_values().collect())
}

/// Requests per backend name (`-` for replies without a backend).
pub fn count_by_backend(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for reply in replies {
        *counts
            .entry(reply.backend.clone().unwrap_or_else(|| "-".to_owned()))
            .or_insert(0) += 1;
    }
    counts
}
