//! Property: whatever Envoy hands the native module (it all comes from clients, pods or
//! operators), the safe adapter the FFI module drives never panics, only ever answers a
//! healthy host of the asking worker's own set, keeps its stream table within its cap, lets
//! no forged stream id take another request's pick, and releases every in-flight count once
//! every stream has ended.
//!
//! Each case runs one [`Cluster`] under one of [`POLICIES`] (hashing on a header, a cookie or
//! the source IP, sticky sessions, a client-keyed rate limit, fail fast, retries at their
//! maximum, breakers that eject on the first failure, zone and tag selectors) shared by two
//! workers, each with its own [`Streams`] and its own view of the hosts, as in Envoy. The
//! steps are what Envoy's callbacks can bring, in any order:
//!
//! - requests through the outcome filter or through a chain without it, whose
//!   [`STREAM_HEADER`] the client wrote: absent, decimal, negative, overflowing, hex of
//!   every width and case, padded with whitespace, or naming another open stream of the
//!   worker; hash headers, cookies and
//!   client keys as bytes (not UTF-8, empty, 60 KiB, repeated, where only the first value is
//!   read, as the FFI reads it);
//! - many retries of one request, with Envoy's retry predicate refusing any hosts;
//! - response headers with `:status` such as `0`, `999`, `abc`, `20x`, `+200` or a huge
//!   number, any `content-type` and `grpc-status`, trailers missing, repeated or before the
//!   headers, response flags with every bit set, the stream's end twice, response callbacks
//!   for a filter that never saw its request, a filter destroyed with its stream open;
//! - host sets that are empty, wide, with addresses that are not `IP:port`, duplicated
//!   within and across priorities, weights 0 and `u32::MAX`, garbage zones and metadata,
//!   replaced on one worker while the other still has the old set (between a pick and its
//!   completion), and health changes Envoy signals to no callback;
//! - the clock jumping; rarely, a worker flooded to [`MAX_STREAMS`] open streams.
//!
//! The case count is [`CASES`] (`PROPTEST_CASES` overrides it) and the seed is fixed
//! (`PROPTEST_RNG_SEED` overrides it), so every run checks the same inputs unless asked
//! otherwise; `cargo xtask fuzz` runs it long with fresh seeds.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use fulcrum_core::{OnNoEndpoint, RequestSent};
use fulcrum_native::{
    balancer::{
        Cluster, Counters, Event, MAX_STREAMS, RequestContext, STREAM_HEADER, STREAM_ID_DIGITS,
        Streams, WorkerLb, parse_stream_id, stream_id_text,
    },
    config::parse_policy,
    hosts::{
        HostSet,
        test_hosts::{TestHost, TestHosts},
    },
    outcomes::{OutcomeFilter, ResponseHead},
};
use proptest::{
    collection::vec,
    option,
    prelude::*,
    sample::select,
    test_runner::{Config, RngSeed, TestCaseError, TestRunner},
};

/// Cases per run in CI: a few seconds in a debug build.
const CASES: u32 = 1_000;
/// The seed unless `PROPTEST_RNG_SEED` is set.
const SEED: u64 = 0x0a71_7e5e_ed00;
/// Most steps of one case.
const STEPS: usize = 48;
/// Largest generated header value: Envoy's default limit for all headers together (60 KiB).
const LARGEST_VALUE: usize = 60 << 10;

/// The header a hashing policy reads, the cookie it or a sticky session reads, and the rate
/// limit's client key.
const HASH_HEADER: &str = "x-user";
const COOKIE: &str = "session";
const CLIENT_KEY_HEADER: &str = "x-api-key";

/// One policy per case, so that every input the module reads is in play.
const POLICIES: [&str; 13] = [
    "",
    r#"{"load_balancer": {"type": "round_robin"}, "retry": 5,
        "outlier_detection": {"consecutive_failures": 1, "base_ejection_time": "1s",
            "max_ejection_percent": 100}}"#,
    r#"{"load_balancer": {"type": "weighted_round_robin"}, "retry": 2}"#,
    r#"{"load_balancer": {"type": "weighted_random"}, "retry": 1}"#,
    r#"{"load_balancer": {"type": "ring_hash", "hash_on": {"header": "x-user"}, "minimum_ring_size": 64,
        "bounded_load": 1.0}, "retry": 1}"#,
    r#"{"load_balancer": {"type": "maglev", "hash_on": {"cookie": {"name": "session", "ttl": "1h"}},
        "table_size": 251}, "retry": 3}"#,
    r#"{"load_balancer": {"type": "maglev", "hash_on": "source_ip", "table_size": 251,
        "bounded_load": 1.5}}"#,
    r#"{"load_balancer": {"type": "sticky", "cookie": "session", "ttl": "1h",
        "fallback": {"type": "ring_hash", "hash_on": {"header": "x-user"}, "minimum_ring_size": 64}}, "retry": 2,
        "outlier_detection": {"consecutive_gateway_errors": 1, "base_ejection_time": "1s",
            "max_ejection_percent": 100}}"#,
    r#"{"load_balancer": {"type": "peak_ewma", "decay": "2s"},
        "outlier_detection": {"consecutive_failures": 0, "base_ejection_time": "1s",
            "max_ejection_percent": 100, "window": "5s",
            "slow_calls": {"latency_threshold": "300ms", "threshold_percent": 50,
                           "minimum_requests": 3}}}"#,
    r#"{"load_balancer": {"type": "health_score"},
        "outlier_detection": {"consecutive_failures": 0, "base_ejection_time": "1s",
            "max_ejection_percent": 100, "window": "5s",
            "failure_rate": {"threshold_percent": 40, "minimum_requests": 3}}}"#,
    r#"{"load_balancer": {"type": "round_robin"},
        "rate_limit": {"requests_per_second": 5, "burst": 1, "client_key_header": "x-api-key"}}"#,
    r#"{"load_balancer": {"type": "least_request", "choice_count": 3}, "retry": 1,
        "on_no_endpoint": "fail_fast", "slow_start": {"window": "5s"},
        "outlier_detection": {"consecutive_failures": 1, "base_ejection_time": "1s",
            "max_ejection_percent": 100, "panic_threshold_percent": 0}}"#,
    r#"{"load_balancer": {"type": "round_robin"}, "retry": 1,
        "locality": {"local_zone": "z1", "failover": ["z2"], "min_healthy_percent": 60},
        "endpoint_selector": {"tags": ["canary"], "metadata": {"version": "v2"}}}"#,
];

/// Host addresses: a few endpoints (so that duplicates are frequent) and strings that are
/// not `IP:port`, which the module skips as it skips a pipe.
const ADDRESSES: [&str; 13] = [
    "10.0.0.1:80",
    "10.0.0.2:80",
    "10.0.0.3:80",
    "10.0.0.4:8080",
    "[fd00::1]:80",
    "[fd00::2]:443",
    "10.0.0.5:80",
    "",
    "/tmp/upstream.sock",
    "10.0.0.1",
    "upstream:80",
    "10.0.0.1:99999",
    "[fd00::1]",
];

/// Values a client writes into the stream header, beside other streams' ids.
const FORGED_IDS: [&str; 16] = [
    "-1",
    "0",
    "0000000000000000",
    "ffffffffffffffff",
    "FFFFFFFFFFFFFFFF",
    "00000000000000001",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999",
    "0x10",
    " 1",
    "1 ",
    "",
    "+1",
    "1e3",
    "\u{ff11}",
];

const STATUSES: [&str; 14] = [
    "200",
    "503",
    "429",
    "504",
    "0",
    "999",
    "abc",
    "20x",
    "+200",
    "2000000000000000000000",
    "",
    "200 ",
    "\u{0662}\u{0660}\u{0660}",
    "-200",
];

const CONTENT_TYPES: [&str; 6] = [
    "application/grpc",
    "application/grpc+proto",
    "application/grpcx",
    "text/html",
    "",
    "APPLICATION/GRPC",
];

const GRPC_STATUSES: [&str; 12] = [
    "0", "14", "4", "16", "17", "99", "-1", "1a", "", "00", "014", "+1",
];

/// Response flags: none, every bit, single upstream flags, a client's cancel (`DC`), the top
/// bit.
const FLAGS: [u64; 7] = [0, u64::MAX, 0x1, 0x2, 0x4, 0x4000, 1 << 63];

// ------------------------------------------------------------------------------------------
// What a case is made of.

/// How a request's [`STREAM_HEADER`] reaches `choose_host`.
#[derive(Debug, Clone)]
enum StreamHeader {
    /// The outcome filter opened a stream and appended its id after the client's copy, if
    /// the client sent one.
    Filter { client_copy: Option<Vec<u8>> },
    /// No filter on the chain; the client sent no header.
    Absent,
    /// No filter on the chain; the client's bytes.
    Forged(Vec<u8>),
    /// No filter on the chain; the client names an open stream of the worker (an id that
    /// reached an upstream, say), spelled one of three ways.
    OtherStream { which: usize, spelling: u8 },
}

/// What the client sends besides the stream header; each value is bytes, and the FFI reads
/// only a header's first value, as UTF-8.
#[derive(Debug, Clone)]
struct ClientHeaders {
    hash: Vec<Vec<u8>>,
    cookie: Vec<Vec<u8>>,
    client_key: Vec<Vec<u8>>,
    source_ip: Option<IpAddr>,
    /// Whether the headers end the request (else the client never sends the rest).
    end_of_stream: bool,
}

/// One thing Envoy does; `request` picks among the requests in flight (modulo their number).
#[derive(Debug, Clone)]
enum Step {
    /// Request headers, then the first `choose_host`.
    Request {
        worker: usize,
        stream_header: StreamHeader,
        headers: ClientHeaders,
    },
    /// Another `choose_host` of a request (Envoy retrying), with the hosts Envoy's retry
    /// predicate refuses (bit `(8 * priority + index) % 64`).
    Retry {
        request: usize,
        refused: u64,
    },
    /// `on_http_filter_response_headers`, with Envoy's flags should the filter read them.
    ResponseHeaders {
        request: usize,
        status: Option<Vec<u8>>,
        content_type: Option<Vec<u8>>,
        grpc_status: Option<Vec<u8>>,
        end_of_stream: bool,
        flags: u64,
    },
    /// `on_http_filter_response_trailers` (before the headers, or again, as it comes).
    Trailers {
        request: usize,
        grpc_status: Option<Vec<u8>>,
        flags: u64,
    },
    /// `on_http_filter_stream_complete` (again, if it already ran).
    StreamComplete {
        request: usize,
        flags: u64,
    },
    /// `on_http_filter_destroy`: the request is gone.
    Destroy {
        request: usize,
    },
    /// Response callbacks for a filter that never saw its request headers.
    Orphan {
        worker: usize,
        status: Option<Vec<u8>>,
        flags: u64,
    },
    /// Envoy replaces a worker's hosts (`on_host_membership_update`); 2 means both workers.
    Membership {
        worker: usize,
        hosts: TestHosts,
    },
    /// A host's health changes: Envoy calls no hook, the next `choose_host` must notice.
    HealthFlip {
        worker: usize,
        priority: usize,
        index: usize,
    },
    Advance {
        millis: u64,
    },
}

/// A cluster, its first hosts, and what happens to it.
#[derive(Debug, Clone)]
struct Case {
    policy: usize,
    seed: u64,
    start: Duration,
    hosts: TestHosts,
    steps: Vec<Step>,
    /// Before which step worker 0 is flooded to [`MAX_STREAMS`] open streams.
    flood_at: Option<usize>,
}

/// A request value as the FFI reads it: `None` unless UTF-8.
fn utf8(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

/// A response value as the FFI reads it: one that is not UTF-8 is present but matches no
/// rule.
fn response_value(bytes: &[u8]) -> &str {
    utf8(bytes).unwrap_or("\u{fffd}")
}

fn bytes_of(texts: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> + Clone {
    select(texts).prop_map(|text| text.as_bytes().to_vec())
}

/// A header value as bytes: empty, arbitrary (mostly not UTF-8), printable, or huge.
fn value() -> impl Strategy<Value = Vec<u8>> + Clone {
    prop_oneof![
        2 => Just(Vec::new()),
        4 => vec(any::<u8>(), 0..24),
        6 => "[a-z0-9=;,. ]{0,24}".prop_map(String::into_bytes),
        1 => (any::<u8>(), 1..=LARGEST_VALUE).prop_map(|(byte, length)| vec![byte; length]),
    ]
}

/// A `cookie` header: the policy's cookie among others, or garbage.
fn cookie() -> impl Strategy<Value = Vec<u8>> + Clone {
    let prefixes: &[&str] = &[
        "",
        "session=",
        "user=1; session=",
        "session=; session=",
        "session=AAAA.BBBB; other=",
        ";;;=",
    ];
    (select(prefixes), value()).prop_map(|(prefix, value)| [prefix.as_bytes(), &value].concat())
}

/// A header sent 0, 1 or 3 times (repeated values: only the first is read).
fn repeated(value: impl Strategy<Value = Vec<u8>> + Clone) -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop_oneof![
        Just(Vec::new()),
        vec(value.clone(), 1..=1),
        vec(value, 3..=3)
    ]
}

fn maybe(value: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Option<Vec<u8>>> {
    option::weighted(0.9, value)
}

fn flags() -> impl Strategy<Value = u64> {
    prop_oneof![3 => select(&FLAGS[..]), 1 => any::<u64>()]
}

fn host() -> impl Strategy<Value = TestHost> {
    let zones: &[&str] = &["", "z1", "z2", "\u{0}\u{ffff}"];
    let tags: &[&str] = &["", "canary", "canary, gpu", ",,,", " , canary ,"];
    let versions: &[&str] = &["v2", "v1", ""];
    (
        select(&ADDRESSES[..]),
        prop::bool::weighted(0.8),
        // `u32::MAX` is rare: it makes a hash policy build its largest table, slow in a
        // debug build.
        prop_oneof![40 => select(&[0, 1, 2, 7][..]), 1 => Just(u32::MAX)],
        select(zones),
        select(zones),
        option::of(select(tags)),
        option::of(select(versions)),
        prop::bool::weighted(0.02),
    )
        .prop_map(
            |(address, healthy, weight, region, zone, tags, version, long)| {
                let mut metadata = BTreeMap::new();
                if let Some(tags) = tags {
                    metadata.insert("tags_csv".to_owned(), tags.to_owned());
                }
                if let Some(version) = version {
                    metadata.insert("metadata.version".to_owned(), version.to_owned());
                }
                if long {
                    metadata.insert("capabilities_csv".to_owned(), "c,".repeat(8 << 10));
                }
                TestHost {
                    address: address.to_owned(),
                    healthy,
                    weight,
                    region: region.to_owned(),
                    zone: zone.repeat(if long { 4096 } else { 1 }),
                    metadata,
                }
            },
        )
}

/// A worker's priority set: empty, a few priorities of a few hosts, or one wide priority.
fn host_set() -> impl Strategy<Value = TestHosts> {
    prop_oneof![
        1 => Just(TestHosts::default()),
        1 => Just(TestHosts::one_priority(Vec::new())),
        12 => vec(vec(host(), 0..8), 1..4).prop_map(|priorities| TestHosts { priorities }),
        1 => vec(host(), 0..200).prop_map(TestHosts::one_priority),
    ]
}

fn stream_header() -> impl Strategy<Value = StreamHeader> {
    prop_oneof![
        8 => option::of(prop_oneof![bytes_of(&FORGED_IDS), value()])
            .prop_map(|client_copy| StreamHeader::Filter { client_copy }),
        2 => Just(StreamHeader::Absent),
        2 => prop_oneof![bytes_of(&FORGED_IDS), value()].prop_map(StreamHeader::Forged),
        2 => (any::<usize>(), 0..3u8)
            .prop_map(|(which, spelling)| StreamHeader::OtherStream { which, spelling }),
    ]
}

fn source_ip() -> impl Strategy<Value = Option<IpAddr>> {
    option::of(prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
    ])
}

fn step() -> impl Strategy<Value = Step> {
    let headers = (
        repeated(value()),
        repeated(cookie()),
        repeated(value()),
        source_ip(),
        any::<bool>(),
    )
        .prop_map(
            |(hash, cookie, client_key, source_ip, end_of_stream)| ClientHeaders {
                hash,
                cookie,
                client_key,
                source_ip,
                end_of_stream,
            },
        );
    let status = prop_oneof![3 => bytes_of(&STATUSES), 1 => value()];
    let content_type = prop_oneof![3 => bytes_of(&CONTENT_TYPES), 1 => value()];
    let grpc_status = prop_oneof![3 => bytes_of(&GRPC_STATUSES), 1 => value()];
    prop_oneof![
        10 => (0..2usize, stream_header(), headers).prop_map(|(worker, stream_header, headers)| {
            Step::Request { worker, stream_header, headers }
        }),
        4 => (any::<usize>(), prop_oneof![Just(0), Just(u64::MAX), any::<u64>()])
            .prop_map(|(request, refused)| Step::Retry { request, refused }),
        5 => (
            any::<usize>(),
            maybe(status.clone()),
            maybe(content_type),
            maybe(grpc_status.clone()),
            any::<bool>(),
            flags(),
        )
            .prop_map(|(request, status, content_type, grpc_status, end_of_stream, flags)| {
                Step::ResponseHeaders { request, status, content_type, grpc_status, end_of_stream, flags }
            }),
        2 => (any::<usize>(), maybe(grpc_status), flags())
            .prop_map(|(request, grpc_status, flags)| Step::Trailers { request, grpc_status, flags }),
        4 => (any::<usize>(), flags())
            .prop_map(|(request, flags)| Step::StreamComplete { request, flags }),
        3 => any::<usize>().prop_map(|request| Step::Destroy { request }),
        1 => (0..2usize, maybe(status), flags())
            .prop_map(|(worker, status, flags)| Step::Orphan { worker, status, flags }),
        2 => (0..3usize, host_set()).prop_map(|(worker, hosts)| Step::Membership { worker, hosts }),
        2 => (0..2usize, 0..4usize, prop_oneof![4 => 0..8usize, 1 => 0..200usize])
            .prop_map(|(worker, priority, index)| Step::HealthFlip { worker, priority, index }),
        2 => prop_oneof![0..50u64, 0..5_000u64, Just(86_400_000u64)]
            .prop_map(|millis| Step::Advance { millis }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        0..POLICIES.len(),
        any::<u64>(),
        0..3_600_000u64,
        host_set(),
        vec(step(), 1..STEPS),
        option::weighted(0.005, 0..STEPS),
    )
        .prop_map(|(policy, seed, start, hosts, steps, flood_at)| Case {
            policy,
            seed,
            start: Duration::from_millis(start),
            hosts,
            steps,
            flood_at,
        })
}

// ------------------------------------------------------------------------------------------
// Running a case.

/// The events the cluster counted, in order.
#[derive(Debug, Default, Clone)]
struct Recorded(Arc<Mutex<Vec<Event>>>);

impl Counters for Recorded {
    fn count(&self, event: Event) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
    }
}

/// One request's `choose_host` view: its downstream headers as Envoy holds them, and the
/// hosts Envoy's retry predicate refuses.
#[derive(Debug)]
struct HostileRequest {
    headers: Vec<(&'static str, Vec<u8>)>,
    refused: u64,
}

impl RequestContext for HostileRequest {
    /// As the FFI reads a header: its first value, `None` unless UTF-8.
    fn header(&self, name: &str) -> Option<String> {
        let (_, value) = self.headers.iter().find(|(key, _)| *key == name)?;
        utf8(value).map(str::to_owned)
    }

    /// As the FFI reads the stream header: its last value, as bytes.
    fn stream_id(&self) -> Option<u64> {
        let (_, value) = self
            .headers
            .iter()
            .rev()
            .find(|(key, _)| *key == STREAM_HEADER)?;
        parse_stream_id(value)
    }

    fn refuses(&self, priority: u32, index: usize) -> bool {
        let bit = (8 * u64::from(priority) + index as u64) % 64;
        self.refused & (1 << bit) != 0
    }
}

/// A request Envoy is still processing.
#[derive(Debug)]
struct Request {
    worker: usize,
    /// Its outcome filter; `None` on a chain without one.
    filter: Option<OutcomeFilter>,
    /// The stream its filter opened.
    stream: Option<u64>,
    context: HostileRequest,
}

impl Request {
    /// The stream its filter opened, while still open.
    fn open_stream(&self, streams: &mut Streams) -> Option<u64> {
        self.stream.filter(|id| streams.get_mut(*id).is_some())
    }
}

/// One worker: its LB, its streams (the FFI's thread-local) and its view of the hosts.
#[derive(Debug)]
struct Worker {
    lb: WorkerLb,
    streams: Streams,
    hosts: TestHosts,
}

struct Run {
    cluster: Arc<Cluster>,
    may_refuse: bool,
    events: Recorded,
    workers: [Worker; 2],
    requests: Vec<Request>,
    /// Streams opened by the flood, closed at the end.
    flooded: Vec<u64>,
    now: Duration,
}

type Checked = Result<(), TestCaseError>;

impl Run {
    fn new(case: &Case) -> Result<Self, TestCaseError> {
        let policy = parse_policy(POLICIES[case.policy].as_bytes())
            .map_err(|error| TestCaseError::fail(format!("a test policy is invalid: {error}")))?;
        let may_refuse =
            policy.rate_limit.is_some() || matches!(policy.on_no_endpoint, OnNoEndpoint::FailFast);
        let events = Recorded::default();
        let cluster = Arc::new(Cluster::new(policy, case.seed, Box::new(events.clone())));
        let worker = || Worker {
            lb: WorkerLb::new(Arc::clone(&cluster), &case.hosts),
            streams: Streams::default(),
            hosts: case.hosts.clone(),
        };
        Ok(Self {
            workers: [worker(), worker()],
            cluster,
            may_refuse,
            events,
            requests: Vec::new(),
            flooded: Vec::new(),
            now: case.start,
        })
    }

    fn apply(&mut self, step: &Step) -> Checked {
        match step {
            Step::Request {
                worker,
                stream_header,
                headers,
            } => self.request(*worker, stream_header, headers),
            Step::Retry { request, refused } => {
                let Some(index) = self.pick_request(*request) else {
                    return Ok(());
                };
                self.requests[index].context.refused = *refused;
                self.choose(index)
            }
            Step::ResponseHeaders {
                request,
                status,
                content_type,
                grpc_status,
                end_of_stream,
                flags,
            } => {
                let head = ResponseHead {
                    status: status.as_deref().map(response_value),
                    content_type: content_type.as_deref().map(response_value),
                    grpc_status: grpc_status.as_deref().map(response_value),
                };
                self.with_filter(*request, |filter, stream, streams, now| {
                    let rejected = stream
                        .and_then(|id| streams.get_mut(id))
                        .and_then(|stream| stream.rejection);
                    let changes =
                        filter.on_response_headers(streams, head, *end_of_stream, now, || *flags);
                    check_header_changes(&changes, rejected)
                })
            }
            Step::Trailers {
                request,
                grpc_status,
                flags,
            } => self.with_filter(*request, |filter, _, streams, now| {
                let grpc_status = grpc_status.as_deref().map(response_value);
                filter.on_response_trailers(streams, grpc_status, now, || *flags);
                Ok(())
            }),
            Step::StreamComplete { request, flags } => {
                self.with_filter(*request, |filter, _, streams, now| {
                    filter.on_stream_end(streams, now, || *flags);
                    prop_assert!(!filter.is_open(), "a stream is open after its end");
                    Ok(())
                })
            }
            Step::Destroy { request } => {
                if let Some(index) = self.pick_request(*request) {
                    self.destroy(index);
                }
                Ok(())
            }
            Step::Orphan {
                worker,
                status,
                flags,
            } => {
                let mut filter = OutcomeFilter::default();
                let streams = &mut self.workers[*worker].streams;
                let head = ResponseHead {
                    status: status.as_deref().map(response_value),
                    ..ResponseHead::default()
                };
                let changes = filter.on_response_headers(streams, head, false, self.now, || *flags);
                prop_assert_eq!(
                    changes,
                    Default::default(),
                    "a filter without a stream changed a response"
                );
                filter.on_response_trailers(streams, Some("14"), self.now, || *flags);
                filter.on_stream_end(streams, self.now, || *flags);
                Ok(())
            }
            Step::Membership { worker, hosts } => {
                for (i, each) in self.workers.iter_mut().enumerate() {
                    if *worker == 2 || *worker == i {
                        each.hosts = hosts.clone();
                        each.lb.reread(&each.hosts);
                    }
                }
                Ok(())
            }
            Step::HealthFlip {
                worker,
                priority,
                index,
            } => {
                let hosts = &mut self.workers[*worker].hosts;
                if let Some(host) = hosts
                    .priorities
                    .get_mut(*priority)
                    .and_then(|hosts| hosts.get_mut(*index))
                {
                    host.healthy = !host.healthy;
                }
                Ok(())
            }
            Step::Advance { millis } => {
                self.now += Duration::from_millis(*millis);
                Ok(())
            }
        }
    }

    /// The request `which` names among those in flight, if any.
    fn pick_request(&self, which: usize) -> Option<usize> {
        (!self.requests.is_empty()).then(|| which % self.requests.len())
    }

    fn request(
        &mut self,
        worker: usize,
        stream_header: &StreamHeader,
        headers: &ClientHeaders,
    ) -> Checked {
        let mut context = HostileRequest {
            headers: Vec::new(),
            refused: 0,
        };
        for (name, values) in [
            (HASH_HEADER, &headers.hash),
            ("cookie", &headers.cookie),
            (CLIENT_KEY_HEADER, &headers.client_key),
        ] {
            context
                .headers
                .extend(values.iter().map(|value| (name, value.clone())));
        }
        // Not a header the policy names, but a cookie of that name is in `cookie`: a client
        // sending the policy's cookie name as a header changes nothing.
        context.headers.push((COOKIE, b"forged".to_vec()));
        let streams = &mut self.workers[worker].streams;
        let mut filter = None;
        let mut stream = None;
        let id = match stream_header {
            StreamHeader::Filter { client_copy } => {
                let mut opened = OutcomeFilter::default();
                let id = opened.on_request(
                    streams,
                    self.now,
                    headers.source_ip,
                    RequestSent::at(headers.end_of_stream),
                );
                filter = Some(opened);
                stream = id;
                // The filter's id goes after the client's copy; at the cap the filter removes
                // every copy.
                if let (Some(copy), Some(_)) = (client_copy, id) {
                    context.headers.push((STREAM_HEADER, copy.clone()));
                }
                id.map(|id| {
                    stream_id_text(id, &mut [0; STREAM_ID_DIGITS])
                        .as_bytes()
                        .to_vec()
                })
            }
            StreamHeader::Absent => None,
            StreamHeader::Forged(bytes) => Some(bytes.clone()),
            StreamHeader::OtherStream { which, spelling } => {
                let open: Vec<u64> = self
                    .requests
                    .iter()
                    .filter(|request| request.worker == worker)
                    .filter_map(|request| request.open_stream(streams))
                    .collect();
                (!open.is_empty()).then(|| {
                    let id = open[which % open.len()];
                    match spelling {
                        0 => format!("{id:016x}"),
                        1 => format!("{id:016X}"),
                        _ => id.to_string(),
                    }
                    .into_bytes()
                })
            }
        };
        if let Some(id) = id {
            // Last among the request's headers, as Envoy appends an added header.
            context.headers.push((STREAM_HEADER, id));
        }
        self.requests.push(Request {
            worker,
            filter,
            stream,
            context,
        });
        self.choose(self.requests.len() - 1)
    }

    /// One `choose_host` of request `index`, and what must hold of its answer.
    fn choose(&mut self, index: usize) -> Checked {
        let request = &self.requests[index];
        let Worker { lb, streams, hosts } = &mut self.workers[request.worker];
        let own = request.open_stream(streams);
        let named = request.context.stream_id().filter(|id| Some(*id) != own);
        // Every other stream's pick, which this request must not take.
        let other_ids: Vec<u64> = self
            .requests
            .iter()
            .filter(|other| other.worker == request.worker)
            .filter_map(|other| other.open_stream(streams))
            .filter(|id| Some(*id) != own)
            .collect();
        let others: HashMap<u64, Option<SocketAddr>> = other_ids
            .into_iter()
            .map(|id| {
                (
                    id,
                    streams
                        .get_mut(id)
                        .and_then(|s| s.pick.as_ref().map(|p| p.picked())),
                )
            })
            .collect();

        let chosen = lb.choose(hosts, &request.context, streams, self.now);

        for (id, picked) in &others {
            let now_picked = streams
                .get_mut(*id)
                .map(|s| s.pick.as_ref().map(|p| p.picked()));
            match (picked, now_picked) {
                (_, None) => {
                    return Err(TestCaseError::fail(
                        "choose_host closed another request's stream",
                    ));
                }
                (Some(picked), Some(now)) => prop_assert_eq!(
                    Some(*picked),
                    now,
                    "choose_host took or changed another request's pick"
                ),
                // A forged id may name a stream before its own request chose: that pick is
                // then the stream's, completed by its own filter.
                (None, Some(now)) => prop_assert!(
                    now.is_none() || named == Some(*id),
                    "a pick landed in a stream nobody named"
                ),
            }
        }
        let Some((priority, healthy_index)) = chosen else {
            let healthy: usize = (0..hosts.priorities())
                .map(|p| hosts.healthy_hosts(p))
                .sum();
            prop_assert!(
                healthy == 0 || self.may_refuse,
                "no host answered while {healthy} are healthy, under a policy that never refuses"
            );
            return Ok(());
        };
        prop_assert!(
            priority < hosts.priorities() && healthy_index < hosts.healthy_hosts(priority),
            "({priority}, {healthy_index}) is not a healthy host of the worker's set"
        );
        let stream = request
            .context
            .stream_id()
            .and_then(|id| streams.get_mut(id));
        // The host Envoy uses is the one the outcome is charged to (none, for a host that is
        // not `IP:port`).
        if let Some(pick) = stream.and_then(|stream| stream.pick.as_ref()) {
            let address = hosts
                .healthy_address(priority, healthy_index)
                .and_then(|address| address.parse::<SocketAddr>().ok());
            prop_assert_eq!(
                pick.last(),
                address,
                "the attempt's host is not the one its outcome will be charged to"
            );
        }
        Ok(())
    }

    /// Runs `f` on request `which`'s filter, if it has one.
    fn with_filter(
        &mut self,
        which: usize,
        f: impl FnOnce(&mut OutcomeFilter, Option<u64>, &mut Streams, Duration) -> Checked,
    ) -> Checked {
        let Some(index) = self.pick_request(which) else {
            return Ok(());
        };
        let request = &mut self.requests[index];
        let Some(filter) = request.filter.as_mut() else {
            return Ok(());
        };
        let streams = &mut self.workers[request.worker].streams;
        let stream = request.stream.filter(|id| streams.get_mut(*id).is_some());
        f(filter, stream, streams, self.now)
    }

    /// The request's filter is destroyed: a stream still open ends with no flags.
    fn destroy(&mut self, index: usize) {
        let request = self.requests.swap_remove(index);
        if let Some(mut filter) = request.filter
            && filter.is_open()
        {
            filter.on_stream_end(&mut self.workers[request.worker].streams, self.now, || 0);
        }
    }

    fn flood(&mut self, worker: usize) -> Checked {
        let streams = &mut self.workers[worker].streams;
        while let Some(id) = streams.open(self.now, None) {
            self.flooded.push(id);
            prop_assert!(streams.len() <= MAX_STREAMS);
        }
        prop_assert_eq!(
            streams.len(),
            MAX_STREAMS,
            "the table refused a stream below its cap"
        );
        Ok(())
    }

    /// After every step: stream tables within their cap, and no endpoint counting more
    /// requests in flight than there are open picks on it.
    fn check_bounds(&mut self) -> Checked {
        let mut live: HashMap<SocketAddr, u32> = HashMap::new();
        for request in &self.requests {
            let streams = &mut self.workers[request.worker].streams;
            let pick = request
                .open_stream(streams)
                .and_then(|id| streams.get_mut(id))
                .and_then(|stream| stream.pick.as_ref());
            if let Some(pick) = pick {
                *live.entry(pick.picked()).or_default() += 1;
            }
        }
        for worker in &self.workers {
            prop_assert!(worker.streams.len() <= MAX_STREAMS);
        }
        let leaking: Vec<(SocketAddr, u32, u32)> = self.cluster.with_picker(|picker| {
            picker
                .endpoints()
                .map(|view| {
                    let address = view.endpoint.address;
                    (
                        address,
                        view.inflight,
                        live.get(&address).copied().unwrap_or(0),
                    )
                })
                .filter(|(_, inflight, live)| inflight > live)
                .collect()
        });
        prop_assert!(
            leaking.is_empty(),
            "in flight beyond the open picks: {leaking:?}"
        );
        Ok(())
    }

    /// Every request ends: nothing stays open or in flight, and every circuit reported open
    /// is one the cluster still holds open.
    fn finish(mut self) -> Checked {
        while !self.requests.is_empty() {
            self.destroy(self.requests.len() - 1);
        }
        for id in std::mem::take(&mut self.flooded) {
            self.workers[0].streams.close(id);
        }
        for worker in &self.workers {
            prop_assert!(
                worker.streams.is_empty(),
                "{} streams left open",
                worker.streams.len()
            );
        }
        let inflight: u32 = self
            .cluster
            .with_picker(|picker| picker.endpoints().map(|view| view.inflight).sum());
        prop_assert_eq!(inflight, 0, "requests in flight after every stream ended");

        let mut open = HashSet::new();
        let events = self
            .events
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for event in events {
            match event {
                Event::CircuitOpen(endpoint) => {
                    prop_assert!(open.insert(endpoint), "{endpoint}'s circuit opened twice");
                }
                Event::CircuitClosed(endpoint) => {
                    prop_assert!(
                        open.remove(&endpoint),
                        "{endpoint}'s circuit closed while closed"
                    );
                }
                _ => {}
            }
        }
        let held: HashSet<SocketAddr> = self.cluster.take_open_circuits().into_iter().collect();
        prop_assert_eq!(
            held,
            open,
            "the circuits to close with the config are not those reported open"
        );
        Ok(())
    }
}

/// A response is changed only to turn a refusal into its reply.
fn check_header_changes(
    changes: &fulcrum_native::outcomes::HeaderChanges,
    rejected: Option<fulcrum_core::Rejection>,
) -> Checked {
    match changes.status {
        None => {}
        Some(429) => prop_assert!(
            matches!(rejected, Some(fulcrum_core::Rejection::RateLimited { .. })),
            "a 429 for a request the rate limit did not refuse"
        ),
        Some(status) => {
            return Err(TestCaseError::fail(format!("the filter answered {status}")));
        }
    }
    prop_assert!(changes.set.is_empty() || rejected.is_some());
    for (name, value) in &changes.set {
        prop_assert!(
            value.bytes().all(|b| b.is_ascii_graphic() || b == b' '),
            "{name}: {value:?} is not a header value"
        );
    }
    if let Some(cookie) = &changes.set_cookie {
        prop_assert!(
            cookie.len() < 4096 && cookie.bytes().all(|b| b.is_ascii_graphic() || b == b' '),
            "Set-Cookie {cookie:?} is not a bounded header value"
        );
    }
    Ok(())
}

fn run(case: &Case) -> Checked {
    let mut run = Run::new(case)?;
    for (index, step) in case.steps.iter().enumerate() {
        if case.flood_at == Some(index) {
            run.flood(0)?;
        }
        run.apply(step)
            .map_err(|error| TestCaseError::fail(format!("step {index} ({step:?}): {error}")))?;
        run.check_bounds()
            .map_err(|error| TestCaseError::fail(format!("after step {index}: {error}")))?;
    }
    run.finish()
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(CASES)
}

#[test]
fn hostile_requests_responses_and_host_sets_never_panic_misroute_or_leak_picks() {
    let defaults = Config::default();
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        rng_seed: match defaults.rng_seed {
            RngSeed::Random => RngSeed::Fixed(SEED),
            seed => seed,
        },
        ..defaults
    };
    let mut runner = TestRunner::new(config);
    if let Err(error) = runner.run(&case(), |case| run(&case)) {
        panic!("{error}");
    }
}
