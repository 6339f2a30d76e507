//! Builds the Envoy resources of one service: its `Cluster` and its `ClusterLoadAssignment`.
//!
//! Every cluster is EDS over ADS. A service on the wasm data plane (the default) balances
//! with Envoy's `override_host` policy: the fulcrum filter writes `IP:port` into
//! [`OVERRIDE_HEADER`] and Envoy sends the request there; without the header (filter
//! fail-open) the fallback policy, least request, picks. A cluster-level upstream
//! `header_mutation` filter removes the header after host selection, so the upstream never
//! sees it. (A route-level `request_headers_to_remove` would run before load balancing and
//! disable the override.) A service whose policy says `data_plane: native` balances with
//! fulcrum's native module instead ([`Balancing::Native`]), its policy in the cluster.
//!
//! The cluster speaks the service's [`UpstreamProtocol`] to its endpoints through
//! `typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]`
//! (`explicit_http_config`): HTTP/2 with prior knowledge for a gRPC or HTTP/2 service, so
//! gRPC's trailers and streams reach the backend, HTTP/1.1 otherwise, whatever the
//! downstream spoke.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                CircuitBreakers, Cluster, LoadBalancingPolicy,
                circuit_breakers::{Thresholds, thresholds::RetryBudget},
                cluster::{ClusterDiscoveryType, CommonLbConfig, DiscoveryType, EdsClusterConfig},
                load_balancing_policy::Policy,
            },
            common::mutation_rules::v3::{
                HeaderMutation as HeaderMutationRule, header_mutation::Action,
            },
            core::v3::{
                Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus,
                HealthStatusSet, Http1ProtocolOptions, Http2ProtocolOptions, Locality, Metadata,
                SocketAddress, TypedExtensionConfig, address, config_source, socket_address,
            },
            endpoint::v3::{
                ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints,
                lb_endpoint,
            },
        },
        extensions::{
            dynamic_modules::v3::DynamicModuleConfig,
            filters::{
                http::{
                    header_mutation::v3::{HeaderMutation, Mutations},
                    upstream_codec::v3::UpstreamCodec,
                },
                network::http_connection_manager::v3::{HttpFilter, http_filter},
            },
            load_balancing_policies::{
                dynamic_modules::v3::DynamicModulesLoadBalancerConfig,
                least_request::v3::LeastRequest,
                override_host::v3::{OverrideHost, override_host::OverrideHostSource},
            },
            upstreams::http::v3::{
                HttpProtocolOptions,
                http_protocol_options::{
                    ExplicitHttpConfig, UpstreamProtocolOptions,
                    explicit_http_config::ProtocolConfig,
                },
            },
        },
    },
    google::protobuf::{
        Any, Duration, ListValue, StringValue, Struct, UInt32Value, Value, value::Kind,
    },
};
use envoy_types::util::pack_any;
use fulcrum_core::{
    Endpoint, Health, NATIVE_LB_POLICY, NATIVE_MODULE, OVERRIDE_HEADER, ServiceEndpoints,
    UpstreamProtocol, endpoint::scalar_metadata,
};

/// The `filter_metadata` namespace endpoint attributes are published under.
pub const METADATA_NAMESPACE: &str = scalar_metadata::NAMESPACE;
const HTTP_PROTOCOL_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Settings shared by every generated cluster. The defaults suit fulcrum's filter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ClusterOptions {
    /// Upstream connect timeout; default 1 s.
    pub connect_timeout: std::time::Duration,
    /// `common_lb_config.update_merge_window`; default 0 s, so endpoint changes apply at once
    /// (Envoy's own default, 1 s, delays every EDS update).
    pub update_merge_window: std::time::Duration,
    /// The cluster's retry budget (`circuit_breakers.thresholds[DEFAULT].retry_budget`):
    /// retries in flight may be at most this percent of the requests in flight, per proxy
    /// across its workers; 0 leaves Envoy's fixed `max_retries` (3) instead. Default 20, as
    /// Linkerd's budget: a failing service cannot turn every request into three.
    pub retry_budget_percent: u32,
    /// ...but always at least this many retries in flight, so a quiet service can retry.
    /// Default 3 (Envoy's default).
    pub min_retry_concurrency: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            connect_timeout: std::time::Duration::from_secs(1),
            update_merge_window: std::time::Duration::ZERO,
            retry_budget_percent: 20,
            min_retry_concurrency: 3,
        }
    }
}

fn duration(value: std::time::Duration) -> Duration {
    Duration {
        seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(value.subsec_nanos()).unwrap_or(0),
    }
}

fn typed_extension(name: &str, config: Any) -> TypedExtensionConfig {
    TypedExtensionConfig {
        name: name.to_owned(),
        typed_config: Some(config),
    }
}

/// How a cluster balances: which data plane applies the service's policy
/// ([`fulcrum_core::DataPlane`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balancing<'a> {
    /// The wasm filter picks: `override_host` reads [`OVERRIDE_HEADER`], least request is the
    /// fallback when the header is absent, and an upstream filter strips the header.
    OverrideHost,
    /// fulcrum's native module is the cluster's policy
    /// (`envoy.load_balancing_policies.dynamic_modules`), configured with `policy`, the
    /// service's policy as JSON: Envoy asks the module for the host. The module's outcome
    /// filter names each request's stream in [`fulcrum_core::NATIVE_STREAM_HEADER`], which
    /// the cluster leaves in place, an opaque per-request id like `x-request-id`: the host
    /// selection of every attempt reads it, retries included, and an upstream filter
    /// removing it would remove it from the request's own headers (the upstream filter chain
    /// edits them in place), so a retry would no longer know its stream.
    Native {
        /// The service's [`fulcrum_core::ServicePolicy`] as JSON.
        policy: &'a str,
    },
}

/// The `Cluster` of service `name`: EDS over ADS, balanced per `balancing`, and `protocol`
/// to the endpoints (HTTP/2 with prior knowledge for gRPC, else HTTP/1.1).
pub fn cluster(
    name: &str,
    options: &ClusterOptions,
    protocol: UpstreamProtocol,
    balancing: Balancing<'_>,
) -> Cluster {
    let protocol_config = match protocol {
        UpstreamProtocol::Http1 => {
            ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default())
        }
        UpstreamProtocol::Http2 => {
            ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())
        }
    };
    let (policy, http_filters, override_host_status) = match balancing {
        Balancing::OverrideHost => (
            typed_extension(
                "envoy.load_balancing_policies.override_host",
                pack_any(override_host()),
            ),
            strip_header_filters(OVERRIDE_HEADER),
            // Draining endpoints stay reachable through the override header, so sticky
            // sessions finish on them; new picks skip them in the filter.
            Some(HealthStatusSet {
                statuses: [
                    HealthStatus::Unknown,
                    HealthStatus::Healthy,
                    HealthStatus::Degraded,
                    HealthStatus::Draining,
                ]
                .into_iter()
                .map(|status| status as i32)
                .collect(),
            }),
        ),
        Balancing::Native { policy } => (
            typed_extension(
                "envoy.load_balancing_policies.dynamic_modules",
                pack_any(native_policy(policy)),
            ),
            Vec::new(),
            None,
        ),
    };
    let protocol_options = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(protocol_config),
            },
        )),
        http_filters,
        ..Default::default()
    };
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource::default(),
                )),
                ..Default::default()
            }),
            service_name: String::new(),
        }),
        connect_timeout: Some(duration(options.connect_timeout)),
        load_balancing_policy: Some(LoadBalancingPolicy {
            policies: vec![Policy {
                typed_extension_config: Some(policy),
            }],
        }),
        common_lb_config: Some(CommonLbConfig {
            update_merge_window: Some(duration(options.update_merge_window)),
            override_host_status,
            ..Default::default()
        }),
        typed_extension_protocol_options: HashMap::from([(
            HTTP_PROTOCOL_OPTIONS_KEY.to_owned(),
            pack_any(protocol_options),
        )]),
        circuit_breakers: retry_budget(options),
        ..Default::default()
    }
}

/// `override_host` on [`OVERRIDE_HEADER`], least request when the header is absent.
fn override_host() -> OverrideHost {
    OverrideHost {
        override_host_sources: vec![OverrideHostSource {
            header: OVERRIDE_HEADER.to_owned(),
            ..Default::default()
        }],
        fallback_policy: Some(LoadBalancingPolicy {
            policies: vec![Policy {
                typed_extension_config: Some(typed_extension(
                    "envoy.load_balancing_policies.least_request",
                    pack_any(LeastRequest::default()),
                )),
            }],
        }),
        ..Default::default()
    }
}

/// The upstream filter chain that removes `header` (the override header) after host
/// selection, so the upstream never sees it. (A route-level `request_headers_to_remove`
/// would run before load balancing, which reads it.) `override_host` keeps the hosts it
/// parsed for the request's retries, so removing the header does not change them.
fn strip_header_filters(header: &str) -> Vec<HttpFilter> {
    let strip_header = HeaderMutation {
        mutations: Some(Mutations {
            request_mutations: vec![HeaderMutationRule {
                action: Some(Action::Remove(header.to_owned())),
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![
        HttpFilter {
            name: "envoy.filters.http.header_mutation".to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(strip_header))),
            ..Default::default()
        },
        HttpFilter {
            name: "envoy.filters.http.upstream_codec".to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                UpstreamCodec::default(),
            ))),
            ..Default::default()
        },
    ]
}

/// fulcrum's native module ([`NATIVE_MODULE`]) as the load-balancing policy, configured with
/// `policy` (the service's policy JSON), which Envoy hands the module as it is.
fn native_policy(policy: &str) -> DynamicModulesLoadBalancerConfig {
    DynamicModulesLoadBalancerConfig {
        dynamic_module_config: Some(DynamicModuleConfig {
            name: NATIVE_MODULE.to_owned(),
            ..Default::default()
        }),
        lb_policy_name: NATIVE_LB_POLICY.to_owned(),
        lb_policy_config: Some(pack_any(StringValue {
            value: policy.to_owned(),
        })),
    }
}

/// The cluster's retry budget: the service-level brake on retry storms is Envoy's, per proxy
/// across workers (docs/policy.md, "Service-level protection").
fn retry_budget(options: &ClusterOptions) -> Option<CircuitBreakers> {
    (options.retry_budget_percent > 0).then(|| CircuitBreakers {
        thresholds: vec![Thresholds {
            retry_budget: Some(RetryBudget {
                budget_percent: Some(envoy_types::pb::envoy::r#type::v3::Percent {
                    value: f64::from(options.retry_budget_percent.min(100)),
                }),
                min_retry_concurrency: Some(UInt32Value {
                    value: options.min_retry_concurrency,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn health_status(health: Health) -> HealthStatus {
    match health {
        Health::Healthy => HealthStatus::Healthy,
        Health::Draining => HealthStatus::Draining,
        Health::Unhealthy => HealthStatus::Unhealthy,
    }
}

fn string_value(value: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(value.to_owned())),
    }
}

fn list_value<'a>(values: impl Iterator<Item = &'a String>) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue {
            values: values.map(|value| string_value(value)).collect(),
        })),
    }
}

/// `filter_metadata["fulcrum"]` of one endpoint: `{metadata: {..}, tags: [..],
/// capabilities: [..]}`, each present only when non-empty (what the wasm filter's snapshot
/// and Istio read), and the same as scalar strings (`tags_csv`, `capabilities_csv`,
/// `metadata.<key>`; [`scalar_metadata`]) for the native module, whose load-balancer ABI reads
/// only scalar metadata by key.
fn endpoint_metadata(endpoint: &Endpoint) -> Option<Metadata> {
    let mut fields = HashMap::new();
    if !endpoint.metadata().is_empty() {
        let metadata = endpoint
            .metadata()
            .iter()
            .map(|(key, value)| (key.clone(), string_value(value)))
            .collect();
        fields.insert(
            "metadata".to_owned(),
            Value {
                kind: Some(Kind::StructValue(Struct { fields: metadata })),
            },
        );
        for (key, value) in endpoint.metadata() {
            fields.insert(
                format!("{}{key}", scalar_metadata::METADATA_PREFIX),
                string_value(value),
            );
        }
    }
    let joined = |items: &std::collections::BTreeSet<String>| {
        string_value(
            &items
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(","),
        )
    };
    if !endpoint.tags().is_empty() {
        fields.insert("tags".to_owned(), list_value(endpoint.tags().iter()));
        fields.insert(scalar_metadata::TAGS.to_owned(), joined(endpoint.tags()));
    }
    if !endpoint.capabilities().is_empty() {
        fields.insert(
            "capabilities".to_owned(),
            list_value(endpoint.capabilities().iter()),
        );
        fields.insert(
            scalar_metadata::CAPABILITIES.to_owned(),
            joined(endpoint.capabilities()),
        );
    }
    (!fields.is_empty()).then(|| Metadata {
        filter_metadata: HashMap::from([(METADATA_NAMESPACE.to_owned(), Struct { fields })]),
        ..Default::default()
    })
}

fn lb_endpoint(endpoint: &Endpoint) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: endpoint.address.ip().to_string(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                        endpoint.address.port(),
                    ))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        health_status: health_status(endpoint.health) as i32,
        metadata: endpoint_metadata(endpoint),
        // Passed through as given: Envoy rejects 0 (NACK), and the last good assignment stays.
        load_balancing_weight: Some(UInt32Value {
            value: endpoint.weight,
        }),
    }
}

/// The `ClusterLoadAssignment` of service `name`: one locality per zone (endpoints without a
/// zone share the empty locality), endpoints in the order given.
pub fn load_assignment(name: &str, service: &ServiceEndpoints) -> ClusterLoadAssignment {
    let mut by_zone: BTreeMap<&str, Vec<LbEndpoint>> = BTreeMap::new();
    for endpoint in &service.endpoints {
        by_zone
            .entry(endpoint.zone().unwrap_or(""))
            .or_default()
            .push(lb_endpoint(endpoint));
    }
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: by_zone
            .into_iter()
            .map(|(zone, lb_endpoints)| LocalityLbEndpoints {
                locality: Some(Locality {
                    zone: zone.to_owned(),
                    ..Default::default()
                }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}
