//! What one snapshot change costs a proxy, through the real filter inside wasmtime: the bytes
//! the control plane sends, the time the polling VM takes to handle the answer (parse,
//! publish to shared data, apply its own copy), the time every other VM takes to apply it,
//! and the VMs' linear memory: at rest, and once a VM has sent a request to every endpoint
//! (what each endpoint it talks to adds).
//!
//! Two meshes, 1,000 services × 10 endpoints and 100 services × 100 endpoints (10,000
//! endpoints each); the change moves one endpoint of one service. The control plane is
//! played by [`ControlPlane`], which answers as `GET /v1/snapshot` does (`fulcrum_core::
//! distribution`): a delta to a filter that accepts one and names the previous version, the
//! whole snapshot otherwise. With `FULCRUM_FILTER_WASM_BEFORE` naming an older filter (e.g.
//! built from 94b494b, before per-service distribution), the same changes run through it
//! too, for a before/after table.
//!
//! Criterion measures both callbacks per shape and filter. Besides, the bench takes the
//! median of [`TABLE_CHANGES`] changes per row and prints a markdown table, also written to
//! the file `FULCRUM_BENCH_OUT` names (for `BENCHMARKS.md`).
//!
//! Needs the release filter: `cargo build --release -p fulcrum-balancer --target
//! wasm32-wasip1` (or `FULCRUM_FILTER_WASM`).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, criterion_group};
use fulcrum_core::{
    Endpoint, OVERRIDE_HEADER, ServiceEndpoints, Snapshot,
    distribution::{DELTA_MEDIA_TYPE, delta},
};
use fulcrum_wasm_host::{HttpCall, Plugin, Response, filter_wasm_path};

const CONTROL_PLANE: &str = "fulcrum_control_plane";
/// Changes whose median goes into the table.
const TABLE_CHANGES: usize = 15;
/// The VMs of the proxy: worker 0 polls, worker 1 applies what it publishes.
const WORKERS: usize = 2;
/// The most requests per endpoint [`Proxy::send_to_every_endpoint`] sends to a service.
const MAX_REQUESTS_PER_ENDPOINT: usize = 20;

/// A mesh shape: services × endpoints each.
#[derive(Debug, Clone, Copy)]
struct Shape {
    services: usize,
    endpoints: usize,
}

impl Shape {
    fn label(self) -> String {
        format!("{} svc × {} ep", self.services, self.endpoints)
    }
}

const SHAPES: [Shape; 2] = [
    Shape {
        services: 1_000,
        endpoints: 10,
    },
    Shape {
        services: 100,
        endpoints: 100,
    },
];

fn address(service: usize, endpoint: usize, port: u16) -> SocketAddr {
    let [_, _, high, low] = (service as u32).to_be_bytes();
    SocketAddr::from(([10, high, low, endpoint as u8 + 1], port))
}

/// The mesh at one of two versions that differ by one endpoint of one service: service 42's
/// first endpoint listens on port 8080 in one and 8081 in the other.
fn mesh(shape: Shape, odd: bool) -> Snapshot {
    let services = (0..shape.services)
        .map(|service| {
            let endpoints = (0..shape.endpoints)
                .map(|endpoint| {
                    let moved = service == 42 && endpoint == 0 && odd;
                    Endpoint::new(address(service, endpoint, if moved { 8081 } else { 8080 }))
                })
                .collect();
            (
                format!("svc-{service:04}"),
                std::sync::Arc::new(ServiceEndpoints {
                    endpoints,
                    protocol: None,
                }),
            )
        })
        .collect();
    Snapshot {
        version: if odd { "odd" } else { "even" }.to_owned(),
        services,
        policy: None,
    }
}

/// The control plane's side: the two versions changes alternate between (a version is a
/// hash of content, so content that comes back has its version back), answered as
/// `GET /v1/snapshot` answers them, and the size of the last answer.
struct ControlPlane {
    versions: [String; 2],
    /// Each version's whole snapshot, as served.
    whole: [Vec<u8>; 2],
    /// The delta to each version from the other one, as served.
    delta: [Vec<u8>; 2],
    current: usize,
    last_answer_bytes: usize,
}

impl ControlPlane {
    fn new(shape: Shape) -> Self {
        let meshes = [mesh(shape, false), mesh(shape, true)];
        Self {
            versions: [meshes[0].version.clone(), meshes[1].version.clone()],
            whole: [
                serde_json::to_vec(&meshes[0]).expect("an answer serializes"),
                serde_json::to_vec(&meshes[1]).expect("an answer serializes"),
            ],
            delta: [
                serde_json::to_vec(&delta(&meshes[1], &meshes[0])).expect("an answer serializes"),
                serde_json::to_vec(&delta(&meshes[0], &meshes[1])).expect("an answer serializes"),
            ],
            current: 0,
            last_answer_bytes: 0,
        }
    }

    /// The next version: one endpoint of one service moved.
    fn change(&mut self) {
        self.current ^= 1;
    }

    fn answer(&mut self, call: &HttpCall) -> Response {
        let takes_delta = call
            .header("accept")
            .is_some_and(|accept| accept.contains(DELTA_MEDIA_TYPE));
        let named = call
            .header("if-none-match")
            .map(|tag| tag.trim_matches('"').to_owned());
        let previous = &self.versions[self.current ^ 1];
        let body = match named {
            Some(version) if version == self.versions[self.current] => {
                self.last_answer_bytes = 0;
                return Response::status(304);
            }
            Some(version) if takes_delta && version == *previous => &self.delta[self.current],
            _ => &self.whole[self.current],
        };
        self.last_answer_bytes = body.len();
        Response::ok(body.clone())
    }

    fn whole_bytes(&self) -> usize {
        self.whole[0].len()
    }
}

/// A proxy of [`WORKERS`] VMs running one filter build, polling `control_plane`.
struct Proxy {
    plugin: Plugin,
    control_plane: Arc<Mutex<ControlPlane>>,
    /// A VM's linear memory before the first snapshot.
    empty_memory: usize,
}

/// What one change cost.
#[derive(Debug, Clone, Copy)]
struct ChangeCost {
    bytes: usize,
    poller: Duration,
    other_vm: Duration,
}

impl Proxy {
    fn start(wasm: &PathBuf, shape: Shape) -> Self {
        let control_plane = Arc::new(Mutex::new(ControlPlane::new(shape)));
        let answering = Arc::clone(&control_plane);
        let plugin = Plugin::load(wasm)
            .unwrap_or_else(|error| panic!("loading {}: {error:#}", wasm.display()))
            .workers(WORKERS)
            .fuel_per_callback(u64::MAX)
            .configure(format!(
                r#"{{"control_plane": {{"cluster": "{CONTROL_PLANE}", "poll_interval": "1s"}}, "only_services": ["*"]}}"#
            ))
            .cluster(CONTROL_PLANE)
            .start()
            .unwrap_or_else(|error| panic!("starting the filter: {error:#}"));
        plugin.serve_http_calls(move |call| answering.lock().expect("control plane").answer(call));
        let empty_memory = plugin.worker(1).memory_bytes();
        let proxy = Self {
            plugin,
            control_plane,
            empty_memory,
        };
        proxy.poll();
        proxy.plugin.deliver_pending().expect("the first snapshot");
        proxy
            .plugin
            .worker(1)
            .tick()
            .expect("the other VM applies it");
        proxy
    }

    /// Lets worker 0 take the lease and poll.
    fn poll(&self) {
        self.plugin.advance_clock(Duration::from_secs(1));
        self.plugin.worker(0).tick().expect("tick");
        assert_eq!(
            self.plugin.worker(0).pending_http_calls(),
            1,
            "worker 0 polls"
        );
    }

    /// One change, end to end: the control plane moves one endpoint, worker 0 polls and
    /// handles the answer, worker 1 applies what it published.
    fn change(&self) -> ChangeCost {
        self.control_plane.lock().expect("control plane").change();
        self.poll();
        let started = Instant::now();
        self.plugin.deliver_pending().expect("the answer");
        let poller = started.elapsed();
        let started = Instant::now();
        self.plugin.worker(1).tick().expect("the other VM's tick");
        let other_vm = started.elapsed();
        ChangeCost {
            bytes: self
                .control_plane
                .lock()
                .expect("control plane")
                .last_answer_bytes,
            poller,
            other_vm,
        }
    }

    /// Sends requests through the other VM, each answered 200 by its pick, until every
    /// endpoint of every service has been picked or [`MAX_REQUESTS_PER_ENDPOINT`] requests per
    /// endpoint went; returns the share of endpoints picked. An endpoint's first answer makes
    /// its breaker's sliding window, so this is what a proxy that talks to every endpoint of
    /// the mesh holds.
    fn send_to_every_endpoint(&self, shape: Shape) -> f64 {
        let mut picked = 0;
        for service in 0..shape.services {
            let authority = format!("svc-{service:04}");
            let mut seen = std::collections::HashSet::new();
            for _ in 0..shape.endpoints * MAX_REQUESTS_PER_ENDPOINT {
                let mut request = self
                    .plugin
                    .worker(1)
                    .request()
                    .header(":authority", &authority)
                    .send_headers()
                    .expect("request headers");
                let pick = request
                    .request_header(OVERRIDE_HEADER)
                    .and_then(|header| header.split(',').next().map(str::to_owned))
                    .expect("a pick");
                request
                    .respond(200)
                    .upstream(&pick)
                    .latency(Duration::from_millis(1))
                    .finish()
                    .expect("the response");
                seen.insert(pick);
                if seen.len() == shape.endpoints {
                    break;
                }
            }
            picked += seen.len();
        }
        picked as f64 / (shape.services * shape.endpoints) as f64
    }

    /// The linear memory of the polling VM and of the other one: its high-water mark, as wasm
    /// memory never shrinks.
    fn memory_bytes(&self) -> (usize, usize) {
        (
            self.plugin.worker(0).memory_bytes(),
            self.plugin.worker(1).memory_bytes(),
        )
    }
}

/// The filter builds to compare: this one, and the one `FULCRUM_FILTER_WASM_BEFORE` names.
fn builds() -> Vec<(&'static str, PathBuf)> {
    let mut builds = Vec::new();
    if let Some(before) = std::env::var_os("FULCRUM_FILTER_WASM_BEFORE") {
        builds.push(("before", PathBuf::from(before)));
    }
    builds.push(("after", filter_wasm_path()));
    builds
}

fn change(c: &mut Criterion) {
    for shape in SHAPES {
        let mut group = c.benchmark_group(format!("snapshot_change/{}", shape.label()));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        for (build, wasm) in builds() {
            let proxy = Proxy::start(&wasm, shape);
            group.bench_function(BenchmarkId::new("poller_and_other_vm", build), |b| {
                b.iter_custom(|changes| {
                    (0..changes)
                        .map(|_| {
                            let cost = proxy.change();
                            cost.poller + cost.other_vm
                        })
                        .sum()
                })
            });
        }
        group.finish();
    }
}

/// One row's measurements for one build.
struct Measured {
    bytes: usize,
    whole_bytes: usize,
    poller: Duration,
    other_vm: Duration,
    /// The polling VM's and the other VM's linear memory.
    memory: (usize, usize),
    /// A VM's linear memory before the first snapshot.
    empty_memory: usize,
    /// The other VM's linear memory once it sent requests to every endpoint, and the share
    /// of endpoints it reached.
    memory_with_traffic: (usize, f64),
}

fn measure(wasm: &PathBuf, shape: Shape) -> Measured {
    let proxy = Proxy::start(wasm, shape);
    let mut costs: Vec<ChangeCost> = (0..TABLE_CHANGES).map(|_| proxy.change()).collect();
    let median = |costs: &mut Vec<ChangeCost>, key: fn(&ChangeCost) -> Duration| {
        costs.sort_by_key(key);
        key(&costs[costs.len() / 2])
    };
    let memory = proxy.memory_bytes();
    let reached = proxy.send_to_every_endpoint(shape);
    Measured {
        memory_with_traffic: (proxy.memory_bytes().1, reached),
        bytes: costs.iter().map(|cost| cost.bytes).max().unwrap_or(0),
        whole_bytes: proxy
            .control_plane
            .lock()
            .expect("control plane")
            .whole_bytes(),
        poller: median(&mut costs, |cost| cost.poller),
        other_vm: median(&mut costs, |cost| cost.other_vm),
        memory,
        empty_memory: proxy.empty_memory,
    }
}

fn kib(bytes: usize) -> String {
    if bytes >= 10 << 10 {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}

/// `before → after`, or `after` alone.
fn pair(before: Option<&Measured>, after: &Measured, show: fn(&Measured) -> String) -> String {
    match before {
        Some(before) => format!("{} → {}", show(before), show(after)),
        None => show(after),
    }
}

fn table() -> String {
    let builds = builds();
    let mut out = String::from(
        "| shape | change | bytes per change | poller: fetch + publish + apply | other VM: apply | memory, polling VM | memory, other VM | memory, other VM after a request to every endpoint |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut empty = 0;
    for shape in SHAPES {
        let mut measured: Vec<(&str, Measured)> = builds
            .iter()
            .map(|(build, wasm)| (*build, measure(wasm, shape)))
            .collect();
        let after = measured.pop().map(|(_, after)| after).expect("this build");
        let before = measured.pop().map(|(_, before)| before);
        let _ = writeln!(
            out,
            "| {} ({} endpoints, {} whole) | 1 endpoint of 1 service | {} | {} | {} | {} | {} | {} |",
            shape.label(),
            shape.services * shape.endpoints,
            kib(after.whole_bytes),
            pair(before.as_ref(), &after, |m| kib(m.bytes)),
            pair(before.as_ref(), &after, |m| ms(m.poller)),
            pair(before.as_ref(), &after, |m| ms(m.other_vm)),
            pair(before.as_ref(), &after, |m| mib(m.memory.0)),
            pair(before.as_ref(), &after, |m| mib(m.memory.1)),
            pair(before.as_ref(), &after, |m| format!(
                "{} ({:.1} % of endpoints picked)",
                mib(m.memory_with_traffic.0),
                m.memory_with_traffic.1 * 100.0
            )),
        );
        empty = empty.max(after.empty_memory);
    }
    let _ = writeln!(
        out,
        "\nTimes: median of {TABLE_CHANGES} changes per cell, {WORKERS} VMs in wasmtime (fuel metering on). Memory: the VM's linear memory after the changes, a high-water mark (wasm memory never shrinks; a VM with no snapshot yet has {}). {} `before → after`.",
        mib(empty),
        if builds.len() == 2 {
            "cells read"
        } else {
            "no FULCRUM_FILTER_WASM_BEFORE given: this build alone,"
        }
    );
    out
}

criterion_group!(benches, change);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let table = table();
    print!("{table}");
    if let Some(path) = std::env::var_os("FULCRUM_BENCH_OUT") {
        std::fs::write(&path, &table)
            .unwrap_or_else(|error| panic!("writing {}: {error}", path.to_string_lossy()));
    }
}
