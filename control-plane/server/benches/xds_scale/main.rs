//! xDS at scale (issue #16): how long a change in an endpoint source takes to reach every
//! connected proxy, and what the control plane spends on it, at 10,000 endpoints in 100
//! clusters with 100 ADS clients.
//!
//! A plain binary, not criterion: it measures latency distributions across a fleet of
//! streams and the CPU and memory of another process, which criterion's per-iteration model
//! does not. For each ADS variant (state of the world, then delta), on a fresh control plane:
//!
//! 1. starts the real `fulcrum-control-plane` binary (release build) with the in-memory
//!    registry as its only source, reads its RSS cold, warms it up (one endpoint registered
//!    and one client of the variant synced, then both gone: what the process allocates or
//!    pages in once, like the code of the registry, pipeline and xDS paths, is then in) and
//!    reads its RSS empty;
//! 2. registers the endpoints over the registry's gRPC API and waits until they are
//!    published (its `fulcrum_cluster_endpoints` gauges add up);
//! 3. connects the clients at once ([`ads_client`]: real tonic ADS clients that subscribe and
//!    ACK as Envoy does) and times until each holds every endpoint (initial sync);
//! 4. makes the changes one after another, each after the previous one reached every client:
//!    odd changes register a new endpoint, even ones deregister it. A change's latency runs
//!    from just before its registry call is sent until a client holds the result, so it
//!    includes the call itself, the pipeline's debounce, the pipeline and the push.
//!
//! The registry pushes (a registration wakes the pipeline at once), so no poll interval
//! hides in the numbers; the debounce (the binary's `--debounce-ms`, 50 ms by default) does,
//! by design, and is reported with them. CPU time and RSS are the control plane's own, from
//! `/proc/<pid>`. Every wait is bounded. Prints a markdown table, also written to the file
//! named by `FULCRUM_BENCH_OUT` when set. Run:
//! `cargo bench -p fulcrum-control-plane --bench xds_scale` (`-- --quick` for a smoke run,
//! `-- --help` for the parameters).

mod ads_client;
mod control_plane;

use std::{
    fmt::Write as _,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
    time::{Instant, timeout},
};

use crate::{
    ads_client::{Event, Expectation, Shared, Variant},
    control_plane::{ControlPlane, Usage},
};

/// How long the whole run may take.
const RUN_LIMIT: Duration = Duration::from_secs(900);
/// How long registering and publishing every endpoint may take.
const PUBLISH_LIMIT: Duration = Duration::from_secs(120);
/// How long every client may take to hold every endpoint.
const SYNC_LIMIT: Duration = Duration::from_secs(120);
/// How long one change may take to reach every client.
const CHANGE_LIMIT: Duration = Duration::from_secs(10);
/// Rest after a change reached every client (their ACKs land) before the next one.
const SETTLE: Duration = Duration::from_millis(100);

/// xDS at scale: change-to-proxy latency, control-plane CPU and RSS per endpoint.
#[derive(Debug, Parser)]
struct Args {
    /// Endpoints registered before the clients connect.
    #[arg(long, default_value_t = 10_000)]
    endpoints: usize,
    /// Clusters (registry services) they spread over, evenly.
    #[arg(long, default_value_t = 100)]
    clusters: usize,
    /// ADS clients per variant.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Changes timed per variant.
    #[arg(long, default_value_t = 20)]
    changes: u32,
    /// The control plane's `--debounce-ms`.
    #[arg(long, default_value_t = 50)]
    debounce_ms: u64,
    /// The ADS variants to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sotw,delta")]
    variants: Vec<Variant>,
    /// Smoke run: 1,000 endpoints in 10 clusters, 10 clients, 10 changes.
    #[arg(long)]
    quick: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Args {
    fn effective(mut self) -> Self {
        if self.quick {
            self.endpoints = 1_000;
            self.clusters = 10;
            self.clients = 10;
            self.changes = 10;
        }
        self
    }
}

/// What one variant's run measured.
struct Run {
    variant: Variant,
    registration: Duration,
    usage_cold: Usage,
    usage_empty: Usage,
    usage_registered: Usage,
    usage_synced: Usage,
    cpu_changes: Duration,
    /// Per client, from the first client connecting.
    sync: Vec<Duration>,
    /// Per change and client.
    change_latencies: Vec<Duration>,
    /// Per change, the slowest client.
    last_client: Vec<Duration>,
    /// Per change, how long the registry call took.
    calls: Vec<Duration>,
    /// Encoded response bytes during the changes, all clients together.
    change_bytes: u64,
    change_responses: u64,
}

fn main() -> Result<()> {
    let args = Args::parse().effective();
    if args.clusters == 0 || args.endpoints < args.clusters || args.clients == 0 {
        bail!("need at least one client and one endpoint per cluster");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let runs = runtime.block_on(async {
        timeout(RUN_LIMIT, async {
            let mut runs = Vec::new();
            for variant in &args.variants {
                runs.push(run(&args, *variant).await?);
            }
            anyhow::Ok(runs)
        })
        .await
        .with_context(|| format!("the run took longer than {RUN_LIMIT:?}"))?
    })?;
    let table = report(&args, &runs);
    print!("{table}");
    if let Ok(path) = std::env::var("FULCRUM_BENCH_OUT") {
        std::fs::write(&path, &table).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

fn service(cluster: usize) -> String {
    format!("svc-{cluster}")
}

/// A distinct loopback address per index (never connected to: endpoints are data here).
fn endpoint_address(index: usize) -> String {
    format!(
        "127.{}.{}.{}",
        1 + (index >> 16),
        (index >> 8) & 0xff,
        index & 0xff
    )
}

async fn run(args: &Args, variant: Variant) -> Result<Run> {
    eprintln!("{}: starting the control plane", variant.label());
    let dir = tempfile::tempdir()?;
    let max_instances = args.endpoints + args.changes as usize + 16;
    let mut control_plane =
        ControlPlane::start(dir.path(), args.debounce_ms, max_instances).await?;
    let usage_cold = control_plane.usage()?;
    warm_up(&mut control_plane, variant).await?;
    let usage_empty = control_plane.usage()?;

    eprintln!(
        "{}: registering {} endpoints",
        variant.label(),
        args.endpoints
    );
    let instances = (0..args.endpoints)
        .map(|index| {
            control_plane::instance(
                &service(index % args.clusters),
                &format!("ep-{index}"),
                endpoint_address(index),
                8080,
            )
        })
        .collect();
    let started = Instant::now();
    control_plane.register_all(instances).await?;
    control_plane
        .wait_for_endpoints(args.endpoints, PUBLISH_LIMIT)
        .await?;
    let registration = started.elapsed();
    let usage_registered = control_plane.usage()?;

    eprintln!("{}: connecting {} clients", variant.label(), args.clients);
    let (expect, expectation) = watch::channel(None);
    let (events_sender, mut events) = mpsc::unbounded_channel();
    let shared = Shared {
        clusters: args.clusters,
        endpoints: args.endpoints,
        expectation,
        events: events_sender,
        bytes: Arc::default(),
        responses: Arc::default(),
    };
    let mut clients = JoinSet::new();
    let started = Instant::now();
    for client in 0..args.clients {
        clients.spawn(ads_client::run(
            variant,
            client,
            control_plane.xds,
            shared.clone(),
        ));
    }
    let mut sync = Vec::with_capacity(args.clients);
    collect(
        &mut events,
        SYNC_LIMIT,
        "initial sync",
        args.clients,
        |event| {
            if let Event::Synced { at } = event {
                sync.push(at - started);
            }
        },
    )
    .await?;
    tokio::time::sleep(SETTLE).await;
    let usage_synced = control_plane.usage()?;

    eprintln!("{}: {} changes", variant.label(), args.changes);
    let mut registry = control_plane.registry_client().await?;
    let (bytes_before, responses_before) = (
        shared.bytes.load(Ordering::Relaxed),
        shared.responses.load(Ordering::Relaxed),
    );
    let mut change_latencies = Vec::new();
    let mut last_client = Vec::new();
    let mut calls = Vec::new();
    for change in 1..=args.changes {
        // Odd changes add an endpoint, the even one after removes it again.
        let added = change.div_ceil(2);
        let cluster = service((added as usize * 7) % args.clusters);
        let id = format!("change-{added}");
        let address = endpoint_address(args.endpoints + added as usize);
        let present = change % 2 == 1;
        expect.send_replace(Some(Arc::new(Expectation {
            change,
            cluster: cluster.clone(),
            address: format!("{address}:9090"),
            present,
        })));
        let sent = Instant::now();
        if present {
            let instance = control_plane::instance(&cluster, &id, address, 9090);
            control_plane::register(&mut registry, instance).await?;
        } else {
            control_plane::deregister(&mut registry, &id).await?;
        }
        calls.push(sent.elapsed());
        let mut slowest = Duration::ZERO;
        let what = format!("change {change}");
        collect(&mut events, CHANGE_LIMIT, &what, args.clients, |event| {
            if let Event::Saw { change: seen, at } = event
                && seen == change
            {
                let latency = at - sent;
                slowest = slowest.max(latency);
                change_latencies.push(latency);
            }
        })
        .await?;
        last_client.push(slowest);
        tokio::time::sleep(SETTLE).await;
    }
    let usage_changed = control_plane.usage()?;
    clients.abort_all();
    control_plane.stop().await?;
    Ok(Run {
        variant,
        registration,
        usage_cold,
        usage_empty,
        usage_registered,
        usage_synced,
        cpu_changes: usage_changed.cpu - usage_synced.cpu,
        sync,
        change_latencies,
        last_client,
        calls,
        change_bytes: shared.bytes.load(Ordering::Relaxed) - bytes_before,
        change_responses: shared.responses.load(Ordering::Relaxed) - responses_before,
    })
}

/// Registers one endpoint, syncs one client of `variant` on it, then disconnects the client
/// and removes the endpoint, so that the memory read next as "empty" holds what the process
/// takes once (code paged in, the runtime's first buffers), not what an endpoint or a client
/// costs.
async fn warm_up(control_plane: &mut ControlPlane, variant: Variant) -> Result<()> {
    eprintln!("{}: warming up", variant.label());
    let mut registry = control_plane.registry_client().await?;
    let id = "warm-up";
    let instance = control_plane::instance(&service(0), id, endpoint_address(0), 8080);
    control_plane::register(&mut registry, instance).await?;
    control_plane.wait_for_endpoints(1, PUBLISH_LIMIT).await?;
    let (_expect, expectation) = watch::channel(None);
    let (events_sender, mut events) = mpsc::unbounded_channel();
    let shared = Shared {
        clusters: 1,
        endpoints: 1,
        expectation,
        events: events_sender,
        bytes: Arc::default(),
        responses: Arc::default(),
    };
    let client = tokio::spawn(ads_client::run(variant, 0, control_plane.xds, shared));
    let synced = collect(&mut events, SYNC_LIMIT, "warm-up sync", 1, |_| {}).await;
    client.abort();
    synced?;
    control_plane::deregister(&mut registry, id).await?;
    control_plane.wait_for_endpoints(0, PUBLISH_LIMIT).await?;
    tokio::time::sleep(SETTLE).await;
    Ok(())
}

/// Feeds the clients' next `count` reports to `on_event` (each client reports a sync or a
/// change once); fails on a client's failure or after `within`, naming `what`.
async fn collect(
    events: &mut mpsc::UnboundedReceiver<Event>,
    within: Duration,
    what: &str,
    count: usize,
    mut on_event: impl FnMut(Event),
) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut received = 0;
    while received < count {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .with_context(|| {
                format!("{what}: only {received} of {count} clients within {within:?}")
            })?
            .context("every client stopped")?;
        if let Event::Failed { client, error } = event {
            bail!("{what}: client {client} failed: {error}");
        }
        received += 1;
        on_event(event);
    }
    Ok(())
}

/// The `q` quantile of `values` (nearest rank), or zero when empty.
fn quantile(values: &[Duration], q: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1e3)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// How one row of the report shows a run.
type Cell<'a> = Box<dyn Fn(&Run) -> String + 'a>;

/// The markdown report: one column per variant.
fn report(args: &Args, runs: &[Run]) -> String {
    let per_endpoint_from = |run: &Run, empty: &Usage| {
        (run.usage_synced.rss_kib.saturating_sub(empty.rss_kib) as f64 * 1024.0)
            / args.endpoints as f64
    };
    let per_endpoint = move |run: &Run| per_endpoint_from(run, &run.usage_empty);
    let per_endpoint_cold = move |run: &Run| per_endpoint_from(run, &run.usage_cold);
    let changes = f64::from(args.changes.max(1));
    let rows: Vec<(String, Cell)> = vec![
        (
            format!(
                "register {} endpoints (gRPC, 64 in flight) until published",
                args.endpoints
            ),
            Box::new(|run| format!("{:.2} s", run.registration.as_secs_f64())),
        ),
        (
            format!(
                "initial sync: {} clients connect at once, until each holds every endpoint: p50 / last client",
                args.clients
            ),
            Box::new(|run| {
                format!(
                    "{} / {}",
                    ms(quantile(&run.sync, 0.5)),
                    ms(quantile(&run.sync, 1.0))
                )
            }),
        ),
        (
            format!(
                "change → a client holds it, p50 / p99 (n = {} changes × {} clients)",
                args.changes, args.clients
            ),
            Box::new(|run| {
                format!(
                    "{} / {}",
                    ms(quantile(&run.change_latencies, 0.5)),
                    ms(quantile(&run.change_latencies, 0.99))
                )
            }),
        ),
        (
            "change → the last client holds it, p50 / p99 / max".to_owned(),
            Box::new(|run| {
                format!(
                    "{} / {} / {}",
                    ms(quantile(&run.last_client, 0.5)),
                    ms(quantile(&run.last_client, 0.99)),
                    ms(quantile(&run.last_client, 1.0))
                )
            }),
        ),
        (
            "the registry call itself, p50".to_owned(),
            Box::new(|run| ms(quantile(&run.calls, 0.5))),
        ),
        (
            "control-plane CPU: registering / initial sync".to_owned(),
            Box::new(|run| {
                format!(
                    "{:.2} s / {:.2} s",
                    (run.usage_registered.cpu - run.usage_empty.cpu).as_secs_f64(),
                    (run.usage_synced.cpu - run.usage_registered.cpu).as_secs_f64()
                )
            }),
        ),
        (
            "control-plane CPU per change".to_owned(),
            Box::new(move |run| ms(run.cpu_changes.div_f64(changes))),
        ),
        (
            "control-plane RSS: cold start / empty (warmed up) / endpoints registered / clients synced (peak)".to_owned(),
            Box::new(|run| {
                format!(
                    "{} / {} / {} / {} ({})",
                    mib(run.usage_cold.rss_kib),
                    mib(run.usage_empty.rss_kib),
                    mib(run.usage_registered.rss_kib),
                    mib(run.usage_synced.rss_kib),
                    mib(run.usage_synced.peak_rss_kib)
                )
            }),
        ),
        (
            "RSS per endpoint: (synced − empty) / endpoints; from a cold start: (synced − cold) / endpoints".to_owned(),
            Box::new(move |run| {
                format!(
                    "{:.0} B; {:.0} B",
                    per_endpoint(run),
                    per_endpoint_cold(run)
                )
            }),
        ),
        (
            "of which: per endpoint, no client (registered − empty) / endpoints; per client (synced − registered) / clients".to_owned(),
            Box::new(move |run| {
                let kib = |from: &Usage, to: &Usage| to.rss_kib.saturating_sub(from.rss_kib) as f64;
                format!(
                    "{:.0} B / {:.1} KiB",
                    kib(&run.usage_empty, &run.usage_registered) * 1024.0 / args.endpoints as f64,
                    kib(&run.usage_registered, &run.usage_synced) / args.clients as f64
                )
            }),
        ),
        (
            "per change and client: responses / encoded bytes".to_owned(),
            Box::new(move |run| {
                let per = changes * args.clients as f64;
                format!(
                    "{:.2} / {:.0} B",
                    run.change_responses as f64 / per,
                    run.change_bytes as f64 / per
                )
            }),
        ),
        (
            "targets: p99 ≤ 100 ms, ≤ 1 KiB RSS per endpoint (warmed up; from a cold start)".to_owned(),
            Box::new(move |run| {
                let latency = quantile(&run.change_latencies, 0.99) <= Duration::from_millis(100);
                let verdict = |met: bool| if met { "met" } else { "missed" };
                format!(
                    "{} / {}; {}",
                    verdict(latency),
                    verdict(per_endpoint(run) <= 1024.0),
                    verdict(per_endpoint_cold(run) <= 1024.0)
                )
            }),
        ),
    ];
    let mut table = format!(
        "{} endpoints in {} clusters, {} ADS clients per variant, {} changes, debounce {} ms\n\n|  |",
        args.endpoints, args.clusters, args.clients, args.changes, args.debounce_ms
    );
    for run in runs {
        let _ = write!(table, " {} |", run.variant.label());
    }
    table.push_str("\n| --- |");
    for _ in runs {
        table.push_str(" --- |");
    }
    table.push('\n');
    for (label, cell) in &rows {
        let _ = write!(table, "| {label} |");
        for run in runs {
            let _ = write!(table, " {} |", cell(run));
        }
        table.push('\n');
    }
    table
}
