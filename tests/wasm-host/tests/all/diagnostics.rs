//! Endpoint diagnostics on demand (`fulcrum endpoints`): the control plane names a service in
//! a snapshot answer, every serving worker writes what it believes about the service's
//! endpoints into its own bounded slot of shared data, and the VM holding the poll lease
//! posts them in one report. Slots are claimed with compare-and-swap, reused once their owner
//! stops heart-beating, and capped; a blob is cut to its bound.

use std::sync::{Arc, Mutex};

use fulcrum_core::{
    OVERRIDE_HEADER,
    diagnostics::{DiagnosticsReport, MAX_WORKER_BYTES, MAX_WORKERS, WorkerDiagnostics, aggregate},
};
use fulcrum_wasm_host::{HttpCall, Plugin, Response, response_flags};
use serde_json::json;

use crate::test_support::{filter, ms};

const CONTROL_PLANE: &str = "fulcrum_control_plane";
const DEAD: &str = "10.0.0.2:8080";
const SLOTS: &str = "fulcrum//diagnostics/slot/";

/// The control plane as the filter sees it: snapshot polls answered with `snapshot`, plus
/// the diagnose header while one is set; reports answered 200.
#[derive(Clone)]
struct ControlPlane {
    diagnose: Arc<Mutex<Option<String>>>,
}

impl ControlPlane {
    fn serve(plugin: &Plugin, snapshot: serde_json::Value) -> Self {
        let control_plane = Self {
            diagnose: Arc::default(),
        };
        let diagnose = control_plane.diagnose.clone();
        let body = snapshot.to_string();
        plugin.serve_http_calls(move |call: &HttpCall| {
            if call.header(":method") == Some("POST") {
                return Response::status(200);
            }
            let answer = Response::ok(body.clone()).header("etag", "\"v1\"");
            match diagnose.lock().expect("not poisoned").as_deref() {
                Some(value) => answer.header("x-fulcrum-diagnose", value),
                None => answer,
            }
        });
        control_plane
    }

    fn ask(&self, value: &str) {
        *self.diagnose.lock().expect("not poisoned") = Some(value.to_owned());
    }
}

fn checkout(endpoints: usize) -> serde_json::Value {
    let endpoints: Vec<_> = (1..=endpoints)
        .map(|i| json!({"address": format!("10.0.{}.{}:8080", i / 250, i % 250)}))
        .collect();
    json!({"version": "v1", "services": {"checkout": {"endpoints": endpoints}}})
}

/// A filter polling every second on `workers` workers, ejecting after three gateway errors
/// for 10 s.
fn polling(workers: usize) -> anyhow::Result<Plugin> {
    filter()
        .workers(workers)
        .configure(format!(
            r#"{{"control_plane": {{"cluster": "{CONTROL_PLANE}", "poll_interval": "1s"}},
                "only_services": ["*"],
                "policy": {{"default": {{"load_balancer": {{"type": "round_robin"}},
                  "outlier_detection": {{"consecutive_gateway_errors": 3, "consecutive_failures": 0,
                    "base_ejection_time": "10s", "ejection_jitter_percent": 0,
                    "max_ejection_percent": 100, "panic_threshold_percent": 0}}}}}}}}"#
        ))
        .property("xds.node.id", fulcrum_wasm_host::Property::string("web-1"))
        .cluster(CONTROL_PLANE)
        .start()
}

/// One second on, one turn of every worker.
fn turn(plugin: &Plugin) -> anyhow::Result<()> {
    plugin.advance_clock(ms(1_000));
    plugin.tick_all()?;
    Ok(())
}

/// Sends one request on `worker`; `DEAD` refuses connections, the others answer 200.
fn send(plugin: &Plugin, worker: usize) -> anyhow::Result<String> {
    let mut request = plugin
        .worker(worker)
        .request()
        .header(":authority", "checkout")
        .send_headers()?;
    let pick = request
        .request_header(OVERRIDE_HEADER)
        .ok_or_else(|| anyhow::anyhow!("no pick; logs:\n{}", plugin.logs_text()))?
        .split(',')
        .next()
        .unwrap_or_default()
        .to_owned();
    if pick == DEAD {
        request
            .respond(503)
            .upstream(&pick)
            .attempts(1)
            .flags(response_flags::UPSTREAM_CONNECTION_FAILURE)
            .finish()?;
    } else {
        request
            .respond(200)
            .upstream(&pick)
            .latency(ms(2))
            .finish()?;
    }
    Ok(pick)
}

/// The reports posted so far.
fn reports(plugin: &Plugin) -> Vec<HttpCall> {
    plugin
        .http_calls()
        .into_iter()
        .filter(|call| call.header(":method") == Some("POST"))
        .collect()
}

/// Turns until a report is posted (at most ten).
fn next_report(plugin: &Plugin) -> anyhow::Result<HttpCall> {
    let before = reports(plugin).len();
    for _ in 0..10 {
        turn(plugin)?;
        if let Some(report) = reports(plugin).get(before) {
            return Ok(report.clone());
        }
    }
    anyhow::bail!("no report; logs:\n{}", plugin.logs_text())
}

#[test]
fn every_worker_reports_its_view_and_one_vm_posts_them_with_the_ejection_and_its_reason()
-> anyhow::Result<()> {
    let plugin = polling(2)?;
    let control_plane = ControlPlane::serve(&plugin, checkout(3));
    turn(&plugin)?;
    turn(&plugin)?;
    let mut dead_picks = 0;
    for _ in 0..30 {
        if send(&plugin, 0)? == DEAD {
            dead_picks += 1;
        }
        if dead_picks == 3 {
            break;
        }
    }
    assert_eq!(dead_picks, 3, "worker 0 ejects the dead endpoint");
    send(&plugin, 1)?;
    // Serving, each worker claims its slot on its next tick.
    turn(&plugin)?;

    control_plane.ask("7 checkout");
    let report = next_report(&plugin)?;
    assert_eq!(report.cluster, CONTROL_PLANE);
    assert_eq!(report.header(":path"), Some("/v1/diagnostics"));
    assert_eq!(report.header("x-fulcrum-node-id"), Some("web-1"));
    let parsed = DiagnosticsReport::parse(&report.body)?;
    assert_eq!((parsed.service.as_str(), parsed.request), ("checkout", 7));
    let mut slots: Vec<u32> = parsed.workers.iter().map(|w| w.worker).collect();
    slots.sort_unstable();
    assert_eq!(slots, [0, 1], "{parsed:?}");
    let dead = aggregate(&parsed.workers)
        .into_iter()
        .find(|endpoint| endpoint.address.to_string() == DEAD)
        .expect("the dead endpoint is reported");
    assert_eq!(dead.state(), "open", "{dead:?}");
    assert_eq!(dead.reasons, ["consecutive_gateway_errors", "shared"]);
    assert!(
        dead.readmit_in_ms.is_some_and(|ms| ms <= 10_000),
        "{dead:?}"
    );

    // Answered once: later polls carrying the same request send nothing more.
    turn(&plugin)?;
    for _ in 0..4 {
        turn(&plugin)?;
    }
    assert_eq!(reports(&plugin).len(), 1);
    assert_eq!(plugin.metric("fulcrum_diagnostics_reports_sent_total")?, 1);

    // A new request gets a new report.
    control_plane.ask("8 checkout");
    let report = next_report(&plugin)?;
    assert_eq!(DiagnosticsReport::parse(&report.body)?.request, 8);
    Ok(())
}

#[test]
fn a_worker_takes_the_slot_of_a_vm_that_stopped_heart_beating_and_stays_out_when_all_are_live()
-> anyhow::Result<()> {
    let plugin = polling(2)?;
    let _control_plane = ControlPlane::serve(&plugin, checkout(3));
    turn(&plugin)?;
    turn(&plugin)?;
    let now = u64::try_from(
        plugin
            .now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos(),
    )?;
    let owner = |token: u64, heartbeat: u64| {
        let mut value = token.to_le_bytes().to_vec();
        value.extend(heartbeat.to_le_bytes());
        value
    };
    // Every slot held by a live VM but slot 5, whose VM went 11 s ago.
    for slot in 0..MAX_WORKERS {
        let heartbeat = if slot == 5 { now - 11_000_000_000 } else { now };
        plugin.set_shared_data(
            &format!("{SLOTS}{slot}/owner"),
            owner(1_000 + slot as u64, heartbeat),
        );
    }
    send(&plugin, 0)?;
    send(&plugin, 1)?;
    plugin.advance_clock(ms(500));
    plugin.tick_all()?;

    let (value, _) = plugin
        .shared_data(&format!("{SLOTS}5/owner"))
        .expect("slot 5 is written");
    assert_ne!(&value[..8], &1_005u64.to_le_bytes(), "a worker took slot 5");
    assert_eq!(
        u64::from_le_bytes(value[8..].try_into()?),
        u64::try_from(
            plugin
                .now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        )?,
        "and heart-beats it at this tick"
    );
    assert_eq!(
        plugin.metric("fulcrum_diagnostics_no_slot_total")?,
        1,
        "the other worker found every slot live"
    );
    assert_eq!(
        plugin.shared_data_keys(SLOTS).len(),
        MAX_WORKERS,
        "no slot beyond the cap"
    );
    Ok(())
}

#[test]
fn a_worker_blob_over_its_bound_is_cut_and_counts_what_it_left_out() -> anyhow::Result<()> {
    let plugin = polling(1)?;
    let control_plane = ControlPlane::serve(&plugin, checkout(1_000));
    turn(&plugin)?;
    turn(&plugin)?;
    let first = send(&plugin, 0)?;
    control_plane.ask("9 checkout");
    let report = next_report(&plugin)?;
    let (blob, _) = plugin
        .shared_data(&format!("{SLOTS}0/blob"))
        .expect("the worker wrote its blob");
    assert!(blob.len() <= 8 + MAX_WORKER_BYTES, "{}", blob.len());
    let worker: WorkerDiagnostics = serde_json::from_slice(&blob[8..])?;
    assert!(worker.omitted > 0, "1000 endpoints do not fit 64 KiB");
    assert_eq!(worker.endpoints.len() + worker.omitted as usize, 1_000);
    let parsed = DiagnosticsReport::parse(&report.body)?;
    assert_eq!(parsed.workers, [worker]);
    assert!(
        parsed.workers[0]
            .endpoints
            .iter()
            .any(|endpoint| endpoint.address.to_string() == first && endpoint.picks == 1),
        "the one pick is counted"
    );
    Ok(())
}

#[test]
fn a_report_waits_for_a_live_worker_at_most_two_seconds_then_goes_without_it() -> anyhow::Result<()>
{
    let plugin = polling(1)?;
    let control_plane = ControlPlane::serve(&plugin, checkout(3));
    turn(&plugin)?;
    turn(&plugin)?;
    send(&plugin, 0)?;
    turn(&plugin)?;
    // A VM that holds slot 7 and heart-beats, but never answers.
    let heartbeat = |plugin: &Plugin| -> anyhow::Result<()> {
        let now = plugin
            .now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64;
        let mut value = 77u64.to_le_bytes().to_vec();
        value.extend(now.to_le_bytes());
        plugin.set_shared_data(&format!("{SLOTS}7/owner"), value);
        Ok(())
    };
    heartbeat(&plugin)?;
    control_plane.ask("11 checkout");
    let mut turns = 0;
    while reports(&plugin).is_empty() && turns < 10 {
        heartbeat(&plugin)?;
        turn(&plugin)?;
        turns += 1;
    }
    assert!(turns >= 3, "waited for the silent worker: {turns} turns");
    let parsed = DiagnosticsReport::parse(&reports(&plugin)[0].body)?;
    assert_eq!(parsed.workers.len(), 1, "only the worker that answered");
    Ok(())
}

#[test]
fn a_diagnose_header_that_is_not_an_id_and_a_service_is_ignored() -> anyhow::Result<()> {
    let plugin = polling(1)?;
    let control_plane = ControlPlane::serve(&plugin, checkout(3));
    turn(&plugin)?;
    turn(&plugin)?;
    send(&plugin, 0)?;
    for hostile in [
        "checkout",
        "7 two words",
        "-1 checkout",
        "99999999999999999999999 x",
    ] {
        control_plane.ask(hostile);
        for _ in 0..4 {
            turn(&plugin)?;
        }
    }
    assert!(reports(&plugin).is_empty());
    assert_eq!(plugin.shared_data("fulcrum//diagnostics/request"), None);
    Ok(())
}
