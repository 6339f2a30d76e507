//! The demo's stack as real processes: sample backends, fulcrum's control plane (static-file
//! source), and Envoy with the fulcrum filter getting its clusters over ADS.
//!
//! The control plane and Envoy bind port 0 and report what they got (the control plane's
//! `--address-file`, Envoy's admin). A backend must come back on the same port after it is
//! killed (the control plane lists it), so its ports are reserved for the demo's lifetime
//! ([`reserve_port`]): no other process is handed them, the kernel never picks them, and a
//! killed backend's port refuses connections as a dead instance's does. Starting the control
//! plane ([`ControlPlane`]) is shared with `fulcrum-compare`, whose `warm-up` scenario runs one.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use fulcrum_example_backend::Fault;
use fulcrum_test_support::{
    AdsApi, Bootstrap, ClusterBalancing, ClusterOptions, Endpoints, Envoy, EnvoyOptions,
    FailurePolicy, FilterSetup, Ingress, NodeLocality, Process, RETRY_ON_HTTP,
    envoy::CONTROL_PLANE_CLUSTER, loopback, reserve_port,
};
use serde_json::{Value, json};
use tempfile::TempDir;

/// How long a backend may take to serve.
const BACKEND_READY: Duration = Duration::from_secs(10);
/// How long the control plane may take to serve its first snapshot.
const CONTROL_PLANE_READY: Duration = Duration::from_secs(20);
/// How long Envoy may take to receive the service's cluster and endpoints.
const CLUSTER_READY: Duration = Duration::from_secs(10);

/// The programs the stack runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub envoy: PathBuf,
    pub wasm: PathBuf,
    pub control_plane: PathBuf,
    pub backend: PathBuf,
}

/// One sample backend process, which can be killed and restarted on the same ports.
#[derive(Debug)]
pub struct BackendProcess {
    pub name: String,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    process: Option<Process>,
    binary: PathBuf,
    log_dir: PathBuf,
}

impl BackendProcess {
    async fn start(binary: &Path, name: &str, log_dir: &Path) -> Result<Self> {
        let mut backend = Self {
            name: name.to_owned(),
            addr: loopback(reserve_port()?),
            admin: loopback(reserve_port()?),
            process: None,
            binary: binary.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
        };
        backend.restart().await?;
        Ok(backend)
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Kills the process: its ports close, in-flight requests are cut.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the process again on the same ports, healthy.
    pub async fn restart(&mut self) -> Result<()> {
        let mut command = Command::new(&self.binary);
        command.args([
            "--name",
            &self.name,
            "--port",
            &self.addr.port().to_string(),
            "--admin-port",
            &self.admin.port().to_string(),
        ]);
        let log = self.log_dir.join(format!("{}.log", self.name));
        let mut process = Process::spawn(&self.name, &mut command, &log)?;
        let fault = format!("http://{}/fault", self.admin);
        process
            .wait_until_serving(&fault, "latency_ms", BACKEND_READY)
            .await?;
        self.process = Some(process);
        Ok(())
    }

    /// Replaces the backend's fault settings through its admin API.
    pub async fn set_fault(&self, fault: &Fault) -> Result<()> {
        reqwest::Client::new()
            .put(format!("http://{}/fault", self.admin))
            .json(fault)
            .send()
            .await?
            .error_for_status()
            .with_context(|| format!("setting the fault of {}", self.name))?;
        Ok(())
    }
}

/// Everything the demo started; dropping it stops every process.
#[derive(Debug)]
pub struct Stack {
    pub service: String,
    pub backends: Vec<BackendProcess>,
    pub listener: SocketAddr,
    pub admin: SocketAddr,
    control_plane: Process,
    envoy: Envoy,
    /// Holds the logs, the endpoints file and the bootstrap; removed on drop.
    pub dir: TempDir,
}

impl Stack {
    /// Starts `backends` backends, the control plane serving them as `service`, and Envoy
    /// with `workers` worker threads and the filter under `policy`.
    pub async fn start(
        binaries: &Binaries,
        service: &str,
        backends: usize,
        workers: u32,
        policy: Value,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fulcrum-demo-").tempdir()?;
        let log_dir = dir.path().to_path_buf();
        let mut started = Vec::new();
        for index in 1..=backends {
            started.push(
                BackendProcess::start(&binaries.backend, &format!("b{index}"), &log_dir).await?,
            );
        }
        let endpoints: Vec<Value> = started
            .iter()
            .map(|b| json!({"address": b.addr.to_string()}))
            .collect();
        let static_file = log_dir.join("endpoints.yaml");
        std::fs::write(
            &static_file,
            json!({"services": {service: {"endpoints": endpoints}}}).to_string(),
        )?;

        let ControlPlane {
            process: control_plane,
            xds,
            snapshot_http,
        } = ControlPlane::start(
            &binaries.control_plane,
            "control-plane",
            &static_file,
            &[],
            &log_dir,
        )
        .await?;

        let bootstrap = Bootstrap {
            node_id: format!("fulcrum-demo-{}", std::process::id()),
            endpoints: Endpoints::Ads {
                xds,
                api: AdsApi::Sotw,
                snapshot_http: Some(snapshot_http),
            },
            ingress: Some(Ingress {
                service: service.to_owned(),
                balancing: ClusterBalancing::Fulcrum,
                filter: Some(FilterSetup {
                    wasm: binaries.wasm.clone(),
                    config: json!({
                        "control_plane": {"cluster": CONTROL_PLANE_CLUSTER, "poll_interval": "250ms"},
                        // The one cluster this bootstrap patches with override_host.
                        "only_services": [service],
                        "policy": policy,
                    }),
                    failure_policy: FailurePolicy::default(),
                }),
                route_timeout_ms: 1000,
                retries: 2,
                retry_on: RETRY_ON_HTTP,
                cluster: ClusterOptions::default(),
            }),
            locality: NodeLocality::default(),
        };
        let options = EnvoyOptions {
            binary: Some(binaries.envoy.clone()),
            concurrency: workers,
            dir: Some(log_dir.clone()),
            ..EnvoyOptions::default()
        };
        let envoy = Envoy::start_with(&bootstrap, &options).await?;
        let listener = envoy.ingress_address().await?;
        let admin = envoy.admin_address();
        let addresses: Vec<SocketAddr> = started.iter().map(|b| b.addr).collect();
        envoy
            .wait_for_endpoints(service, &addresses, CLUSTER_READY)
            .await
            .context(
                "Envoy did not receive the cluster with all endpoints from the control plane",
            )?;
        Ok(Self {
            service: service.to_owned(),
            backends: started,
            listener,
            admin,
            control_plane,
            envoy,
            dir,
        })
    }

    /// Fails if Envoy or the control plane died.
    pub fn check_running(&mut self) -> Result<()> {
        self.envoy.check_running()?;
        Ok(self.control_plane.check_running()?)
    }

    /// Envoy stats of the filter, summed per endpoint: `fulcrum_endpoint_<name>`.
    pub async fn endpoint_stat(&self, name: &str) -> Result<BTreeMap<SocketAddr, i64>> {
        let prefix = format!(
            "wasmcustom.fulcrum_endpoint_{name}.service.{}.endpoint.",
            self.service
        );
        let text = self
            .envoy
            .admin_get(&format!("/stats?filter=fulcrum_endpoint_{name}"))
            .await?;
        let mut values = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let Some((address, value)) = rest.rsplit_once(": ") else {
                continue;
            };
            if let (Ok(address), Ok(value)) = (address.parse(), value.trim().parse()) {
                values.insert(address, value);
            }
        }
        Ok(values)
    }
}

/// fulcrum's control plane as a child process, on the ports it picked.
#[derive(Debug)]
pub struct ControlPlane {
    /// The process, killed on drop.
    pub process: Process,
    /// Its ADS gRPC server.
    pub xds: SocketAddr,
    /// Its HTTP API (`/v1/snapshot`, which the filters poll).
    pub snapshot_http: SocketAddr,
}

impl ControlPlane {
    /// Starts `binary` as `name` serving the services of `static_file`, with `extra_args` (a
    /// policy file, a faster poll of the static file), every listener on a loopback port of
    /// its choosing; returns once it serves its first snapshot. Its log and address file go to
    /// `log_dir` as `<name>.log` and `<name>.addresses.json`.
    pub async fn start(
        binary: &Path,
        name: &str,
        static_file: &Path,
        extra_args: &[&str],
        log_dir: &Path,
    ) -> Result<Self> {
        let address_file = log_dir.join(format!("{name}.addresses.json"));
        // A file left by an earlier run would name ports nothing serves.
        match std::fs::remove_file(&address_file) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error.into()),
            _ => {}
        }
        let mut command = Command::new(binary);
        command
            .arg("--static-file")
            .arg(static_file)
            .args(["--xds-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .arg("--address-file")
            .arg(&address_file)
            .args(extra_args);
        let mut process = Process::spawn(name, &mut command, &log_dir.join(format!("{name}.log")))?;
        let (xds, snapshot_http) = process
            .wait_for(
                CONTROL_PLANE_READY,
                "the control plane's address file",
                || {
                    let addresses = std::fs::read_to_string(&address_file)
                        .ok()
                        .and_then(|text| bound_addresses(&text));
                    async move { addresses }
                },
            )
            .await?;
        process
            .wait_until_serving(
                &format!("http://{snapshot_http}/readyz"),
                "",
                CONTROL_PLANE_READY,
            )
            .await?;
        Ok(Self {
            process,
            xds,
            snapshot_http,
        })
    }
}

/// The xDS and snapshot HTTP addresses in the control plane's `--address-file`.
fn bound_addresses(text: &str) -> Option<(SocketAddr, SocketAddr)> {
    let addresses: Value = serde_json::from_str(text).ok()?;
    let address = |key: &str| addresses[key].as_str()?.parse().ok();
    Some((address("xds")?, address("http")?))
}
