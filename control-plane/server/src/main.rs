//! `fulcrum-control-plane`: serves Envoy (ADS: CDS + EDS) and the fulcrum filters (the
//! snapshot HTTP API) from the configured endpoint sources, until SIGTERM or Ctrl-C.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory, Parser, ValueEnum, error::ErrorKind};
use fulcrum_control_plane::{
    Config, ControlPlane, OptionalSources, PolicySource, RegistryBackendOptions, RegistryOptions,
};
use fulcrum_kube_source::{KubeOptions, Mapping};
use fulcrum_registry::EtcdConfig;
use fulcrum_xds::ClusterOptions;
use tracing::error;
use tracing_subscriber::EnvFilter;

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
    /// Balancing policy file (YAML, or JSON for `*.json`), reloaded when it changes.
    #[arg(long, value_name = "PATH", conflicts_with = "policy_configmap")]
    policy_file: Option<PathBuf>,
    /// Balancing policy from a ConfigMap key, watched: `NAMESPACE/NAME[:KEY]`, the key
    /// `policy.yaml` unless given.
    #[arg(long, value_name = "NS/NAME[:KEY]", value_parser = parse_configmap)]
    policy_configmap: Option<PolicySource>,
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
    /// The registry's bearer tokens: one per line, `IDENTITY TOKEN` or `TOKEN` (at least 16
    /// characters); `#` starts a comment.
    #[arg(long, value_name = "PATH", requires = "registry")]
    registry_token_file: Option<PathBuf>,
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
            grpc_address: self.registry_addr,
        }))
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
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let config = Config {
        static_file: cli.static_file,
        poll_interval: Duration::from_millis(cli.poll_interval_ms),
        xds_address: cli.xds_addr,
        http_address: cli.http_addr,
        debounce: Duration::from_millis(cli.debounce_ms),
        cluster_options: ClusterOptions::default(),
    };
    let optional = OptionalSources {
        kubernetes: cli.kube.then(|| KubeOptions {
            namespaces: cli.kube_namespace,
            label_selector: cli.kube_label_selector,
            mapping: Mapping {
                cluster_domain: cli.cluster_domain,
                ..Mapping::default()
            },
        }),
        policy: cli
            .policy_file
            .map(PolicySource::File)
            .or(cli.policy_configmap),
        registry,
        kube_client: None,
    };
    let control_plane = match ControlPlane::start_with(config, optional).await {
        Ok(control_plane) => control_plane,
        Err(error) => {
            error!(error = format!("{error:#}"), "cannot start");
            return ExitCode::FAILURE;
        }
    };
    shutdown_signal().await;
    control_plane.shutdown().await;
    ExitCode::SUCCESS
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
