//! Property: whatever a client sends (arbitrary header names and values as bytes, repeated,
//! in any case, up to 64 KiB; arbitrary cookies, authorities and properties), whatever an
//! upstream answers (any `content-type`, gRPC or not, any `grpc-status` bytes, in the headers
//! or the trailers) and whatever the control plane answers (any `:status`, any body, any replica name, valid snapshots with arbitrary names,
//! zones and weights up to the registry's 10,000, resets, timeouts), the real filter never
//! traps, never lets a client's override header through, keeps picking for ordinary requests,
//! and its memory stays bounded.
//!
//! One plugin per service source runs every case, so state accumulates across thousands of
//! hostile requests the way it does in a worker; the module is compiled once. The case count
//! is [`CASES`] (`PROPTEST_CASES` overrides it) and the seed is fixed (`PROPTEST_RNG_SEED`
//! overrides it), so every run checks the same inputs unless asked otherwise.

use std::net::SocketAddr;

use fulcrum_core::OVERRIDE_HEADER;
use fulcrum_wasm_host::{Outcome, Plugin, Property, Request, Response};
use proptest::{
    collection::vec,
    prelude::*,
    sample::select,
    test_runner::{Config, RngSeed, TestCaseError, TestRunner},
};

use crate::test_support::{filter, ms};

/// Cases per run in CI (about 10 s here, most of it compiling the module once).
const CASES: u32 = 10_000;
/// The seed unless `PROPTEST_RNG_SEED` is set.
const SEED: u64 = 0x00f0_1c00_5eed;
/// Most a worker's guest memory may grow over a whole run: a leak of 64 bytes per request,
/// or header values kept per client, would exceed it within the default case count.
const MEMORY_GROWTH_BOUND: usize = 4 << 20;
/// Largest generated header value: beyond Envoy's default 60 KiB limit for all headers.
const LARGEST_VALUE: usize = 64 << 10;
/// Largest generated endpoint weight: the registry's cap (0 is invalid and must be refused).
const MAX_WEIGHT: u32 = 10_000;

const DEFAULT_OVERRIDE: &[u8] = OVERRIDE_HEADER.as_bytes();
const CUSTOM_OVERRIDE: &[u8] = b"x-pick";
const CONTROL_PLANE: &str = "fulcrum_control_plane";
const SERVICES: [&str; 4] = ["checkout", "cart", "api", "geo"];
/// Every endpoint any snapshot or static configuration names; a client's override value is
/// never one of these (see [`plausible_value`]), so an override header holding only these
/// addresses was written by the filter.
const ENDPOINTS: [&str; 4] = [
    "10.9.0.1:9001",
    "10.9.0.2:9001",
    "10.9.0.3:9002",
    "[fd00::9]:9003",
];

/// One policy per service, so every input the filter reads is in play: a sticky cookie with
/// a header hash behind it, a cookie hash, a client-keyed rate limit, a source-IP hash.
const POLICY: &str = r#"{
    "default": {"load_balancer": {"type": "sticky",
        "fallback": {"type": "ring_hash", "hash_on": {"header": "x-user"}}}, "retry": 2},
    "services": {
        "cart": {"load_balancer": {"type": "ring_hash", "hash_on": {"cookie": {"name": "user"}}}},
        "api": {"load_balancer": {"type": "round_robin"},
            "rate_limit": {"requests_per_second": 50, "burst": 20, "client_key_header": "x-api-key"}},
        "geo": {"load_balancer": {"type": "maglev", "hash_on": "source_ip"}}
    }
}"#;

fn static_endpoints() -> String {
    let endpoints: Vec<String> = ENDPOINTS
        .iter()
        .map(|address| format!(r#"{{"address": "{address}"}}"#))
        .collect();
    let endpoints = endpoints.join(", ");
    let services: Vec<String> = SERVICES
        .iter()
        .map(|service| format!(r#""{service}": [{endpoints}]"#))
        .collect();
    format!("{{{}}}", services.join(", "))
}

fn good_snapshot() -> String {
    let services: Vec<String> = SERVICES
        .iter()
        .map(|service| {
            format!(
                r#""{service}": {{"endpoints": [{{"address": "{}"}}]}}"#,
                ENDPOINTS[0]
            )
        })
        .collect();
    format!(
        r#"{{"version": "good", "services": {{{}}}}}"#,
        services.join(", ")
    )
}

/// Where a plugin finds the service, and the override header it writes.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// `:authority`, default override header.
    Authority,
    /// Header `x-service`, override header `x-pick`.
    Header,
    /// `xds.cluster_name`, snapshots from the control plane.
    RouteCluster,
}

/// The three plugins, each with its guest memory size at the start.
struct Fixture {
    plugins: Vec<(Source, Plugin, usize)>,
}

impl Fixture {
    fn start() -> anyhow::Result<Self> {
        let endpoints = static_endpoints();
        let configs = [
            (
                Source::Authority,
                format!(r#"{{"endpoints": {endpoints}, "policy": {POLICY}}}"#),
            ),
            (
                Source::Header,
                format!(
                    r#"{{"endpoints": {endpoints}, "policy": {POLICY}, "override_header": "x-pick",
                        "service": {{"from": "header", "name": "x-service"}}}}"#
                ),
            ),
            (
                Source::RouteCluster,
                format!(
                    r#"{{"control_plane": {{"cluster": "{CONTROL_PLANE}", "poll_interval": "1s"}}, "only_services": ["*"],
                        "policy": {POLICY}, "service": {{"from": "route_cluster"}}}}"#
                ),
            ),
        ];
        let mut plugins = Vec::new();
        for (source, config) in configs {
            let plugin = filter().configure(config).cluster(CONTROL_PLANE).start()?;
            if matches!(source, Source::RouteCluster) {
                poll(&plugin, Response::ok(good_snapshot()))?;
            }
            let memory = plugin.worker(0).memory_bytes();
            plugins.push((source, plugin, memory));
        }
        Ok(Self { plugins })
    }

    fn check(&self, case: &Case) -> anyhow::Result<()> {
        for (source, plugin, _) in &self.plugins {
            if let (Source::RouteCluster, Some(answer)) = (source, &case.snapshot) {
                poll(plugin, answer.clone().into_outcome())?;
            }
            hostile_request(*source, plugin, case)
                .map_err(|e| e.context(format!("{source:?}; logs:\n{}", plugin.logs_text())))?;
            if !matches!(source, Source::RouteCluster) {
                ordinary_request_is_picked(*source, plugin)
                    .map_err(|e| e.context(format!("{source:?} after the hostile request")))?;
            }
        }
        Ok(())
    }

    /// After the run: memory bounded, and every plugin still picks (the route-cluster one
    /// once a good snapshot is back).
    fn check_after_run(&self) -> anyhow::Result<()> {
        for (source, plugin, memory_at_start) in &self.plugins {
            let memory = plugin.worker(0).memory_bytes();
            anyhow::ensure!(
                memory <= memory_at_start + MEMORY_GROWTH_BOUND,
                "{source:?}: guest memory grew from {memory_at_start} to {memory} bytes"
            );
            if matches!(source, Source::RouteCluster) {
                poll(plugin, Response::ok(good_snapshot()))?;
            }
            ordinary_request_is_picked(*source, plugin)?;
            anyhow::ensure!(plugin.metric("fulcrum_override_header_stripped_total")? > 0);
        }
        Ok(())
    }
}

/// One poll answered with `outcome`, delivered and applied.
fn poll(plugin: &Plugin, outcome: impl Into<Outcome>) -> anyhow::Result<()> {
    plugin.script_http_call(CONTROL_PLANE, outcome);
    plugin.advance_clock(ms(1_000));
    plugin.tick_all()?;
    plugin.tick_all()?;
    Ok(())
}

fn override_name(source: Source) -> &'static [u8] {
    match source {
        Source::Header => CUSTOM_OVERRIDE,
        Source::Authority | Source::RouteCluster => DEFAULT_OVERRIDE,
    }
}

/// No client copy of an override header survives: the name the plugin writes holds at most
/// the filter's pick, and the default name, when the plugin writes another, is gone.
fn no_client_override_survives(source: Source, request: &Request<'_>) -> anyhow::Result<()> {
    let written = override_name(source);
    let mut picks = 0;
    for (name, value) in request.request_headers_bytes() {
        if name.eq_ignore_ascii_case(written) {
            picks += 1;
            let text = std::str::from_utf8(&value)?;
            anyhow::ensure!(
                text.split(',').all(|address| ENDPOINTS.contains(&address)),
                "{} survived as {value:?}",
                String::from_utf8_lossy(written)
            );
        } else {
            anyhow::ensure!(
                !name.eq_ignore_ascii_case(DEFAULT_OVERRIDE),
                "{} survived as {value:?}",
                String::from_utf8_lossy(&name)
            );
        }
    }
    anyhow::ensure!(picks <= 1, "{picks} override headers");
    Ok(())
}

fn hostile_request(source: Source, plugin: &Plugin, case: &Case) -> anyhow::Result<()> {
    let mut builder = plugin.worker(0).request();
    for (name, value) in &case.headers {
        builder = builder.header_bytes(name, value);
    }
    if let Some(address) = &case.source_address {
        builder = builder.property("source.address", Property::bytes(address.clone()));
    }
    if let Some(cluster) = &case.route_cluster {
        builder = builder.property("xds.cluster_name", Property::bytes(cluster.clone()));
    }
    let mut request = builder.send_headers()?;
    no_client_override_survives(source, &request)?;
    let mut response = request.respond(case.status);
    for (path, value) in &case.response_properties {
        response = response.property(path, Property::bytes(value.clone()));
    }
    for (name, value) in &case.response_headers {
        response = response.header_bytes(name, value);
    }
    for (name, value) in case.trailers.iter().flatten() {
        response = response.trailer_bytes(name, value);
    }
    response.finish()?;
    Ok(())
}

fn ordinary_request_is_picked(source: Source, plugin: &Plugin) -> anyhow::Result<()> {
    let builder = plugin.worker(0).request();
    let builder = match source {
        Source::Authority => builder.header(":authority", "checkout"),
        Source::Header => builder.header("x-service", "checkout").cluster("checkout"),
        Source::RouteCluster => builder.cluster("checkout"),
    };
    let mut request = builder.header("x-user", "alice").send_headers()?;
    let name = override_name(source);
    let pick = request
        .request_header_bytes(name)
        .ok_or_else(|| anyhow::anyhow!("no pick"))?;
    let first = String::from_utf8(pick)?
        .split(',')
        .next()
        .unwrap_or_default()
        .to_owned();
    anyhow::ensure!(first.parse::<SocketAddr>().is_ok(), "pick {first:?}");
    request.respond(200).upstream(&first).finish()?;
    Ok(())
}

/// How the control plane answers one poll.
#[derive(Debug, Clone)]
enum Answer {
    /// `replica`: the `x-fulcrum-replica` the answer carries, if any.
    Respond {
        status: Vec<u8>,
        body: Vec<u8>,
        replica: Option<Vec<u8>>,
    },
    Reset,
    Timeout,
    Refused,
}

impl Answer {
    fn into_outcome(self) -> Outcome {
        match self {
            Self::Respond {
                status,
                body,
                replica,
            } => {
                let response = Response::raw_status(status).body(body);
                match replica {
                    Some(replica) => response.header_bytes("x-fulcrum-replica", replica).into(),
                    None => response.into(),
                }
            }
            Self::Reset => Outcome::Reset,
            Self::Timeout => Outcome::Timeout,
            Self::Refused => Outcome::Refused,
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    source_address: Option<Vec<u8>>,
    route_cluster: Option<Vec<u8>>,
    status: u16,
    response_properties: Vec<(&'static str, Vec<u8>)>,
    response_headers: Vec<(Vec<u8>, Vec<u8>)>,
    trailers: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    snapshot: Option<Answer>,
}

/// Response headers or trailers an upstream may send: gRPC's (`content-type`, `grpc-status`)
/// with plausible and arbitrary values, or arbitrary bytes.
fn response_field() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let name = prop_oneof![
        4 => select(vec!["content-type", "grpc-status", "Grpc-Status", "grpc-message"])
            .prop_map(|name| name.as_bytes().to_vec()),
        1 => vec(any::<u8>(), 0..16),
    ];
    let value = prop_oneof![
        3 => select(vec![
            "application/grpc",
            "application/grpc+proto",
            "application/grpcx",
            "0",
            "14",
            "4",
            "999",
            "1234",
            "-1",
            "",
        ])
        .prop_map(|value| value.as_bytes().to_vec()),
        1 => vec(any::<u8>(), 0..64),
    ];
    (name, value)
}

/// A name the filter reads, in random case, or arbitrary bytes.
fn header_name() -> impl Strategy<Value = Vec<u8>> {
    let known = select(vec![
        ":authority",
        OVERRIDE_HEADER,
        "x-pick",
        "cookie",
        "x-user",
        "x-api-key",
        "x-service",
    ]);
    prop_oneof![
        6 => (known, vec(any::<bool>(), 18)).prop_map(|(name, upper)| {
            name.bytes()
                .zip(upper)
                .map(|(byte, upper)| if upper { byte.to_ascii_uppercase() } else { byte })
                .collect()
        }),
        1 => vec(any::<u8>(), 0..24),
    ]
}

/// Values that reach deep into the filter: services, sessions, cookies, keys, addresses. No
/// element of [`ENDPOINTS`] is among them.
fn plausible_value() -> impl Strategy<Value = Vec<u8>> {
    select(vec![
        "checkout",
        "cart:8080",
        "api",
        "geo",
        "[::1]:80",
        "alice",
        "user=alice",
        "a=1; fulcrum-session=0123456789abcdef; user=bob",
        "fulcrum-session=\"zz\"",
        "6.6.6.6:1",
        "10.0.0.9:1,10.0.0.8:2",
        "",
    ])
    .prop_map(|value| value.as_bytes().to_vec())
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => plausible_value(),
        4 => vec(any::<u8>(), 0..48),
        2 => (plausible_value(), vec(any::<u8>(), 1..8), any::<prop::sample::Index>()).prop_map(
            |(mut value, noise, at)| {
                let at = at.index(value.len() + 1);
                value.splice(at..at, noise);
                value
            }
        ),
        1 => (any::<u8>(), 0..=LARGEST_VALUE).prop_map(|(byte, len)| vec![byte; len]),
    ]
}

fn property_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        select(vec![
            "10.1.2.3:5555",
            "[fd00::1]:443",
            "10.1.2.3",
            "checkout",
            "/tmp/envoy.sock"
        ])
        .prop_map(|value| value.as_bytes().to_vec()),
        vec(any::<u8>(), 0..24),
        (any::<u8>(), 0..=LARGEST_VALUE).prop_map(|(byte, len)| vec![byte; len]),
    ]
}

/// A snapshot with arbitrary names, versions and weights over the known endpoints.
fn snapshot_body() -> impl Strategy<Value = Vec<u8>> {
    let service = prop_oneof![select(SERVICES.to_vec()).prop_map(str::to_owned), ".{0,12}"];
    let endpoint = (
        select(ENDPOINTS.to_vec()),
        0..=MAX_WEIGHT,
        any::<bool>(),
        proptest::option::of(".{0,8}"),
    );
    (
        ".{0,16}",
        vec((service, vec(endpoint, 0..5)), 0..4),
    )
        .prop_map(|(version, services)| {
            let services: serde_json_like::Object = services
                .into_iter()
                .map(|(name, endpoints)| {
                    let endpoints: Vec<String> = endpoints
                        .into_iter()
                        .map(|(address, weight, draining, zone)| {
                            let health = if draining { "draining" } else { "healthy" };
                            let zone = zone.map_or_else(
                                String::new,
                                |zone| format!(r#", "zone": {}"#, serde_json_like::string(&zone)),
                            );
                            format!(
                                r#"{{"address": "{address}", "weight": {weight}, "health": "{health}"{zone}}}"#
                            )
                        })
                        .collect();
                    (name, format!(r#"{{"endpoints": [{}]}}"#, endpoints.join(", ")))
                })
                .collect();
            format!(
                r#"{{"version": {}, "services": {}}}"#,
                serde_json_like::string(&version),
                services.render()
            )
            .into_bytes()
        })
}

fn answer() -> impl Strategy<Value = Answer> {
    let status = prop_oneof![
        select(vec!["200", "304", "503", "2000", ""]).prop_map(|s| s.as_bytes().to_vec()),
        vec(any::<u8>(), 0..6),
    ];
    let body = prop_oneof![
        snapshot_body(),
        vec(any::<u8>(), 0..64),
        Just(good_snapshot().into_bytes()),
        Just(b"{\"version\": \"v\", \"services\": {\"checkout\": {\"endpoints\": [".to_vec()),
    ];
    // Replica names: a few plausible ones (so the filter follows, ignores and fails over),
    // and arbitrary bytes, longer than the names it compares.
    let replica = proptest::option::of(prop_oneof![
        3 => select(vec!["control-plane-a", "control-plane-b", ""])
            .prop_map(|name| name.as_bytes().to_vec()),
        1 => vec(any::<u8>(), 0..400),
    ]);
    prop_oneof![
        6 => (status, body, replica.clone())
            .prop_map(|(status, body, replica)| Answer::Respond { status, body, replica }),
        6 => (snapshot_body(), replica).prop_map(|(body, replica)| Answer::Respond {
            status: b"200".to_vec(),
            body,
            replica,
        }),
        1 => Just(Answer::Reset),
        1 => Just(Answer::Timeout),
        1 => Just(Answer::Refused),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let response_property = (
        select(vec!["response.code", "response.flags", "upstream.address"]),
        prop_oneof![
            property_value(),
            any::<u64>().prop_map(|n| n.to_le_bytes().to_vec())
        ],
    );
    (
        vec((header_name(), header_value()), 0..10),
        proptest::option::of(property_value()),
        proptest::option::of(prop_oneof![
            select(SERVICES.to_vec()).prop_map(|s| s.as_bytes().to_vec()),
            property_value()
        ]),
        select(vec![200u16, 404, 503]),
        vec(response_property, 0..3),
        (
            vec(response_field(), 0..4),
            proptest::option::weighted(0.5, vec(response_field(), 0..3)),
        ),
        proptest::option::weighted(0.3, answer()),
    )
        .prop_map(
            |(
                headers,
                source_address,
                route_cluster,
                status,
                response_properties,
                (response_headers, trailers),
                snapshot,
            )| {
                Case {
                    headers,
                    source_address,
                    route_cluster,
                    status,
                    response_properties,
                    response_headers,
                    trailers,
                    snapshot,
                }
            },
        )
}

/// Just enough JSON writing for generated snapshots, kept here so the test needs no JSON
/// dependency: arbitrary strings are escaped as JSON requires.
mod serde_json_like {
    /// `"…"` with `"`, `\` and control characters escaped.
    pub fn string(text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 2);
        out.push('"');
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// An object of already-rendered values; a repeated key keeps its last value.
    pub struct Object(std::collections::BTreeMap<String, String>);

    impl FromIterator<(String, String)> for Object {
        fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
            Self(pairs.into_iter().collect())
        }
    }

    impl Object {
        pub fn render(&self) -> String {
            let fields: Vec<String> = self
                .0
                .iter()
                .map(|(key, value)| format!("{}: {value}", string(key)))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(CASES)
}

#[test]
fn hostile_requests_and_snapshots_never_trap_leak_the_override_header_or_grow_memory() {
    let fixture = Fixture::start().expect("the plugins start");
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
    if let Err(error) = runner.run(&case(), |case| {
        fixture
            .check(&case)
            .map_err(|error| TestCaseError::fail(format!("{error:#}")))
    }) {
        panic!("{error}");
    }
    fixture.check_after_run().expect("the filter still works");
}
