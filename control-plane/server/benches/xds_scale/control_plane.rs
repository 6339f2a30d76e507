//! The control plane under test: the real `fulcrum-control-plane` binary as a child process
//! (so its CPU time and memory are its own, not the ADS clients'), with the in-memory
//! registry as its only endpoint source, and what `/proc` says about it.
//!
//! The registry pushes: a registration wakes the pipeline at once, so the latency measured
//! downstream is the control plane's (debounce, pipeline, xDS push), not a poll interval.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fulcrum_proto::registry::v1::{self as pb, registry_client::RegistryClient};
use fulcrum_test_support::Process;
use futures::{StreamExt, TryStreamExt, stream};
use tonic::transport::Channel;

/// The registry's bearer token in the bench.
const TOKEN: &str = "xds-scale-bench-token-0123456789";
/// How long the binary may take to bind and become ready.
const START_PATIENCE: Duration = Duration::from_secs(30);
/// Registry connections the initial registrations spread over.
const REGISTER_CONNECTIONS: usize = 16;
/// Registrations in flight at once.
const REGISTER_IN_FLIGHT: usize = 64;
/// A registration's lease: far longer than a run, so no lease expires during one.
const TTL_MS: u32 = 600_000;

/// CPU time and memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// User plus system CPU time since the process started.
    pub cpu: Duration,
    /// Resident set size now (`VmRSS`), in KiB.
    pub rss_kib: u64,
    /// Peak resident set size (`VmHWM`), in KiB.
    pub peak_rss_kib: u64,
}

/// A running control plane; dropping it kills the process.
pub struct ControlPlane {
    process: Process,
    /// Its ADS address.
    pub xds: SocketAddr,
    http: SocketAddr,
    registry: SocketAddr,
    clock_ticks_per_second: u64,
}

impl ControlPlane {
    /// Starts the binary in `dir` (tokens, address file, log) on loopback ports the kernel
    /// picks, with the in-memory registry admitting loopback addresses and up to
    /// `max_instances` registrations, and waits until it is ready (its first, empty
    /// snapshot is built).
    pub async fn start(dir: &Path, debounce_ms: u64, max_instances: usize) -> Result<Self> {
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, format!("bench {TOKEN}\n")).context("writing the token file")?;
        let address_file = dir.join("addresses.json");
        let mut process = Process::spawn(
            "fulcrum-control-plane",
            Command::new(env!("CARGO_BIN_EXE_fulcrum-control-plane"))
                .args(["--xds-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
                .args([
                    "--admin-addr",
                    "127.0.0.1:0",
                    "--registry-addr",
                    "127.0.0.1:0",
                ])
                .args(["--registry", "memory", "--registry-token-file"])
                .arg(&tokens)
                .args(["--registry-allow-addresses", "127.0.0.0/8"])
                .args(["--registry-max-instances", &max_instances.to_string()])
                .args(["--debounce-ms", &debounce_ms.to_string()])
                .arg("--address-file")
                .arg(&address_file),
            &dir.join("control-plane.log"),
        )?;
        let text = process
            .wait_for(START_PATIENCE, "the address file", || {
                let text = std::fs::read_to_string(&address_file).ok();
                async move { text }
            })
            .await?;
        let json: serde_json::Value = serde_json::from_str(&text)?;
        let address = |key: &str| -> Result<SocketAddr> {
            json[key]
                .as_str()
                .and_then(|text| text.parse().ok())
                .with_context(|| format!("no {key} address in {text}"))
        };
        let (xds, http, registry) = (address("xds")?, address("http")?, address("registry")?);
        process
            .wait_until_serving(&format!("http://{http}/readyz"), "", START_PATIENCE)
            .await?;
        Ok(Self {
            process,
            xds,
            http,
            registry,
            clock_ticks_per_second: clock_ticks_per_second(),
        })
    }

    /// The process's CPU time and memory now.
    pub fn usage(&self) -> Result<Usage> {
        let pid = self.process.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name, which ends at the last ')': state is field 3, utime
        // field 14 and stime field 15 (proc(5)).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |index: usize| -> Result<u64> {
            fields
                .get(index)
                .and_then(|field| field.parse().ok())
                .with_context(|| format!("no field {} in /proc/{pid}/stat", index + 3))
        };
        let ticks = ticks(11)? + ticks(12)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |key: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no {key} in /proc/{pid}/status"))
        };
        Ok(Usage {
            cpu: Duration::from_secs_f64(ticks as f64 / self.clock_ticks_per_second as f64),
            rss_kib: kib("VmRSS:")?,
            peak_rss_kib: kib("VmHWM:")?,
        })
    }

    /// A client of the registry's gRPC API on its own connection.
    pub async fn registry_client(&self) -> Result<RegistryClient<Channel>> {
        Ok(RegistryClient::connect(format!("http://{}", self.registry)).await?)
    }

    /// Registers every instance, [`REGISTER_IN_FLIGHT`] at a time over
    /// [`REGISTER_CONNECTIONS`] connections; fails on the first refused registration.
    pub async fn register_all(&self, instances: Vec<pb::Instance>) -> Result<()> {
        let mut clients = Vec::with_capacity(REGISTER_CONNECTIONS);
        for _ in 0..REGISTER_CONNECTIONS {
            clients.push(self.registry_client().await?);
        }
        stream::iter(instances.into_iter().enumerate())
            .map(|(index, instance)| {
                let mut client = clients[index % REGISTER_CONNECTIONS].clone();
                async move { register(&mut client, instance).await }
            })
            .buffer_unordered(REGISTER_IN_FLIGHT)
            .try_collect::<()>()
            .await
    }

    /// Waits until the published snapshot holds `count` endpoints (the
    /// `fulcrum_cluster_endpoints` gauges add up to it), polling `/metrics`.
    pub async fn wait_for_endpoints(&mut self, count: usize, within: Duration) -> Result<()> {
        let url = format!("http://{}/metrics", self.http);
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        let what = format!("{count} endpoints published");
        self.process
            .wait_for(within, &what, || {
                let request = http.get(&url).send();
                async move {
                    let text = request.await.ok()?.text().await.ok()?;
                    (published_endpoints(&text) == count).then_some(())
                }
            })
            .await?;
        Ok(())
    }

    /// SIGTERM, then waits for the process to exit.
    pub async fn stop(mut self) -> Result<()> {
        let started = Instant::now();
        let status = self.process.terminate(Duration::from_secs(15)).await?;
        if !status.success() {
            bail!(
                "the control plane exited with {status} after {:?}",
                started.elapsed()
            );
        }
        Ok(())
    }
}

/// One registration, with the bench's token.
pub async fn register(client: &mut RegistryClient<Channel>, instance: pb::Instance) -> Result<()> {
    let id = instance.id.clone();
    client
        .register(authed(pb::RegisterRequest {
            instance: Some(instance),
        }))
        .await
        .with_context(|| format!("registering {id}"))?;
    Ok(())
}

/// Removes registration `id`, with the bench's token.
pub async fn deregister(client: &mut RegistryClient<Channel>, id: &str) -> Result<()> {
    client
        .deregister(authed(pb::DeregisterRequest { id: id.to_owned() }))
        .await
        .with_context(|| format!("deregistering {id}"))?;
    Ok(())
}

/// Instance `id` of service `service` at `address:port`, living [`TTL_MS`].
pub fn instance(service: &str, id: &str, address: String, port: u32) -> pb::Instance {
    pb::Instance {
        name: service.to_owned(),
        id: id.to_owned(),
        address,
        port,
        ttl_ms: TTL_MS,
        ..pb::Instance::default()
    }
}

fn authed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}")
            .parse()
            .expect("the token is ASCII"),
    );
    request
}

/// The sum of the `fulcrum_cluster_endpoints` gauges in a Prometheus text exposition.
fn published_endpoints(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|line| line.starts_with("fulcrum_cluster_endpoints{"))
        .filter_map(|line| line.rsplit_once(' '))
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum::<f64>() as usize
}

/// `sysconf(_SC_CLK_TCK)` through `getconf`, the unit of `/proc/<pid>/stat`'s CPU times;
/// 100 (Linux's `USER_HZ` everywhere in practice) when `getconf` is missing.
fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}
