//! Shared fixtures: an in-process control plane over a temporary endpoints file, and an
//! Envoy bootstrapped with ADS to it.

use std::{path::PathBuf, time::Duration};

use fulcrum_control_plane::{Config, ControlPlane};
use fulcrum_test_support::{AdsApi, Bootstrap, ClusterHost, Envoy, eventually};
use fulcrum_xds::ClusterOptions;
use serde_json::Value;

/// How long any eventually-consistent expectation may take.
pub const PATIENCE: Duration = Duration::from_secs(15);
/// File poll interval used by the tests (the binary's default is 500 ms).
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Debounce used by the tests (the binary's default is 50 ms).
pub const DEBOUNCE: Duration = Duration::from_millis(10);

/// A control plane configuration for tests: any free loopback ports, fast polling and debounce.
pub fn loopback_config(static_file: Option<PathBuf>) -> Config {
    Config {
        static_file,
        poll_interval: POLL_INTERVAL,
        xds_address: "127.0.0.1:0".parse().expect("address"),
        http_address: "127.0.0.1:0".parse().expect("address"),
        debounce: DEBOUNCE,
        cluster_options: ClusterOptions::default(),
        ..Config::default()
    }
}

/// An HTTP client that ignores proxy settings from the environment (every call is loopback).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// One endpoint line of the YAML file.
pub fn endpoint(address: &str, extra: &str) -> String {
    format!("      - {{ address: \"{address}\"{extra} }}\n")
}

/// A YAML endpoints file from (service, endpoint lines).
pub fn endpoints_file(services: &[(&str, Vec<String>)]) -> String {
    let mut yaml = String::from("services:\n");
    for (name, endpoints) in services {
        yaml.push_str(&format!("  {name}:\n    endpoints:\n"));
        if endpoints.is_empty() {
            yaml.push_str("      []\n");
        }
        for line in endpoints {
            yaml.push_str(line);
        }
    }
    yaml
}

/// A control plane serving a temporary endpoints file.
pub struct Fixture {
    pub control_plane: ControlPlane,
    pub file: PathBuf,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Fixture {
    pub async fn start(initial_yaml: &str) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            ))
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("endpoints.yaml");
        std::fs::write(&file, initial_yaml).expect("write endpoints file");
        let control_plane = ControlPlane::start(loopback_config(Some(file.clone())))
            .await
            .expect("control plane starts");
        let http = http_client();
        Self {
            control_plane,
            file,
            http,
            _dir: dir,
        }
    }

    /// Replaces the endpoints file atomically (write then rename), as a deploy tool would.
    pub fn write(&self, yaml: &str) {
        let staging = self.file.with_extension("yaml.tmp");
        std::fs::write(&staging, yaml).expect("write staging file");
        std::fs::rename(&staging, &self.file).expect("rename into place");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.control_plane.http_address())
    }

    pub async fn get_json(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json")
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("body")
    }

    /// The current snapshot version once the control plane has one.
    pub async fn snapshot_version(&self) -> String {
        eventually(PATIENCE, "a snapshot version", || async {
            self.get_json("/v1/status").await["snapshot_version"]
                .as_str()
                .map(str::to_owned)
        })
        .await
        .expect("a snapshot is built")
    }

    /// Writes `yaml` and waits for the version after `previous`.
    pub async fn next_version(&self, yaml: &str, previous: &str) -> String {
        self.write(yaml);
        eventually(PATIENCE, "a new snapshot version", || async {
            let version = self.snapshot_version().await;
            (version != previous).then_some(version)
        })
        .await
        .expect("a changed file yields a new version")
    }

    /// Starts an Envoy taking CDS/EDS from this control plane.
    pub async fn envoy(&self, node_id: &str, api: AdsApi) -> Envoy {
        let bootstrap = Bootstrap::ads(node_id, self.control_plane.xds_address(), api);
        Envoy::start(&bootstrap).await.expect("Envoy starts")
    }
}

/// The hosts Envoy holds for `cluster`, sorted by address (empty if it has no such cluster).
pub async fn hosts(envoy: &Envoy, cluster: &str) -> Vec<ClusterHost> {
    let mut hosts = envoy
        .cluster_hosts()
        .await
        .expect("admin /clusters")
        .remove(cluster)
        .unwrap_or_default();
    hosts.sort_by(|a, b| a.address.cmp(&b.address));
    hosts
}

/// Waits until `envoy`'s hosts of `cluster` satisfy `expected`, returning them.
pub async fn wait_for_hosts(
    envoy: &Envoy,
    cluster: &str,
    what: &str,
    expected: impl Fn(&[ClusterHost]) -> bool,
) -> Vec<ClusterHost> {
    match eventually(PATIENCE, what, || async {
        let hosts = hosts(envoy, cluster).await;
        expected(&hosts).then_some(hosts)
    })
    .await
    {
        Ok(hosts) => hosts,
        Err(_) => panic!(
            "Envoy never showed {what} for {cluster}; it has {:?}",
            hosts(envoy, cluster).await
        ),
    }
}

/// Addresses of `hosts`.
pub fn addresses(hosts: &[ClusterHost]) -> Vec<&str> {
    hosts.iter().map(|host| host.address.as_str()).collect()
}

/// The `/v1/status` entry of the stream of `node_id`.
pub async fn stream_status(fixture: &Fixture, node_id: &str) -> Option<Value> {
    let status = fixture.get_json("/v1/status").await;
    status["streams"]
        .as_array()?
        .iter()
        .find(|stream| stream["node_id"] == node_id)
        .cloned()
}

/// The first config_dump entry of `type_suffix` (e.g. `ClustersConfigDump`).
pub fn dump_section<'a>(dump: &'a Value, type_suffix: &str) -> &'a Value {
    dump["configs"]
        .as_array()
        .and_then(|configs| {
            configs.iter().find(|config| {
                config["@type"]
                    .as_str()
                    .is_some_and(|ty| ty.ends_with(type_suffix))
            })
        })
        .unwrap_or_else(|| panic!("config_dump has no {type_suffix}"))
}

/// The `explicit_http_config` Envoy holds for cluster `name`, if it holds the cluster.
async fn explicit_http_config(envoy: &Envoy, name: &str) -> Option<Value> {
    let dump = envoy.config_dump(false).await.ok()?;
    let clusters = dump_section(&dump, "ClustersConfigDump")["dynamic_active_clusters"]
        .as_array()?
        .clone();
    let cluster = clusters.iter().find(|c| c["cluster"]["name"] == name)?;
    Some(
        cluster["cluster"]["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
            .clone(),
    )
}

/// Waits until Envoy's cluster `name` speaks `protocol` (`http2_protocol_options` or
/// `http_protocol_options`).
pub async fn wait_for_protocol(envoy: &Envoy, name: &str, protocol: &str) {
    let waited = eventually(PATIENCE, &format!("{name} with {protocol}"), || async {
        let config = explicit_http_config(envoy, name).await?;
        config.get(protocol).map(|_| ())
    })
    .await;
    if let Err(error) = waited {
        let dump = envoy.config_dump(false).await.unwrap_or_default();
        panic!(
            "Envoy's cluster {name} never had {protocol}: {error}; clusters: {:#}",
            dump_section(&dump, "ClustersConfigDump")
        );
    }
}
