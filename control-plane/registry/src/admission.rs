//! Who may register what, where, and how many: the registry's admission of a registration.
//!
//! A token authenticates an identity; admission decides what that identity may register,
//! so that a token cannot turn the registry against the mesh (traffic sent to a proxy's own
//! admin port, to the node's cloud metadata service) or grow the snapshot every filter loads
//! past what the filters accept. A valid registration is admitted in four steps, each
//! refusal a [`Refusal`] with a bounded [`reason`](Refusal::reason):
//!
//! 1. **Address class** ([`AddressPolicy`]): loopback (127.0.0.0/8, ::1), link-local
//!    (169.254.0.0/16, fe80::/10) and cloud metadata addresses are refused unless an
//!    operator allowed a range holding them (`--registry-allow-addresses`). They reach the
//!    proxy's or the node's own services, not an instance. (Unspecified, multicast and
//!    broadcast addresses never validate: see [`crate::model`].)
//! 2. **Service scope** ([`Scope::services`]): the identity's name patterns (`shop-*`, `cart`).
//! 3. **Address scope** ([`Scope::addresses`]): the identity's address ranges (CIDRs).
//! 4. **Quotas**: fewer live registrations than the identity's [`Scope::max`] and than the
//!    registry's [`Limits::max_instances`], counted in the local view plus the writes in
//!    flight, so concurrent registrations cannot all take the last slot.
//!
//! A scope comes from the token file (see [`crate::auth`]); a field left out leaves that
//! step open (any name; any address outside the refused classes; only the registry's cap).

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
};

pub use ipnet::IpNet;

use crate::{model::Registration, view::View};

/// Live registrations a registry holds at most by default. With the per-registration bound
/// of [`crate::model::MAX_ENDPOINT_BYTES`], a registry full of the largest registrations
/// publishes about 22 MiB, under the filters' 32 MiB snapshot cap.
pub const DEFAULT_MAX_INSTANCES: usize = 10_000;

/// Service names that get their own series in the registry's metrics by default; others are
/// counted under [`crate::metrics::OTHER_SERVICES`].
pub const DEFAULT_MAX_SERVICE_SERIES: usize = 1_000;

/// Addresses of cloud metadata services: AWS, GCP, Azure, OpenStack (169.254.169.254),
/// AWS over IPv6 (fd00:ec2::254), GCP over IPv6 (fd20:ce::254), Alibaba Cloud
/// (100.100.100.200) and Oracle Cloud's older endpoint (192.0.0.192).
const METADATA: [IpAddr; 5] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)),
    IpAddr::V6(Ipv6Addr::new(0xfd20, 0x00ce, 0, 0, 0, 0, 0, 0x0254)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
];

/// A class of addresses refused unless explicitly allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// 127.0.0.0/8 and ::1: the host itself (a proxy's admin port listens there).
    Loopback,
    /// A cloud metadata service (credentials of the node).
    Metadata,
    /// 169.254.0.0/16 and fe80::/10: one network segment only.
    LinkLocal,
}

impl AddressClass {
    /// The class of `ip`, if refused: an IPv6 address that carries an IPv4 address
    /// ([`embedded_ipv4`]) is refused for that address's class too.
    pub fn of(ip: IpAddr) -> Option<Self> {
        Self::of_one(ip).or_else(|| match ip {
            IpAddr::V6(v6) => embedded_ipv4(v6)
                .into_iter()
                .find_map(|v4| Self::of_one(IpAddr::V4(v4))),
            IpAddr::V4(_) => None,
        })
    }

    fn of_one(ip: IpAddr) -> Option<Self> {
        let ip = ip.to_canonical();
        if METADATA.contains(&ip) {
            return Some(Self::Metadata);
        }
        match ip {
            IpAddr::V4(v4) if v4.is_loopback() => Some(Self::Loopback),
            IpAddr::V4(v4) if v4.is_link_local() => Some(Self::LinkLocal),
            IpAddr::V6(v6) if v6.is_loopback() => Some(Self::Loopback),
            IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(Self::LinkLocal),
            _ => None,
        }
    }

    /// A short name for logs: `loopback`, `metadata` or `link_local`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Metadata => "metadata",
            Self::LinkLocal => "link_local",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Loopback => {
                "a loopback address (127.0.0.0/8, ::1): Envoy would send the traffic to its own host, where its admin port listens"
            }
            Self::Metadata => {
                "a cloud metadata address: Envoy would send the traffic to the node's metadata service, which hands out its credentials"
            }
            Self::LinkLocal => {
                "a link-local address (169.254.0.0/16, fe80::/10): reachable on one network segment only, where cloud metadata services live"
            }
        }
    }
}

/// The IPv4 addresses an IPv6 address carries, where a network may deliver it to one of
/// them: IPv4-mapped (`::ffff:a.b.c.d`) and SIIT's IPv4-translated (`::ffff:0:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`, deprecated but still routed by some stacks; not `::` or
/// `::1`), 6to4 (`2002:AABB:CCDD::/48`), NAT64's well-known prefix (`64:ff9b::a.b.c.d`) and
/// its local-use prefix (`64:ff9b:1::/48`, the address at bits 48-88 or in the last 32),
/// ISATAP's interface id (`…:0:5efe:a.b.c.d`, `…:200:5efe:a.b.c.d`) and Teredo
/// (`2001::/32`: the server at bits 32-64, the client inverted in the last 32). So
/// `::7f00:1` or `64:ff9b::a9fe:a9fe` cannot stand in for a loopback or a metadata address.
pub fn embedded_ipv4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let [s0, s1, s2, s3, s4, s5, s6, s7] = ip.segments();
    let o = ip.octets();
    let v4 = |high: u16, low: u16| Ipv4Addr::from((u32::from(high) << 16) | u32::from(low));
    let last = v4(s6, s7);
    match (s0, s1, s2, s3, s4, s5) {
        (0, 0, 0, 0, 0, 0xffff) | (0, 0, 0, 0, 0xffff, 0) => vec![last],
        (0, 0, 0, 0, 0, 0) if (s6, s7) != (0, 0) && (s6, s7) != (0, 1) => vec![last],
        (0x2002, ..) => vec![v4(s1, s2)],
        (0x0064, 0xff9b, 0, 0, 0, 0) => vec![last],
        (0x0064, 0xff9b, 0x0001, ..) => {
            vec![Ipv4Addr::new(o[6], o[7], o[9], o[10]), last]
        }
        (0x2001, 0, ..) => vec![v4(s2, s3), v4(!s6, !s7)],
        (_, _, _, _, 0x0000 | 0x0200, 0x5efe) => vec![last],
        _ => Vec::new(),
    }
}

/// Parses an address range: a CIDR (`10.0.0.0/8`, `fd00::/8`) or one address (`10.0.0.7`,
/// a /32 or /128). Host bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
pub fn parse_range(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        format!("`{text}` is not an address range; write a CIDR such as 10.0.0.0/8 or an address")
    })
}

/// Which of the refused classes an operator allowed. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    allowed: Vec<IpNet>,
}

impl AddressPolicy {
    /// A policy allowing the refused addresses inside `ranges` (e.g. `127.0.0.0/8` for
    /// instances on the control plane's own host, in tests).
    pub fn allowing(ranges: Vec<IpNet>) -> Self {
        Self { allowed: ranges }
    }

    /// Refuses `ip` when it is in a refused class outside every allowed range.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let Some(class) = AddressClass::of(ip) else {
            return Ok(());
        };
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_ipv4(v6),
            IpAddr::V4(_) => Vec::new(),
        };
        if self.allowed.iter().any(|range| {
            range.contains(&ip)
                || embedded
                    .iter()
                    .any(|embedded| range.contains(&IpAddr::V4(*embedded)))
        }) {
            return Ok(());
        }
        Err(Refusal::AddressClass { address: ip, class })
    }
}

/// What a registry admits, whoever asks. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Which refused address classes are allowed. Default: none.
    pub addresses: AddressPolicy,
    /// Live registrations the registry holds at most. Default [`DEFAULT_MAX_INSTANCES`].
    pub max_instances: usize,
    /// Service names with their own metric series at most. Default
    /// [`DEFAULT_MAX_SERVICE_SERIES`].
    pub max_service_series: usize,
}

impl Limits {
    /// The default limits, with the refused addresses inside `ranges` allowed (e.g.
    /// `127.0.0.0/8` for instances on the control plane's own host, as in tests).
    pub fn allowing(ranges: Vec<IpNet>) -> Self {
        Self {
            addresses: AddressPolicy::allowing(ranges),
            ..Self::default()
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            addresses: AddressPolicy::default(),
            max_instances: DEFAULT_MAX_INSTANCES,
            max_service_series: DEFAULT_MAX_SERVICE_SERIES,
        }
    }
}

/// A service name pattern: `*` stands for any run of characters (`shop-*`, `*-canary`, `*`),
/// anything else for itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePattern(String);

impl ServicePattern {
    /// Parses a pattern: service-name characters (lowercase letters, digits, `-`, `.`, `_`)
    /// and `*`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let valid = !text.is_empty()
            && text.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'-' | b'.' | b'_' | b'*')
            });
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(format!(
                "`{text}` is not a service pattern; use lowercase letters, digits, '-', '.', '_' and '*' for any run of them"
            ))
        }
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        glob(self.0.as_bytes(), name.as_bytes())
    }
}

impl fmt::Display for ServicePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `*`-only glob matching in linear time: on a mismatch, the last `*` takes one more
/// character.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

/// What one identity may register. `None` leaves that step open (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Service names it may register (`services=` in the token file).
    pub services: Option<Vec<ServicePattern>>,
    /// Address ranges it may register in (`addresses=`).
    pub addresses: Option<Vec<IpNet>>,
    /// Live registrations it may hold at once (`max=`); 0 makes a read-only token.
    pub max: Option<usize>,
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl Scope {
    /// The fields left out, by their token file key: what this identity is not restricted in.
    pub fn open_fields(&self) -> Vec<&'static str> {
        let mut open = Vec::new();
        if self.services.is_none() {
            open.push("services");
        }
        if self.addresses.is_none() {
            open.push("addresses");
        }
        if self.max.is_none() {
            open.push("max");
        }
        open
    }

    /// Sets the field `key` from its token file text.
    pub(crate) fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let split = || {
            value
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
        };
        let duplicate =
            || format!("`{key}=` is given twice; list every value in one, comma-separated");
        match key {
            "services" => {
                let patterns = split()
                    .map(ServicePattern::parse)
                    .collect::<Result<Vec<_>, _>>()?;
                if patterns.is_empty() {
                    return Err("`services=` is empty; list patterns such as shop-*,cart".into());
                }
                if self.services.replace(patterns).is_some() {
                    return Err(duplicate());
                }
            }
            "addresses" => {
                let ranges = split().map(parse_range).collect::<Result<Vec<_>, _>>()?;
                if ranges.is_empty() {
                    return Err("`addresses=` is empty; list ranges such as 10.0.0.0/8".into());
                }
                if self.addresses.replace(ranges).is_some() {
                    return Err(duplicate());
                }
            }
            "max" => {
                let max = value.parse::<usize>().map_err(|_| {
                    format!("`max={value}` is not a count; write max=N with N of 0 or more")
                })?;
                if self.max.replace(max).is_some() {
                    return Err(duplicate());
                }
            }
            _ => {
                return Err(format!(
                    "`{key}=` is not a field; the fields are {}",
                    SCOPE_KEYS.map(|key| format!("{key}=")).join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Refuses a registration outside the service names or address ranges of `identity`.
    fn check(&self, identity: &str, registration: &Registration) -> Result<(), Refusal> {
        if let Some(patterns) = &self.services
            && !patterns.iter().any(|p| p.matches(&registration.name))
        {
            return Err(Refusal::ServiceScope {
                identity: identity.to_owned(),
                service: registration.name.to_string(),
                allowed: list(patterns),
            });
        }
        let ip = registration.address().ip();
        if let Some(ranges) = &self.addresses
            && !ranges
                .iter()
                .any(|range| range.contains(&ip) || range.contains(&ip.to_canonical()))
        {
            return Err(Refusal::AddressScope {
                identity: identity.to_owned(),
                address: ip,
                allowed: list(ranges),
            });
        }
        Ok(())
    }
}

/// The token file keys a [`Scope`] reads.
pub const SCOPE_KEYS: [&str; 3] = ["services", "addresses", "max"];

/// Why a registration was not admitted. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The address is in a refused class.
    #[error(
        "`{address}` is {}; register the instance's own routable address (or, when this is intended, have the operator allow the range with --registry-allow-addresses)",
        class.describe()
    )]
    AddressClass {
        /// The address.
        address: IpAddr,
        /// Its class.
        class: AddressClass,
    },
    /// The service name matches none of the identity's patterns.
    #[error(
        "identity `{identity}` may register services {allowed}, not `{service}`; use one of those names, or have the operator add it to `services=` on the identity's line in the token file"
    )]
    ServiceScope {
        /// Who asked.
        identity: String,
        /// The service name.
        service: String,
        /// The identity's patterns, comma-separated.
        allowed: String,
    },
    /// The address lies outside the identity's ranges.
    #[error(
        "identity `{identity}` may register addresses in {allowed}, not `{address}`; register an address in those ranges, or have the operator add the range to `addresses=` on the identity's line in the token file"
    )]
    AddressScope {
        /// Who asked.
        identity: String,
        /// The address.
        address: IpAddr,
        /// The identity's ranges, comma-separated.
        allowed: String,
    },
    /// The identity holds its quota of live registrations.
    #[error(
        "identity `{identity}` holds its quota of {max} live registrations; deregister some, or have the operator raise `max=` on the identity's line in the token file"
    )]
    IdentityQuota {
        /// Who asked.
        identity: String,
        /// The quota.
        max: usize,
    },
    /// The registry holds its cap of live registrations.
    #[error(
        "the registry holds its cap of {max} live registrations; retry after others expire, or have the operator raise --registry-max-instances (every filter loads every registration: keep the snapshot under the filters' cap)"
    )]
    GlobalCap {
        /// The cap.
        max: usize,
    },
}

impl Refusal {
    /// Every [`reason`](Self::reason) label.
    pub const REASONS: [&'static str; 5] = [
        "address_class",
        "service_scope",
        "address_scope",
        "identity_quota",
        "global_cap",
    ];

    /// The `reason` label of `fulcrum_registry_refusals_total`: one of [`Self::REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            Self::AddressClass { .. } => "address_class",
            Self::ServiceScope { .. } => "service_scope",
            Self::AddressScope { .. } => "address_scope",
            Self::IdentityQuota { .. } => "identity_quota",
            Self::GlobalCap { .. } => "global_cap",
        }
    }

    /// The refused class, for an [`AddressClass`](Self::AddressClass) refusal.
    pub fn address_class(&self) -> Option<AddressClass> {
        match self {
            Self::AddressClass { class, .. } => Some(*class),
            _ => None,
        }
    }

    /// The request field refused, when one is.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::AddressClass { .. } | Self::AddressScope { .. } => Some("address"),
            Self::ServiceScope { .. } => Some("name"),
            Self::IdentityQuota { .. } | Self::GlobalCap { .. } => None,
        }
    }
}

/// Registrations admitted whose write has not ended, per identity and in total, and by id:
/// a write lands in the view before its reservation drops, so near a quota the ids tell
/// which reservations the view already counts.
#[derive(Debug, Default)]
struct Pending {
    total: usize,
    by_owner: HashMap<String, usize>,
    /// Reservations per registration id: (owner, count).
    by_id: HashMap<String, (String, usize)>,
}

impl Pending {
    /// The reservations whose registration the view already holds (for `owner`: held by
    /// it), written and not yet released. Walks every reservation: only asked at a quota.
    fn landed(&self, view: &View, owner: Option<&str>) -> usize {
        self.by_id
            .iter()
            .filter(|(id, (holder, _))| match owner {
                None => view.get(id).is_some(),
                Some(owner) => {
                    holder == owner
                        && view
                            .get(id)
                            .is_some_and(|entry| *entry.record.owner == *owner)
                }
            })
            .map(|(_, (_, count))| count)
            .sum()
    }
}

/// Admission of registrations for one registry: [`Limits`] plus the writes in flight.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: Limits,
    pending: Mutex<Pending>,
}

/// An admitted new registration, counted until its write ends (dropped).
#[derive(Debug)]
pub(crate) struct Reservation<'a> {
    admission: &'a Admission,
    /// (owner, registration id) of a reservation that holds a slot.
    slot: Option<(String, String)>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let Some((owner, id)) = self.slot.take() else {
            return;
        };
        let mut pending = self.admission.lock();
        pending.total -= 1;
        if let Some(count) = pending.by_owner.get_mut(&owner) {
            *count -= 1;
            if *count == 0 {
                pending.by_owner.remove(&owner);
            }
        }
        if let Some((_, count)) = pending.by_id.get_mut(&id) {
            *count -= 1;
            if *count == 0 {
                pending.by_id.remove(&id);
            }
        }
    }
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            pending: Mutex::new(Pending::default()),
        }
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits `registration` for `identity` with `scope`, given what `view` holds: refuses
    /// it, or reserves its slot until the returned reservation drops (after the write). A
    /// re-registration of an id the identity holds takes no new slot.
    pub(crate) fn admit(
        &self,
        registration: &Registration,
        identity: &str,
        scope: &Arc<Scope>,
        view: &View,
    ) -> Result<Reservation<'_>, Refusal> {
        self.limits.addresses.check(registration.address().ip())?;
        scope.check(identity, registration)?;
        let replaces = view
            .get(&registration.id)
            .is_some_and(|entry| *entry.record.owner == *identity);
        if replaces {
            return Ok(Reservation {
                admission: self,
                slot: None,
            });
        }
        let mut pending = self.lock();
        let own = pending.by_owner.get(identity).copied().unwrap_or(0);
        // The cheap count first; at a quota, the exact one: a write in its last instant is
        // in the view and still reserved, and must not take a slot twice.
        if let Some(max) = scope.max
            && view.owned_by(identity) + own >= max
            && (view.owned_by(identity) + own).saturating_sub(pending.landed(view, Some(identity)))
                >= max
        {
            return Err(Refusal::IdentityQuota {
                identity: identity.to_owned(),
                max,
            });
        }
        let max = self.limits.max_instances;
        if view.len() + pending.total >= max
            && (view.len() + pending.total).saturating_sub(pending.landed(view, None)) >= max
        {
            return Err(Refusal::GlobalCap { max });
        }
        pending.total += 1;
        *pending.by_owner.entry(identity.to_owned()).or_default() += 1;
        pending
            .by_id
            .entry(registration.id.to_string())
            .or_insert_with(|| (identity.to_owned(), 0))
            .1 += 1;
        Ok(Reservation {
            admission: self,
            slot: Some((identity.to_owned(), registration.id.to_string())),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn loopback_link_local_and_metadata_addresses_are_refused_by_default() {
        let policy = AddressPolicy::default();
        for (address, class) in [
            ("127.0.0.1", AddressClass::Loopback),
            ("127.3.2.1", AddressClass::Loopback),
            ("::1", AddressClass::Loopback),
            ("::ffff:127.0.0.1", AddressClass::Loopback),
            ("169.254.169.254", AddressClass::Metadata),
            ("fd00:ec2::254", AddressClass::Metadata),
            ("100.100.100.200", AddressClass::Metadata),
            ("169.254.10.1", AddressClass::LinkLocal),
            ("fe80::1", AddressClass::LinkLocal),
            // IPv6 addresses carrying a refused IPv4 address.
            ("::7f00:1", AddressClass::Loopback),
            ("::127.0.0.1", AddressClass::Loopback),
            ("2002:7f00:1::1", AddressClass::Loopback),
            ("64:ff9b::a9fe:a9fe", AddressClass::Metadata),
            ("64:ff9b::169.254.169.254", AddressClass::Metadata),
            ("2002:a9fe:a9fe::", AddressClass::Metadata),
            ("::ffff:169.254.1.1", AddressClass::LinkLocal),
            ("::ffff:0:7f00:1", AddressClass::Loopback),
            ("64:ff9b:1::7f00:1", AddressClass::Loopback),
            ("64:ff9b:1::a9fe:a9fe", AddressClass::Metadata),
            ("64:ff9b:1:7f00:1:0:0:0", AddressClass::Loopback),
            ("2001:0:a9fe:a9fe::1", AddressClass::Metadata),
            ("2001:0:a00:1::80ff:fefe", AddressClass::Loopback),
            ("fe80::5efe:7f00:1", AddressClass::LinkLocal),
            ("2001:db8::5efe:7f00:1", AddressClass::Loopback),
            ("2001:db8::200:5efe:a9fe:a9fe", AddressClass::Metadata),
            ("fd20:ce::254", AddressClass::Metadata),
            ("192.0.0.192", AddressClass::Metadata),
        ] {
            assert_eq!(
                policy.check(ip(address)),
                Err(Refusal::AddressClass {
                    address: ip(address),
                    class
                }),
                "{address}"
            );
        }
        for routable in [
            "10.0.3.12",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
            "2001:db8::1",
            "::",
            "::a00:1",
            "2002:a00:1::1",
            "64:ff9b::a00:1",
            "64:ff9b:1::a00:1",
            "2001:0:a00:1::f5ff:fffe",
            "2001:db8::5efe:a00:1",
        ] {
            assert_eq!(policy.check(ip(routable)), Ok(()), "{routable}");
        }
    }

    #[test]
    fn an_allowed_range_admits_the_refused_addresses_inside_it_only() {
        let policy = AddressPolicy::allowing(vec![parse_range("127.0.0.0/8").expect("range")]);
        assert_eq!(policy.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(policy.check(ip("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(policy.check(ip("2002:7f00:1::1")), Ok(()));
        assert!(policy.check(ip("::1")).is_err());
        assert!(policy.check(ip("169.254.169.254")).is_err());
    }

    #[test]
    fn the_address_refusal_says_why_and_how_to_allow_it() {
        let refusal = AddressPolicy::default()
            .check(ip("169.254.169.254"))
            .expect_err("metadata");
        assert_eq!(refusal.field(), Some("address"));
        assert_eq!(refusal.reason(), "address_class");
        let text = refusal.to_string();
        assert!(text.contains("metadata"), "{text}");
        assert!(text.contains("--registry-allow-addresses"), "{text}");
    }

    #[test]
    fn ranges_parse_as_cidrs_or_single_addresses() {
        assert_eq!(
            parse_range("10.1.2.3/8"),
            Ok("10.0.0.0/8".parse().expect("net"))
        );
        assert_eq!(
            parse_range("10.0.0.7"),
            Ok("10.0.0.7/32".parse().expect("net"))
        );
        assert_eq!(
            parse_range("fd00::1"),
            Ok("fd00::1/128".parse().expect("net"))
        );
        assert!(parse_range("10.0.0.0/33").is_err());
        assert!(parse_range("shop").is_err());
    }

    #[test]
    fn service_patterns_match_exact_names_and_globs() {
        let pattern = |text| ServicePattern::parse(text).expect("pattern");
        assert!(pattern("cart").matches("cart"));
        assert!(!pattern("cart").matches("carts"));
        assert!(pattern("shop-*").matches("shop-"));
        assert!(pattern("shop-*").matches("shop-checkout"));
        assert!(!pattern("shop-*").matches("shopping"));
        assert!(pattern("*-canary").matches("cart-canary"));
        assert!(pattern("a*b*c").matches("aXbYbZc"));
        assert!(!pattern("a*b*c").matches("aXbYbZ"));
        assert!(pattern("*").matches("anything.at-all"));
        assert!(ServicePattern::parse("Shop-*").is_err());
        assert!(ServicePattern::parse("").is_err());
    }

    #[test]
    fn every_refusal_has_a_listed_reason_and_quota_refusals_name_no_field() {
        let refusals = [
            Refusal::AddressClass {
                address: ip("127.0.0.1"),
                class: AddressClass::Loopback,
            },
            Refusal::ServiceScope {
                identity: "a".into(),
                service: "s".into(),
                allowed: "t".into(),
            },
            Refusal::AddressScope {
                identity: "a".into(),
                address: ip("10.0.0.1"),
                allowed: "10.1.0.0/16".into(),
            },
            Refusal::IdentityQuota {
                identity: "a".into(),
                max: 1,
            },
            Refusal::GlobalCap { max: 1 },
        ];
        let reasons: Vec<&str> = refusals.iter().map(Refusal::reason).collect();
        assert_eq!(reasons, Refusal::REASONS);
        let fields: Vec<Option<&str>> = refusals.iter().map(Refusal::field).collect();
        assert_eq!(
            fields,
            [Some("address"), Some("name"), Some("address"), None, None]
        );
    }

    /// An admission under a cap of `max_instances`, an empty view, and a scope allowing
    /// `identity_max` registrations.
    fn quotas(max_instances: usize, identity_max: usize) -> (Admission, View, Arc<Scope>) {
        let admission = Admission::new(Limits {
            max_instances,
            ..crate::test_support::loopback()
        });
        let scope = Arc::new(Scope {
            max: Some(identity_max),
            ..Scope::default()
        });
        (admission, View::new("e"), scope)
    }

    /// A valid registration `id` of service `svc`.
    fn registration(id: &str) -> Registration {
        crate::test_support::spec("svc", id, 1)
            .validate()
            .expect("valid")
    }

    #[test]
    fn writes_in_flight_hold_their_slot_until_they_end() {
        let (admission, view, scope) = quotas(3, 2);
        let first = admission
            .admit(&registration("a"), "alice", &scope, &view)
            .expect("first");
        let _second = admission
            .admit(&registration("b"), "alice", &scope, &view)
            .expect("second");
        assert!(matches!(
            admission.admit(&registration("c"), "alice", &scope, &view),
            Err(Refusal::IdentityQuota { max: 2, .. })
        ));
        let _other = admission
            .admit(&registration("d"), "bob", &Arc::default(), &view)
            .expect("bob's own");
        assert!(matches!(
            admission.admit(&registration("e"), "bob", &Arc::default(), &view),
            Err(Refusal::GlobalCap { max: 3 })
        ));
        // The first write ended without a registration (it failed): its slot is free.
        drop(first);
        admission
            .admit(&registration("c"), "alice", &scope, &view)
            .expect("the freed slot");
        // A registration alice holds (the fixture's owner) is replaced without a slot.
        view.upsert(crate::test_support::record(crate::test_support::spec(
            "svc", "a", 1,
        )));
        admission
            .admit(&registration("a"), "alice", &scope, &view)
            .expect("a replacement");
    }

    /// A write lands in the view a moment before its reservation drops; a registration
    /// arriving in that moment, at the cap, must not count it twice (10,000 concurrent
    /// registrations against the default cap of 10,000 on etcd lost 4 that way).
    #[test]
    fn a_write_that_landed_but_is_still_reserved_takes_one_slot_not_two() {
        let (admission, view, scope) = quotas(2, 2);
        let landing = admission
            .admit(&registration("a"), "alice", &scope, &view)
            .expect("first");
        // Its write is in the view (owned by alice, the fixture's owner), not yet released.
        view.upsert(crate::test_support::record(crate::test_support::spec(
            "svc", "a", 1,
        )));

        let second = admission
            .admit(&registration("b"), "alice", &scope, &view)
            .expect("the second of two slots, under both the identity's quota and the cap");
        assert!(matches!(
            admission.admit(&registration("c"), "bob", &Arc::default(), &view),
            Err(Refusal::GlobalCap { max: 2 })
        ));
        drop(landing);
        drop(second);
        assert!(
            admission
                .admit(&registration("c"), "alice", &scope, &view)
                .is_ok(),
            "b's write failed: its slot is free again, a's is held by the view"
        );
    }

    proptest! {
        #[test]
        fn a_pattern_without_stars_matches_exactly_its_name(
            pattern in "[a-z.-]{1,12}",
            name in "[a-z.-]{1,12}",
        ) {
            let parsed = ServicePattern::parse(&pattern).expect("pattern");
            prop_assert_eq!(parsed.matches(&name), pattern == name);
        }

        #[test]
        fn a_prefix_glob_matches_exactly_the_names_with_that_prefix(
            prefix in "[a-z-]{0,6}",
            name in "[a-z-]{0,12}",
        ) {
            let parsed = ServicePattern::parse(&format!("{prefix}*")).expect("pattern");
            prop_assert_eq!(parsed.matches(&name), name.starts_with(&prefix));
        }
    }
}
