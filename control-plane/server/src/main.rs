//! `fulcrum-control-plane`: serves Envoy (ADS: CDS + EDS) and the fulcrum filters (the
//! snapshot HTTP API) from the configured endpoint sources, until SIGTERM or Ctrl-C.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory, Parser, ValueEnum, error::ErrorKind};
use fulcrum_control_plane::telemetry::{Otlp, OtlpConfig, OtlpMetrics};
use fulcrum_control_plane::{
    Config, ControlPlane, ListenerLimits, OptionalSources, PolicySource, ProxyTableLimits,
    RegistryBackendOptions, RegistryOptions, TlsFiles,
};
use fulcrum_kube_source::{KubeOptions, Mapping};
use fulcrum_registry::{
    EtcdConfig, Limits,
    admission::{DEFAULT_MAX_INSTANCES, IpNet, parse_range},
    backend::etcd::{ClientCertFiles, EtcdTls},
};
use fulcrum_xds::ClusterOptions;
use tracing::error;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// fulcrum's control plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// YAML endpoints file (`services: {NAME: {endpoints: [{address: IP:PORT, ...}]}}`),
    /// reloaded when it changes. At least one endpoint source (this, `--kube`, `--registry`)
    /// is required.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["kube", "registry"])]
    static_file: Option<PathBuf>,
    /// Address of the ADS gRPC server.
    #[arg(long, default_value = "127.0.0.1:18000")]
    xds_addr: SocketAddr,
    /// Address of the HTTP API (snapshot, health, metrics, status).
    #[arg(long, default_value = "127.0.0.1:18080")]
    http_addr: SocketAddr,
    /// Address of the admin API (policy rollback and history): loopback unless
    /// `--admin-token-file` is given, since it changes what every proxy runs.
    #[arg(long, default_value = "127.0.0.1:18081")]
    admin_addr: SocketAddr,
    /// Bearer tokens the admin API requires: one per line, `IDENTITY TOKEN` or `TOKEN` (at
    /// least 16 characters); `#` starts a comment. Required when `--admin-addr` is not
    /// loopback.
    #[arg(long, value_name = "PATH")]
    admin_token_file: Option<PathBuf>,
    /// The largest snapshot published, in bytes of JSON. Keep it below the filters'
    /// `control_plane.max_snapshot_bytes` (32 MiB by default): a larger snapshot is refused,
    /// Envoy and the filters keep the last good one, `fulcrum_snapshot_over_budget` is 1.
    #[arg(long, default_value_t = fulcrum_pipeline::DEFAULT_SNAPSHOT_BUDGET)]
    snapshot_budget_bytes: usize,
    /// Deadline of an HTTP request, in milliseconds (the registry's watch adds its wait).
    #[arg(long, default_value_t = 10_000)]
    http_request_timeout_ms: u64,
    /// HTTP requests served at once per listener; more get 503 at once. The registry's
    /// watch long polls get a quarter of this on top, of their own; probes take none.
    #[arg(long, default_value_t = 1024)]
    http_max_in_flight: usize,
    /// Largest HTTP request body, in bytes; also the registry's largest gRPC message.
    #[arg(long, default_value_t = 64 << 10)]
    http_max_body_bytes: usize,
    /// Bytes of answers held at once while they are sent, per listener: each its own bytes
    /// (none for the snapshot, whose answers share one copy) plus 4 KiB; an answer beyond
    /// gets 503. Clients that stop reading cannot pile up answers.
    #[arg(long, default_value_t = 64 << 20)]
    http_max_answer_bytes: usize,
    /// HTTP connections one listener holds at once; one more is closed as it is accepted.
    #[arg(long, default_value_t = 8192)]
    http_max_connections: usize,
    /// How long an HTTP/1 request's head may take to arrive, in milliseconds; also how long
    /// an HTTP/1 keep-alive connection may sit idle between requests.
    #[arg(long, default_value_t = 10_000)]
    http_header_read_timeout_ms: u64,
    /// How long an HTTP connection may wait on its peer with no byte moving either way (a
    /// client that stopped reading, a body that stopped coming), in milliseconds. Keep it
    /// above the request deadline plus a long poll's wait (60 s).
    #[arg(long, default_value_t = 120_000)]
    http_idle_timeout_ms: u64,
    /// Concurrent streams on one HTTP/2 connection to the HTTP listeners.
    #[arg(long, default_value_t = 64)]
    http2_max_streams_per_connection: u32,
    /// xDS streams served at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = fulcrum_xds::DEFAULT_MAX_STREAMS)]
    xds_max_streams: usize,
    /// Concurrent gRPC streams per HTTP/2 connection (xDS and the registry).
    #[arg(long, default_value_t = 64)]
    grpc_max_streams_per_connection: u32,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    grpc_max_message_bytes: usize,
    /// Once every listener is bound, write their addresses here as JSON
    /// (`{"xds": "IP:PORT", "http": "IP:PORT", "admin": "IP:PORT", "registry": "IP:PORT" | null}`), replacing the
    /// file atomically. With port 0 in `--xds-addr` and the like, this is how a supervisor or a
    /// test learns the ports the kernel chose, without racing for a "free" port.
    #[arg(long, value_name = "PATH")]
    address_file: Option<PathBuf>,
    /// Export the control plane's spans (one trace per change, from the source to every
    /// Envoy's ACK) to this OTLP/gRPC collector, e.g. `http://otel-collector:4317`. Default:
    /// `$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `$OTEL_EXPORTER_OTLP_ENDPOINT`; unset: off.
    /// `$OTEL_SERVICE_NAME` names the service (default `fulcrum-control-plane`).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Log filter (`info`, `debug`, `fulcrum_xds=debug,info`, ...); `RUST_LOG` overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Quiet period folding bursts of source updates into one push, in milliseconds.
    #[arg(long, default_value_t = 50)]
    debounce_ms: u64,
    /// How often the static file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_interval_ms: u64,
    /// Also take endpoints from Kubernetes EndpointSlices (one cluster per Service port,
    /// named `outbound|PORT||SVC.NS.svc.DOMAIN`), with the in-cluster or kubeconfig client.
    #[arg(long, alias = "kubernetes")]
    kube: bool,
    /// Namespace to watch (repeatable); none watches every namespace.
    #[arg(long, value_name = "NS", requires = "kube")]
    kube_namespace: Vec<String>,
    /// Label selector for the watched Services and EndpointSlices (`app=web,tier!=batch`).
    #[arg(long, value_name = "SELECTOR", requires = "kube")]
    kube_label_selector: Option<String>,
    /// The cluster's DNS domain, in cluster names.
    #[arg(long, default_value = "cluster.local", requires = "kube")]
    cluster_domain: String,
    /// Pod labels copied into the metadata of the pod's endpoints, so a policy's
    /// `endpoint_selector.metadata` can select subsets (comma-separated; an empty value watches
    /// no pods). Needs list/watch on pods.
    #[arg(
        long,
        value_name = "KEYS",
        value_delimiter = ',',
        default_value = "version,app.kubernetes.io/version",
        requires = "kube"
    )]
    kube_pod_labels: Vec<String>,
    /// Watch Nodes for their `topology.kubernetes.io/region` label, which becomes the region
    /// (metadata `topology.kubernetes.io/region`) of the endpoints on them, for region
    /// locality. Needs list/watch on nodes; without it endpoints are published with no region.
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        action = clap::ArgAction::Set,
        requires = "kube"
    )]
    kube_node_regions: bool,
    /// Balancing policy file (YAML, or JSON for `*.json`), reloaded when it changes.
    #[arg(long, value_name = "PATH", conflicts_with = "policy_configmap")]
    policy_file: Option<PathBuf>,
    /// Balancing policy from a ConfigMap key, watched: `NAMESPACE/NAME[:KEY]`, the key
    /// `policy.yaml` unless given.
    #[arg(long, value_name = "NS/NAME[:KEY]", value_parser = parse_configmap)]
    policy_configmap: Option<PolicySource>,
    /// Serve TLS on every listener (HTTP, admin, xDS, registry gRPC) with this PEM certificate
    /// chain; reloaded every 10 s, so a rotated Secret takes effect without a restart.
    #[arg(long, value_name = "PATH", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// The PEM private key of `--tls-cert-file`.
    #[arg(long, value_name = "PATH", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// This replica's name, sent with every snapshot so each filter follows one replica at a
    /// time; unique per replica. Default: `$POD_NAME`, else `$HOSTNAME`, else a random name.
    #[arg(long, value_name = "NAME")]
    replica_name: Option<String>,
    /// The ConfigMap (in the policy ConfigMap's namespace) where the accepted policy, its
    /// history and rollbacks are recorded for every replica and restart; the control plane
    /// creates and updates it. Default: the policy ConfigMap's name with `-accepted`.
    #[arg(long, value_name = "NAME", requires = "policy_configmap")]
    policy_status_configmap: Option<String>,
    /// Run the self-registration registry with this backend: its REST API on `--http-addr`
    /// (`/v1/registry/...`), its gRPC API on `--registry-addr`, its instances merged into the
    /// snapshot. Requires `--registry-token-file`.
    #[arg(
        long,
        value_enum,
        value_name = "BACKEND",
        requires = "registry_token_file"
    )]
    registry: Option<RegistryBackendArg>,
    /// etcd client URLs of the `etcd` backend, comma-separated (`http://10.0.0.1:2379,...`).
    #[arg(
        long,
        value_name = "URL,...",
        value_delimiter = ',',
        required_if_eq("registry", "etcd")
    )]
    etcd_endpoints: Vec<String>,
    /// Key prefix of the registrations in etcd; a trailing `/` is added when missing.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "/fulcrum/registry/instances/",
        requires = "etcd_endpoints"
    )]
    etcd_prefix: String,
    /// PEM bundle of the CAs that signed the etcd members' certificates; implies TLS
    /// (`https://` endpoints). Without it, `https://` endpoints are verified against the
    /// system's roots.
    #[arg(long, value_name = "PATH", requires = "etcd_endpoints")]
    etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate for etcd members started with `--client-cert-auth`; implies
    /// TLS. Requires `--etcd-key-file`.
    #[arg(
        long,
        value_name = "PATH",
        requires_all = ["etcd_endpoints", "etcd_key_file"]
    )]
    etcd_cert_file: Option<PathBuf>,
    /// PEM private key of `--etcd-cert-file` (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PATH", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
    /// The name the etcd members' certificates must hold, instead of each endpoint's host
    /// (for endpoints given as IPs); implies TLS.
    #[arg(long, value_name = "NAME", requires = "etcd_endpoints")]
    etcd_server_name: Option<String>,
    /// The registry's bearer tokens: one per line, `IDENTITY TOKEN` or `TOKEN` (at least 16
    /// characters), then optionally what the identity may register: `services=PATTERN,...`
    /// (`shop-*`, `cart`), `addresses=CIDR,...`, `max=N` live registrations; `#` starts a
    /// comment.
    #[arg(long, value_name = "PATH", requires = "registry")]
    registry_token_file: Option<PathBuf>,
    /// Address ranges whose loopback, link-local or cloud metadata addresses the registry
    /// admits anyway (refused by default: they reach the proxy's or the node's own services),
    /// comma-separated CIDRs or addresses, e.g. `127.0.0.0/8` for instances on this host.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', value_parser = parse_range, requires = "registry")]
    registry_allow_addresses: Vec<IpNet>,
    /// Live registrations the registry holds at most; more are refused (429 /
    /// RESOURCE_EXHAUSTED). Every filter loads every registration: at the default, the largest
    /// registrations make a snapshot of about 22 MiB, under the filters' 32 MiB cap.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_INSTANCES, requires = "registry")]
    registry_max_instances: usize,
    /// Most proxies `GET /v1/proxies` lists (one per Envoy node id whose filter polls this
    /// replica); a new one beyond evicts the least recently seen
    /// (`fulcrum_proxies_evicted_total`).
    #[arg(long, value_name = "N", default_value_t = fulcrum_control_plane::proxies::DEFAULT_MAX_PROXIES)]
    max_proxies: usize,
    /// A proxy whose filter has not polled for this long reads `stale`, in milliseconds.
    /// Default: three times the filter's default `control_plane.poll_interval` (500ms); raise
    /// it with the filters' poll interval.
    #[arg(long, value_name = "MS", default_value_t = 1_500)]
    proxy_stale_after_ms: u64,
    /// A proxy whose filter has not polled for this long is no longer listed, in
    /// milliseconds; longer than `--proxy-stale-after-ms`.
    #[arg(long, value_name = "MS", default_value_t = 600_000)]
    proxy_expire_after_ms: u64,
    /// Address of the registry's gRPC API (`fulcrum.registry.v1.Registry`).
    #[arg(long, default_value = "127.0.0.1:18001", requires = "registry")]
    registry_addr: SocketAddr,
}

/// `--registry` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RegistryBackendArg {
    /// In this process: nothing survives a restart, replicas do not share registrations.
    Memory,
    /// In etcd (`--etcd-endpoints`), shared by every replica.
    Etcd,
}

impl Cli {
    /// The registry's options, or a usage error for flags that do not fit together.
    fn registry(&self) -> Result<Option<RegistryOptions>, clap::Error> {
        let Some(backend) = self.registry else {
            return Ok(None);
        };
        let backend = match backend {
            RegistryBackendArg::Memory if !self.etcd_endpoints.is_empty() => {
                return Err(Cli::command().error(
                    ErrorKind::ArgumentConflict,
                    "--etcd-endpoints is for `--registry etcd`; drop it or switch the backend",
                ));
            }
            RegistryBackendArg::Memory => RegistryBackendOptions::Memory,
            RegistryBackendArg::Etcd => {
                let mut config = EtcdConfig::new(self.etcd_endpoints.clone());
                config.prefix = if self.etcd_prefix.ends_with('/') {
                    self.etcd_prefix.clone()
                } else {
                    format!("{}/", self.etcd_prefix)
                };
                config.tls = self.etcd_tls();
                RegistryBackendOptions::Etcd(config)
            }
        };
        let Some(token_file) = self.registry_token_file.clone() else {
            return Err(Cli::command().error(
                ErrorKind::MissingRequiredArgument,
                "--registry needs --registry-token-file",
            ));
        };
        Ok(Some(RegistryOptions {
            backend,
            token_file,
            limits: Limits {
                max_instances: self.registry_max_instances,
                ..Limits::allowing(self.registry_allow_addresses.clone())
            },
            grpc_address: self.registry_addr,
        }))
    }

    /// The TLS settings for etcd when any TLS flag is given; `None` leaves TLS to the
    /// endpoints' scheme (`https://` verified against the system's roots).
    fn etcd_tls(&self) -> Option<EtcdTls> {
        let client_cert = match (&self.etcd_cert_file, &self.etcd_key_file) {
            (Some(cert_file), Some(key_file)) => Some(ClientCertFiles {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            }),
            // clap requires both or neither.
            _ => None,
        };
        let tls = EtcdTls {
            ca_file: self.etcd_ca_file.clone(),
            client_cert,
            server_name: self.etcd_server_name.clone(),
        };
        (tls != EtcdTls::default()).then_some(tls)
    }
}

/// Parses `NAMESPACE/NAME[:KEY]`.
fn parse_configmap(text: &str) -> Result<PolicySource, String> {
    let (reference, key) = text.split_once(':').unwrap_or((text, "policy.yaml"));
    match reference.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !key.is_empty() => {
            Ok(PolicySource::ConfigMap {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                key: key.to_owned(),
                status: format!("{name}-accepted"),
            })
        }
        _ => Err(format!(
            "expected NAMESPACE/NAME[:KEY], e.g. fulcrum-system/fulcrum-policy:policy.yaml; got `{text}`"
        )),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let registry = cli.registry().unwrap_or_else(|error| error.exit());
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let replica = cli
        .replica_name
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(fulcrum_control_plane::unique_replica_name);
    let otlp = match OtlpConfig::resolve(cli.otlp_endpoint.as_deref(), &replica, |name| {
        std::env::var(name).ok()
    })
    .map(|config| Otlp::start(&config, OtlpMetrics::global().clone()))
    .transpose()
    {
        Ok(otlp) => otlp,
        Err(error) => {
            eprintln!(
                "fulcrum-control-plane: {error}: {}",
                std::error::Error::source(&error)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_filter(filter))
        .with(otlp.as_ref().map(Otlp::layer))
        .init();
    let address_file = cli.address_file.clone();
    let config = Config {
        static_file: cli.static_file,
        poll_interval: Duration::from_millis(cli.poll_interval_ms),
        xds_address: cli.xds_addr,
        http_address: cli.http_addr,
        debounce: Duration::from_millis(cli.debounce_ms),
        cluster_options: ClusterOptions::default(),
        admin_address: cli.admin_addr,
        admin_token_file: cli.admin_token_file,
        tls: cli
            .tls_cert_file
            .zip(cli.tls_key_file)
            .map(|(cert, key)| TlsFiles { cert, key }),
        replica,
        snapshot_budget_bytes: cli.snapshot_budget_bytes,
        proxies: ProxyTableLimits {
            max_proxies: cli.max_proxies,
            stale_after: Duration::from_millis(cli.proxy_stale_after_ms),
            expire_after: Duration::from_millis(cli.proxy_expire_after_ms),
        },
        limits: ListenerLimits {
            http_request_timeout: Duration::from_millis(cli.http_request_timeout_ms),
            http_max_in_flight: cli.http_max_in_flight,
            http_max_body_bytes: cli.http_max_body_bytes,
            http_max_answer_bytes: cli.http_max_answer_bytes,
            http_max_connections: cli.http_max_connections,
            http_header_read_timeout: Duration::from_millis(cli.http_header_read_timeout_ms),
            http_idle_timeout: Duration::from_millis(cli.http_idle_timeout_ms),
            http2_max_streams_per_connection: cli.http2_max_streams_per_connection,
            xds_max_streams: cli.xds_max_streams,
            grpc_max_streams_per_connection: cli.grpc_max_streams_per_connection,
            grpc_max_message_bytes: cli.grpc_max_message_bytes,
        },
    };
    let optional = OptionalSources {
        kubernetes: cli.kube.then(|| KubeOptions {
            namespaces: cli.kube_namespace,
            label_selector: cli.kube_label_selector,
            mapping: Mapping {
                cluster_domain: cli.cluster_domain,
                pod_labels: cli
                    .kube_pod_labels
                    .into_iter()
                    .map(|key| key.trim().to_owned())
                    .filter(|key| !key.is_empty())
                    .collect(),
                node_regions: cli.kube_node_regions,
                ..Mapping::default()
            },
        }),
        policy: cli.policy_file.map(PolicySource::File).or_else(|| {
            cli.policy_configmap.map(|mut source| {
                if let (PolicySource::ConfigMap { status, .. }, Some(named)) =
                    (&mut source, cli.policy_status_configmap)
                {
                    *status = named;
                }
                source
            })
        }),
        registry,
        kube_client: None,
    };
    let control_plane = match ControlPlane::start_with(config, optional).await {
        Ok(control_plane) => control_plane,
        Err(error) => {
            error!(error = format!("{error:#}"), "cannot start");
            stop_export(otlp).await;
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = address_file
        && let Err(error) = write_address_file(&path, &control_plane)
    {
        error!(
            path = %path.display(),
            %error,
            "cannot write the address file"
        );
        control_plane.shutdown().await;
        stop_export(otlp).await;
        return ExitCode::FAILURE;
    }
    shutdown_signal().await;
    control_plane.shutdown().await;
    stop_export(otlp).await;
    ExitCode::SUCCESS
}

/// Flushes the spans still queued for the collector, if spans are exported.
async fn stop_export(otlp: Option<Otlp>) {
    if let Some(otlp) = otlp {
        otlp.shutdown().await;
    }
}

/// Writes the bound addresses as JSON to a temporary file beside `path`, then renames it, so
/// a reader never sees half a file.
fn write_address_file(path: &std::path::Path, control_plane: &ControlPlane) -> std::io::Result<()> {
    let addresses = serde_json::json!({
        "xds": control_plane.xds_address().to_string(),
        "http": control_plane.http_address().to_string(),
        "admin": control_plane.admin_address().to_string(),
        "registry": control_plane.registry_address().map(|address| address.to_string()),
    });
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, addresses.to_string())?;
    std::fs::rename(&partial, path)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                error!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the process");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ETCD: [&str; 7] = [
        "fulcrum-control-plane",
        "--registry",
        "etcd",
        "--registry-token-file",
        "tokens",
        "--etcd-endpoints",
        "https://10.0.0.1:2379,https://10.0.0.2:2379",
    ];

    fn etcd_config(extra: &[&str]) -> Result<EtcdConfig, clap::Error> {
        let cli = Cli::try_parse_from(ETCD.iter().chain(extra))?;
        match cli.registry()?.map(|registry| registry.backend) {
            Some(RegistryBackendOptions::Etcd(config)) => Ok(config),
            other => panic!("expected the etcd backend, got {other:?}"),
        }
    }

    #[test]
    fn registry_admission_flags_make_the_limits() {
        let limits = |extra: &[&str]| {
            let cli = Cli::try_parse_from(ETCD.iter().chain(extra))?;
            Ok::<_, clap::Error>(cli.registry()?.map(|registry| registry.limits))
        };
        assert_eq!(limits(&[]).expect("valid"), Some(Limits::default()));
        let allowed = limits(&[
            "--registry-allow-addresses",
            "127.0.0.0/8,::1",
            "--registry-max-instances",
            "500",
        ])
        .expect("valid");
        assert_eq!(
            allowed,
            Some(Limits {
                max_instances: 500,
                ..Limits::allowing(vec![
                    "127.0.0.0/8".parse().expect("net"),
                    "::1/128".parse().expect("net")
                ])
            })
        );
        let error = limits(&["--registry-allow-addresses", "localhost"]).expect_err("not a range");
        assert!(error.to_string().contains("CIDR"), "{error}");
    }

    #[test]
    fn etcd_tls_flags_make_the_tls_settings() {
        let config = etcd_config(&[
            "--etcd-ca-file",
            "/etc/etcd-tls/ca.crt",
            "--etcd-cert-file",
            "/etc/etcd-tls/tls.crt",
            "--etcd-key-file",
            "/etc/etcd-tls/tls.key",
            "--etcd-server-name",
            "etcd.etcd.svc",
        ])
        .expect("valid flags");
        assert_eq!(
            config.tls,
            Some(EtcdTls {
                ca_file: Some("/etc/etcd-tls/ca.crt".into()),
                client_cert: Some(ClientCertFiles {
                    cert_file: "/etc/etcd-tls/tls.crt".into(),
                    key_file: "/etc/etcd-tls/tls.key".into(),
                }),
                server_name: Some("etcd.etcd.svc".into()),
            })
        );
        let ca_only = etcd_config(&["--etcd-ca-file", "ca.crt"]).expect("valid flags");
        assert_eq!(
            ca_only.tls,
            Some(EtcdTls {
                ca_file: Some("ca.crt".into()),
                ..EtcdTls::default()
            })
        );
    }

    #[test]
    fn without_tls_flags_tls_follows_the_endpoints_scheme() {
        let config = etcd_config(&[]).expect("valid flags");
        assert_eq!(config.tls, None);
        assert_eq!(
            config.endpoints,
            ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        );
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_tls_flags_need_etcd() {
        let error = etcd_config(&["--etcd-cert-file", "tls.crt"]).expect_err("no key");
        assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument);
        assert!(error.to_string().contains("--etcd-key-file"), "{error}");
        let error = etcd_config(&["--etcd-key-file", "tls.key"]).expect_err("no certificate");
        assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument);
        assert!(error.to_string().contains("--etcd-cert-file"), "{error}");
        let error = Cli::try_parse_from([
            "fulcrum-control-plane",
            "--registry",
            "memory",
            "--registry-token-file",
            "tokens",
            "--etcd-ca-file",
            "ca.crt",
        ])
        .expect_err("TLS to etcd without etcd");
        assert!(error.to_string().contains("--etcd-endpoints"), "{error}");
    }
}
