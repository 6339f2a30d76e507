//! Fixtures for fulcrum's end-to-end tests: real Envoy (through `fulcrum-envoy-harness`) with
//! the release filter, in-process sample backends and control plane, and a small client.
//!
//! Every Envoy here runs one worker thread, so per-worker balancing state makes exact,
//! repeatable counts; the filter's behaviour with several workers is covered in the wasmtime
//! host's tests.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fulcrum_demo::envoy_config::{
    Bootstrap, ClusterBalancing, Endpoints, FailurePolicy, FilterSetup,
};
use fulcrum_envoy_harness::{Envoy, EnvoyOptions};
use fulcrum_example_backend::Backend;
use serde_json::{Value, json};

/// The service every test sends its requests to.
pub const SERVICE: &str = "shop";

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

/// `n` in-process backends named `b1`…`bn` on free loopback ports.
pub async fn backends(n: usize) -> Result<Vec<Backend>> {
    let mut started = Vec::new();
    for index in 1..=n {
        started.push(Backend::bind(&format!("b{index}"), 0, 0).await?);
    }
    Ok(started)
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
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"address": a.to_string()}))
        .collect();
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
    let filter_config = json!({
        "control_plane": {"cluster": "fulcrum_control_plane", "poll_interval": "200ms"},
        "policy": {"default": policy},
    });
    Proxy::start_for_test(Endpoints::Ads { xds, snapshot_http }, filter_config).await
}

/// A running Envoy and a client for its listener.
#[derive(Debug)]
pub struct Proxy {
    pub envoy: Envoy,
    pub listener: SocketAddr,
    client: reqwest::Client,
}

/// What one request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `x-backend` of the response; `None` for Envoy's own replies and failures.
    pub backend: Option<String>,
    /// `None` when no response arrived.
    pub status: Option<u16>,
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
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let started = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bootstrap = Bootstrap {
            node_id: format!("e2e-{}-{started}", std::process::id()),
            admin_port: 0,
            // Envoy binds a port of its own choosing; asked back below.
            listener_port: 0,
            service: SERVICE.to_owned(),
            endpoints,
            balancing: ClusterBalancing::Fulcrum,
            filter: Some(filter),
            route_timeout_ms: 2000,
            retries: 2,
        };
        let options = EnvoyOptions {
            concurrency: 1,
            ..EnvoyOptions::default()
        };
        let envoy = Envoy::start_with(&bootstrap.to_json().to_string(), &options).await?;
        let listener = envoy.listener_address("ingress").await?;
        // Title-Case header names on the wire, as some clients send them.
        let client = reqwest::Client::builder()
            .http1_title_case_headers()
            .resolve(SERVICE, listener)
            .timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            envoy,
            listener,
            client,
        })
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
            Ok(response) => Reply {
                backend: response
                    .headers()
                    .get("x-backend")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                status: Some(response.status().as_u16()),
            },
            Err(_) => Reply {
                backend: None,
                status: None,
            },
        }
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
        let deadline = Instant::now() + timeout;
        loop {
            let clusters = self.envoy.admin_get("/clusters").await?;
            let present: Vec<&SocketAddr> = endpoints
                .iter()
                .filter(|a| clusters.contains(&format!("{SERVICE}::{a}::")))
                .collect();
            let members = clusters
                .lines()
                .filter(|l| l.starts_with(&format!("{SERVICE}::")) && l.contains("::cx_active::"))
                .count();
            if present.len() == endpoints.len() && members == endpoints.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy's cluster {SERVICE} did not get exactly {endpoints:?} within {timeout:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The filter's per-endpoint stat `fulcrum_endpoint_<name>` for the service.
    pub async fn endpoint_stat(&self, name: &str, endpoint: SocketAddr) -> Result<u64> {
        let stat =
            format!("wasmcustom.fulcrum_endpoint_{name}.service.{SERVICE}.endpoint.{endpoint}");
        Ok(self.envoy.stat(&stat).await?.unwrap_or(0))
    }
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
