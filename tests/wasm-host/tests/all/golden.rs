//! The golden test of the two data planes (issue #18): the same sequence of requests and
//! outcomes, under the same service policy and the same endpoints, gives the same picks
//! through the real wasm filter (`fulcrum_balancer.wasm` in this host) and through the native
//! module's safe adapter (`fulcrum-native`: the `fulcrum_outcomes` filter's logic and the
//! per-worker load balancer `choose_host` runs, over `TestHosts` instead of Envoy's host
//! set), step by step: the host each request goes to (or the refusal, or failing open), the
//! host a retry goes to, and the cookie each response sets.
//!
//! - **Same endpoints.** Five, with drawn weights and fixed zones, region, tags and metadata: the
//!   filter's static endpoints, and the adapter's hosts with the locality and the
//!   `filter_metadata["fulcrum"]` strings the control plane's EDS writes.
//! - **Same inputs.** Each case is a sequence of operations drawn by proptest: send a request
//!   (a hash-header value or none, a client address, a cookie the planes issued earlier, a
//!   forged one or none), answer one of the requests in flight (an HTTP status, a gRPC status
//!   in the headers or the trailers, an upstream reset, timeout or connect failure as Envoy's
//!   router reports them, a latency, served by the pick or by its first retry target), or
//!   let time pass (the filter's tick runs). Requests overlap, so in-flight counts matter.
//! - **Same randomness.** The filter seeds its worker's generator with
//!   `fulcrum_core::rng::vm_seed` of the host clock when it is configured and its root context
//!   id; the native cluster takes its seed from its caller (in Envoy, a random one per
//!   cluster). Each case starts the host's clock at a drawn instant
//!   ([`PluginBuilder::clock_start`](fulcrum_wasm_host::PluginBuilder::clock_start)) and
//!   gives the native cluster the seed the filter derives from it.
//! - **Same clock.** The native adapter takes time from its callers: every call gets the
//!   host's clock, so latencies, ejection times (and their jitter, a hash of the time) and
//!   rate-limit refills agree.
//! - **Outcomes as Envoy presents them to each.** The filter reads `:status`, `grpc-status`,
//!   `upstream.address`, the attempt count and the response flags; the outcome filter sees
//!   the response (Envoy's router answers an upstream reset or connect failure with a local
//!   503 and a timeout with a local 504), the same response flags, and, for a retry, the
//!   second `choose_host` of the stream. A client that goes away before the response ends
//!   the stream with no response and Envoy's `DC` flag on both; a stream that idles past
//!   Envoy's stream idle timeout ends with a local 408 and `SI`.
//! - **Same request ends.** A request ends with its headers, or its body follows and ends,
//!   or the client announces a body and stalls: the filter's `proxy_on_request_headers` and
//!   `proxy_on_request_body` and the outcome filter's request end see the same, so a stalled
//!   client's idle timeout charges nobody on either plane.
//!
//! The case count is [`CASES`] per policy family (`PROPTEST_CASES` overrides it) and the
//! seed is fixed (`PROPTEST_RNG_SEED` overrides it): every run checks the same sequences, and
//! a failure prints the shrunk sequence that replays it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, ensure};
use fulcrum_core::{
    OVERRIDE_HEADER, RequestSent,
    endpoint::{REGION_KEY, scalar_metadata},
    rng::vm_seed,
};
use fulcrum_native::{
    balancer::{
        Cluster, Counters, Event, RequestContext, STREAM_HEADER, STREAM_ID_DIGITS, Streams,
        WorkerLb, stream_id_text,
    },
    config::parse_policy,
    hosts::{
        HostSet,
        test_hosts::{TestHost, TestHosts},
    },
    outcomes::{OutcomeFilter, ResponseHead},
};
use fulcrum_wasm_host::{Plugin, PluginBuilder, Request, response_flags};
use proptest::{
    collection::vec,
    prelude::*,
    sample::{Index, select},
    test_runner::{Config, RngSeed, TestCaseError, TestRunner},
};

use crate::test_support::{filter, ms};

/// Cases per policy family.
const CASES: u32 = 48;
/// The seed unless `PROPTEST_RNG_SEED` is set.
const SEED: u64 = 0x0060_1de0;
const SERVICE: &str = "checkout";
/// The header the hashing families hash on.
const HASH_HEADER: &str = "x-user";
/// The cookie of the sticky and cookie-hash families.
const COOKIE: &str = "session";
/// The region of every endpoint.
const REGION: &str = "r1";

/// One endpoint of every case (its weight is drawn): where it is and what it carries, which
/// the filter reads from its static endpoints and the native adapter from the host's
/// locality and `filter_metadata["fulcrum"]` strings.
struct EndpointSpec {
    address: &'static str,
    zone: &'static str,
    tags: &'static [&'static str],
    /// Its `version` metadata.
    version: &'static str,
}

const ENDPOINTS: [EndpointSpec; 5] = [
    EndpointSpec {
        address: "10.0.0.1:8080",
        zone: "z1",
        tags: &["canary"],
        version: "v2",
    },
    EndpointSpec {
        address: "10.0.0.2:8080",
        zone: "z1",
        tags: &[],
        version: "v1",
    },
    EndpointSpec {
        address: "10.0.0.3:8080",
        zone: "z2",
        tags: &["canary", "gpu"],
        version: "v2",
    },
    EndpointSpec {
        address: "10.0.0.4:8080",
        zone: "z2",
        tags: &["canary"],
        version: "v2",
    },
    EndpointSpec {
        address: "10.0.0.5:8080",
        zone: "z3",
        tags: &[],
        version: "v2",
    },
];
/// A breaker that trips within a sequence: three consecutive failures eject for a second
/// (jittered), up to three of the five endpoints at once.
const BREAKER: &str = r#""outlier_detection": {"consecutive_failures": 3, "base_ejection_time": "1s",
    "max_ejection_percent": 60}"#;

/// Breakers that eject an endpoint at its first failure, every endpoint if need be, with no
/// panic mode: a service can run out of admissible endpoints (its `on_no_endpoint` decides).
const EJECT_EVERY_FAILING: &str = r#""outlier_detection": {"consecutive_failures": 1,
    "base_ejection_time": "2s", "max_ejection_percent": 100, "panic_threshold_percent": 0}"#;

/// One case: where the clock starts (the filter's seed), the endpoints' weights, the steps.
#[derive(Debug, Clone)]
struct Case {
    clock_start: Duration,
    weights: Vec<u32>,
    ops: Vec<Op>,
}

/// One step of a case, applied to both planes.
#[derive(Debug, Clone)]
enum Op {
    /// A request: its hash-header value, its client (`192.0.2.<client>`), its cookie, its
    /// body.
    Send {
        key: Option<u8>,
        client: u8,
        cookie: CookieChoice,
        body: Body,
    },
    /// The upstream answers one of the requests in flight after `latency_ms`.
    Answer {
        which: Index,
        answer: Answer,
        latency_ms: u16,
        /// Envoy retried on the pick's first retry target (when it has one), which answered.
        retried: bool,
    },
    /// Time passes; the filter's tick runs.
    Wait { ms: u16 },
}

/// The cookie a request carries.
#[derive(Debug, Clone)]
enum CookieChoice {
    None,
    /// One of the cookies responses set so far (none yet: no cookie).
    Issued(Index),
    Forged,
}

/// Whether a request has a body, and whether the client sends all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// The headers end the request.
    None,
    /// A body follows the headers, its last chunk right after them.
    Sent,
    /// A body is announced and never finished: the client stalls.
    Stalled,
}

/// How the upstream, or Envoy's router on its behalf, answers.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// A plain HTTP response with this status.
    Status(u16),
    /// A gRPC response (`:status` 200) with this `grpc-status`, in its headers
    /// (trailers-only) or its trailers.
    Grpc { code: u8, in_trailers: bool },
    /// Envoy's local 503 for an upstream reset before the response (`UR`).
    UpstreamReset,
    /// Envoy's local 503 for a connect failure (`UF`).
    ConnectFailure,
    /// Envoy's local 504 for a route timeout (`UT`).
    Timeout,
    /// The client went away before the response: no response, Envoy's `DC` flag.
    ClientCancel,
    /// Nothing moved on the stream for Envoy's stream idle timeout: a local 408, `SI`.
    IdleTimeout,
}

impl Answer {
    /// The response flags Envoy reports for this answer, to both data planes.
    fn flags(self) -> u64 {
        match self {
            Self::UpstreamReset => response_flags::UPSTREAM_REMOTE_RESET,
            Self::ConnectFailure => response_flags::UPSTREAM_CONNECTION_FAILURE,
            Self::Timeout => response_flags::UPSTREAM_REQUEST_TIMEOUT,
            Self::ClientCancel => response_flags::DOWNSTREAM_CONNECTION_TERMINATION,
            Self::IdleTimeout => response_flags::STREAM_IDLE_TIMEOUT,
            Self::Status(_) | Self::Grpc { .. } => 0,
        }
    }
}

fn answers() -> impl Strategy<Value = Answer> {
    prop_oneof![
        6 => select(vec![200u16, 200, 200, 201, 404, 500, 502, 503]).prop_map(Answer::Status),
        2 => (select(vec![0u8, 0, 14, 4, 13, 5]), any::<bool>())
            .prop_map(|(code, in_trailers)| Answer::Grpc { code, in_trailers }),
        1 => Just(Answer::UpstreamReset),
        1 => Just(Answer::ConnectFailure),
        1 => Just(Answer::Timeout),
        1 => Just(Answer::ClientCancel),
        1 => Just(Answer::IdleTimeout),
    ]
}

fn ops() -> impl Strategy<Value = Op> {
    let cookie = prop_oneof![
        2 => Just(CookieChoice::None),
        3 => any::<Index>().prop_map(CookieChoice::Issued),
        1 => Just(CookieChoice::Forged),
    ];
    let body = prop_oneof![
        6 => Just(Body::None),
        2 => Just(Body::Sent),
        2 => Just(Body::Stalled),
    ];
    prop_oneof![
        5 => (prop::option::weighted(0.9, 0u8..12), 0u8..6, cookie, body)
            .prop_map(|(key, client, cookie, body)| Op::Send { key, client, cookie, body }),
        4 => (any::<Index>(), answers(), 1u16..700, prop::bool::weighted(0.2)).prop_map(
            |(which, answer, latency_ms, retried)| Op::Answer { which, answer, latency_ms, retried }
        ),
        1 => (1u16..1500).prop_map(|ms| Op::Wait { ms }),
    ]
}

fn cases() -> impl Strategy<Value = Case> {
    let weights = prop_oneof![
        Just(vec![1; ENDPOINTS.len()]),
        vec(1u32..=3, ENDPOINTS.len()),
    ];
    (0u64..1_000_000_000_000_000, weights, vec(ops(), 1..160)).prop_map(
        |(offset_nanos, weights, ops)| Case {
            // 2025-01-01 plus up to about eleven days, to the nanosecond: the filter's seed.
            clock_start: Duration::from_secs(1_735_689_600) + Duration::from_nanos(offset_nanos),
            weights,
            ops,
        },
    )
}

/// Counts the native adapter's fail-opens: a host it returns then is not fulcrum's pick.
#[derive(Debug, Default, Clone)]
struct FailOpens(Arc<AtomicU64>);

impl FailOpens {
    fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Counters for FailOpens {
    fn count(&self, event: Event) {
        if event == Event::FailOpen {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The request headers `choose_host` reads (Envoy's retry predicates refuse no host here).
#[derive(Debug, Clone)]
struct NativeRequest(Vec<(&'static str, String)>);

impl RequestContext for NativeRequest {
    fn header(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(header, _)| *header == name)
            .map(|(_, value)| value.clone())
    }

    fn refuses(&self, _priority: u32, _index: usize) -> bool {
        false
    }
}

/// Where a request went, as either data plane tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Routed {
    /// fulcrum picked this endpoint.
    Picked(String),
    /// fulcrum refused the request with this status (rate limit 429, fail fast 503).
    Refused(u16),
    /// fulcrum left the choice to Envoy.
    FailedOpen,
}

/// A request both planes are serving.
struct InFlight<'p> {
    wasm: Request<'p>,
    /// The filter's override header: the pick, then its retry targets.
    wasm_targets: Vec<String>,
    native: OutcomeFilter,
    native_request: NativeRequest,
}

/// Both data planes under one policy, fed the same operations.
struct Planes<'p> {
    plugin: &'p Plugin,
    hosts: TestHosts,
    worker: WorkerLb,
    streams: Streams,
    fail_opens: FailOpens,
    in_flight: Vec<InFlight<'p>>,
    /// Every cookie a response set (`name=value`), in order.
    cookies: Vec<String>,
}

fn since_epoch(time: SystemTime) -> Duration {
    time.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// The filter's configuration: the endpoints, statically, and `policy` for every service.
fn filter_config(weights: &[u32], policy: &str) -> String {
    let endpoints: Vec<String> = ENDPOINTS
        .iter()
        .zip(weights)
        .map(|(spec, weight)| {
            let tags: Vec<String> = spec.tags.iter().map(|tag| format!(r#""{tag}""#)).collect();
            format!(
                r#"{{"address": "{}", "weight": {weight}, "zone": "{}", "tags": [{}],
                    "metadata": {{"{REGION_KEY}": "{REGION}", "version": "{}"}}}}"#,
                spec.address,
                spec.zone,
                tags.join(", "),
                spec.version
            )
        })
        .collect();
    format!(
        r#"{{"endpoints": {{"{SERVICE}": [{}]}}, "policy": {{"default": {policy}}}}}"#,
        endpoints.join(", ")
    )
}

fn start_plugin(filter: &PluginBuilder, case: &Case, policy: &str) -> anyhow::Result<Plugin> {
    filter
        .clone()
        .configure(filter_config(&case.weights, policy))
        .clock_start(UNIX_EPOCH + case.clock_start)
        .start()
}

impl<'p> Planes<'p> {
    fn new(plugin: &'p Plugin, case: &Case, policy: &str) -> anyhow::Result<Self> {
        let hosts = TestHosts::one_priority(
            ENDPOINTS
                .iter()
                .zip(&case.weights)
                .map(|(spec, weight)| TestHost {
                    weight: *weight,
                    zone: spec.zone.to_owned(),
                    region: REGION.to_owned(),
                    metadata: BTreeMap::from([
                        (scalar_metadata::TAGS.to_owned(), spec.tags.join(",")),
                        (
                            format!("{}version", scalar_metadata::METADATA_PREFIX),
                            spec.version.to_owned(),
                        ),
                    ]),
                    ..TestHost::healthy(spec.address)
                })
                .collect(),
        );
        // The seed the filter's worker took from the clock when it was configured.
        let seed = vm_seed(case.clock_start, plugin.worker(0).root_context_id());
        let fail_opens = FailOpens::default();
        let cluster = Cluster::new(
            parse_policy(policy.as_bytes())?,
            seed,
            Box::new(fail_opens.clone()),
        );
        let worker = WorkerLb::new(Arc::new(cluster), &hosts);
        Ok(Self {
            plugin,
            hosts,
            worker,
            streams: Streams::default(),
            fail_opens,
            in_flight: Vec::new(),
            cookies: Vec::new(),
        })
    }

    /// The clock both planes read.
    fn now(&self) -> Duration {
        since_epoch(self.plugin.now())
    }

    fn apply(&mut self, op: &Op) -> anyhow::Result<()> {
        match op {
            Op::Send {
                key,
                client,
                cookie,
                body,
            } => {
                let cookie = match cookie {
                    CookieChoice::None => None,
                    CookieChoice::Issued(index) => (!self.cookies.is_empty())
                        .then(|| self.cookies[index.index(self.cookies.len())].clone()),
                    CookieChoice::Forged => Some(format!("{COOKIE}=forged")),
                };
                self.send(key.map(|key| key.to_string()), *client, cookie, *body)
            }
            Op::Answer {
                which,
                answer,
                latency_ms,
                retried,
            } => {
                if self.in_flight.is_empty() {
                    return Ok(());
                }
                let request = self.in_flight.remove(which.index(self.in_flight.len()));
                self.answer(request, *answer, ms(u64::from(*latency_ms)), *retried)
            }
            Op::Wait { ms: wait } => {
                self.plugin.advance_clock(ms(u64::from(*wait)));
                self.plugin.tick_all()?;
                Ok(())
            }
        }
    }

    fn send(
        &mut self,
        key: Option<String>,
        client: u8,
        cookie: Option<String>,
        body: Body,
    ) -> anyhow::Result<()> {
        let now = self.now();
        let client = Ipv4Addr::new(192, 0, 2, client);
        let mut builder = self
            .plugin
            .worker(0)
            .request()
            .header(":authority", SERVICE)
            .header(":path", "/")
            .source(&format!("{client}:40000"));
        let mut native_headers = Vec::new();
        if let Some(key) = &key {
            builder = builder.header(HASH_HEADER, key);
            native_headers.push((HASH_HEADER, key.clone()));
        }
        if let Some(cookie) = &cookie {
            builder = builder.header("cookie", cookie);
            native_headers.push(("cookie", cookie.clone()));
        }

        let mut wasm = if body == Body::None {
            builder.send_headers()?
        } else {
            builder.send_headers_with_body()?
        };
        let wasm_targets: Vec<String> = wasm
            .request_header(OVERRIDE_HEADER)
            .map(|header| header.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        let wasm_routed = match (wasm_targets.first(), wasm.local_response()) {
            (Some(pick), _) => Routed::Picked(pick.clone()),
            (None, Some(reply)) => Routed::Refused(u16::try_from(reply.status)?),
            (None, None) => Routed::FailedOpen,
        };

        let mut native = OutcomeFilter::default();
        let stream = native
            .on_request(
                &mut self.streams,
                now,
                Some(IpAddr::V4(client)),
                RequestSent::at(body == Body::None),
            )
            .context("the outcome filter opens a stream")?;
        let mut digits = [0; STREAM_ID_DIGITS];
        native_headers.push((
            STREAM_HEADER,
            stream_id_text(stream, &mut digits).to_owned(),
        ));
        let native_request = NativeRequest(native_headers);
        let fail_opens = self.fail_opens.count();
        let chosen = self
            .worker
            .choose(&self.hosts, &native_request, &mut self.streams, now);
        let native_routed = match chosen {
            Some(_) if self.fail_opens.count() != fail_opens => Routed::FailedOpen,
            Some((priority, index)) => Routed::Picked(
                self.hosts
                    .healthy_address(priority, index)
                    .context("choose_host answers a healthy host")?,
            ),
            // Envoy answers 503 `no healthy upstream`; the outcome filter makes it the
            // filter's reply.
            None => {
                // Envoy's `UH`, no healthy upstream: not a flag fulcrum reads.
                let changes = native.on_response_headers(
                    &mut self.streams,
                    ResponseHead {
                        status: Some("503"),
                        ..ResponseHead::default()
                    },
                    true,
                    now,
                    || 0x2,
                );
                Routed::Refused(changes.status.unwrap_or(503))
            }
        };

        ensure!(
            wasm_routed == native_routed,
            "the request went {wasm_routed:?} through the wasm filter but {native_routed:?} \
             through the native module"
        );
        if matches!(wasm_routed, Routed::Picked(_)) {
            if body == Body::Sent {
                wasm.send_body(b"{}", true)?;
                native.on_request_end();
            }
            self.in_flight.push(InFlight {
                wasm,
                wasm_targets,
                native,
                native_request,
            });
        } else {
            // Envoy's fallback serves a request fulcrum failed open (nobody is charged), or
            // the local reply ends it.
            wasm.reset()?;
            native.on_stream_end(&mut self.streams, now, || 0);
        }
        Ok(())
    }

    fn answer(
        &mut self,
        mut request: InFlight<'p>,
        answer: Answer,
        latency: Duration,
        retried: bool,
    ) -> anyhow::Result<()> {
        if matches!(answer, Answer::ClientCancel) {
            // Before any retry: the stream ends with no response and no upstream named.
            self.plugin.advance_clock(latency);
            request.wasm.reset()?;
            let now = self.now();
            request
                .native
                .on_stream_end(&mut self.streams, now, || answer.flags());
            return Ok(());
        }
        // An idle stream ends at the pick's attempt: Envoy retries nothing.
        let retried = retried && !matches!(answer, Answer::IdleTimeout);
        let retry_target = request.wasm_targets.get(1).filter(|_| retried).cloned();
        // Envoy's retry asks the native policy again for the stream's host.
        if let Some(target) = &retry_target {
            let now = self.now();
            let chosen =
                self.worker
                    .choose(&self.hosts, &request.native_request, &mut self.streams, now);
            let native_retry =
                chosen.and_then(|(priority, index)| self.hosts.healthy_address(priority, index));
            ensure!(
                native_retry.as_ref() == Some(target),
                "the retry went to {target} through the wasm filter but {native_retry:?} \
                 through the native module"
            );
        }
        let served = retry_target.unwrap_or_else(|| request.wasm_targets[0].clone());

        let (status, grpc) = match answer {
            Answer::Status(status) => (status, None),
            Answer::Grpc { code, in_trailers } => (200, Some((code.to_string(), in_trailers))),
            Answer::UpstreamReset | Answer::ConnectFailure => (503, None),
            Answer::Timeout => (504, None),
            Answer::IdleTimeout => (408, None),
            Answer::ClientCancel => unreachable!("answered above"),
        };
        let mut response = request.wasm.respond(status);
        response = match answer {
            Answer::UpstreamReset => response
                .flags(answer.flags())
                .code_details("upstream_reset_before_response_started{remote_reset}"),
            Answer::ConnectFailure => response
                .flags(answer.flags())
                .code_details("upstream_reset_before_response_started{connection_failure}"),
            Answer::Timeout => response
                .flags(answer.flags())
                .code_details("upstream_response_timeout"),
            Answer::IdleTimeout => response
                .flags(answer.flags())
                .code_details("stream_idle_timeout"),
            Answer::Status(_) | Answer::Grpc { .. } | Answer::ClientCancel => response,
        };
        if let Some((code, in_trailers)) = &grpc {
            response = response.header("content-type", "application/grpc");
            response = if *in_trailers {
                response.trailer("grpc-status", code)
            } else {
                response.header("grpc-status", code)
            };
        }
        response
            .upstream(&served)
            .attempts(if served == request.wasm_targets[0] {
                1
            } else {
                2
            })
            .latency(latency)
            .finish()?;
        let wasm_cookie = request.wasm.response_header("set-cookie");

        let now = self.now();
        let code = status.to_string();
        let (content_type, headers_grpc_status, trailers_grpc_status) = match &grpc {
            Some((code, false)) => (Some("application/grpc"), Some(code.as_str()), None),
            Some((code, true)) => (Some("application/grpc"), None, Some(code.as_str())),
            None => (None, None, None),
        };
        let changes = request.native.on_response_headers(
            &mut self.streams,
            ResponseHead {
                status: Some(&code),
                content_type,
                grpc_status: headers_grpc_status,
            },
            trailers_grpc_status.is_none(),
            now,
            || answer.flags(),
        );
        if trailers_grpc_status.is_some() {
            request.native.on_response_trailers(
                &mut self.streams,
                trailers_grpc_status,
                now,
                || answer.flags(),
            );
        }
        request
            .native
            .on_stream_end(&mut self.streams, now, || answer.flags());

        ensure!(
            wasm_cookie == changes.set_cookie,
            "the response set cookie {wasm_cookie:?} through the wasm filter but {:?} through \
             the native module",
            changes.set_cookie
        );
        if let Some(cookie) = wasm_cookie {
            let pair = cookie.split(';').next().unwrap_or_default().trim();
            self.cookies.push(pair.to_owned());
        }
        Ok(())
    }
}

/// Runs every case of the family under `policy` (one service policy, as JSON) through both
/// planes, failing with the first step where they part and the shrunk case.
fn both_planes_pick_alike(policy: &str) {
    let defaults = Config::default();
    let config = Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(CASES),
        failure_persistence: None,
        rng_seed: match defaults.rng_seed {
            RngSeed::Random => RngSeed::Fixed(SEED),
            seed => seed,
        },
        ..defaults
    };
    // Loaded before the runner, so a missing module fails at once saying how to build it.
    let filter = filter();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&cases(), |case| {
        run_case(&filter, &case, policy).map_err(|error| TestCaseError::fail(format!("{error:#}")))
    });
    if let Err(error) = result {
        panic!("policy {policy}: {error}");
    }
}

fn run_case(filter: &PluginBuilder, case: &Case, policy: &str) -> anyhow::Result<()> {
    let plugin = start_plugin(filter, case, policy)?;
    let mut planes = Planes::new(&plugin, case, policy)?;
    for (step, op) in case.ops.iter().enumerate() {
        planes
            .apply(op)
            .with_context(|| format!("step {step}: {op:?}"))?;
    }
    Ok(())
}

#[test]
fn golden_least_request_p2c_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "least_request"}}, {BREAKER}}}"#
    ));
}

#[test]
fn golden_least_request_with_slow_start_and_retries_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "least_request", "choice_count": 3}}, "retry": 2,
            "slow_start": {{"window": "5s"}}, {BREAKER}}}"#
    ));
}

#[test]
fn golden_round_robin_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(
        r#"{"load_balancer": {"type": "round_robin"}, "retry": 1,
            "outlier_detection": {"consecutive_gateway_errors": 2, "base_ejection_time": "2s",
                                  "max_ejection_percent": 40}}"#,
    );
}

#[test]
fn golden_weighted_round_robin_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "weighted_round_robin"}}, "retry": 2, {BREAKER}}}"#
    ));
}

#[test]
fn golden_weighted_random_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "weighted_random"}}, {BREAKER}}}"#
    ));
}

#[test]
fn golden_peak_ewma_with_slow_call_ejection_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(
        r#"{"load_balancer": {"type": "peak_ewma", "decay": "2s"},
            "outlier_detection": {"consecutive_failures": 0, "base_ejection_time": "1s",
                "max_ejection_percent": 60, "window": "5s",
                "slow_calls": {"latency_threshold": "300ms", "threshold_percent": 50,
                               "minimum_requests": 3}}}"#,
    );
}

#[test]
fn golden_health_score_with_failure_rate_ejection_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(
        r#"{"load_balancer": {"type": "health_score"},
            "outlier_detection": {"consecutive_failures": 0, "base_ejection_time": "1s",
                "max_ejection_percent": 60, "window": "5s",
                "failure_rate": {"threshold_percent": 40, "minimum_requests": 3}}}"#,
    );
}

#[test]
fn golden_ring_hash_by_header_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "ring_hash", "hash_on": {{"header": "{HASH_HEADER}"}}}},
            {BREAKER}}}"#
    ));
}

#[test]
fn golden_maglev_by_header_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "maglev", "hash_on": {{"header": "{HASH_HEADER}"}},
            "table_size": 251}}, {BREAKER}}}"#
    ));
}

#[test]
fn golden_maglev_by_source_ip_with_bounded_load_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "maglev", "hash_on": "source_ip", "table_size": 251,
            "bounded_load": 1.5}}, {BREAKER}}}"#
    ));
}

#[test]
fn golden_ring_hash_by_cookie_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "ring_hash",
            "hash_on": {{"cookie": {{"name": "{COOKIE}", "ttl": "1h"}}}}}}, {BREAKER}}}"#
    ));
}

#[test]
fn golden_sticky_by_cookie_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "sticky", "cookie": "{COOKIE}",
            "fallback": {{"type": "least_request"}}}}, "retry": 1, {BREAKER}}}"#
    ));
}

#[test]
fn golden_rate_limit_refuses_alike_on_both_data_planes() {
    both_planes_pick_alike(
        r#"{"load_balancer": {"type": "round_robin"},
            "rate_limit": {"requests_per_second": 5, "burst": 3}}"#,
    );
}

#[test]
fn golden_fail_fast_refuses_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "least_request"}}, "on_no_endpoint": "fail_fast",
            {EJECT_EVERY_FAILING}}}"#
    ));
}

#[test]
fn golden_fail_open_leaves_the_choice_to_envoy_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "round_robin"}}, "on_no_endpoint": "fail_open",
            {EJECT_EVERY_FAILING}}}"#
    ));
}

#[test]
fn golden_zone_preference_with_failover_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "round_robin"}}, "retry": 1,
            "locality": {{"local_zone": "z1", "failover": ["z3"], "min_healthy_percent": 60}},
            {BREAKER}}}"#
    ));
}

#[test]
fn golden_tag_and_metadata_selector_picks_alike_on_both_data_planes() {
    both_planes_pick_alike(&format!(
        r#"{{"load_balancer": {{"type": "least_request"}},
            "endpoint_selector": {{"tags": ["canary"], "metadata": {{"version": "v2"}}}},
            {BREAKER}}}"#
    ));
}
