//! The demo's stack as real processes: sample backends, fulcrum's control plane (static-file
//! source), and Envoy with the fulcrum filter getting its clusters over ADS.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use fulcrum_example_backend::Fault;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::process::Command;

use crate::{
    envoy_config::{Bootstrap, ClusterBalancing, Endpoints, FailurePolicy, FilterSetup},
    process::{Process, free_port, loopback, start_envoy, wait_ready},
};

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
            addr: loopback(free_port()?),
            admin: loopback(free_port()?),
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
    pub async fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().await;
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
        let mut process = Process::spawn(&self.name, command, &self.log_dir)?;
        wait_ready(
            &mut process,
            &format!("http://{}/fault", self.admin),
            "latency_ms",
            Duration::from_secs(10),
        )
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
    envoy: Process,
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

        let xds = loopback(free_port()?);
        let snapshot_http = loopback(free_port()?);
        let mut command = Command::new(&binaries.control_plane);
        command.arg("--static-file").arg(&static_file).args([
            "--xds-addr",
            &xds.to_string(),
            "--http-addr",
            &snapshot_http.to_string(),
        ]);
        let mut control_plane = Process::spawn("control-plane", command, &log_dir)?;
        wait_ready(
            &mut control_plane,
            &format!("http://{snapshot_http}/readyz"),
            "",
            Duration::from_secs(20),
        )
        .await?;

        let listener = loopback(free_port()?);
        let admin = loopback(free_port()?);
        let bootstrap = Bootstrap {
            node_id: format!("fulcrum-{}", listener.port()),
            admin_port: admin.port(),
            listener_port: listener.port(),
            service: service.to_owned(),
            endpoints: Endpoints::Ads { xds, snapshot_http },
            balancing: ClusterBalancing::Fulcrum,
            filter: Some(FilterSetup {
                wasm: binaries.wasm.clone(),
                config: json!({
                    "control_plane": {"cluster": "fulcrum_control_plane", "poll_interval": "250ms"},
                    // The one cluster this bootstrap patches with override_host.
                    "only_services": [service],
                    "policy": policy,
                }),
                failure_policy: FailurePolicy::default(),
            }),
            route_timeout_ms: 1000,
            retries: 2,
        };
        let envoy = start_envoy(
            &binaries.envoy,
            "envoy",
            &bootstrap,
            workers,
            "info",
            &log_dir,
        )
        .await?;
        let mut stack = Self {
            service: service.to_owned(),
            backends: started,
            listener,
            admin,
            control_plane,
            envoy,
            dir,
        };
        stack.wait_for_cluster().await?;
        Ok(stack)
    }

    /// Waits until Envoy has the service's cluster with every endpoint (CDS + EDS arrived).
    async fn wait_for_cluster(&mut self) -> Result<()> {
        let expected: Vec<String> = self
            .backends
            .iter()
            .map(|b| format!("{}::{}::", self.service, b.addr))
            .collect();
        let url = format!("http://{}/clusters", self.admin);
        for _ in 0..100 {
            let clusters = reqwest::get(&url).await?.text().await?;
            if expected.iter().all(|line| clusters.contains(line)) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!(
            "Envoy did not receive cluster {} with all endpoints from the control plane",
            self.service
        )
    }

    /// Fails if Envoy or the control plane died.
    pub fn check_running(&mut self) -> Result<()> {
        self.envoy.check_running()?;
        self.control_plane.check_running()
    }

    /// Envoy stats of the filter, summed per endpoint: `fulcrum_endpoint_<name>`.
    pub async fn endpoint_stat(&self, name: &str) -> Result<BTreeMap<SocketAddr, i64>> {
        let prefix = format!(
            "wasmcustom.fulcrum_endpoint_{name}.service.{}.endpoint.",
            self.service
        );
        let url = format!("http://{}/stats?filter=fulcrum_endpoint_{name}", self.admin);
        let text = reqwest::get(&url).await?.text().await?;
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
