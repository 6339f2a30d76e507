//! Nanoseconds per request through the real filter inside wasmtime, beside the same core
//! (`fulcrum_core::ServicePicker`) called natively, at 10, 1,000 and 10,000 endpoints.
//!
//! One wasm iteration is the whole stream lifecycle Envoy drives: context create,
//! `on_request_headers` (strip, pick, write the override header), `on_response_headers`
//! (outcome to the core), `on_done`, `on_log`, `on_delete`, plus the host's own work
//! (header maps, properties, fuel metering). One native iteration is `pick` + `complete`.
//! The difference is the price of the wasm boundary and the proxy-wasm ABI.
//!
//! With `FULCRUM_FLOOR_WASM` (the do-nothing filter of `tests/floor-filter`, which
//! `cargo xtask bench` builds), `wasmtime_floor` drives the same stream through it: the
//! host's and the boundary's share, which any filter pays in this host; the filter's own
//! work is the difference between the two wasmtime rows.
//!
//! Needs the release filter: `cargo xtask build-wasm` (or `FULCRUM_FILTER_WASM`).

use std::{hint::black_box, net::SocketAddr, time::Duration};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum_core::{
    Endpoint, OVERRIDE_HEADER, ServicePolicy,
    rng::SplitMix64,
    service::{Outcome, RequestAttributes, ServicePicker},
};
use fulcrum_wasm_host::{Plugin, Request};

const SIZES: [usize; 3] = [10, 1_000, 10_000];

fn address(index: usize) -> SocketAddr {
    let (high, low) = ((index / 250) as u8, (index % 250) as u8 + 1);
    SocketAddr::from(([10, 1, high, low], 8080))
}

fn config(size: usize) -> String {
    let endpoints: Vec<String> = (0..size)
        .map(|i| format!(r#"{{"address": "{}"}}"#, address(i)))
        .collect();
    format!(
        r#"{{"endpoints": {{"checkout": [{}]}}}}"#,
        endpoints.join(",")
    )
}

/// One stream through `plugin`, answered 200 after 50 µs by the upstream `upstream` names
/// (from the request as the filter left it); returns that upstream.
fn one_stream(plugin: &Plugin, upstream: impl FnOnce(&Request<'_>) -> String) -> String {
    let mut request = plugin
        .worker(0)
        .request()
        .header(":authority", "checkout")
        .header(":path", "/")
        .send_headers()
        .expect("request headers");
    let upstream = upstream(&request);
    plugin.advance_clock(Duration::from_micros(50));
    request
        .respond(200)
        .upstream(&upstream)
        .finish()
        .expect("response");
    upstream
}

fn wasm(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_through_filter");
    for size in SIZES {
        let plugin = Plugin::load_filter()
            .and_then(|builder| builder.configure(config(size)).start())
            .unwrap_or_else(|error| panic!("starting the filter: {error:#}"));
        group.bench_with_input(BenchmarkId::new("wasmtime", size), &size, |b, _| {
            b.iter(|| {
                black_box(one_stream(&plugin, |request| {
                    request.request_header(OVERRIDE_HEADER).expect("a pick")
                }))
            })
        });
    }
    group.finish();
}

fn floor(c: &mut Criterion) {
    let Some(path) = std::env::var_os("FULCRUM_FLOOR_WASM") else {
        return;
    };
    let mut group = c.benchmark_group("request_through_filter");
    for size in SIZES {
        // The floor reads no configuration: the size names the column, the stream is the same.
        let plugin = Plugin::load(&path)
            .and_then(|builder| builder.configure(config(size)).start())
            .unwrap_or_else(|error| panic!("starting the floor filter: {error:#}"));
        group.bench_with_input(BenchmarkId::new("wasmtime_floor", size), &size, |b, _| {
            b.iter(|| black_box(one_stream(&plugin, |_| address(0).to_string())))
        });
    }
    group.finish();
}

fn native(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_through_filter");
    for size in SIZES {
        let endpoints: Vec<Endpoint> = (0..size).map(|i| Endpoint::new(address(i))).collect();
        let mut picker = ServicePicker::new(&ServicePolicy::default(), &endpoints);
        let mut rng = SplitMix64::new(7);
        let mut now = Duration::from_secs(1);
        group.bench_with_input(BenchmarkId::new("native_core", size), &size, |b, _| {
            b.iter(|| {
                let pick = picker
                    .pick(&RequestAttributes::default(), now, &mut rng)
                    .expect("a pick");
                now += Duration::from_micros(50);
                let outcome = Outcome {
                    status: Some(200),
                    latency: Duration::from_micros(50),
                    ..Outcome::default()
                };
                black_box(picker.complete(
                    pick.endpoint,
                    fulcrum_core::Served::ByPick,
                    outcome,
                    now,
                ));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, wasm, floor, native);
criterion_main!(benches);
