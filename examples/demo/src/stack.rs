//! The demo's stack as real processes: sample backends, fulcrum's control plane (static-file
//! source), and Envoy getting its clusters over ADS, on either data plane ([`DataPlane`]):
//! the wasm filter (policy in its config, the `override_host` cluster), or the native module
//! (policy in the control plane's policy file with `data_plane: native`, so the cluster Envoy
//! balances with is the one the control plane generates, with the module as its policy; the
//! outcome filter in the listener).
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

use anyhow::{Context, Result, bail};
use fulcrum_core::NATIVE_MODULE;
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
    pub control_plane: PathBuf,
    pub backend: PathBuf,
}

/// Which data plane balances the demo's service.
#[derive(Debug, Clone)]
pub enum DataPlane {
    /// The proxy-wasm filter (`fulcrum_balancer.wasm`) picks; the cluster honours its header.
    Wasm {
        /// The filter.
        wasm: PathBuf,
    },
    /// The native module (`libfulcrum_native.so`) is the cluster's load-balancing policy.
    Native {
        /// The directory holding the module (`ENVOY_DYNAMIC_MODULES_SEARCH_PATH`).
        module_directory: PathBuf,
    },
}

/// The directory Envoy searches for the native module (`ENVOY_DYNAMIC_MODULES_SEARCH_PATH`):
/// `module`'s, which must name an existing `libfulcrum_native.so` (`--native-module`).
pub fn native_module_directory(module: Option<&Path>) -> Result<PathBuf> {
    let module = module.context(
        "the native data plane needs --native-module PATH (or FULCRUM_NATIVE_MODULE): build the module with `cargo build --release -p fulcrum-native` and pass target/release/libfulcrum_native.so",
    )?;
    let expected = format!("lib{NATIVE_MODULE}.so");
    if module.file_name().and_then(|name| name.to_str()) != Some(expected.as_str()) {
        bail!(
            "--native-module {} must name {expected}: Envoy loads the module by that name",
            module.display()
        );
    }
    if !module.is_file() {
        bail!(
            "--native-module {} does not exist; build it with `cargo build --release -p fulcrum-native`",
            module.display()
        );
    }
    let module = module
        .canonicalize()
        .with_context(|| format!("resolving {}", module.display()))?;
    Ok(module
        .parent()
        .context("the module's directory")?
        .to_path_buf())
}

/// The Envoy stats prefix of the native module's metrics.
const NATIVE_STATS_PREFIX: &str = "dynamicmodulescustom.";

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
    /// Whether the native module balances (else the wasm filter).
    pub native: bool,
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
    /// with `workers` worker threads balancing on `data_plane` under `policy` (one service
    /// policy, docs/policy.md).
    pub async fn start(
        binaries: &Binaries,
        service: &str,
        backends: usize,
        workers: u32,
        data_plane: &DataPlane,
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

        // The native module takes its policy from the cluster the control plane generates,
        // which takes it from the control plane's policy file.
        let mut extra_args = Vec::new();
        if let DataPlane::Native { .. } = data_plane {
            let mut native = policy.clone();
            native["data_plane"] = json!("native");
            let policy_file = log_dir.join("policy.json");
            std::fs::write(
                &policy_file,
                json!({"services": {service: native}}).to_string(),
            )?;
            extra_args.push("--policy-file".to_owned());
            extra_args.push(policy_file.display().to_string());
        }
        let extra_args: Vec<&str> = extra_args.iter().map(String::as_str).collect();
        let ControlPlane {
            process: control_plane,
            xds,
            snapshot_http,
        } = ControlPlane::start(
            &binaries.control_plane,
            "control-plane",
            &static_file,
            &extra_args,
            &log_dir,
        )
        .await?;

        let (balancing, filter, snapshot_http, env) = match data_plane {
            DataPlane::Wasm { wasm } => (
                ClusterBalancing::Fulcrum,
                Some(FilterSetup {
                    wasm: wasm.clone(),
                    config: json!({
                        "control_plane": {"cluster": CONTROL_PLANE_CLUSTER, "poll_interval": "250ms"},
                        // The one cluster this bootstrap patches with override_host.
                        "only_services": [service],
                        "policy": {"default": policy},
                    }),
                    failure_policy: FailurePolicy::default(),
                }),
                Some(snapshot_http),
                Vec::new(),
            ),
            // The cluster comes over ADS (the control plane's); the ingress adds the outcome
            // filter.
            DataPlane::Native { module_directory } => (
                ClusterBalancing::FulcrumNative { policy },
                None,
                None,
                vec![(
                    "ENVOY_DYNAMIC_MODULES_SEARCH_PATH".to_owned(),
                    module_directory.display().to_string(),
                )],
            ),
        };
        let bootstrap = Bootstrap {
            node_id: format!("fulcrum-demo-{}", std::process::id()),
            endpoints: Endpoints::Ads {
                xds,
                api: AdsApi::Sotw,
                snapshot_http,
            },
            ingress: Some(Ingress {
                service: service.to_owned(),
                balancing,
                filter,
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
            env,
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
        if let DataPlane::Native { .. } = data_plane {
            let dump = envoy.config_dump(false).await?.to_string();
            if !dump.contains(NATIVE_MODULE) {
                bail!(
                    "the control plane's cluster for {service} is not balanced by the native module (no {NATIVE_MODULE} in Envoy's config dump); check the policy file in {}",
                    dir.path().display()
                );
            }
        }
        Ok(Self {
            service: service.to_owned(),
            native: matches!(data_plane, DataPlane::Native { .. }),
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

    /// The native module's cluster counters (`fulcrum_native_*_total{cluster}` of the
    /// service's cluster), by name, as Envoy reports them.
    pub async fn native_counters(&self) -> Result<BTreeMap<String, u64>> {
        let text = self
            .envoy
            .admin_get("/stats?filter=fulcrum_native_")
            .await?;
        let suffix = format!(".cluster.{}", self.service);
        let mut values = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(NATIVE_STATS_PREFIX) else {
                continue;
            };
            let Some((name, value)) = rest.rsplit_once(": ") else {
                continue;
            };
            let Some(name) = name.strip_suffix(&suffix) else {
                continue;
            };
            if let Ok(value) = value.trim().parse() {
                values.insert(name.to_owned(), value);
            }
        }
        Ok(values)
    }

    /// An endpoint stat of the data plane, per endpoint: the wasm filter's
    /// `fulcrum_endpoint_<name>` summed over the workers' VMs, or the native module's
    /// `fulcrum_native_endpoint_<name>` (one per proxy: its breakers are shared).
    pub async fn endpoint_stat(&self, name: &str) -> Result<BTreeMap<SocketAddr, i64>> {
        let (filter, prefix) = if self.native {
            let filter = format!("fulcrum_native_endpoint_{name}");
            let prefix = format!(
                "{NATIVE_STATS_PREFIX}{filter}.cluster.{}.endpoint.",
                self.service
            );
            (filter, prefix)
        } else {
            let filter = format!("fulcrum_endpoint_{name}");
            let prefix = format!("wasmcustom.{filter}.service.{}.endpoint.", self.service);
            (filter, prefix)
        };
        let text = self
            .envoy
            .admin_get(&format!("/stats?filter={filter}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_native_data_plane_without_a_module_says_how_to_build_one() {
        let error = native_module_directory(None).unwrap_err().to_string();
        assert!(error.contains("--native-module"), "{error}");
        assert!(
            error.contains("cargo build --release -p fulcrum-native"),
            "{error}"
        );
        let misnamed = native_module_directory(Some(Path::new("/tmp/module.so")))
            .unwrap_err()
            .to_string();
        assert!(misnamed.contains("libfulcrum_native.so"), "{misnamed}");
    }

    #[test]
    fn the_control_planes_address_file_names_both_listeners() {
        let text =
            r#"{"xds": "127.0.0.1:18000", "http": "127.0.0.1:18001", "admin": "127.0.0.1:1"}"#;
        assert_eq!(
            bound_addresses(text),
            Some((
                SocketAddr::from(([127, 0, 0, 1], 18000)),
                SocketAddr::from(([127, 0, 0, 1], 18001))
            ))
        );
        assert_eq!(bound_addresses("{}"), None);
    }
}
