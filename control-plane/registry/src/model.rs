//! What an instance registers, and its validation into a [`Registration`].
//!
//! [`InstanceSpec`] is the wire shape a client sends (REST JSON, and the gRPC message maps
//! onto it field for field), with "empty means default" semantics like proto3. It is also
//! how a registration is stored in etcd, so one validation guards every way in:
//! [`InstanceSpec::validate`] applies the defaults and reports every bad field by name (the
//! first 16, then how many more), giving a [`Registration`] whose invariants the rest of the
//! crate relies on. A list or map over its limit is one error naming it, its entries unread.
//! [`validate_discovery`] holds a discovery's filters to the same bounds.
//!
//! Sizes are bounded so that a registration cannot bloat what every filter loads: each
//! string and list has a limit, and the endpoint a registration publishes (tags,
//! capabilities, zone and metadata, encoded as the snapshot encodes them, escapes included)
//! takes at most [`MAX_ENDPOINT_BYTES`]. With the registry's cap on live registrations
//! ([`crate::admission::DEFAULT_MAX_INSTANCES`]), the registry's share of the snapshot stays
//! under the filters' 32 MiB cap.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use fulcrum_core::Attributes;
/// One invalid field: the same model as the policy's and the snapshot's validation errors.
pub use fulcrum_core::ValidationError;
use fulcrum_core::policy::{
    DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT, DEFAULT_HEALTHY_THRESHOLD, DEFAULT_HTTP_PATH,
    DEFAULT_UNHEALTHY_THRESHOLD, default_jitter,
};
/// The validated health check: the same model as the policy's `health_check`.
pub use fulcrum_core::policy::{HealthCheck, Probe};
use serde::{Deserialize, Serialize};

/// TTL when the client sends none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Shortest TTL accepted: a lease shorter than a second cannot be renewed reliably.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest TTL accepted.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
const MAX_WEIGHT: u32 = 10_000;
const MAX_LIST: usize = 64;
const MAX_LABEL: usize = 64;
const MAX_METADATA_VALUE: usize = 256;
/// Longest HTTP health check path, in bytes.
const MAX_CHECK_PATH: usize = 256;
/// Longest gRPC health check service name, in bytes.
const MAX_CHECK_SERVICE: usize = 253;
/// Most expected statuses of an HTTP health check.
const MAX_EXPECTED_STATUSES: usize = 16;
/// Most bytes the endpoint a registration publishes takes in the snapshot (as JSON, with its
/// address, weight and health). 10,000 such endpoints take about 20 MiB.
pub const MAX_ENDPOINT_BYTES: usize = 2048;

/// An instance as a client describes it. Zero and empty values mean "the default".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceSpec {
    /// Service (Envoy cluster) name.
    pub name: String,
    /// Instance id, unique in the registry.
    pub id: String,
    /// IPv4 or IPv6 literal.
    pub address: String,
    /// 1-65535.
    pub port: u32,
    /// `http` (default), `http2`, `grpc` or `tcp`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    /// 1-10000; 0 for 1.
    #[serde(skip_serializing_if = "is_zero")]
    pub weight: u32,
    /// Failure domain; empty for none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zone: String,
    /// Labels.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Capabilities.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Key/value attributes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Active health check; none when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
    /// Lease TTL in milliseconds, 1000-3600000; 0 for 30000.
    #[serde(skip_serializing_if = "is_zero")]
    pub ttl_ms: u32,
}

/// An active health check as a client describes it: exactly one of `http`, `tcp`, `grpc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// HTTP GET probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheckSpec>,
    /// TCP connect probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<PortSpec>,
    /// gRPC health v1 probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcCheckSpec>,
    /// 100-60000 ms; 0 for 5000.
    #[serde(skip_serializing_if = "is_zero")]
    pub interval_ms: u32,
    /// 10 ms up to the interval; 0 for 1000 (or the interval, if shorter).
    #[serde(skip_serializing_if = "is_zero")]
    pub timeout_ms: u32,
    /// 1-10; 0 for 2.
    #[serde(skip_serializing_if = "is_zero")]
    pub healthy_threshold: u32,
    /// 1-10; 0 for 3.
    #[serde(skip_serializing_if = "is_zero")]
    pub unhealthy_threshold: u32,
    /// Up to the interval; 0 for interval / 10.
    #[serde(skip_serializing_if = "is_zero")]
    pub jitter_ms: u32,
}

/// HTTP probe settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpCheckSpec {
    /// Path starting with `/`; empty for `/healthz`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Statuses that pass; empty for any 2xx.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u32>,
    /// Port to probe; 0 for the instance's.
    #[serde(skip_serializing_if = "is_zero")]
    pub port: u32,
}

/// TCP probe settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortSpec {
    /// Port to probe; 0 for the instance's.
    #[serde(skip_serializing_if = "is_zero")]
    pub port: u32,
}

/// gRPC probe settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcCheckSpec {
    /// Service asked about; empty for the whole server.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service: String,
    /// Port to probe; 0 for the instance's.
    #[serde(skip_serializing_if = "is_zero")]
    pub port: u32,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// The application protocol an instance speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 (the default).
    #[default]
    Http,
    /// HTTP/2 (h2c).
    Http2,
    /// gRPC.
    Grpc,
    /// Opaque TCP.
    Tcp,
}

impl Protocol {
    /// What Envoy speaks to an instance of this protocol: HTTP/2 for gRPC and HTTP/2, HTTP/1.1
    /// for HTTP, nothing for TCP (an HTTP cluster has no protocol for it; it names none).
    pub fn upstream(self) -> Option<fulcrum_core::UpstreamProtocol> {
        match self {
            Self::Http => Some(fulcrum_core::UpstreamProtocol::Http1),
            Self::Http2 | Self::Grpc => Some(fulcrum_core::UpstreamProtocol::Http2),
            Self::Tcp => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Http2 => "http2",
            Self::Grpc => "grpc",
            Self::Tcp => "tcp",
        }
    }
}

/// A validated registration: every field in range, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Service name: once stored, the view's one allocation per service, which every
    /// registration of the service shares.
    pub name: Arc<str>,
    /// Instance id: once stored, the one allocation the view's maps key it by too.
    pub id: Arc<str>,
    /// Where Envoy sends traffic ([`Registration::address`]): the address and port apart,
    /// 19 bytes where a `SocketAddr` takes 32 (its IPv6 flow and scope, which a registration
    /// never sets).
    ip: IpAddr,
    port: u16,
    /// Application protocol.
    pub protocol: Protocol,
    /// 1-10000.
    pub weight: u32,
    /// Zone, tags, capabilities and metadata ([`Registration::attributes`]), allocated
    /// together and only when one is set: most registrations have none, and inline they made
    /// every stored registration 88 bytes larger. Shared with the endpoint the registration
    /// publishes ([`Registration::endpoint`]).
    attributes: Option<Arc<Attributes>>,
    /// Active health check, boxed: most registrations have none, and an unboxed one would
    /// make every stored registration about 100 bytes larger.
    pub health_check: Option<Box<HealthCheck>>,
    /// Lease TTL in milliseconds, 1 s to 1 h ([`Registration::ttl`]): 4 bytes where a
    /// `Duration` takes 16.
    ttl_ms: u32,
}

/// Every field that failed validation, in field order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FieldErrors(pub Vec<ValidationError>);

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", error.path, error.message)?;
        }
        Ok(())
    }
}

impl FieldErrors {
    /// One error.
    pub fn one(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self(vec![ValidationError {
            path: field.into(),
            message: reason.into(),
        }])
    }
}

/// Errors listed per request at most. A request with more gets these and one entry counting
/// the rest, so the answer to hostile input does not grow with it.
const MAX_ERRORS: usize = 16;

/// The path of the entry counting the errors beyond [`MAX_ERRORS`]: no field is named so.
const MORE_ERRORS: &str = "(more)";

#[derive(Default)]
struct Errors {
    /// The first [`MAX_ERRORS`] errors.
    listed: Vec<ValidationError>,
    /// How many more there were.
    unlisted: usize,
}

impl Errors {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        if self.listed.len() < MAX_ERRORS {
            self.listed.push(ValidationError {
                path: field.into(),
                message: reason.into(),
            });
        } else {
            self.unlisted += 1;
        }
    }

    /// `Ok` when nothing was added; else every listed error, then the count of the rest.
    fn into_result(self) -> Result<(), FieldErrors> {
        let mut listed = self.listed;
        if listed.is_empty() {
            return Ok(());
        }
        if self.unlisted > 0 {
            listed.push(ValidationError {
                path: MORE_ERRORS.to_owned(),
                message: format!(
                    "and {} more invalid fields, not listed: fix the ones above and send again to see them",
                    self.unlisted
                ),
            });
        }
        Err(FieldErrors(listed))
    }
}

/// Checks a service name: what Envoy accepts as a cluster name and DNS-like labels allow.
pub fn validate_service_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!("must be 1-253 characters, got {}", name.len()));
    }
    let valid = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_'));
    if !valid {
        return Err(format!(
            "`{name}` may only contain lowercase letters, digits, '-', '.' and '_'"
        ));
    }
    Ok(())
}

/// Checks an instance id.
pub fn validate_instance_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!("must be 1-128 characters, got {}", id.len()));
    }
    let valid = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'));
    if !valid {
        return Err(format!(
            "`{id}` may only contain letters, digits, '-', '.', '_' and ':'"
        ));
    }
    Ok(())
}

/// Checks a tag, capability, zone or metadata key: 1-64 visible ASCII characters.
fn validate_label(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_LABEL {
        return Err(format!(
            "must be 1-{MAX_LABEL} characters, got {}",
            value.len()
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "`{value}` must be visible ASCII without spaces or commas"
        ));
    }
    if value.contains(',') {
        return Err(format!("`{value}` must not contain ','"));
    }
    Ok(())
}

fn port(value: u32, field: &str, errors: &mut Errors) -> u16 {
    match u16::try_from(value) {
        Ok(port) if port > 0 => port,
        _ => {
            errors.add(field, format!("must be 1-65535, got {value}"));
            0
        }
    }
}

/// A probe port override: 0 means the instance's port. Always resolved, so a registration
/// records the port it probes. An invalid port (this one, or the instance's) is reported once,
/// on its own field, and left unresolved.
fn override_port(value: u32, instance: u16, field: &str, errors: &mut Errors) -> Option<u16> {
    let port = if value == 0 {
        instance
    } else {
        port(value, field, errors)
    };
    (port != 0).then_some(port)
}

/// Checks tags or capabilities: more than [`MAX_LIST`] is one error naming `field`, without
/// looking at any entry; else each entry must be a label.
fn check_labels<'a>(
    values: impl ExactSizeIterator<Item = &'a String>,
    field: &str,
    errors: &mut Errors,
) {
    if values.len() > MAX_LIST {
        errors.add(
            field,
            format!("at most {MAX_LIST} entries, got {}", values.len()),
        );
        return;
    }
    for (index, value) in values.enumerate() {
        if let Err(reason) = validate_label(value) {
            errors.add(format!("{field}[{index}]"), reason);
        }
    }
}

/// Checks metadata: more than [`MAX_LIST`] entries is one error naming `metadata`, without
/// looking at any entry; else each key must be a label and each value short enough.
fn check_metadata(metadata: &BTreeMap<String, String>, errors: &mut Errors) {
    if metadata.len() > MAX_LIST {
        errors.add(
            "metadata",
            format!("at most {MAX_LIST} entries, got {}", metadata.len()),
        );
        return;
    }
    for (key, value) in metadata {
        if let Err(reason) = validate_label(key) {
            errors.add(format!("metadata[{key}]"), format!("key {reason}"));
        }
        if value.len() > MAX_METADATA_VALUE {
            errors.add(
                format!("metadata[{key}]"),
                format!(
                    "value must be at most {MAX_METADATA_VALUE} bytes, got {}",
                    value.len()
                ),
            );
        }
    }
}

/// Checks a discovery: the service name, and the filters with the bounds of what a
/// registration may hold (a filter beyond them could match no registration anyway). Errors
/// name the field: `name`, `zone`, `tags`, `capabilities` or `metadata`.
pub fn validate_discovery(
    service: &str,
    zone: Option<&str>,
    tags: &BTreeSet<String>,
    capabilities: &BTreeSet<String>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), FieldErrors> {
    let mut errors = Errors::default();
    if let Err(reason) = validate_service_name(service) {
        errors.add("name", reason);
    }
    if let Some(Err(reason)) = zone.map(validate_label) {
        errors.add("zone", reason);
    }
    check_labels(tags.iter(), "tags", &mut errors);
    check_labels(capabilities.iter(), "capabilities", &mut errors);
    check_metadata(metadata, &mut errors);
    errors.into_result()
}

fn millis(value: u32, default: Duration) -> Duration {
    if value == 0 {
        default
    } else {
        Duration::from_millis(u64::from(value))
    }
}

fn millis_u32(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

impl InstanceSpec {
    /// Validates every field and applies the defaults.
    pub fn validate(&self) -> Result<Registration, FieldErrors> {
        let mut errors = Errors::default();
        if let Err(reason) = validate_service_name(&self.name) {
            errors.add("name", reason);
        }
        if let Err(reason) = validate_instance_id(&self.id) {
            errors.add("id", reason);
        }
        let ip = match self.address.parse::<IpAddr>() {
            Ok(ip) if !is_unicast(ip) => {
                errors.add(
                    "address",
                    format!(
                        "`{ip}` is not a unicast address Envoy can send to (unspecified, 0.0.0.0/8, multicast and broadcast addresses are never accepted)"
                    ),
                );
                ip
            }
            Ok(ip) => ip,
            Err(_) => {
                errors.add(
                    "address",
                    format!(
                        "`{}` is not an IPv4 or IPv6 literal (names are not resolved)",
                        self.address
                    ),
                );
                IpAddr::from([0, 0, 0, 0])
            }
        };
        let instance_port = port(self.port, "port", &mut errors);
        let protocol = match self.protocol.as_str() {
            "" | "http" => Protocol::Http,
            "http2" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "tcp" => Protocol::Tcp,
            other => {
                errors.add(
                    "protocol",
                    format!("`{other}` is not one of http, http2, grpc, tcp"),
                );
                Protocol::Http
            }
        };
        let weight = match self.weight {
            0 => 1,
            weight if weight > MAX_WEIGHT => {
                errors.add("weight", format!("must be 1-{MAX_WEIGHT}, got {weight}"));
                weight
            }
            weight => weight,
        };
        let zone = if self.zone.is_empty() {
            None
        } else {
            if let Err(reason) = validate_label(&self.zone) {
                errors.add("zone", reason);
            }
            Some(self.zone.clone())
        };
        check_labels(self.tags.iter(), "tags", &mut errors);
        check_labels(self.capabilities.iter(), "capabilities", &mut errors);
        check_metadata(&self.metadata, &mut errors);
        let ttl = millis(self.ttl_ms, DEFAULT_TTL);
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            errors.add(
                "ttl_ms",
                format!("must be 1000-3600000 (or 0 for 30000), got {}", self.ttl_ms),
            );
        }
        let health_check = self
            .health_check
            .as_ref()
            .map(|spec| Box::new(spec.validate(instance_port, &mut errors)));
        errors.into_result()?;
        let attributes = Attributes {
            zone,
            tags: self.tags.iter().cloned().collect(),
            capabilities: self.capabilities.iter().cloned().collect(),
            metadata: self.metadata.clone(),
        };
        let registration = Registration {
            name: self.name.as_str().into(),
            id: self.id.as_str().into(),
            ip,
            port: instance_port,
            protocol,
            weight,
            attributes: attributes.into_shared(),
            health_check,
            ttl_ms: millis_u32(ttl),
        };
        registration.check_published_size()?;
        Ok(registration)
    }
}

/// Whether Envoy can send to `ip`: not unspecified, not in 0.0.0.0/8 ("this network"), not
/// multicast, not the IPv4 broadcast address (IPv4-mapped IPv6 addresses as their IPv4).
fn is_unicast(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => !(v4.octets()[0] == 0 || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// Bytes `value` takes as JSON.
fn json_len(value: &impl Serialize) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len())
}

impl HealthCheckSpec {
    /// The check this spec describes, with defaults filled in. The wire form (one of `http`,
    /// `tcp`, `grpc`; numbers that fit) is checked here; ranges by [`HealthCheck::validate`],
    /// the policy's own validator, with its paths named as this spec's fields.
    fn validate(&self, instance_port: u16, errors: &mut Errors) -> HealthCheck {
        let kinds = [self.http.is_some(), self.tcp.is_some(), self.grpc.is_some()];
        if kinds.iter().filter(|set| **set).count() != 1 {
            errors.add("health_check", "set exactly one of `http`, `tcp` or `grpc`");
        }
        let probe = if let Some(http) = &self.http {
            let path = if http.path.is_empty() {
                DEFAULT_HTTP_PATH.to_owned()
            } else {
                http.path.clone()
            };
            if path.len() > MAX_CHECK_PATH {
                errors.add(
                    "health_check.http.path",
                    format!("must be at most {MAX_CHECK_PATH} bytes, got {}", path.len()),
                );
            }
            // Over the limit, one error and no entry looked at.
            let mut expected_statuses = Vec::new();
            if http.expected_statuses.len() > MAX_EXPECTED_STATUSES {
                errors.add(
                    "health_check.http.expected_statuses",
                    format!(
                        "at most {MAX_EXPECTED_STATUSES} entries, got {}",
                        http.expected_statuses.len()
                    ),
                );
            } else {
                for (index, status) in http.expected_statuses.iter().enumerate() {
                    match u16::try_from(*status) {
                        Ok(status) => expected_statuses.push(status),
                        Err(_) => errors.add(
                            format!("health_check.http.expected_statuses[{index}]"),
                            format!("must be an HTTP status 100..=599, got {status}"),
                        ),
                    }
                }
            }
            Probe::Http {
                path,
                expected_statuses,
                port: override_port(http.port, instance_port, "health_check.http.port", errors),
            }
        } else if let Some(grpc) = &self.grpc {
            if grpc.service.len() > MAX_CHECK_SERVICE {
                errors.add(
                    "health_check.grpc.service",
                    format!(
                        "must be at most {MAX_CHECK_SERVICE} bytes, got {}",
                        grpc.service.len()
                    ),
                );
            }
            Probe::Grpc {
                service: grpc.service.clone(),
                port: override_port(grpc.port, instance_port, "health_check.grpc.port", errors),
            }
        } else {
            let port = self.tcp.as_ref().map_or(0, |tcp| tcp.port);
            Probe::Tcp {
                port: override_port(port, instance_port, "health_check.tcp.port", errors),
            }
        };
        let interval = millis(self.interval_ms, DEFAULT_CHECK_INTERVAL);
        let or_default = |value: u32, default: u32| if value == 0 { default } else { value };
        let check = HealthCheck {
            probe,
            interval,
            timeout: millis(self.timeout_ms, DEFAULT_CHECK_TIMEOUT.min(interval)),
            healthy_threshold: or_default(self.healthy_threshold, DEFAULT_HEALTHY_THRESHOLD),
            unhealthy_threshold: or_default(self.unhealthy_threshold, DEFAULT_UNHEALTHY_THRESHOLD),
            jitter: millis(self.jitter_ms, default_jitter(interval)),
        };
        if let Err(invalid) = check.validate() {
            for error in invalid.errors {
                errors.add(spec_field(&error.path), error.message);
            }
        }
        check
    }
}

/// The field of this wire form that [`HealthCheck::validate`]'s `path` names: durations are
/// `*_ms` here.
fn spec_field(path: &str) -> String {
    match path {
        "interval" | "timeout" | "jitter" => format!("health_check.{path}_ms"),
        _ => format!("health_check.{path}"),
    }
}

impl Registration {
    /// Where Envoy sends traffic.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// The lease's TTL, 1 s to 1 h.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(u64::from(self.ttl_ms))
    }

    /// Its zone, tags, capabilities and metadata (each empty when not set).
    pub fn attributes(&self) -> &Attributes {
        self.attributes.as_deref().unwrap_or(Attributes::none())
    }

    /// Refuses a registration whose published endpoint would take more than
    /// [`MAX_ENDPOINT_BYTES`], naming the field that takes the most.
    fn check_published_size(&self) -> Result<(), FieldErrors> {
        let size = json_len(&self.endpoint(fulcrum_core::Health::Unhealthy));
        if size <= MAX_ENDPOINT_BYTES {
            return Ok(());
        }
        let attributes = self.attributes();
        let parts = [
            ("metadata", json_len(&attributes.metadata)),
            ("tags", json_len(&attributes.tags)),
            ("capabilities", json_len(&attributes.capabilities)),
            ("zone", json_len(&attributes.zone)),
        ];
        let field = parts
            .iter()
            .max_by_key(|(_, bytes)| *bytes)
            .map_or("metadata", |(field, _)| field);
        Err(FieldErrors::one(
            field,
            format!(
                "the instance's endpoint would take {size} bytes of the snapshot every filter loads, at most {MAX_ENDPOINT_BYTES} (tags, capabilities, zone and metadata together, as JSON with escapes); `{field}` takes the most: shorten or drop some"
            ),
        ))
    }

    /// The spec that validates back into this registration (defaults written out), used to
    /// store it and to answer clients.
    pub fn to_spec(&self) -> InstanceSpec {
        let attributes = self.attributes();
        InstanceSpec {
            name: self.name.to_string(),
            id: self.id.to_string(),
            address: self.ip.to_string(),
            port: u32::from(self.port),
            protocol: self.protocol.as_str().to_owned(),
            weight: self.weight,
            zone: attributes.zone.clone().unwrap_or_default(),
            tags: attributes.tags.iter().cloned().collect(),
            capabilities: attributes.capabilities.iter().cloned().collect(),
            metadata: attributes.metadata.clone(),
            health_check: self
                .health_check
                .as_deref()
                .map(HealthCheckSpec::from_check),
            ttl_ms: self.ttl_ms,
        }
    }

    /// The endpoint this registration contributes to its service, with `health`: its
    /// attributes are the registration's, shared.
    pub fn endpoint(&self, health: fulcrum_core::Health) -> fulcrum_core::Endpoint {
        fulcrum_core::Endpoint::new(self.address())
            .with_weight(self.weight)
            .with_health(health)
            .with_shared_attributes(self.attributes.clone())
    }
}

impl HealthCheckSpec {
    /// The spec that validates back into `check`.
    fn from_check(check: &HealthCheck) -> Self {
        let mut spec = Self {
            interval_ms: millis_u32(check.interval),
            timeout_ms: millis_u32(check.timeout),
            healthy_threshold: check.healthy_threshold,
            unhealthy_threshold: check.unhealthy_threshold,
            jitter_ms: millis_u32(check.jitter),
            ..Self::default()
        };
        let port = check.probe.port().map_or(0, u32::from);
        match &check.probe {
            Probe::Http {
                path,
                expected_statuses,
                ..
            } => {
                spec.http = Some(HttpCheckSpec {
                    path: path.clone(),
                    expected_statuses: expected_statuses.iter().map(|s| u32::from(*s)).collect(),
                    port,
                });
            }
            Probe::Tcp { .. } => spec.tcp = Some(PortSpec { port }),
            Probe::Grpc { service, .. } => {
                spec.grpc = Some(GrpcCheckSpec {
                    service: service.clone(),
                    port,
                })
            }
        }
        spec
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            name: "checkout".into(),
            id: "checkout-1".into(),
            address: "127.0.0.1".into(),
            port: 8080,
            ..InstanceSpec::default()
        }
    }

    fn fields(error: &FieldErrors) -> Vec<&str> {
        error.0.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn attributes_are_allocated_only_when_one_is_set_and_shared_with_the_endpoint() {
        let mut tagged = spec();
        tagged.tags = vec!["canary".into()];
        let registration = tagged.validate().expect("valid");
        let attributes = registration.attributes.as_ref().expect("allocated");
        assert_eq!(attributes.tags, BTreeSet::from(["canary".to_owned()]));
        assert_eq!(
            registration.to_spec().validate().expect("valid"),
            registration
        );
        let endpoint = registration.endpoint(fulcrum_core::Health::Healthy);
        assert_eq!(endpoint.tags(), &attributes.tags);
        assert_eq!(endpoint.zone(), None);
        assert!(
            endpoint
                .shared_attributes()
                .is_some_and(|shared| Arc::ptr_eq(shared, attributes)),
            "the endpoint shares the registration's attributes, not a copy"
        );
        let plain = spec().validate().expect("valid");
        assert_eq!(
            plain
                .endpoint(fulcrum_core::Health::Healthy)
                .shared_attributes(),
            None
        );
    }

    #[test]
    fn minimal_spec_gets_the_documented_defaults() {
        let registration = spec().validate().expect("valid");
        assert_eq!(
            registration.address(),
            "127.0.0.1:8080".parse().expect("addr")
        );
        assert_eq!(registration.protocol, Protocol::Http);
        assert_eq!(registration.weight, 1);
        assert_eq!(registration.ttl(), DEFAULT_TTL);
        assert_eq!(registration.attributes(), &Attributes::default());
        assert_eq!(registration.attributes, None, "nothing boxed");
        assert_eq!(registration.health_check, None);
    }

    #[test]
    fn health_check_defaults_probe_the_instance_port_every_five_seconds() {
        let mut input = spec();
        input.health_check = Some(HealthCheckSpec {
            http: Some(HttpCheckSpec::default()),
            ..HealthCheckSpec::default()
        });
        let check = input
            .validate()
            .expect("valid")
            .health_check
            .expect("check");
        assert_eq!(
            check.probe,
            Probe::Http {
                path: "/healthz".into(),
                expected_statuses: vec![],
                port: Some(8080)
            }
        );
        assert_eq!(check.interval, Duration::from_secs(5));
        assert_eq!(check.timeout, Duration::from_secs(1));
        assert_eq!(check.jitter, Duration::from_millis(500));
        assert_eq!((check.healthy_threshold, check.unhealthy_threshold), (2, 3));
    }

    #[test]
    fn every_bad_field_is_named() {
        let input = InstanceSpec {
            name: "Checkout!".into(),
            id: String::new(),
            address: "db.internal".into(),
            port: 70_000,
            protocol: "smtp".into(),
            weight: 20_000,
            tags: vec!["ok".into(), "has space".into()],
            ttl_ms: 10,
            health_check: Some(HealthCheckSpec {
                interval_ms: 50,
                ..HealthCheckSpec::default()
            }),
            ..InstanceSpec::default()
        };
        let error = input.validate().expect_err("invalid");
        assert_eq!(
            fields(&error),
            [
                "name",
                "id",
                "address",
                "port",
                "protocol",
                "weight",
                "tags[1]",
                "ttl_ms",
                "health_check",
                "health_check.interval_ms",
            ]
        );
        assert!(
            error
                .to_string()
                .contains("port: must be 1-65535, got 70000"),
            "{error}"
        );
    }

    #[test]
    fn timeout_longer_than_the_interval_is_refused() {
        let mut input = spec();
        input.health_check = Some(HealthCheckSpec {
            tcp: Some(PortSpec::default()),
            interval_ms: 200,
            timeout_ms: 500,
            ..HealthCheckSpec::default()
        });
        let error = input.validate().expect_err("invalid");
        assert_eq!(fields(&error), ["health_check.timeout_ms"]);
    }

    #[test]
    fn a_list_over_its_limit_is_one_error_naming_it_without_its_entries_read() {
        let mut input = spec();
        input.tags = vec![String::new(); 100_000];
        let error = input.validate().expect_err("too many tags");
        assert_eq!(fields(&error), ["tags"]);
        assert!(
            error.to_string().contains("at most 64 entries, got 100000"),
            "{error}"
        );
        let mut input = spec();
        input.capabilities = vec![" ".into(); MAX_LIST + 1];
        let error = input.validate().expect_err("too many capabilities");
        assert_eq!(fields(&error), ["capabilities"]);
        let mut input = spec();
        input.health_check = Some(HealthCheckSpec {
            http: Some(HttpCheckSpec {
                expected_statuses: vec![u32::MAX; 100_000],
                ..HttpCheckSpec::default()
            }),
            ..HealthCheckSpec::default()
        });
        let error = input.validate().expect_err("too many statuses");
        assert_eq!(fields(&error), ["health_check.http.expected_statuses"]);
    }

    #[test]
    fn metadata_over_its_limit_is_one_error_naming_it_without_its_entries_read() {
        let mut input = spec();
        input.metadata = (0..100_000)
            .map(|index| (format!("bad key {index}"), "v".repeat(1000)))
            .collect();
        let error = input.validate().expect_err("too much metadata");
        assert_eq!(fields(&error), ["metadata"]);
        assert!(
            error.to_string().contains("at most 64 entries, got 100000"),
            "{error}"
        );
    }

    #[test]
    fn errors_beyond_the_first_sixteen_are_counted_not_listed() {
        let mut input = spec();
        input.tags = vec![" ".into(); MAX_LIST];
        input.capabilities = vec![String::new(); MAX_LIST];
        let error = input.validate().expect_err("every entry invalid");
        let fields = fields(&error);
        assert_eq!(fields.len(), MAX_ERRORS + 1);
        assert!(
            fields[..MAX_ERRORS]
                .iter()
                .all(|field| field.starts_with("tags["))
        );
        assert_eq!(fields[MAX_ERRORS], MORE_ERRORS);
        assert!(
            error.to_string().contains("and 112 more invalid fields"),
            "{error}"
        );
    }

    #[test]
    fn discovery_filters_are_held_to_a_registrations_bounds() {
        let tags = (0..100_000).map(|index| index.to_string()).collect();
        let error = validate_discovery("svc", None, &tags, &BTreeSet::new(), &BTreeMap::new())
            .expect_err("too many tags");
        assert_eq!(fields(&error), ["tags"]);
        let metadata = BTreeMap::from([("k".to_owned(), "v".repeat(MAX_METADATA_VALUE + 1))]);
        let error = validate_discovery(
            "Bad Name",
            Some(&"z".repeat(MAX_LABEL + 1)),
            &BTreeSet::new(),
            &BTreeSet::from([String::new()]),
            &metadata,
        )
        .expect_err("every field bad");
        assert_eq!(
            fields(&error),
            ["name", "zone", "capabilities[0]", "metadata[k]"]
        );
        let fine = BTreeSet::from(["a".to_owned()]);
        assert_eq!(
            validate_discovery(
                "svc",
                Some("z1"),
                &fine,
                &fine,
                &BTreeMap::from([("k".to_owned(), String::new())])
            ),
            Ok(())
        );
    }

    #[test]
    fn unknown_json_field_is_refused() {
        let error =
            serde_json::from_str::<InstanceSpec>(r#"{"name":"a","adress":"x"}"#).expect_err("typo");
        assert!(error.to_string().contains("adress"), "{error}");
    }

    /// A spec with every list and string at its longest, of characters JSON escapes.
    fn maximal() -> InstanceSpec {
        let label = |index: usize| format!("{index:02}{}", "\"".repeat(MAX_LABEL - 2));
        InstanceSpec {
            zone: label(99),
            tags: (0..MAX_LIST).map(label).collect(),
            capabilities: (0..MAX_LIST).map(label).collect(),
            metadata: (0..MAX_LIST)
                .map(|index| (label(index), "\u{1}".repeat(MAX_METADATA_VALUE)))
                .collect(),
            ..spec()
        }
    }

    fn published_len(registration: &Registration) -> usize {
        json_len(&registration.endpoint(fulcrum_core::Health::Unhealthy))
    }

    #[test]
    fn a_registration_whose_endpoint_would_bloat_the_snapshot_is_refused_naming_its_largest_field()
    {
        let error = maximal().validate().expect_err("too large");
        assert_eq!(fields(&error), ["metadata"]);
        assert!(error.to_string().contains("2048"), "{error}");
        let mut tags_only = spec();
        tags_only.tags = maximal().tags;
        let error = tags_only.validate().expect_err("too large");
        assert_eq!(fields(&error), ["tags"]);
    }

    #[test]
    fn addresses_envoy_cannot_send_to_are_refused() {
        for address in [
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "::",
            "ff02::1",
            "::ffff:0.0.0.0",
        ] {
            let input = InstanceSpec {
                address: address.into(),
                ..spec()
            };
            let error = input.validate().expect_err(address);
            assert_eq!(fields(&error), ["address"], "{address}");
        }
    }

    #[test]
    fn health_check_strings_and_lists_are_bounded() {
        let mut input = spec();
        input.health_check = Some(HealthCheckSpec {
            http: Some(HttpCheckSpec {
                path: format!("/{}", "a".repeat(MAX_CHECK_PATH)),
                expected_statuses: vec![200; MAX_EXPECTED_STATUSES + 1],
                port: 0,
            }),
            ..HealthCheckSpec::default()
        });
        let error = input.validate().expect_err("too long");
        assert_eq!(
            fields(&error),
            [
                "health_check.http.path",
                "health_check.http.expected_statuses"
            ]
        );
        input.health_check = Some(HealthCheckSpec {
            grpc: Some(GrpcCheckSpec {
                service: "s".repeat(MAX_CHECK_SERVICE + 1),
                port: 0,
            }),
            ..HealthCheckSpec::default()
        });
        let error = input.validate().expect_err("too long");
        assert_eq!(fields(&error), ["health_check.grpc.service"]);
    }

    proptest! {
        #[test]
        fn a_valid_registration_round_trips_through_its_spec(
            port in 1u16..,
            weight in 1u32..=10_000,
            ttl_ms in 1000u32..=3_600_000,
            tags in proptest::collection::vec("[a-z0-9.-]{1,10}", 0..4),
            interval_ms in 100u32..=60_000,
        ) {
            let input = InstanceSpec {
                port: u32::from(port),
                weight,
                ttl_ms,
                tags,
                health_check: Some(HealthCheckSpec {
                    grpc: Some(GrpcCheckSpec::default()),
                    interval_ms,
                    ..HealthCheckSpec::default()
                }),
                ..spec()
            };
            let registration = input.validate().expect("valid");
            prop_assert_eq!(registration.to_spec().validate().expect("still valid"), registration);
        }

        #[test]
        fn every_valid_registration_publishes_at_most_the_endpoint_budget(
            tags in proptest::collection::vec("[!-~]{1,64}", 0..64),
            capabilities in proptest::collection::vec("[\"\\\\a-z]{1,64}", 0..64),
            metadata in proptest::collection::btree_map("[a-z\"]{1,64}", "(?s).{0,256}", 0..64),
            zone in "[\"a-z]{0,64}",
        ) {
            let input = InstanceSpec { tags, capabilities, metadata, zone, ..spec() };
            if let Ok(registration) = input.validate() {
                prop_assert!(published_len(&registration) <= MAX_ENDPOINT_BYTES);
            }
        }

        #[test]
        fn validation_never_panics(name in ".{0,20}", address in ".{0,20}", port in any::<u32>()) {
            let _ = InstanceSpec { name, address, port, ..spec() }.validate();
        }
    }
}
