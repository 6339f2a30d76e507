//! Envoy bootstraps for fulcrum, built as JSON values (Envoy reads JSON as YAML).
//!
//! One place builds every Envoy configuration the demo, the end-to-end tests and the
//! comparison benchmark use, so fulcrum and Envoy's native balancers are set up identically
//! except for the one thing compared: the listener's wasm filter and the cluster's
//! load-balancing policy. Both get the same route, retry policy and timeouts; native outlier
//! detection gets `update_merge_window: 0s` so its ejections reach the workers at once.

use std::{net::SocketAddr, path::PathBuf};

use serde_json::{Value, json};

/// The header the filter writes and the cluster's `override_host` policy reads.
pub use fulcrum_core::OVERRIDE_HEADER;

/// How the upstream cluster balances.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterBalancing {
    /// fulcrum's filter picks; the cluster honours its header (`override_host`).
    Fulcrum,
    /// Envoy's round robin.
    RoundRobin,
    /// Envoy's least request (P2C).
    LeastRequest,
    /// Envoy's least request with outlier detection (5 consecutive 5xx / gateway errors,
    /// 10 s interval → ejections on each failure via `update_merge_window: 0s`).
    LeastRequestWithOutlierDetection,
}

impl ClusterBalancing {
    /// A short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Fulcrum => "fulcrum",
            Self::RoundRobin => "round_robin",
            Self::LeastRequest => "least_request",
            Self::LeastRequestWithOutlierDetection => "least_request+outlier_detection",
        }
    }
}

/// The wasm filter in the listener.
#[derive(Debug, Clone)]
pub struct FilterSetup {
    /// Path of `fulcrum_balancer.wasm`.
    pub wasm: PathBuf,
    /// The plugin configuration (docs/filter.md).
    pub config: Value,
    /// What Envoy does when the filter's VM fails.
    pub failure_policy: FailurePolicy,
}

/// Envoy's `PluginConfig.failure_policy`: what happens to requests once the filter's VM has
/// failed (a panic, a trap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Replace the failed VM on the next request (after a backoff): what fulcrum ships
    /// (Istio's `failStrategy: FAIL_RELOAD`). Requests meanwhile are answered 503.
    #[default]
    Reload,
    /// Answer every request 503 from then on (Envoy's default).
    Closed,
    /// Run without the filter from then on: nothing strips a client's override header.
    Open,
}

impl FailurePolicy {
    /// The `failure_policy` value.
    pub fn as_envoy(self) -> &'static str {
        match self {
            Self::Reload => "FAIL_RELOAD",
            Self::Closed => "FAIL_CLOSED",
            Self::Open => "FAIL_OPEN",
        }
    }
}

/// Where the upstream cluster's endpoints come from.
#[derive(Debug, Clone)]
pub enum Endpoints {
    /// A static list in the bootstrap.
    Static(Vec<SocketAddr>),
    /// CDS + EDS over ADS from fulcrum's control plane at this gRPC address; the control
    /// plane generates the cluster (with `override_host`).
    Ads {
        xds: SocketAddr,
        snapshot_http: SocketAddr,
    },
}

/// One Envoy: a listener routing everything to one service's cluster.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// `node.id`: what the control plane and logs call this Envoy.
    pub node_id: String,
    /// 0 lets Envoy pick; read it back from the admin address path.
    pub admin_port: u16,
    /// The `ingress` listener's port; 0 lets Envoy pick (read it back from `/listeners`).
    pub listener_port: u16,
    /// The service (= cluster) name every request goes to.
    pub service: String,
    pub endpoints: Endpoints,
    pub balancing: ClusterBalancing,
    /// Present iff `balancing` is [`ClusterBalancing::Fulcrum`].
    pub filter: Option<FilterSetup>,
    /// Route timeout in milliseconds (the same for every setup).
    pub route_timeout_ms: u64,
    /// Retries on connect failure and reset (the same for every setup).
    pub retries: u32,
}

impl Bootstrap {
    /// The whole bootstrap.
    pub fn to_json(&self) -> Value {
        let mut clusters = Vec::new();
        let mut bootstrap = json!({
            "admin": {"address": socket("127.0.0.1", self.admin_port)},
            "stats_config": {"stats_tags": stats_tags()},
            "node": {"id": self.node_id, "cluster": "fulcrum-demo"},
        });
        match &self.endpoints {
            Endpoints::Static(addresses) => clusters.push(self.static_cluster(addresses)),
            Endpoints::Ads { xds, snapshot_http } => {
                clusters.push(http2_cluster("fulcrum_xds", *xds));
                clusters.push(plain_cluster("fulcrum_control_plane", *snapshot_http));
                bootstrap["dynamic_resources"] = json!({
                    "ads_config": {
                        "api_type": "GRPC",
                        "transport_api_version": "V3",
                        "grpc_services": [{"envoy_grpc": {"cluster_name": "fulcrum_xds"}}],
                    },
                    "cds_config": {"ads": {}, "resource_api_version": "V3"},
                });
            }
        }
        bootstrap["static_resources"] = json!({
            "listeners": [self.listener()],
            "clusters": clusters,
        });
        bootstrap
    }

    fn listener(&self) -> Value {
        let mut http_filters = Vec::new();
        if let Some(filter) = &self.filter {
            let mut wasm = json!({
                "name": "envoy.filters.http.wasm",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                    "config": {
                        "name": "fulcrum",
                        "root_id": "fulcrum",
                        "failure_policy": filter.failure_policy.as_envoy(),
                        "configuration": {
                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                            "value": filter.config.to_string(),
                        },
                        "vm_config": {
                            "runtime": "envoy.wasm.runtime.v8",
                            "code": {"local": {"filename": filter.wasm.display().to_string()}},
                        },
                    },
                },
            });
            if filter.failure_policy == FailurePolicy::Reload {
                // At most one reload of a failed VM per second.
                wasm["typed_config"]["config"]["reload_config"] =
                    json!({"backoff": {"base_interval": "1s"}});
            }
            http_filters.push(wasm);
        }
        http_filters.push(json!({
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }));
        json!({
            "name": "ingress",
            "address": socket("127.0.0.1", self.listener_port),
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "ingress",
                    // Clusters from CDS do not exist when the static listener loads.
                    "route_config": {"validate_clusters": false, "virtual_hosts": [{
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{
                            "match": {"prefix": "/"},
                            "route": {
                                "cluster": self.service,
                                "timeout": format!("{}s", self.route_timeout_ms as f64 / 1000.0),
                                "retry_policy": {
                                    "retry_on": "connect-failure,reset",
                                    "num_retries": self.retries,
                                },
                            },
                        }],
                    }]},
                    "http_filters": http_filters,
                },
            }]}],
        })
    }

    fn static_cluster(&self, addresses: &[SocketAddr]) -> Value {
        let lb_endpoints: Vec<Value> = addresses
            .iter()
            .map(|a| json!({"endpoint": {"address": socket(&a.ip().to_string(), a.port())}}))
            .collect();
        let mut cluster = json!({
            "name": self.service,
            "type": "STATIC",
            "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": self.service, "endpoints": [{"lb_endpoints": lb_endpoints}]},
            "common_lb_config": {"update_merge_window": "0s"},
        });
        match self.balancing {
            ClusterBalancing::Fulcrum => {
                let options = override_host_options();
                cluster["load_balancing_policy"] = options["load_balancing_policy"].clone();
                cluster["typed_extension_protocol_options"] =
                    options["typed_extension_protocol_options"].clone();
            }
            ClusterBalancing::RoundRobin => cluster["lb_policy"] = json!("ROUND_ROBIN"),
            ClusterBalancing::LeastRequest => cluster["lb_policy"] = json!("LEAST_REQUEST"),
            ClusterBalancing::LeastRequestWithOutlierDetection => {
                cluster["lb_policy"] = json!("LEAST_REQUEST");
                cluster["outlier_detection"] = json!({
                    "consecutive_5xx": 5,
                    "consecutive_gateway_failure": 5,
                    "enforcing_consecutive_gateway_failure": 100,
                    "interval": "10s",
                    "base_ejection_time": "30s",
                    "max_ejection_percent": 50,
                });
            }
        }
        cluster
    }
}

/// The `override_host` policy (fallback: least request) and the upstream `header_mutation`
/// that removes the override header after host selection (docs/filter.md).
pub fn override_host_options() -> Value {
    json!({
        "load_balancing_policy": {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                "override_host_sources": [{"header": OVERRIDE_HEADER}],
                "fallback_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.least_request",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"},
                }}]},
            },
        }}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {}},
            "http_filters": [
                {
                    "name": "envoy.filters.http.header_mutation",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                        "mutations": {"request_mutations": [{"remove": OVERRIDE_HEADER}]},
                    },
                },
                {
                    "name": "envoy.filters.http.upstream_codec",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
                },
            ],
        }},
    })
}

/// Turns fulcrum's label-encoding stat names into Prometheus labels (docs/filter.md).
pub fn stats_tags() -> Value {
    json!([
        {"tag_name": "service", "regex": r"(\.service\.(.+?))(?:\.endpoint\.|$)"},
        {"tag_name": "endpoint", "regex": r"(\.endpoint\.(.+))$"},
        {"tag_name": "reason", "regex": r"fulcrum_fail_open_total(\.reason\.(\w+))$"},
        {"tag_name": "input", "regex": r"fulcrum_request_input_invalid_total(\.input\.(\w+))$"},
    ])
}

fn socket(address: &str, port: u16) -> Value {
    json!({"socket_address": {"address": address, "port_value": port}})
}

fn plain_cluster(name: &str, address: SocketAddr) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": socket(&address.ip().to_string(), address.port())}}
        ]}]},
    })
}

fn http2_cluster(name: &str, address: SocketAddr) -> Value {
    let mut cluster = plain_cluster(name, address);
    cluster["typed_extension_protocol_options"] = json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }});
    cluster
}
