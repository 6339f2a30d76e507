//! The golden requirement: the same requests and outcomes give the same picks through the
//! native adapter (outcome filter → `choose_host` → response) as through the core driven the
//! way the wasm filter drives it (`pick_with_buckets`, then `complete` with the
//! `Served::classify` of the response's upstream). One worker, one seed, every policy family,
//! sequences drawn by proptest (seeded by proptest's own runner: a failure is replayable).

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use fulcrum_core::{
    Outcome, RequestAttributes, Served, ServicePicker, ServicePolicy, ratelimit::LocalBuckets,
    rng::SplitMix64,
};
use proptest::prelude::*;

use crate::{
    balancer::{Cluster, Counters, Event, RequestContext, STREAM_HEADER, Streams, WorkerLb},
    config::parse_policy,
    hosts::{
        HostSet, read_hosts,
        test_hosts::{TestHost, TestHosts},
    },
    outcomes::{OutcomeFilter, ResponseHead},
};

const SEED: u64 = 0x5eed;
const HASH_HEADER: &str = "x-user";

/// One request of a sequence: its hash key, and how its pick answers.
#[derive(Debug, Clone, Copy)]
struct Step {
    key: u8,
    failed: bool,
    latency_ms: u16,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (any::<u8>(), prop::bool::weighted(0.3), 1u16..400).prop_map(
            |(key, failed, latency_ms)| Step {
                key,
                failed,
                latency_ms,
            },
        ),
        1..120,
    )
}

#[derive(Debug, Default)]
struct NoCounters;

impl Counters for NoCounters {
    fn count(&self, _event: Event) {}
}

/// The request `choose_host` sees: the filter's stream header and the hash header.
struct Request(BTreeMap<&'static str, String>);

impl RequestContext for Request {
    fn header(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
    fn refuses(&self, _priority: u32, _index: usize) -> bool {
        false
    }
}

fn hosts() -> TestHosts {
    let weights = [1, 3, 1, 2, 1];
    TestHosts::one_priority(
        weights
            .iter()
            .enumerate()
            .map(|(i, weight)| {
                let mut host = TestHost::healthy(&format!("10.0.0.{}:8080", i + 1));
                host.weight = *weight;
                host
            })
            .collect(),
    )
}

fn healthy_address(hosts: &TestHosts, (priority, index): (u32, usize)) -> SocketAddr {
    hosts
        .healthy_address(priority, index)
        .and_then(|text| text.parse().ok())
        .expect("choose_host answers a healthy host")
}

fn status(step: Step) -> u16 {
    if step.failed { 503 } else { 200 }
}

/// The picks through the native adapter.
fn native_picks(policy: &ServicePolicy, steps: &[Step]) -> Vec<Option<SocketAddr>> {
    let hosts = hosts();
    let cluster = Arc::new(Cluster::new(policy.clone(), SEED, Box::new(NoCounters)));
    let mut worker = WorkerLb::new(cluster, &hosts);
    let mut streams = Streams::default();
    let mut now = Duration::from_secs(1);
    steps
        .iter()
        .map(|step| {
            let mut filter = OutcomeFilter::default();
            let id = filter
                .on_request(&mut streams, now, None)
                .expect("a stream");
            let request = Request(BTreeMap::from([
                (STREAM_HEADER, id.to_string()),
                (HASH_HEADER, step.key.to_string()),
            ]));
            let chosen = worker.choose(&hosts, &request, &mut streams, now);
            now += Duration::from_millis(u64::from(step.latency_ms));
            let code = status(*step).to_string();
            filter.on_response_headers(
                &mut streams,
                ResponseHead {
                    status: Some(&code),
                    ..ResponseHead::default()
                },
                true,
                now,
            );
            chosen.map(|place| healthy_address(&hosts, place))
        })
        .collect()
}

/// The picks through the core, used as the wasm filter uses it.
fn core_picks(policy: &ServicePolicy, steps: &[Step]) -> Vec<Option<SocketAddr>> {
    let (endpoints, _) = read_hosts(&hosts(), policy);
    let mut picker = ServicePicker::new(policy, &endpoints);
    let mut rng = SplitMix64::new(SEED);
    let mut buckets = LocalBuckets::default();
    let mut now = Duration::from_secs(1);
    steps
        .iter()
        .map(|step| {
            let key = step.key.to_string();
            let attributes = RequestAttributes {
                hash_header: Some(&key),
                ..RequestAttributes::default()
            };
            let started = now;
            let picked = picker.pick_with_buckets(&attributes, now, &mut rng, &mut buckets);
            now += Duration::from_millis(u64::from(step.latency_ms));
            let Ok(pick) = picked else {
                return None;
            };
            let served = Served::classify(
                pick.endpoint,
                &pick.retry_targets,
                Some(pick.endpoint),
                Some(1),
            );
            let outcome = Outcome {
                status: Some(status(*step)),
                latency: now - started,
                ..Outcome::default()
            };
            picker.complete(pick.endpoint, served, outcome, now);
            Some(pick.endpoint)
        })
        .collect()
}

fn policy(json: &str) -> ServicePolicy {
    parse_policy(json.as_bytes()).expect("a valid test policy")
}

/// One policy of each family, with a breaker that trips within a sequence.
fn policies() -> Vec<ServicePolicy> {
    let breaker = r#""outlier_detection": {"consecutive_failures": 3, "base_ejection_time": "1s", "max_ejection_percent": 60}"#;
    [
        r#"{"load_balancer": {"type": "round_robin"}}"#.to_owned(),
        format!(r#"{{"load_balancer": {{"type": "least_request"}}, {breaker}}}"#),
        format!(r#"{{"load_balancer": {{"type": "peak_ewma"}}, {breaker}}}"#),
        r#"{"load_balancer": {"type": "weighted_random"}}"#.to_owned(),
        r#"{"load_balancer": {"type": "weighted_round_robin"}, "retry": 2}"#.to_owned(),
        format!(
            r#"{{"load_balancer": {{"type": "ring_hash", "hash_on": {{"header": "{HASH_HEADER}"}}}}, {breaker}}}"#
        ),
        format!(
            r#"{{"load_balancer": {{"type": "maglev", "hash_on": {{"header": "{HASH_HEADER}"}}}}}}"#
        ),
        r#"{"load_balancer": {"type": "round_robin"}, "rate_limit": {"requests_per_second": 20, "burst": 5}}"#.to_owned(),
    ]
    .iter()
    .map(|json| policy(json))
    .collect()
}

proptest! {
    #[test]
    fn the_native_adapter_picks_as_the_core_does_for_the_wasm_filter(steps in steps()) {
        for policy in policies() {
            prop_assert_eq!(
                native_picks(&policy, &steps),
                core_picks(&policy, &steps),
                "policy {:?}",
                policy.load_balancer
            );
        }
    }
}

#[test]
fn a_breaker_trips_natively_as_in_the_core() {
    // Every request to a failing host fails: both paths eject the same hosts at the same
    // request, so the picks that follow avoid them alike.
    let steps: Vec<Step> = (0..60)
        .map(|i| Step {
            key: i,
            failed: i % 5 == 1,
            latency_ms: 10,
        })
        .collect();
    let policy = &policies()[1];
    let native = native_picks(policy, &steps);
    assert_eq!(native, core_picks(policy, &steps));
    assert!(native.iter().all(Option::is_some));
}
