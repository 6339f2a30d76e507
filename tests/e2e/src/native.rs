//! Fixtures for the native module (`libfulcrum_native.so`): real Envoy whose cluster's
//! load-balancing policy is fulcrum's dynamic module, with the `fulcrum_outcomes` filter
//! before the router, over in-process backends. The cluster is static, from a CDS file (the
//! shape the control plane generates, see `docs/native.md`) or over ADS from fulcrum's
//! control plane itself.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use fulcrum_core::endpoint::scalar_metadata::TAGS;
use fulcrum_test_support::{Envoy, EnvoyOptions, envoy::INGRESS_LISTENER};
use serde_json::{Value, json};

use crate::{Client, Reply, SERVICE};

/// The module's name: Envoy loads `lib<name>.so` from `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`.
pub const MODULE_NAME: &str = "fulcrum_native";

/// The module's stats prefix in Envoy (`dynamicmodulescustom.` + the counter's name).
pub const STATS_PREFIX: &str = "dynamicmodulescustom.";

/// The release module: `FULCRUM_NATIVE_MODULE` (set by `cargo xtask test` after building it).
pub fn native_module() -> Result<PathBuf> {
    let path = std::env::var_os("FULCRUM_NATIVE_MODULE").map(PathBuf::from).context(
        "FULCRUM_NATIVE_MODULE is not set: run the end-to-end tests with `cargo xtask test`, which builds the native module, or build it with `cargo build --release -p fulcrum-native` and set FULCRUM_NATIVE_MODULE to target/release/libfulcrum_native.so",
    )?;
    if !path.is_file() {
        bail!(
            "FULCRUM_NATIVE_MODULE={} does not exist; build it with `cargo build --release -p fulcrum-native`",
            path.display()
        );
    }
    if path.file_name().and_then(|name| name.to_str()) != Some("libfulcrum_native.so") {
        bail!(
            "FULCRUM_NATIVE_MODULE={} must name libfulcrum_native.so (Envoy loads the module by name)",
            path.display()
        );
    }
    Ok(path)
}

/// One upstream of the cluster.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Its address.
    pub address: SocketAddr,
    /// Its load-balancing weight.
    pub weight: u32,
    /// Its tags, published as the control plane does for the native module
    /// (`filter_metadata.fulcrum.tags_csv`).
    pub tags: Vec<&'static str>,
}

impl Upstream {
    /// An upstream of weight 1 without tags.
    pub fn at(address: SocketAddr) -> Self {
        Self {
            address,
            weight: 1,
            tags: Vec::new(),
        }
    }
}

/// How the route retries (Envoy's `retry_policy`); `None`: no retries.
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    /// `retry_on`.
    pub on: &'static str,
    /// `num_retries`.
    pub count: u32,
}

/// Retry a connect failure once: what a dead endpoint needs.
pub const RETRY_A_CONNECT_FAILURE: Retries = Retries {
    on: "connect-failure",
    count: 1,
};

/// Outlier detection ejecting an endpoint for 30 s once `rule` (`consecutive_failures`,
/// `consecutive_gateway_errors`) reaches `count`, at most half the endpoints at once.
pub fn ejecting_after(rule: &str, count: u32) -> Value {
    json!({rule: count, "base_ejection_time": "30s", "max_ejection_percent": 50})
}

/// Round robin ejecting after `count` of `rule` ([`ejecting_after`]).
pub fn round_robin_ejecting_after(rule: &str, count: u32) -> Value {
    json!({
        "load_balancer": {"type": "round_robin"},
        "outlier_detection": ejecting_after(rule, count),
    })
}

/// Round robin with one retry target, ejecting an endpoint after 3 gateway errors in a row:
/// a dead endpoint costs at most 3 connect failures, each retried onto a live endpoint.
pub fn dead_endpoint_policy() -> Value {
    let mut policy = round_robin_ejecting_after("consecutive_gateway_errors", 3);
    policy["retry"] = json!(1);
    policy
}

/// The cluster's `load_balancing_policy`: fulcrum's module under `policy` (one service's
/// policy JSON).
pub fn load_balancing_policy(policy: &Value) -> Value {
    json!({
        "policies": [{
            "typed_extension_config": {
                "name": "fulcrum",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.dynamic_modules.v3.DynamicModulesLoadBalancerConfig",
                    "dynamic_module_config": {"name": MODULE_NAME},
                    "lb_policy_name": "fulcrum",
                    "lb_policy_config": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": policy.to_string(),
                    },
                }
            }
        }]
    })
}

/// The cluster `SERVICE` over `upstreams` under `policy`.
pub fn cluster(upstreams: &[Upstream], policy: &Value) -> Value {
    let endpoints: Vec<Value> = upstreams
        .iter()
        .map(|upstream| {
            let mut endpoint = json!({
                "endpoint": {"address": {"socket_address": {
                    "address": upstream.address.ip().to_string(),
                    "port_value": upstream.address.port(),
                }}},
                "load_balancing_weight": upstream.weight,
            });
            if !upstream.tags.is_empty() {
                endpoint["metadata"] = json!({"filter_metadata": {"fulcrum": {
                    TAGS: upstream.tags.join(","),
                }}});
            }
            endpoint
        })
        .collect();
    json!({
        "name": SERVICE,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_balancing_policy": load_balancing_policy(policy),
        "load_assignment": {"cluster_name": SERVICE, "endpoints": [{"lb_endpoints": endpoints}]},
    })
}

/// `cluster` speaking HTTP/2 to its upstreams (gRPC services).
pub fn over_http2(mut cluster: Value) -> Value {
    cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    });
    cluster
}

/// The bootstrap: an `ingress` listener routing everything to `SERVICE` (1 s timeout, the
/// given retries) through `fulcrum_outcomes` and the router; `clusters` as given (static
/// resources) or from `cds_path` (a file Envoy watches).
pub fn bootstrap(clusters: Clusters<'_>, retries: Option<Retries>) -> Value {
    let mut route = json!({"cluster": SERVICE, "timeout": "1s"});
    if let Some(retries) = retries {
        route["retry_policy"] = json!({"retry_on": retries.on, "num_retries": retries.count});
    }
    let listener = json!({
        "name": INGRESS_LISTENER,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "ingress",
                "route_config": {"virtual_hosts": [{
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": route}],
                }]},
                "http_filters": [
                    {
                        "name": "fulcrum_outcomes",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                            "dynamic_module_config": {"name": MODULE_NAME},
                            "filter_name": "fulcrum_outcomes",
                        }
                    },
                    {
                        "name": "envoy.filters.http.router",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                    }
                ],
            }
        }]}],
    });
    let mut bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "node": {"id": "native", "cluster": "fulcrum"},
        "static_resources": {"listeners": [listener], "clusters": []},
    });
    match clusters {
        Clusters::Static(clusters) => {
            bootstrap["static_resources"]["clusters"] = Value::Array(clusters.to_vec());
        }
        Clusters::File(path) => {
            // The route names a cluster CDS brings later.
            bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
                ["route_config"]["validate_clusters"] = json!(false);
            bootstrap["dynamic_resources"] = json!({
                "cds_config": {"path_config_source": {"path": path.display().to_string()}, "resource_api_version": "V3"}
            });
        }
        Clusters::Ads(xds) => {
            bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
                ["route_config"]["validate_clusters"] = json!(false);
            bootstrap["static_resources"]["clusters"] = json!([{
                "name": XDS_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }},
                "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": xds.ip().to_string(),
                    "port_value": xds.port(),
                }}}}]}]},
            }]);
            bootstrap["dynamic_resources"] = json!({
                "ads_config": {
                    "api_type": "GRPC",
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                },
                "cds_config": {"ads": {}, "resource_api_version": "V3"},
            });
        }
    }
    bootstrap
}

/// Where the bootstrap's clusters come from.
#[derive(Debug, Clone, Copy)]
pub enum Clusters<'a> {
    /// Static resources.
    Static(&'a [Value]),
    /// A CDS file Envoy watches (replace it with a rename to update it).
    File(&'a Path),
    /// CDS + EDS over ADS (state of the world) from fulcrum's control plane at this xDS
    /// address, which generates the native cluster of a `data_plane: native` service.
    Ads(SocketAddr),
}

/// The static cluster carrying the ADS stream of [`Clusters::Ads`].
const XDS_CLUSTER: &str = "fulcrum_xds";

/// A CDS file's content: a discovery response with `clusters`.
pub fn cds_file(clusters: &[Value]) -> Value {
    let resources: Vec<Value> = clusters
        .iter()
        .map(|cluster| {
            let mut cluster = cluster.clone();
            cluster["@type"] = json!("type.googleapis.com/envoy.config.cluster.v3.Cluster");
            cluster
        })
        .collect();
    json!({"version_info": "1", "resources": resources})
}

/// Envoy with the native module, and a client of its ingress.
#[derive(Debug)]
pub struct NativeProxy {
    /// The Envoy.
    pub envoy: Envoy,
    client: Client,
}

impl NativeProxy {
    /// Starts Envoy (`workers` worker threads) with `bootstrap` and the module of
    /// [`native_module`].
    pub async fn start(bootstrap: &Value, workers: u32) -> Result<Self> {
        let module = native_module()?;
        let dir = module
            .parent()
            .context("the module's directory")?
            .display()
            .to_string();
        let options = EnvoyOptions {
            concurrency: workers,
            env: vec![("ENVOY_DYNAMIC_MODULES_SEARCH_PATH".to_owned(), dir)],
            ..EnvoyOptions::default()
        };
        let envoy = Envoy::start_json(bootstrap, &options).await?;
        let listener = envoy.ingress_address().await?;
        Ok(Self {
            envoy,
            client: Client::new(listener, 16),
        })
    }

    /// Envoy with the module balancing `upstreams` under `policy`, `workers` workers.
    pub async fn with_upstreams(
        upstreams: &[Upstream],
        policy: Value,
        retries: Option<Retries>,
        workers: u32,
    ) -> Result<Self> {
        let clusters = [cluster(upstreams, &policy)];
        Self::start(&bootstrap(Clusters::Static(&clusters), retries), workers).await
    }

    /// Sends one `GET /` with extra headers.
    pub async fn send_with(&self, headers: &[(&str, &str)]) -> Reply {
        self.client.send_with(headers).await
    }

    /// Sends one request with raw header values (not UTF-8, huge, repeated names).
    pub async fn send_raw(&self, headers: &[(&str, &[u8])]) -> Reply {
        self.client.send_raw(headers).await
    }

    /// Sends `n` plain requests one after the other.
    pub async fn send(&self, n: usize) -> Vec<Reply> {
        let mut replies = Vec::with_capacity(n);
        for _ in 0..n {
            replies.push(self.send_with(&[]).await);
        }
        replies
    }

    /// The module's counter `name` of the service's cluster (e.g.
    /// `fulcrum_native_fail_open_total{cluster="shop"}`), 0 when absent.
    pub async fn counter(&self, name: &str) -> Result<u64> {
        Ok(self
            .envoy
            .stat(&format!("{STATS_PREFIX}{name}.cluster.{SERVICE}"))
            .await?
            .unwrap_or(0))
    }

    /// The module's metric `fulcrum_native_endpoint_<name>` of `endpoint` in the service's
    /// cluster (`ejections_total`, `circuit_open`), 0 when absent.
    pub async fn endpoint_metric(&self, name: &str, endpoint: SocketAddr) -> Result<u64> {
        Ok(self
            .envoy
            .stat(&format!(
                "{STATS_PREFIX}fulcrum_native_endpoint_{name}.cluster.{SERVICE}.endpoint.{endpoint}"
            ))
            .await?
            .unwrap_or(0))
    }
}
