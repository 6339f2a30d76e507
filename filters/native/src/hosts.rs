//! Envoy's host set as fulcrum-core endpoints, and the way back from a picked address to the
//! host Envoy knows.
//!
//! The LB ABI reads a host by `(priority, index)`: among all hosts of a priority (address,
//! weight, locality, metadata) or among its healthy hosts, which are what `choose_host`
//! answers with. [`HostSet`] is that read access, implemented over the ABI by the FFI module
//! and over plain vectors in tests. [`read_hosts`] turns it into the core's endpoints (sorted
//! by address, duplicates dropped, every priority flattened into one set: fulcrum ranks by its
//! own locality tiers, not by Envoy priorities) and a [`HostIndex`] from address to
//! `(priority, index)`.
//!
//! Health: a host in its priority's healthy list is `healthy`, any other `unhealthy` (Envoy
//! only lets the policy return healthy hosts; degraded ones are not offered). Zone and region
//! come from the host's locality. Tags, capabilities and metadata come from the endpoint's
//! `filter_metadata["fulcrum"]`, which the LB ABI reads only as scalars: the control plane's
//! scalar form ([`fulcrum_core::endpoint::scalar_metadata`]): `tags_csv` and
//! `capabilities_csv` (comma-joined strings), and `metadata.<key>` (one string per key), read
//! for each metadata key the policy's `endpoint_selector` matches on.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
};

use fulcrum_core::{Attributes, Endpoint, Health, ServicePolicy, endpoint::REGION_KEY};

/// The `filter_metadata` namespace of an endpoint's fulcrum attributes.
pub const METADATA_NAMESPACE: &str = fulcrum_core::endpoint::scalar_metadata::NAMESPACE;
use fulcrum_core::endpoint::scalar_metadata::{
    CAPABILITIES as CAPABILITIES_KEY, METADATA_PREFIX as METADATA_KEY_PREFIX, TAGS as TAGS_KEY,
};

/// Most hosts read from one cluster, and from one priority: a larger set is cut (the index's
/// `truncated` flag says so) so one pathological cluster cannot exhaust memory or time.
pub const MAX_HOSTS: usize = 65_536;

/// Longest zone or region read from a host: a DNS name's limit, as the wasm filter's; a
/// longer one reads as unset.
pub const MAX_LOCALITY_BYTES: usize = 253;

/// Longest `filter_metadata["fulcrum"]` string read from a host; a longer one reads as
/// absent. The registry refuses metadata values over 256 bytes, and a tag list of 64 tags
/// of 64 bytes fits.
pub const MAX_METADATA_BYTES: usize = 4096;

/// Most tags, and most capabilities, read from a host; the rest of a longer list is left.
pub const MAX_LIST_ITEMS: usize = 64;

/// Read access to one worker's priority set (the LB ABI's host callbacks).
pub trait HostSet {
    /// Number of priorities.
    fn priorities(&self) -> u32;
    /// Number of hosts at `priority`.
    fn hosts(&self, priority: u32) -> usize;
    /// Number of healthy hosts at `priority`.
    fn healthy_hosts(&self, priority: u32) -> usize;
    /// The `IP:port` of host `index` at `priority`.
    fn address(&self, priority: u32, index: usize) -> Option<String>;
    /// The `IP:port` of healthy host `index` at `priority`.
    fn healthy_address(&self, priority: u32, index: usize) -> Option<String>;
    /// Healthy host `index` at `priority` as an endpoint address; `None` when it is not
    /// `IP:port`. An implementation may parse without copying; it must parse as
    /// [`SocketAddr`]'s `FromStr` does.
    fn healthy_endpoint(&self, priority: u32, index: usize) -> Option<SocketAddr> {
        parse_address(&self.healthy_address(priority, index)?)
    }
    /// Whether healthy host `index` at `priority` is `address`, as Envoy spelled it when the
    /// hosts were read. An implementation may compare without copying or parsing.
    fn healthy_address_is(&self, priority: u32, index: usize, address: &str) -> bool {
        self.healthy_address(priority, index).as_deref() == Some(address)
    }
    /// The load-balancing weight of host `index` at `priority`.
    fn weight(&self, priority: u32, index: usize) -> u32;
    /// The region and zone of host `index` at `priority` (empty when unset or longer than
    /// [`MAX_LOCALITY_BYTES`]).
    fn locality(&self, priority: u32, index: usize) -> Option<(String, String)>;
    /// The string under `key` in the host's `filter_metadata["fulcrum"]`; `None` when
    /// longer than [`MAX_METADATA_BYTES`], which an implementation should not copy.
    fn metadata(&self, priority: u32, index: usize, key: &str) -> Option<String>;
}

/// Where a host is in the worker's priority set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSlot {
    /// Its priority.
    pub priority: u32,
    /// Its index among all hosts of the priority (for `should_select_another_host`).
    pub index: usize,
    /// Its index among the healthy hosts of the priority, when healthy (what `choose_host`
    /// returns).
    pub healthy_index: Option<usize>,
}

/// Address → place in one worker's priority set, as of the last read. Looked up on every
/// pick and answer, so hashed with foldhash rather than SipHash (225 instructions of the
/// module's per-request 6,600, callgrind): its keys are Envoy's hosts, which the control
/// plane's endpoints name, never a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostIndex {
    /// Each host's place, and its address as Envoy spells it (what an answer's check
    /// compares with Envoy's list, without parsing it again).
    slots: HashMap<SocketAddr, (HostSlot, Box<str>), foldhash::fast::RandomState>,
    /// Healthy hosts per priority when read: a different count means health changed.
    healthy_counts: Vec<usize>,
    /// Whether the set had more than [`MAX_HOSTS`] hosts.
    pub truncated: bool,
}

impl HostIndex {
    /// Where `address` is.
    pub fn get(&self, address: SocketAddr) -> Option<HostSlot> {
        self.slots.get(&address).map(|(slot, _)| *slot)
    }

    /// Where `address` is, and how Envoy spelled it.
    pub fn get_with_text(&self, address: SocketAddr) -> Option<(HostSlot, &str)> {
        self.slots
            .get(&address)
            .map(|(slot, text)| (*slot, &**text))
    }

    /// Whether the healthy counts of `hosts` differ from those read: health or membership
    /// changed since (one ABI call per priority).
    pub fn is_stale(&self, hosts: &impl HostSet) -> bool {
        let priorities = hosts.priorities() as usize;
        priorities != self.healthy_counts.len()
            || (0..priorities).any(|p| hosts.healthy_hosts(p as u32) != self.healthy_counts[p])
    }

    /// The first healthy host, `(priority, healthy index)`: where a request goes when fulcrum
    /// fails open.
    pub fn first_healthy(&self, spread: u64) -> Option<(u32, usize)> {
        let (priority, count) = self
            .healthy_counts
            .iter()
            .enumerate()
            .find(|(_, count)| **count > 0)?;
        let index = (spread % *count as u64) as usize;
        Some((u32::try_from(priority).ok()?, index))
    }
}

/// The hosts of `hosts` as core endpoints for a service under `policy`, and their index.
pub fn read_hosts(hosts: &impl HostSet, policy: &ServicePolicy) -> (Vec<Endpoint>, HostIndex) {
    let mut index = HostIndex::default();
    let mut endpoints = Vec::new();
    let priorities = hosts.priorities();
    for priority in 0..priorities {
        let healthy = hosts.healthy_hosts(priority);
        index.healthy_counts.push(healthy);
        // Envoy's counts size nothing beyond the cap: the index stays bounded whatever they say.
        let mut healthy_at: HashMap<SocketAddr, usize> =
            HashMap::with_capacity(healthy.min(MAX_HOSTS));
        for i in 0..healthy.min(MAX_HOSTS) {
            if let Some(address) = hosts.healthy_endpoint(priority, i) {
                healthy_at.entry(address).or_insert(i);
            }
        }
        let count = hosts.hosts(priority);
        if count > MAX_HOSTS {
            index.truncated = true;
        }
        for i in 0..count.min(MAX_HOSTS) {
            if endpoints.len() >= MAX_HOSTS {
                index.truncated = true;
                break;
            }
            let Some(text) = hosts.address(priority, i) else {
                continue;
            };
            let Some(address) = parse_address(&text) else {
                continue;
            };
            if index.slots.contains_key(&address) {
                continue;
            }
            let healthy_index = healthy_at.get(&address).copied();
            // The host's one address object in Envoy spells it in both lists alike.
            let slot = HostSlot {
                priority,
                index: i,
                healthy_index,
            };
            index.slots.insert(address, (slot, text.into_boxed_str()));
            endpoints.push(endpoint(hosts, priority, i, address, healthy_index, policy));
        }
    }
    endpoints.sort_by_key(|endpoint| endpoint.address);
    (endpoints, index)
}

fn endpoint(
    hosts: &impl HostSet,
    priority: u32,
    i: usize,
    address: SocketAddr,
    healthy_index: Option<usize>,
    policy: &ServicePolicy,
) -> Endpoint {
    let health = if healthy_index.is_some() {
        Health::Healthy
    } else {
        Health::Unhealthy
    };
    let mut attributes = Attributes::default();
    if let Some((region, zone)) = hosts.locality(priority, i) {
        if !zone.is_empty() {
            attributes.zone = Some(zone);
        }
        if !region.is_empty() {
            attributes.metadata.insert(REGION_KEY.to_owned(), region);
        }
    }
    let list = |key: &str| -> BTreeSet<String> {
        hosts
            .metadata(priority, i, key)
            .map(|joined| {
                joined
                    .split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .take(MAX_LIST_ITEMS)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    attributes.tags = list(TAGS_KEY);
    attributes.capabilities = list(CAPABILITIES_KEY);
    for key in policy.endpoint_selector.metadata.keys() {
        if let Some(value) = hosts.metadata(priority, i, &format!("{METADATA_KEY_PREFIX}{key}")) {
            attributes.metadata.insert(key.clone(), value);
        }
    }
    Endpoint::new(address)
        .with_weight(hosts.weight(priority, i).max(1))
        .with_health(health)
        .with_attributes(attributes)
}

/// `IP:port`; anything else (a pipe, an internal address) is not an endpoint fulcrum picks.
fn parse_address(text: &str) -> Option<SocketAddr> {
    text.parse().ok()
}

pub mod test_hosts {
    //! A priority set in plain vectors, standing in for Envoy's where the safe adapter is
    //! driven without Envoy: this crate's unit tests, and the cross-data-plane golden test
    //! (`tests/wasm-host/tests/all/golden.rs`), which gives the same requests to the wasm
    //! filter and to [`WorkerLb`](crate::balancer::WorkerLb) over these hosts. Not used by
    //! the module Envoy loads.

    use std::collections::BTreeMap;

    use super::{HostSet, MAX_LOCALITY_BYTES, MAX_METADATA_BYTES};

    /// One host of a [`TestHosts`] priority.
    #[derive(Debug, Clone)]
    pub struct TestHost {
        /// `IP:port` (anything else is skipped, as a pipe would be).
        pub address: String,
        /// Whether the host is among its priority's healthy hosts.
        pub healthy: bool,
        /// Its load-balancing weight.
        pub weight: u32,
        /// Its locality's region (empty: none).
        pub region: String,
        /// Its locality's zone (empty: none).
        pub zone: String,
        /// Its `filter_metadata["fulcrum"]` strings.
        pub metadata: BTreeMap<String, String>,
    }

    impl TestHost {
        /// A healthy host of weight 1 at `address`, with no locality or metadata.
        pub fn healthy(address: &str) -> Self {
            Self {
                address: address.to_owned(),
                healthy: true,
                weight: 1,
                region: String::new(),
                zone: String::new(),
                metadata: BTreeMap::new(),
            }
        }
    }

    /// Hosts per priority.
    #[derive(Debug, Clone, Default)]
    pub struct TestHosts {
        /// The hosts of priority 0, 1, …
        pub priorities: Vec<Vec<TestHost>>,
    }

    impl TestHosts {
        /// `hosts`, all at priority 0.
        pub fn one_priority(hosts: Vec<TestHost>) -> Self {
            Self {
                priorities: vec![hosts],
            }
        }

        fn host(&self, priority: u32, index: usize) -> Option<&TestHost> {
            self.priorities.get(priority as usize)?.get(index)
        }

        fn healthy(&self, priority: u32) -> Vec<&TestHost> {
            self.priorities
                .get(priority as usize)
                .map(|hosts| hosts.iter().filter(|host| host.healthy).collect())
                .unwrap_or_default()
        }
    }

    impl HostSet for TestHosts {
        fn priorities(&self) -> u32 {
            self.priorities.len() as u32
        }
        fn hosts(&self, priority: u32) -> usize {
            self.priorities.get(priority as usize).map_or(0, Vec::len)
        }
        fn healthy_hosts(&self, priority: u32) -> usize {
            self.healthy(priority).len()
        }
        fn address(&self, priority: u32, index: usize) -> Option<String> {
            Some(self.host(priority, index)?.address.clone())
        }
        fn healthy_address(&self, priority: u32, index: usize) -> Option<String> {
            Some(self.healthy(priority).get(index)?.address.clone())
        }
        fn weight(&self, priority: u32, index: usize) -> u32 {
            self.host(priority, index).map_or(0, |host| host.weight)
        }
        fn locality(&self, priority: u32, index: usize) -> Option<(String, String)> {
            let host = self.host(priority, index)?;
            let within = |text: &String| {
                if text.len() <= MAX_LOCALITY_BYTES {
                    text.clone()
                } else {
                    String::new()
                }
            };
            Some((within(&host.region), within(&host.zone)))
        }
        fn metadata(&self, priority: u32, index: usize, key: &str) -> Option<String> {
            let value = self.host(priority, index)?.metadata.get(key)?;
            (value.len() <= MAX_METADATA_BYTES).then(|| value.clone())
        }
    }

    /// A priority set whose counts claim `count` hosts, healthy, where `hosts` lists fewer:
    /// a set larger than the module's caps, without listing it.
    #[derive(Debug)]
    pub struct Claiming {
        /// The hosts actually listed.
        pub hosts: TestHosts,
        /// The count every priority claims, of hosts and of healthy hosts.
        pub count: usize,
    }

    impl HostSet for Claiming {
        fn priorities(&self) -> u32 {
            self.hosts.priorities()
        }
        fn hosts(&self, _priority: u32) -> usize {
            self.count
        }
        fn healthy_hosts(&self, _priority: u32) -> usize {
            self.count
        }
        fn address(&self, priority: u32, index: usize) -> Option<String> {
            self.hosts.address(priority, index)
        }
        fn healthy_address(&self, priority: u32, index: usize) -> Option<String> {
            self.hosts.healthy_address(priority, index)
        }
        fn weight(&self, priority: u32, index: usize) -> u32 {
            self.hosts.weight(priority, index)
        }
        fn locality(&self, priority: u32, index: usize) -> Option<(String, String)> {
            self.hosts.locality(priority, index)
        }
        fn metadata(&self, priority: u32, index: usize, key: &str) -> Option<String> {
            self.hosts.metadata(priority, index, key)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        test_hosts::{Claiming, TestHost, TestHosts},
        *,
    };

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("a test address")
    }

    #[test]
    fn hosts_become_endpoints_sorted_by_address_with_their_attributes() {
        let mut tagged = TestHost::healthy("10.0.0.2:80");
        tagged.weight = 3;
        tagged.zone = "z1".to_owned();
        tagged.region = "r1".to_owned();
        tagged
            .metadata
            .insert(TAGS_KEY.to_owned(), "canary, gpu,".to_owned());
        tagged
            .metadata
            .insert(CAPABILITIES_KEY.to_owned(), "llm.chat".to_owned());
        tagged
            .metadata
            .insert("metadata.version".to_owned(), "v2".to_owned());
        let hosts = TestHosts::one_priority(vec![TestHost::healthy("10.0.0.9:80"), tagged]);
        let policy: ServicePolicy =
            serde_json::from_str(r#"{"endpoint_selector": {"metadata": {"version": "v2"}}}"#)
                .expect("a policy");

        let (endpoints, index) = read_hosts(&hosts, &policy);

        assert_eq!(endpoints.len(), 2);
        let first = &endpoints[0];
        assert_eq!(first.address, addr("10.0.0.2:80"));
        assert_eq!(first.weight, 3);
        assert_eq!(first.zone(), Some("z1"));
        assert_eq!(first.region(), Some("r1"));
        assert_eq!(
            first.tags().iter().map(String::as_str).collect::<Vec<_>>(),
            ["canary", "gpu"]
        );
        assert!(first.capabilities().contains("llm.chat"));
        assert_eq!(
            first.metadata().get("version").map(String::as_str),
            Some("v2")
        );
        assert_eq!(endpoints[1].address, addr("10.0.0.9:80"));
        assert_eq!(
            index.get(addr("10.0.0.2:80")),
            Some(HostSlot {
                priority: 0,
                index: 1,
                healthy_index: Some(1)
            })
        );
    }

    #[test]
    fn a_hosts_oversized_locality_and_metadata_read_as_unset_and_a_long_list_is_cut() {
        let mut hostile = TestHost::healthy("10.0.0.1:80");
        hostile.zone = "z".repeat(MAX_LOCALITY_BYTES + 1);
        hostile.region = "r1".to_owned();
        let many: Vec<String> = (0..10_000).map(|item| format!("t{item}")).collect();
        hostile
            .metadata
            .insert(TAGS_KEY.to_owned(), many[..500].join(","));
        hostile
            .metadata
            .insert(CAPABILITIES_KEY.to_owned(), many.join(","));
        let hosts = TestHosts::one_priority(vec![hostile]);

        let (endpoints, _) = read_hosts(&hosts, &ServicePolicy::default());

        let endpoint = &endpoints[0];
        assert_eq!(endpoint.zone(), None, "a zone longer than a DNS name");
        assert_eq!(endpoint.region(), Some("r1"));
        assert_eq!(endpoint.tags().len(), MAX_LIST_ITEMS, "the first 64 of 500");
        assert!(
            endpoint.capabilities().is_empty(),
            "a list longer than {MAX_METADATA_BYTES} bytes reads as absent"
        );
    }

    #[test]
    fn an_unhealthy_host_is_an_unhealthy_endpoint_without_a_healthy_index() {
        let mut down = TestHost::healthy("10.0.0.1:80");
        down.healthy = false;
        let hosts = TestHosts::one_priority(vec![down, TestHost::healthy("10.0.0.2:80")]);

        let (endpoints, index) = read_hosts(&hosts, &ServicePolicy::default());

        assert_eq!(endpoints[0].health, Health::Unhealthy);
        assert_eq!(endpoints[1].health, Health::Healthy);
        assert_eq!(
            index.get(addr("10.0.0.2:80")).and_then(|s| s.healthy_index),
            Some(0)
        );
        assert_eq!(
            index.get(addr("10.0.0.1:80")).and_then(|s| s.healthy_index),
            None
        );
    }

    #[test]
    fn priorities_are_flattened_and_a_duplicate_address_keeps_its_first_place() {
        let hosts = TestHosts {
            priorities: vec![
                vec![TestHost::healthy("10.0.0.1:80")],
                vec![
                    TestHost::healthy("10.0.0.1:80"),
                    TestHost::healthy("10.0.0.3:80"),
                ],
            ],
        };

        let (endpoints, index) = read_hosts(&hosts, &ServicePolicy::default());

        assert_eq!(endpoints.len(), 2);
        assert_eq!(index.get(addr("10.0.0.1:80")).map(|s| s.priority), Some(0));
        assert_eq!(
            index.get(addr("10.0.0.3:80")),
            Some(HostSlot {
                priority: 1,
                index: 1,
                healthy_index: Some(1)
            })
        );
    }

    #[test]
    fn a_host_that_is_not_an_ip_and_port_is_skipped() {
        let hosts = TestHosts::one_priority(vec![
            TestHost::healthy("/tmp/pipe"),
            TestHost::healthy("10.0.0.2:80"),
        ]);
        let (endpoints, _) = read_hosts(&hosts, &ServicePolicy::default());
        assert_eq!(endpoints.len(), 1);
    }

    #[test]
    fn a_host_set_counting_more_hosts_than_the_cap_is_read_within_it() {
        let hosts = Claiming {
            hosts: TestHosts::one_priority(vec![TestHost::healthy("10.0.0.1:80")]),
            count: usize::MAX,
        };

        let (endpoints, index) = read_hosts(&hosts, &ServicePolicy::default());

        assert_eq!(endpoints.len(), 1);
        assert!(index.truncated);
    }

    #[test]
    fn the_index_turns_stale_when_a_healthy_count_changes() {
        let mut hosts = TestHosts::one_priority(vec![
            TestHost::healthy("10.0.0.1:80"),
            TestHost::healthy("10.0.0.2:80"),
        ]);
        let (_, index) = read_hosts(&hosts, &ServicePolicy::default());
        assert!(!index.is_stale(&hosts));
        hosts.priorities[0][0].healthy = false;
        assert!(index.is_stale(&hosts));
    }
}
