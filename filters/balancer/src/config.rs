//! The filter's plugin configuration: where endpoints come from, how the service of a
//! request is found, the header Envoy's `override_host` policy reads, and the default policy.
//!
//! This is the JSON in Envoy's `configuration` / Istio's `WasmPlugin.pluginConfig`. It is
//! parsed and validated once, in `on_configure`; an invalid configuration is refused with
//! every error and its field path, so the plugin never starts half-configured.

use std::{collections::BTreeMap, time::Duration};

use fulcrum_core::{
    Endpoint, Policy, SessionKeys,
    tables::{self, DEFAULT_TABLE_BUDGET_BYTES},
    validate::{ValidationError, ValidationErrors},
};
use serde::Deserialize;

/// The default header written with the chosen `IP:port` (and retry targets).
pub const DEFAULT_OVERRIDE_HEADER: &str = fulcrum_core::OVERRIDE_HEADER;

/// `only_services: ["*"]`: every service gets a pick.
pub const ALL_SERVICES: &str = "*";

/// The whole plugin configuration. `{}` is not valid: endpoints must come from somewhere.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterConfig {
    /// Request header carrying the pick; must equal the cluster's `override_host` header
    /// source. Lower-case. Default: `x-fulcrum-endpoint`.
    pub override_header: String,
    /// How a request's service (the Envoy cluster it goes to) is found. Default: the cluster
    /// of the route Envoy resolved (`route_cluster`), the only source a client cannot steer.
    pub service: ServiceSource,
    /// Policy per service. A policy in a control-plane snapshot replaces it. Default: defaults.
    pub policy: Policy,
    /// Static endpoints per service, used when no control plane is configured.
    pub endpoints: BTreeMap<String, Vec<Endpoint>>,
    /// The control plane whose snapshot (endpoints and policy) the filter polls.
    pub control_plane: Option<ControlPlane>,
    /// The services (as the `service` source names them) that get a pick; every other
    /// request passes with no header (counted as the `not_listed` fail-open). List exactly the
    /// clusters whose `override_host` reads and whose upstream filter strips the header (in
    /// Istio, the clusters `envoyfilter-override-host.yaml` patches), so the header never
    /// reaches an application; `["*"]` opts in every service, for a proxy whose every
    /// cluster does. Required with `control_plane`, whose snapshot names every service of the
    /// mesh; with static `endpoints` the default is the services listed there.
    pub only_services: Option<Vec<String>>,
    /// Secret keys of sticky-session cookies, 32 hex digits each: the first signs new
    /// cookies, every one is accepted (rotate by putting a new key first, drop the old one
    /// after the cookie TTL). The same on every proxy of a service, so a session survives a
    /// change of proxy. Default: none (a public key: cookies can be forged; the filter warns).
    pub session_keys: Vec<String>,
    /// The most memory, in bytes, the consistent-hash tables (`ring_hash`, `maglev`) of every
    /// service together may take in one VM, 1 MiB..=1 GiB: a snapshot (or static
    /// configuration) whose tables would exceed it is refused, naming the service and the
    /// policy field, and the last good one stays (`fulcrum_core::tables`). Default: 64 MiB.
    pub max_table_bytes: u64,
    /// Which responses say why their request went where it did, in the response header
    /// `x-fulcrum-pick` (and a debug log line): `off`, `on_request` (requests carrying the
    /// header `x-fulcrum-explain`, whatever its value) or `always`. The explanation names
    /// upstream addresses: keep it `off` or `on_request` in production and strip both
    /// headers at the edge. Default: `off`.
    pub explain_picks: ExplainPicks,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            override_header: DEFAULT_OVERRIDE_HEADER.to_owned(),
            service: ServiceSource::default(),
            policy: Policy::default(),
            endpoints: BTreeMap::new(),
            control_plane: None,
            only_services: None,
            session_keys: Vec::new(),
            max_table_bytes: DEFAULT_TABLE_BUDGET_BYTES,
            explain_picks: ExplainPicks::default(),
        }
    }
}

/// Which responses carry the explanation of their pick (`explain_picks`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum ExplainPicks {
    /// None: a pick costs nothing for it, not even a header lookup.
    #[default]
    Off,
    /// Those whose request carries `x-fulcrum-explain` (any value): one header lookup per
    /// request.
    OnRequest,
    /// Every one.
    Always,
}

impl<'de> Deserialize<'de> for ExplainPicks {
    /// One of `"off"`, `"on_request"`, `"always"`; anything else is refused naming the field.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        match value.as_str() {
            "off" => Ok(Self::Off),
            "on_request" => Ok(Self::OnRequest),
            "always" => Ok(Self::Always),
            other => Err(serde::de::Error::custom(format!(
                "explain_picks must be \"off\", \"on_request\" or \"always\", got {other:?}"
            ))),
        }
    }
}

/// Where the service name of a request comes from.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServiceSource {
    /// The `:authority` (Host) header, without a `:port` suffix. The client's word: a request
    /// whose routed cluster differs gets no header (`service_mismatch`), nor one Envoy routed
    /// to no cluster (`no_route`). So do the next two.
    Authority,
    /// The value of a request header (lower-case name).
    Header { name: String },
    /// Always this service: one filter instance in front of one cluster.
    Fixed { name: String },
    /// The cluster of the route Envoy resolved for the request (`xds.cluster_name`), e.g.
    /// Istio's `outbound|8080||checkout.shop.svc.cluster.local`. The default.
    #[default]
    RouteCluster,
}

/// How the filter reaches the control plane's snapshot API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlPlane {
    /// The Envoy cluster that routes to the control plane's HTTP port. Required.
    pub cluster: String,
    /// `:authority` of the snapshot requests. Default: `fulcrum-control-plane`.
    pub authority: String,
    /// Path of the snapshot API. Default: `/v1/snapshot`.
    pub path: String,
    /// How often one VM of the plugin asks for a new version, 100ms..=1h. Default: `"500ms"`.
    #[serde(with = "fulcrum_core::duration")]
    pub poll_interval: Duration,
    /// Timeout of one snapshot request, 10ms..=1m. Default: `"2s"`.
    #[serde(with = "fulcrum_core::duration")]
    pub timeout: Duration,
    /// Largest snapshot body accepted, in bytes, 1 KiB..=256 MiB. Default: 32 MiB.
    pub max_snapshot_bytes: usize,
    /// How long the followed control-plane replica may stay silent before the proxy follows
    /// another one that answers (see `fulcrum_core::replica`), 1s..=1h and at least twice
    /// `poll_interval`. Default: `"10s"`.
    #[serde(with = "fulcrum_core::duration")]
    pub failover_after: Duration,
}

impl Default for ControlPlane {
    fn default() -> Self {
        Self {
            cluster: String::new(),
            authority: "fulcrum-control-plane".to_owned(),
            path: "/v1/snapshot".to_owned(),
            poll_interval: Duration::from_millis(500),
            timeout: Duration::from_secs(2),
            max_snapshot_bytes: 32 << 20,
            failover_after: Duration::from_secs(10),
        }
    }
}

/// Why the plugin configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON of the configuration's shape.
    #[error("plugin configuration JSON is malformed at line {line}, column {column}: {source}")]
    Json {
        line: usize,
        column: usize,
        #[source]
        source: serde_json::Error,
    },
    /// Parsed, but some values are invalid.
    #[error("plugin configuration is invalid:\n{0}")]
    Invalid(#[from] ValidationErrors),
}

impl FilterConfig {
    /// Whether requests for `service` may get a pick under `only_services`.
    pub fn opts_in(&self, service: &str) -> bool {
        self.only_services.as_ref().is_none_or(|only| {
            only.iter()
                .any(|listed| listed == service || listed == ALL_SERVICES)
        })
    }

    /// The sticky-session keys (validated by [`FilterConfig::validate`]; an invalid one is
    /// skipped here).
    pub fn session_keys(&self) -> SessionKeys {
        SessionKeys::new(
            self.session_keys
                .iter()
                .filter_map(|key| SessionKeys::parse_key(key))
                .collect(),
        )
    }

    /// Parses and validates the plugin configuration (empty means `{}`).
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            bytes
        };
        let config: Self = serde_json::from_slice(bytes).map_err(|source| ConfigError::Json {
            line: source.line(),
            column: source.column(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field, collecting every error with its path.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        let mut push = |path: &str, message: String| {
            errors.push(ValidationError {
                path: path.to_owned(),
                message,
            })
        };
        if !is_header_name(&self.override_header) {
            push(
                "override_header",
                format!(
                    "must be a lower-case HTTP header name, got {:?}",
                    self.override_header
                ),
            );
        }
        match &self.service {
            ServiceSource::Header { name } if !is_header_name(name) => push(
                "service.name",
                format!("must be a lower-case HTTP header name, got {name:?}"),
            ),
            ServiceSource::Fixed { name } if name.is_empty() => {
                push("service.name", "must not be empty".to_owned())
            }
            _ => {}
        }
        if let Err(policy_errors) = self.policy.validate() {
            for error in policy_errors.errors {
                push(&format!("policy.{}", error.path), error.message);
            }
            if policy_errors.omitted > 0 {
                push(
                    "policy",
                    format!("… and {} more invalid fields", policy_errors.omitted),
                );
            }
        }
        for (service, endpoints) in &self.endpoints {
            for (index, endpoint) in endpoints.iter().enumerate() {
                if endpoint.weight == 0 {
                    push(
                        &format!("endpoints.{service}[{index}].weight"),
                        "must be at least 1, got 0".to_owned(),
                    );
                }
            }
        }
        if !(1 << 20..=1 << 30).contains(&self.max_table_bytes) {
            push(
                "max_table_bytes",
                format!(
                    "must be within 1048576..=1073741824, got {}",
                    self.max_table_bytes
                ),
            );
        } else if let Err(error) = tables::check_budget(
            &self.policy,
            self.endpoints.iter().map(|(name, endpoints)| {
                (
                    name.as_str(),
                    endpoints.iter().map(|endpoint| endpoint.weight),
                )
            }),
            self.max_table_bytes,
        ) {
            push(&format!("endpoints.{}", error.service), error.to_string());
        }
        match &self.control_plane {
            None if self.endpoints.is_empty() => push(
                "endpoints",
                "no endpoints: set `endpoints` (static) or `control_plane` (polled)".to_owned(),
            ),
            None => {}
            Some(cp) => {
                if cp.cluster.is_empty() {
                    push(
                        "control_plane.cluster",
                        "must name the Envoy cluster of the control plane".to_owned(),
                    );
                }
                if cp.authority.is_empty() {
                    push("control_plane.authority", "must not be empty".to_owned());
                }
                if !cp.path.starts_with('/') {
                    push(
                        "control_plane.path",
                        format!("must start with '/', got {:?}", cp.path),
                    );
                }
                if !(Duration::from_millis(100)..=Duration::from_secs(3600))
                    .contains(&cp.poll_interval)
                {
                    push(
                        "control_plane.poll_interval",
                        "must be within 100ms..=1h".to_owned(),
                    );
                }
                if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&cp.timeout) {
                    push(
                        "control_plane.timeout",
                        "must be within 10ms..=1m".to_owned(),
                    );
                }
                if !(Duration::from_secs(1)..=Duration::from_secs(3600))
                    .contains(&cp.failover_after)
                    || cp.failover_after < cp.poll_interval.saturating_mul(2)
                {
                    push(
                        "control_plane.failover_after",
                        "must be within 1s..=1h and at least twice control_plane.poll_interval"
                            .to_owned(),
                    );
                }
                if !(1024..=256 << 20).contains(&cp.max_snapshot_bytes) {
                    push(
                        "control_plane.max_snapshot_bytes",
                        format!(
                            "must be within 1024..=268435456, got {}",
                            cp.max_snapshot_bytes
                        ),
                    );
                }
            }
        }
        match &self.only_services {
            None if self.control_plane.is_some() => push(
                "only_services",
                format!(
                    "required with control_plane (its snapshot names every service of the mesh): list the services whose Envoy cluster reads `{}` with override_host and strips it, or [\"{ALL_SERVICES}\"] when every cluster of this proxy does",
                    self.override_header
                ),
            ),
            None => {}
            Some(only) => {
                if only.is_empty() {
                    push(
                        "only_services",
                        format!(
                            "must list at least one service, or [\"{ALL_SERVICES}\"] for every service"
                        ),
                    );
                }
                if only.len() > 1 && only.iter().any(|name| name == ALL_SERVICES) {
                    push(
                        "only_services",
                        format!(
                            "\"{ALL_SERVICES}\" stands alone: it already opts in every service"
                        ),
                    );
                }
                for (index, name) in only.iter().enumerate() {
                    if name.is_empty() {
                        push(
                            &format!("only_services[{index}]"),
                            "must not be empty".to_owned(),
                        );
                    }
                }
            }
        }
        for (index, key) in self.session_keys.iter().enumerate() {
            if SessionKeys::parse_key(key).is_none() {
                // The key itself is a secret: never echo it.
                push(
                    &format!("session_keys[{index}]"),
                    format!(
                        "must be 32 hex digits (16 random bytes, e.g. `openssl rand -hex 16`), got {} characters",
                        key.len()
                    ),
                );
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors::new(errors))
        }
    }
}

/// An HTTP/2-valid header name: non-empty lower-case token characters.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_static_endpoints_with_defaults() {
        let config =
            FilterConfig::parse(br#"{"endpoints": {"checkout": [{"address": "10.0.0.1:8080"}]}}"#)
                .expect("valid");
        assert_eq!(config.override_header, DEFAULT_OVERRIDE_HEADER);
        assert_eq!(config.service, ServiceSource::RouteCluster);
        assert_eq!(config.endpoints["checkout"][0].weight, 1);
    }

    #[test]
    fn accepts_a_control_plane_with_defaults() {
        let config = FilterConfig::parse(br#"{"control_plane": {"cluster": "fulcrum"}, "only_services": ["*"], "service": {"from": "header", "name": "x-service"}}"#)
            .expect("valid");
        let control_plane = config.control_plane.expect("set");
        assert_eq!(control_plane.path, "/v1/snapshot");
        assert_eq!(control_plane.poll_interval, Duration::from_millis(500));
        assert_eq!(control_plane.failover_after, Duration::from_secs(10));
    }

    #[test]
    fn refuses_a_failover_shorter_than_two_polls() {
        let error = FilterConfig::parse(br#"{"control_plane": {"cluster": "fulcrum", "poll_interval": "2s", "failover_after": "3s"}, "only_services": ["*"]}"#)
            .expect_err("fails over between two polls")
            .to_string();
        assert!(error.contains("control_plane.failover_after"), "{error}");
        assert!(
            error.contains("twice control_plane.poll_interval"),
            "{error}"
        );
    }

    #[test]
    fn refuses_an_empty_configuration_saying_where_endpoints_come_from() {
        let error = FilterConfig::parse(b"")
            .expect_err("no endpoints")
            .to_string();
        assert!(
            error.contains(
                "endpoints: no endpoints: set `endpoints` (static) or `control_plane` (polled)"
            ),
            "{error}"
        );
    }

    #[test]
    fn reports_every_invalid_field_with_its_path() {
        let error = FilterConfig::parse(
            br#"{
                "override_header": "X-Upper",
                "policy": {"default": {"retry": 9}},
                "control_plane": {"cluster": "", "path": "snapshot", "poll_interval": "1ms"},
                "only_services": ["*", "checkout"]
            }"#,
        )
        .expect_err("invalid");
        let ConfigError::Invalid(errors) = error else {
            panic!("expected validation errors, got {error}")
        };
        let paths: Vec<&str> = errors.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "override_header",
                "policy.default.retry",
                "control_plane.cluster",
                "control_plane.path",
                "control_plane.poll_interval",
                "only_services"
            ]
        );
    }

    #[test]
    fn a_control_plane_requires_the_services_to_balance_to_be_listed() {
        let error = FilterConfig::parse(br#"{"control_plane": {"cluster": "fulcrum"}}"#)
            .expect_err("only_services is required with a control plane")
            .to_string();
        assert!(
            error.contains("only_services: required with control_plane"),
            "{error}"
        );
        let listed = br#"{"control_plane": {"cluster": "fulcrum"}, "only_services": ["checkout"]}"#;
        assert!(FilterConfig::parse(listed).is_ok());
        // Static endpoints name their services themselves.
        let fixed = br#"{"endpoints": {"checkout": [{"address": "10.0.0.1:8080"}]}}"#;
        assert_eq!(
            FilterConfig::parse(fixed).expect("valid").only_services,
            None
        );
    }

    #[test]
    fn explains_no_pick_unless_asked_and_refuses_an_unknown_mode_naming_the_field() {
        let endpoints = r#""endpoints": {"checkout": [{"address": "10.0.0.1:8080"}]}"#;
        let parse = |extra: &str| FilterConfig::parse(format!("{{{endpoints}{extra}}}").as_bytes());
        assert_eq!(parse("").expect("valid").explain_picks, ExplainPicks::Off);
        for (mode, expected) in [
            ("off", ExplainPicks::Off),
            ("on_request", ExplainPicks::OnRequest),
            ("always", ExplainPicks::Always),
        ] {
            let config = parse(&format!(r#", "explain_picks": "{mode}""#)).expect("valid");
            assert_eq!(config.explain_picks, expected);
        }
        let error = parse(r#", "explain_picks": "sometimes""#)
            .expect_err("not a mode")
            .to_string();
        assert!(
            error.contains(
                r#"explain_picks must be "off", "on_request" or "always", got "sometimes""#
            ),
            "{error}"
        );
    }

    #[test]
    fn reports_malformed_json_with_its_location() {
        let error = FilterConfig::parse(b"{\n  \"endpoint\": {}\n}")
            .expect_err("unknown field")
            .to_string();
        assert!(
            error.starts_with("plugin configuration JSON is malformed at line 2"),
            "{error}"
        );
        assert!(error.contains("unknown field `endpoint`"), "{error}");
    }
}
