//! Envoy bootstraps for fulcrum, built as JSON values (Envoy reads JSON as YAML): the one
//! builder behind every Envoy the tests, the demo and the comparison benchmark start.
//!
//! A [`Bootstrap`] is an Envoy whose clusters are static or come over ADS from fulcrum's
//! control plane ([`Endpoints`]), with an optional `ingress` listener routing every request
//! to one service ([`Ingress`]) through fulcrum's wasm filter, fulcrum's native module (the
//! cluster's policy and its outcome filter, [`ClusterBalancing::FulcrumNative`]) or neither.
//! fulcrum and Envoy's native
//! balancers are set up identically except for the one thing compared: the listener's wasm
//! filter and the cluster's load-balancing policy. Both get the same route, retry policy and
//! timeouts; native outlier detection gets `update_merge_window: 0s` so its ejections reach
//! the workers at once. The admin and ingress listeners bind port 0: [`Envoy`](super::Envoy)
//! reads back the ports Envoy got, so no port is chosen before it is bound.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use fulcrum_core::{NATIVE_LB_POLICY, NATIVE_MODULE, NATIVE_OUTCOME_FILTER, OVERRIDE_HEADER};
use serde_json::{Value, json};

/// The static cluster carrying the ADS stream.
const XDS_CLUSTER: &str = "fulcrum_xds";
/// The static cluster of the control plane's snapshot HTTP API, which the filter polls
/// (its `control_plane.cluster`).
pub const CONTROL_PLANE_CLUSTER: &str = "fulcrum_control_plane";
/// The name of the listener an [`Ingress`] becomes.
pub const INGRESS_LISTENER: &str = "ingress";

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
    /// fulcrum's native module is the cluster's load-balancing policy under `policy` (one
    /// service's policy JSON, docs/policy.md), and the listener has its outcome filter before
    /// the router. Envoy needs `ENVOY_DYNAMIC_MODULES_SEARCH_PATH` (the module's directory).
    FulcrumNative {
        /// The service policy the module balances with.
        policy: Value,
    },
}

impl ClusterBalancing {
    /// A short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Fulcrum => "fulcrum",
            Self::RoundRobin => "round_robin",
            Self::LeastRequest => "least_request",
            Self::LeastRequestWithOutlierDetection => "least_request+outlier_detection",
            Self::FulcrumNative { .. } => "fulcrum native",
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

/// Which ADS protocol variant Envoy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdsApi {
    /// State of the world (`GRPC`).
    Sotw,
    /// Incremental (`DELTA_GRPC`).
    Delta,
}

impl AdsApi {
    /// The `ads_config.api_type` value.
    pub fn as_envoy(self) -> &'static str {
        match self {
            Self::Sotw => "GRPC",
            Self::Delta => "DELTA_GRPC",
        }
    }
}

/// Where Envoy's clusters come from.
#[derive(Debug, Clone)]
pub enum Endpoints {
    /// A static cluster named after the [`Ingress`]'s service, with these members and the
    /// ingress's balancing. Needs an ingress: without one nothing names the cluster.
    Static(Vec<SocketAddr>),
    /// The static cluster of [`Endpoints::Static`], while the filter learns the service's
    /// endpoints and their health from the control plane's snapshot API, the static cluster
    /// [`CONTROL_PLANE_CLUSTER`]: Envoy's cluster stays fixed, so it must list every endpoint
    /// the control plane may name (`override_host` honours members only).
    StaticWithSnapshots {
        /// The static cluster's members.
        members: Vec<SocketAddr>,
        /// The control plane's snapshot HTTP API.
        snapshot_http: SocketAddr,
    },
    /// CDS + EDS over ADS from fulcrum's control plane, which generates each cluster (with
    /// `override_host`). The node is sent on the stream's first message only.
    Ads {
        /// The control plane's xDS gRPC address.
        xds: SocketAddr,
        /// SotW or delta.
        api: AdsApi,
        /// The control plane's snapshot HTTP API, as the static cluster
        /// [`CONTROL_PLANE_CLUSTER`] for the filter to poll; `None` when no filter polls.
        snapshot_http: Option<SocketAddr>,
    },
}

/// The `ingress` listener: every request goes to one service's cluster, through fulcrum's
/// filter if there is one.
#[derive(Debug, Clone)]
pub struct Ingress {
    /// The service (= cluster) name every request goes to.
    pub service: String,
    /// How a static cluster balances (a cluster from ADS is the control plane's).
    pub balancing: ClusterBalancing,
    /// Present iff `balancing` is [`ClusterBalancing::Fulcrum`].
    pub filter: Option<FilterSetup>,
    /// Route timeout in milliseconds (the same for every setup).
    pub route_timeout_ms: u64,
    /// How many retries the route allows (the same for every setup).
    pub retries: u32,
    /// The route's `retry_on`: [`RETRY_ON_HTTP`], or [`RETRY_ON_GRPC`] in front of gRPC
    /// services (the same for every setup compared).
    pub retry_on: &'static str,
    /// A static cluster's protocol, health checks and slow start (a cluster from ADS is the
    /// control plane's).
    pub cluster: ClusterOptions,
}

/// What a static cluster has beyond its members and balancing. Default: HTTP/1.1, no health
/// checks, no slow start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterOptions {
    /// The protocol Envoy speaks to the members.
    pub protocol: UpstreamProtocol,
    /// Envoy's active health checks of the members. fulcrum's `override_host` cluster ignores
    /// Envoy's host health (fulcrum's own comes from the control plane), so give them to
    /// native balancers.
    pub health_check: Option<HealthCheck>,
    /// The window of Envoy's `slow_start_config` (aggression 1, minimum weight 10 %) for round
    /// robin and least request; not applied to fulcrum's cluster, whose slow start is its
    /// policy's `slow_start`.
    pub slow_start_window: Option<Duration>,
    /// The base ejection time of Envoy's outlier detection
    /// ([`ClusterBalancing::LeastRequestWithOutlierDetection`]); `None`: 30 s. Its sweep
    /// interval is the shorter of 10 s and this, so an ejected host returns on time.
    pub base_ejection_time: Option<Duration>,
}

/// The protocol Envoy speaks to a static cluster's members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1.
    #[default]
    Http1,
    /// HTTP/2 without TLS (h2c), what gRPC servers such as tonic speak.
    Http2,
}

impl UpstreamProtocol {
    /// The `explicit_http_config` of the cluster's `HttpProtocolOptions`.
    fn explicit_http_config(self) -> Value {
        match self {
            Self::Http1 => json!({"http_protocol_options": {}}),
            Self::Http2 => json!({"http2_protocol_options": {}}),
        }
    }
}

/// Envoy's active HTTP health check of every member of a static cluster: `GET path` every
/// `interval` (which is also its timeout, and the interval before the cluster's first
/// connection too) must answer 200. One failure makes a member unhealthy, one pass healthy
/// again, so a member's health follows within one interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The path checked.
    pub path: String,
    /// Time between two checks of a member.
    pub interval: Duration,
}

/// The route's `retry_on` in front of HTTP services: connect failures and resets.
pub const RETRY_ON_HTTP: &str = "connect-failure,reset";
/// The route's `retry_on` in front of gRPC services: [`RETRY_ON_HTTP`] and calls that end
/// `UNAVAILABLE` (Envoy's gRPC retry condition `unavailable`).
pub const RETRY_ON_GRPC: &str = "connect-failure,reset,unavailable";

/// One Envoy: its node, its clusters and its listener.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// `node.id`: what the control plane and logs call this Envoy.
    pub node_id: String,
    /// Where the clusters come from.
    pub endpoints: Endpoints,
    /// The `ingress` listener; `None` for an Envoy that only takes clusters (what the control
    /// plane's tests watch).
    pub ingress: Option<Ingress>,
    /// `node.locality`: where this Envoy runs, as Istio's bootstrap sets it from the pod's
    /// node labels. Empty by default.
    pub locality: NodeLocality,
}

/// An Envoy node's `locality`: its region and zone, each left out of the bootstrap when
/// `None` (Envoy's `--service-zone` sets the zone too, and wins; no flag sets the region).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeLocality {
    /// `node.locality.region`.
    pub region: Option<String>,
    /// `node.locality.zone`.
    pub zone: Option<String>,
}

impl NodeLocality {
    /// The `locality` object of the bootstrap's node.
    fn to_json(&self) -> Value {
        let mut locality = serde_json::Map::new();
        for (field, value) in [("region", &self.region), ("zone", &self.zone)] {
            if let Some(value) = value {
                locality.insert(field.to_owned(), Value::from(value.as_str()));
            }
        }
        Value::Object(locality)
    }
}

impl Bootstrap {
    /// An Envoy with no listener taking every cluster over ADS from `xds`.
    pub fn ads(node_id: impl Into<String>, xds: SocketAddr, api: AdsApi) -> Self {
        Self {
            node_id: node_id.into(),
            endpoints: Endpoints::Ads {
                xds,
                api,
                snapshot_http: None,
            },
            ingress: None,
            locality: NodeLocality::default(),
        }
    }

    /// The whole bootstrap.
    pub fn to_json(&self) -> Value {
        let mut clusters = Vec::new();
        let mut bootstrap = json!({
            "admin": {"address": socket("127.0.0.1", 0)},
            "stats_config": {"stats_tags": stats_tags()},
            "node": {"id": self.node_id, "cluster": "fulcrum"},
        });
        let locality = self.locality.to_json();
        if locality
            .as_object()
            .is_some_and(|fields| !fields.is_empty())
        {
            bootstrap["node"]["locality"] = locality;
        }
        match &self.endpoints {
            Endpoints::Static(members)
            | Endpoints::StaticWithSnapshots {
                members,
                snapshot_http: _,
            } => {
                debug_assert!(
                    self.ingress.is_some(),
                    "static endpoints need an ingress to name their cluster"
                );
                if let Some(ingress) = &self.ingress {
                    clusters.push(ingress.static_cluster(members));
                }
                if let Endpoints::StaticWithSnapshots { snapshot_http, .. } = &self.endpoints {
                    clusters.push(plain_cluster(CONTROL_PLANE_CLUSTER, *snapshot_http));
                }
            }
            Endpoints::Ads {
                xds,
                api,
                snapshot_http,
            } => {
                clusters.push(http2_cluster(XDS_CLUSTER, *xds));
                if let Some(snapshot_http) = snapshot_http {
                    clusters.push(plain_cluster(CONTROL_PLANE_CLUSTER, *snapshot_http));
                }
                bootstrap["dynamic_resources"] = json!({
                    "ads_config": {
                        "api_type": api.as_envoy(),
                        "transport_api_version": "V3",
                        "set_node_on_first_message_only": true,
                        "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                    },
                    "cds_config": {"ads": {}, "resource_api_version": "V3"},
                });
            }
        }
        let listeners: Vec<Value> = self.ingress.iter().map(Ingress::listener).collect();
        bootstrap["static_resources"] = json!({
            "listeners": listeners,
            "clusters": clusters,
        });
        bootstrap
    }
}

impl Ingress {
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
        if matches!(self.balancing, ClusterBalancing::FulcrumNative { .. }) {
            http_filters.push(json!({
                "name": NATIVE_OUTCOME_FILTER,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                    "dynamic_module_config": {"name": NATIVE_MODULE},
                    "filter_name": NATIVE_OUTCOME_FILTER,
                },
            }));
        }
        http_filters.push(json!({
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }));
        json!({
            "name": INGRESS_LISTENER,
            "address": socket("127.0.0.1", 0),
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
                                "timeout": seconds(Duration::from_millis(self.route_timeout_ms)),
                                "retry_policy": {
                                    "retry_on": self.retry_on,
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
        let options = &self.cluster;
        if options.protocol != UpstreamProtocol::Http1 {
            cluster["typed_extension_protocol_options"] = json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": options.protocol.explicit_http_config(),
            }});
        }
        if let Some(check) = &options.health_check {
            let interval = seconds(check.interval);
            cluster["health_checks"] = json!([{
                "interval": interval,
                // Envoy checks every 60 s until the cluster's first connection otherwise.
                "no_traffic_interval": interval,
                "timeout": interval,
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": check.path},
            }]);
        }
        let slow_start = options.slow_start_window.map(|window| {
            json!({"slow_start_config": {
                "slow_start_window": seconds(window),
                "aggression": {"default_value": 1.0, "runtime_key": "upstream.slow_start.aggression"},
                "min_weight_percent": {"value": 10.0},
            }})
        });
        match &self.balancing {
            ClusterBalancing::FulcrumNative { policy } => {
                cluster["load_balancing_policy"] = json!({"policies": [{"typed_extension_config": {
                    "name": NATIVE_LB_POLICY,
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.dynamic_modules.v3.DynamicModulesLoadBalancerConfig",
                        "dynamic_module_config": {"name": NATIVE_MODULE},
                        "lb_policy_name": NATIVE_LB_POLICY,
                        "lb_policy_config": {
                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                            "value": policy.to_string(),
                        },
                    },
                }}]});
                cluster["typed_extension_protocol_options"] = json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": options.protocol.explicit_http_config(),
                }});
            }
            ClusterBalancing::Fulcrum => {
                let override_host = override_host_options(options.protocol);
                cluster["load_balancing_policy"] = override_host["load_balancing_policy"].clone();
                cluster["typed_extension_protocol_options"] =
                    override_host["typed_extension_protocol_options"].clone();
            }
            ClusterBalancing::RoundRobin => {
                cluster["lb_policy"] = json!("ROUND_ROBIN");
                if let Some(slow_start) = slow_start {
                    cluster["round_robin_lb_config"] = slow_start;
                }
            }
            ClusterBalancing::LeastRequest | ClusterBalancing::LeastRequestWithOutlierDetection => {
                cluster["lb_policy"] = json!("LEAST_REQUEST");
                if let Some(slow_start) = slow_start {
                    cluster["least_request_lb_config"] = slow_start;
                }
            }
        }
        if self.balancing == ClusterBalancing::LeastRequestWithOutlierDetection {
            let base_ejection_time = options
                .base_ejection_time
                .unwrap_or(Duration::from_secs(30));
            cluster["outlier_detection"] = json!({
                "consecutive_5xx": 5,
                "consecutive_gateway_failure": 5,
                "enforcing_consecutive_gateway_failure": 100,
                "interval": seconds(base_ejection_time.min(Duration::from_secs(10))),
                "base_ejection_time": seconds(base_ejection_time),
                "max_ejection_percent": 50,
            });
        }
        cluster
    }
}

/// The `override_host` policy (fallback: least request) and the upstream `header_mutation`
/// that removes the override header after host selection (docs/filter.md), over `protocol`.
fn override_host_options(protocol: UpstreamProtocol) -> Value {
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
            "explicit_http_config": protocol.explicit_http_config(),
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
fn stats_tags() -> Value {
    json!([
        {"tag_name": "service", "regex": r"(\.service\.(.+?))(?:\.endpoint\.|$)"},
        {"tag_name": "endpoint", "regex": r"(\.endpoint\.(.+))$"},
        {"tag_name": "reason", "regex": r"fulcrum_fail_open_total(\.reason\.(\w+))$"},
        {"tag_name": "input", "regex": r"fulcrum_request_input_invalid_total(\.input\.(\w+))$"},
    ])
}

/// A protobuf `Duration` as JSON: seconds with a fraction, `"0.25s"`.
fn seconds(duration: Duration) -> String {
    format!("{}s", duration.as_secs_f64())
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
        "explicit_http_config": UpstreamProtocol::Http2.explicit_http_config(),
    }});
    cluster
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingress(balancing: ClusterBalancing, filter: Option<FilterSetup>) -> Ingress {
        Ingress {
            service: "shop".to_owned(),
            balancing,
            filter,
            route_timeout_ms: 1500,
            retries: 2,
            retry_on: RETRY_ON_HTTP,
            cluster: ClusterOptions::default(),
        }
    }

    #[test]
    fn an_ads_bootstrap_has_the_xds_cluster_and_no_listener() {
        let xds = SocketAddr::from(([127, 0, 0, 1], 18000));
        let bootstrap = Bootstrap::ads("node-1", xds, AdsApi::Delta).to_json();
        let ads = &bootstrap["dynamic_resources"]["ads_config"];
        assert_eq!(ads["api_type"], "DELTA_GRPC");
        assert_eq!(ads["set_node_on_first_message_only"], true);
        assert_eq!(bootstrap["node"]["id"], "node-1");
        assert_eq!(
            bootstrap["admin"]["address"]["socket_address"]["port_value"],
            0
        );
        let clusters = bootstrap["static_resources"]["clusters"]
            .as_array()
            .expect("clusters");
        assert_eq!(clusters.len(), 1, "{clusters:?}");
        assert_eq!(clusters[0]["name"], XDS_CLUSTER);
        let endpoint = &clusters[0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0];
        assert_eq!(
            endpoint["endpoint"]["address"]["socket_address"]["port_value"],
            18000
        );
        assert_eq!(bootstrap["static_resources"]["listeners"], json!([]));
    }

    #[test]
    fn a_native_ingress_gets_the_module_as_its_policy_and_the_outcome_filter_before_the_router() {
        let policy = json!({"load_balancer": {"type": "peak_ewma"}});
        let bootstrap = Bootstrap {
            node_id: "native".to_owned(),
            endpoints: Endpoints::Static(vec![SocketAddr::from(([127, 0, 0, 1], 8080))]),
            ingress: Some(ingress(
                ClusterBalancing::FulcrumNative {
                    policy: policy.clone(),
                },
                None,
            )),
            locality: NodeLocality::default(),
        }
        .to_json();
        let cluster = &bootstrap["static_resources"]["clusters"][0];
        let config = &cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"]["typed_config"];
        assert_eq!(config["dynamic_module_config"]["name"], NATIVE_MODULE);
        assert_eq!(config["lb_policy_name"], NATIVE_LB_POLICY);
        assert_eq!(config["lb_policy_config"]["value"], policy.to_string());
        assert!(cluster.get("lb_policy").is_none(), "{cluster}");
        let filters = &bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
            [0]["typed_config"]["http_filters"];
        assert_eq!(filters[0]["name"], NATIVE_OUTCOME_FILTER);
        assert_eq!(
            filters[0]["typed_config"]["filter_name"],
            NATIVE_OUTCOME_FILTER
        );
        assert_eq!(filters[1]["name"], "envoy.filters.http.router");
    }

    #[test]
    fn a_node_locality_sets_only_the_fields_given() {
        let xds = SocketAddr::from(([127, 0, 0, 1], 18000));
        let mut bootstrap = Bootstrap::ads("node-1", xds, AdsApi::Delta);
        assert!(bootstrap.to_json()["node"].get("locality").is_none());
        bootstrap.locality.region = Some("r1".to_owned());
        assert_eq!(
            bootstrap.to_json()["node"]["locality"],
            json!({"region": "r1"})
        );
        bootstrap.locality.zone = Some("z1".to_owned());
        assert_eq!(
            bootstrap.to_json()["node"]["locality"],
            json!({"region": "r1", "zone": "z1"})
        );
    }

    #[test]
    fn static_endpoints_behind_the_filter_get_override_host_and_the_wasm_filter() {
        let filter = FilterSetup {
            wasm: PathBuf::from("/filter.wasm"),
            config: json!({"policy": {}}),
            failure_policy: FailurePolicy::Reload,
        };
        let bootstrap = Bootstrap {
            node_id: "static".to_owned(),
            endpoints: Endpoints::Static(vec![SocketAddr::from(([127, 0, 0, 1], 9001))]),
            ingress: Some(ingress(ClusterBalancing::Fulcrum, Some(filter))),
            locality: NodeLocality::default(),
        }
        .to_json();
        assert!(bootstrap.get("dynamic_resources").is_none());
        let cluster = &bootstrap["static_resources"]["clusters"][0];
        assert_eq!(cluster["name"], "shop");
        let policy = &cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"];
        assert_eq!(
            policy["typed_config"]["override_host_sources"][0]["header"],
            OVERRIDE_HEADER
        );
        let listener = &bootstrap["static_resources"]["listeners"][0];
        assert_eq!(listener["name"], INGRESS_LISTENER);
        let manager = &listener["filter_chains"][0]["filters"][0]["typed_config"];
        let route = &manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"];
        assert_eq!(route["cluster"], "shop");
        assert_eq!(route["timeout"], "1.5s");
        assert_eq!(route["retry_policy"]["retry_on"], RETRY_ON_HTTP);
        let wasm = &manager["http_filters"][0]["typed_config"]["config"];
        assert_eq!(wasm["failure_policy"], "FAIL_RELOAD");
        assert_eq!(wasm["reload_config"]["backoff"]["base_interval"], "1s");
        assert_eq!(
            wasm["vm_config"]["code"]["local"]["filename"],
            "/filter.wasm"
        );
    }

    #[test]
    fn a_native_balancer_has_no_filter_and_envoys_policy() {
        let bootstrap = Bootstrap {
            node_id: "native".to_owned(),
            endpoints: Endpoints::Static(vec![SocketAddr::from(([127, 0, 0, 1], 9001))]),
            ingress: Some(ingress(ClusterBalancing::RoundRobin, None)),
            locality: NodeLocality::default(),
        }
        .to_json();
        let cluster = &bootstrap["static_resources"]["clusters"][0];
        assert_eq!(cluster["lb_policy"], "ROUND_ROBIN");
        assert!(cluster.get("load_balancing_policy").is_none());
        let manager = &bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
            [0]["typed_config"];
        let filters: Vec<&str> = manager["http_filters"]
            .as_array()
            .expect("filters")
            .iter()
            .filter_map(|filter| filter["name"].as_str())
            .collect();
        assert_eq!(filters, ["envoy.filters.http.router"]);
    }

    #[test]
    fn ads_with_a_snapshot_api_adds_the_cluster_the_filter_polls() {
        let bootstrap = Bootstrap {
            node_id: "demo".to_owned(),
            endpoints: Endpoints::Ads {
                xds: SocketAddr::from(([127, 0, 0, 1], 18000)),
                api: AdsApi::Sotw,
                snapshot_http: Some(SocketAddr::from(([127, 0, 0, 1], 18080))),
            },
            ingress: Some(ingress(ClusterBalancing::Fulcrum, None)),
            locality: NodeLocality::default(),
        }
        .to_json();
        assert_eq!(
            bootstrap["dynamic_resources"]["ads_config"]["api_type"],
            "GRPC"
        );
        let names: Vec<&str> = bootstrap["static_resources"]["clusters"]
            .as_array()
            .expect("clusters")
            .iter()
            .filter_map(|cluster| cluster["name"].as_str())
            .collect();
        assert_eq!(names, [XDS_CLUSTER, CONTROL_PLANE_CLUSTER]);
    }

    #[test]
    fn an_http2_cluster_speaks_h2c_natively_and_under_override_host() {
        let members = vec![SocketAddr::from(([127, 0, 0, 1], 9001))];
        for balancing in [ClusterBalancing::LeastRequest, ClusterBalancing::Fulcrum] {
            let mut ingress = ingress(balancing.clone(), None);
            ingress.cluster.protocol = UpstreamProtocol::Http2;
            let bootstrap = Bootstrap {
                node_id: "grpc".to_owned(),
                endpoints: Endpoints::Static(members.clone()),
                ingress: Some(ingress),
                locality: NodeLocality::default(),
            }
            .to_json();
            let options = &bootstrap["static_resources"]["clusters"][0]["typed_extension_protocol_options"]
                ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
            assert_eq!(
                options["explicit_http_config"],
                json!({"http2_protocol_options": {}}),
                "{balancing:?}"
            );
            let upstream_filters = options["http_filters"].as_array().map_or(0, Vec::len);
            assert_eq!(
                upstream_filters,
                if balancing == ClusterBalancing::Fulcrum {
                    2
                } else {
                    0
                },
                "only fulcrum's cluster strips the override header: {options}"
            );
        }
    }

    #[test]
    fn health_checks_and_slow_start_go_to_native_least_request_and_slow_start_not_to_fulcrum() {
        let cluster_of = |balancing: ClusterBalancing| {
            let mut ingress = ingress(balancing, None);
            ingress.cluster.health_check = Some(HealthCheck {
                path: "/healthz".to_owned(),
                interval: Duration::from_millis(250),
            });
            ingress.cluster.slow_start_window = Some(Duration::from_secs(10));
            Bootstrap {
                node_id: "warm".to_owned(),
                endpoints: Endpoints::Static(vec![SocketAddr::from(([127, 0, 0, 1], 9001))]),
                ingress: Some(ingress),
                locality: NodeLocality::default(),
            }
            .to_json()["static_resources"]["clusters"][0]
                .clone()
        };
        let native = cluster_of(ClusterBalancing::LeastRequestWithOutlierDetection);
        let check = &native["health_checks"][0];
        assert_eq!(check["interval"], "0.25s");
        assert_eq!(check["timeout"], "0.25s");
        assert_eq!(check["no_traffic_interval"], "0.25s");
        assert_eq!(check["http_health_check"]["path"], "/healthz");
        let slow_start = &native["least_request_lb_config"]["slow_start_config"];
        assert_eq!(slow_start["slow_start_window"], "10s");
        assert_eq!(slow_start["min_weight_percent"]["value"], 10.0);
        assert_eq!(native["outlier_detection"]["consecutive_5xx"], 5);
        let fulcrum = cluster_of(ClusterBalancing::Fulcrum);
        assert!(
            fulcrum.get("least_request_lb_config").is_none(),
            "{fulcrum}"
        );
        assert!(fulcrum.get("outlier_detection").is_none(), "{fulcrum}");
    }

    #[test]
    fn static_members_with_snapshots_add_the_cluster_the_filter_polls() {
        let bootstrap = Bootstrap {
            node_id: "joins".to_owned(),
            endpoints: Endpoints::StaticWithSnapshots {
                members: vec![SocketAddr::from(([127, 0, 0, 1], 9001))],
                snapshot_http: SocketAddr::from(([127, 0, 0, 1], 18080)),
            },
            ingress: Some(ingress(ClusterBalancing::Fulcrum, None)),
            locality: NodeLocality::default(),
        }
        .to_json();
        assert!(bootstrap.get("dynamic_resources").is_none());
        let clusters = bootstrap["static_resources"]["clusters"]
            .as_array()
            .expect("clusters");
        let names: Vec<&str> = clusters
            .iter()
            .filter_map(|cluster| cluster["name"].as_str())
            .collect();
        assert_eq!(names, ["shop", CONTROL_PLANE_CLUSTER]);
        assert_eq!(clusters[0]["type"], "STATIC");
    }
}
