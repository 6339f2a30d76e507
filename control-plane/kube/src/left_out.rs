//! What the mapping leaves out of the clusters, and the checks that decide it.
//!
//! Everything read from the API server is untrusted: whoever may write a Service or an
//! EndpointSlice in a watched namespace (or a buggy controller, or an API server that is not
//! Kubernetes') writes it. A bad entry is left out on its own (an address, a slice, a Service
//! over its budget), never its whole Service or the snapshot, and is reported as a
//! [`LeftOut`] naming the object, the field, what was wrong and how to fix it.
//!
//! Addresses are held to what the API server's own validation admits in an EndpointSlice
//! (`ValidateEndpointIP`): an IP of the slice's `addressType`, not unspecified, loopback,
//! link-local (where cloud metadata services answer, `169.254.169.254`) or link-local
//! multicast. An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is read as the IPv4 address it
//! carries, so it can neither slip a loopback or metadata address past these checks nor list
//! one pod twice.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::{
    core::v1::ServicePort,
    discovery::v1::{EndpointPort, EndpointSlice},
};

/// Why an entry was left out; the `reason` label of `fulcrum_kube_left_out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// An endpoint address that is no IP, not of its slice's type, or one Kubernetes refuses.
    Address,
    /// A slice whose `addressType` is neither `IPv4`, `IPv6` nor `FQDN`.
    AddressType,
    /// A slice port that is not a port number or whose name is listed twice.
    Port,
    /// A slice over the API's limit of endpoints or ports.
    TooManyEndpoints,
    /// A Service whose clusters would take more than [`crate::Mapping::max_service_bytes`].
    OverBudget,
}

impl Reason {
    /// Every reason, in the order the metrics list them.
    pub const ALL: [Self; 5] = [
        Self::Address,
        Self::AddressType,
        Self::Port,
        Self::TooManyEndpoints,
        Self::OverBudget,
    ];

    /// Its name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::AddressType => "address_type",
            Self::Port => "port",
            Self::TooManyEndpoints => "too_many_endpoints",
            Self::OverBudget => "over_budget",
        }
    }
}

/// One entry the mapping left out: `EndpointSlice shop/checkout-abc
/// endpoints[3].addresses[0]: ...`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeftOut {
    /// `EndpointSlice` or `Service`.
    pub kind: &'static str,
    /// The object's namespace.
    pub namespace: String,
    /// The object's name.
    pub name: String,
    /// The field, as a path in the object (`endpoints[3].addresses[0]`, `ports[1].port`).
    pub field: String,
    /// Why, for the metrics.
    pub reason: Reason,
    /// What was wrong, what was left out and how to fix it.
    pub message: String,
}

impl fmt::Display for LeftOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{} {}: {}",
            self.kind, self.namespace, self.name, self.field, self.message
        )
    }
}

impl LeftOut {
    /// An entry of `slice`.
    pub(crate) fn slice(
        slice: &EndpointSlice,
        field: String,
        reason: Reason,
        message: String,
    ) -> Self {
        Self {
            kind: "EndpointSlice",
            namespace: slice.metadata.namespace.clone().unwrap_or_default(),
            name: slice.metadata.name.clone().unwrap_or_default(),
            field,
            reason,
            message,
        }
    }
}

/// The IP family an EndpointSlice carries, from its `addressType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of `slice`, `Ok(None)` for an `FQDN` slice (not mapped: Envoy needs IPs),
    /// an error for a type the API does not define.
    pub(crate) fn of(slice: &EndpointSlice) -> Result<Option<Self>, LeftOut> {
        match slice.address_type.as_str() {
            "IPv4" => Ok(Some(Self::V4)),
            "IPv6" => Ok(Some(Self::V6)),
            "FQDN" => Ok(None),
            other => Err(LeftOut::slice(
                slice,
                "addressType".to_owned(),
                Reason::AddressType,
                format!(
                    "{other:?} is not an address type of the EndpointSlice API (IPv4, IPv6, FQDN); the slice is left out, fix the controller that writes it"
                ),
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

/// The IP of address `address` (endpoint `endpoint`'s first) of `slice`, whose family is
/// `family`, if Kubernetes would admit it there (see the module docs).
pub(crate) fn endpoint_ip(
    slice: &EndpointSlice,
    family: Family,
    endpoint: usize,
    address: &str,
) -> Result<IpAddr, LeftOut> {
    let refuse = |problem: String| {
        LeftOut::slice(
            slice,
            format!("endpoints[{endpoint}].addresses[0]"),
            Reason::Address,
            format!(
                "{problem}; the endpoint is left out, fix the controller that writes this slice"
            ),
        )
    };
    let parsed: IpAddr = address.parse().map_err(|_| {
        refuse(format!(
            "{address:?} is not an IP address (zone indexes such as %eth0 are not allowed)"
        ))
    })?;
    let ip = parsed.to_canonical();
    let actual = match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    };
    if actual != family {
        return Err(refuse(format!(
            "{address} is an {} address in an {} slice",
            actual.name(),
            family.name()
        )));
    }
    match special(ip) {
        Some(class) => Err(refuse(format!(
            "{address} is {class}, which Kubernetes refuses in an EndpointSlice"
        ))),
        None => Ok(ip),
    }
}

/// What makes `ip` an address no endpoint has, as the API server's `ValidateEndpointIP`.
fn special(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) if ip.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(ip) if ip.is_loopback() => Some("a loopback address (127.0.0.0/8)"),
        IpAddr::V4(ip) if ip.is_link_local() => {
            Some("a link-local address (169.254.0.0/16, where cloud metadata services answer)")
        }
        IpAddr::V4(ip) if is_v4_link_local_multicast(ip) => {
            Some("a link-local multicast address (224.0.0.0/24)")
        }
        IpAddr::V6(ip) if ip.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(ip) if ip.is_loopback() => Some("the loopback address (::1)"),
        IpAddr::V6(ip) if ip.is_unicast_link_local() => Some("a link-local address (fe80::/10)"),
        IpAddr::V6(ip) if is_v6_link_local_multicast(ip) => {
            Some("a link-local multicast address (ff02::/16)")
        }
        _ => None,
    }
}

fn is_v4_link_local_multicast(ip: Ipv4Addr) -> bool {
    matches!(ip.octets(), [224, 0, 0, _])
}

fn is_v6_link_local_multicast(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xff0f == 0xff02
}

/// The port number of `slice`'s port serving Service port `port` (same name, unset and
/// empty alike, and TCP): `Ok(None)` when the slice lists none (it serves other ports), an
/// error when the one it lists is no port number or its name is listed twice.
pub(crate) fn target_port(
    slice: &EndpointSlice,
    port: &ServicePort,
) -> Result<Option<u16>, LeftOut> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let mut matching = ports
        .iter()
        .enumerate()
        .filter(|(_, candidate)| serves(candidate, port));
    let Some((index, found)) = matching.next() else {
        return Ok(None);
    };
    let name = port.name.as_deref().unwrap_or_default();
    if let Some((again, _)) = matching.next() {
        return Err(LeftOut::slice(
            slice,
            format!("ports[{again}].name"),
            Reason::Port,
            format!(
                "port name {name:?} is listed again (first at ports[{index}]), so its target port is ambiguous; the slice is left out of the Service port's cluster, fix the controller that writes it (names must be unique)"
            ),
        ));
    }
    let refuse = |problem: String| {
        LeftOut::slice(
            slice,
            format!("ports[{index}].port"),
            Reason::Port,
            format!(
                "{problem}; the slice is left out of the cluster of Service port {name:?}, set it to the Service's target port"
            ),
        )
    };
    match found.port {
        None => Err(refuse(
            "unset (\"all ports\"), so no target port is known".to_owned(),
        )),
        Some(number) => match u16::try_from(number) {
            Ok(number) if number != 0 => Ok(Some(number)),
            _ => Err(refuse(format!("{number} is not a port number (1-65535)"))),
        },
    }
}

/// Whether slice port `candidate` serves Service port `port`: same name, unset and empty
/// alike, and TCP.
pub(crate) fn serves(candidate: &EndpointPort, port: &ServicePort) -> bool {
    candidate.name.as_deref().unwrap_or_default() == port.name.as_deref().unwrap_or_default()
        && is_tcp(&candidate.protocol)
}

/// Whether a port's protocol is TCP (unset means TCP).
pub(crate) fn is_tcp(protocol: &Option<String>) -> bool {
    protocol.as_deref().is_none_or(|protocol| protocol == "TCP")
}
