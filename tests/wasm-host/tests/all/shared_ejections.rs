//! Ejections are learnt once per proxy: a breaker that opens on one worker opens on the others
//! by their next tick (or their next response that may be a failure) through shared data, and
//! the end of the ejection travels the same way. The consecutive failures that lead to an
//! ejection are counted once per proxy too, and a success on any worker resets them. Bytes in
//! shared data are not trusted.

use fulcrum_core::OVERRIDE_HEADER;
use fulcrum_wasm_host::{Plugin, response_flags};

use crate::test_support::{filter, ms};

const DEAD: &str = "10.0.0.2:8080";
const RECORD_KEY: &str = "fulcrum//ejections/checkout";

fn two_workers() -> Plugin {
    filter()
        .configure(
            r#"{"endpoints": {"checkout": [{"address": "10.0.0.1:8080"}, {"address": "10.0.0.2:8080"},
                                          {"address": "10.0.0.3:8080"}]},
                "policy": {"default": {"load_balancer": {"type": "round_robin"},
                  "outlier_detection": {"consecutive_gateway_errors": 3, "consecutive_failures": 0,
                    "base_ejection_time": "10s", "ejection_jitter_percent": 0,
                    "max_ejection_percent": 100, "panic_threshold_percent": 0}}}}"#,
        )
        .workers(2)
        .start()
        .expect("the filter starts")
}

/// Sends one request on `worker`; the dead endpoint refuses connections (503 `UF`), the
/// others answer 200 or, when `all_healthy`, every endpoint does. Returns the pick.
fn send(plugin: &Plugin, worker: usize, all_healthy: bool) -> anyhow::Result<String> {
    let mut request = plugin
        .worker(worker)
        .request()
        .header(":authority", "checkout")
        .send_headers()?;
    let header = request
        .request_header(OVERRIDE_HEADER)
        .ok_or_else(|| anyhow::anyhow!("no pick; logs:\n{}", plugin.logs_text()))?;
    let pick = header.split(',').next().unwrap_or_default().to_string();
    if pick == DEAD && !all_healthy {
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

/// Sends requests on `worker` until the dead endpoint has been picked `failures` times (at
/// most 100 requests).
fn fail_on_dead(plugin: &Plugin, worker: usize, failures: usize) -> anyhow::Result<()> {
    pick_dead(plugin, worker, failures, false)
}

/// Sends requests on `worker`, every endpoint answering, until the endpoint that was dead has
/// been picked and succeeded once.
fn succeed_on_dead(plugin: &Plugin, worker: usize) -> anyhow::Result<()> {
    pick_dead(plugin, worker, 1, true)
}

/// Sends requests on `worker` until `DEAD` has been picked `times` times (at most 100
/// requests), answering as [`send`] does.
fn pick_dead(
    plugin: &Plugin,
    worker: usize,
    times: usize,
    all_healthy: bool,
) -> anyhow::Result<()> {
    let mut seen = 0;
    for _ in 0..100 {
        if send(plugin, worker, all_healthy)? == DEAD {
            seen += 1;
            if seen == times {
                return Ok(());
            }
        }
    }
    anyhow::bail!("the dead endpoint was picked {seen} times in 100 requests")
}

/// Ejections of the dead endpoint judged by a worker (not adopted), over both workers.
fn judged_ejections(plugin: &Plugin) -> anyhow::Result<u64> {
    plugin.metric(&format!(
        "fulcrum_endpoint_ejections_total.service.checkout.endpoint.{DEAD}"
    ))
}

/// One healthy request on each worker: a VM applies shared ejections once it serves.
fn serve_once_on_each_worker(plugin: &Plugin) -> anyhow::Result<()> {
    send(plugin, 0, true)?;
    send(plugin, 1, true)?;
    Ok(())
}

/// The proxy's picks of the dead endpoint, once every worker's tick has flushed its count.
fn dead_picks(plugin: &Plugin) -> anyhow::Result<u64> {
    plugin.tick_all()?;
    plugin.metric(&format!(
        "fulcrum_endpoint_picks_total.service.checkout.endpoint.{DEAD}"
    ))
}

#[test]
fn an_endpoint_one_worker_ejected_is_avoided_by_the_other_after_one_tick() -> anyhow::Result<()> {
    let plugin = two_workers();
    serve_once_on_each_worker(&plugin)?;
    fail_on_dead(&plugin, 0, 3)?;
    assert_eq!(
        plugin.metric(&format!(
            "fulcrum_endpoint_ejections_total.service.checkout.endpoint.{DEAD}"
        ))?,
        1
    );
    assert!(
        plugin.shared_data(RECORD_KEY).is_some(),
        "the ejection is shared"
    );
    plugin.tick_all()?;
    let picks = (0..30)
        .map(|_| send(&plugin, 1, false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert!(!picks.iter().any(|pick| pick == DEAD), "{picks:?}");
    assert_eq!(
        dead_picks(&plugin)?,
        3,
        "the proxy paid for the dead endpoint once"
    );
    assert_eq!(
        plugin.metric("fulcrum_ejections_adopted_total.service.checkout")?,
        1
    );
    assert_eq!(
        plugin.metric(&format!(
            "fulcrum_endpoint_circuit_open.service.checkout.endpoint.{DEAD}"
        ))?,
        2,
        "both workers hold the circuit open"
    );
    Ok(())
}

#[test]
fn a_failure_on_an_endpoint_ejected_elsewhere_adopts_the_ejection_before_the_tick()
-> anyhow::Result<()> {
    let plugin = two_workers();
    serve_once_on_each_worker(&plugin)?;
    fail_on_dead(&plugin, 0, 3)?;
    // No tick: worker 1 learns of the ejection from its first failure on the endpoint, which
    // then does not count towards an ejection of its own.
    fail_on_dead(&plugin, 1, 1)?;
    let picks = (0..30)
        .map(|_| send(&plugin, 1, false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert!(!picks.iter().any(|pick| pick == DEAD), "{picks:?}");
    assert_eq!(dead_picks(&plugin)?, 4);
    assert_eq!(
        plugin.metric(&format!(
            "fulcrum_endpoint_ejections_total.service.checkout.endpoint.{DEAD}"
        ))?,
        1,
        "worker 1 never judged the endpoint itself"
    );
    Ok(())
}

#[test]
fn the_end_of_an_ejection_reaches_every_worker_after_one_tick() -> anyhow::Result<()> {
    let plugin = two_workers();
    fail_on_dead(&plugin, 0, 3)?;
    // Worker 1's first request catches up with the ejection before its pick.
    assert_ne!(send(&plugin, 1, false)?, DEAD);
    plugin.advance_clock(ms(10_001));
    // Worker 0 probes the endpoint, now healthy, and closes it.
    for _ in 0..3 {
        send(&plugin, 0, true)?;
    }
    plugin.tick_all()?;
    assert_eq!(
        plugin.metric("fulcrum_ejections_ended_elsewhere_total.service.checkout")?,
        1
    );
    assert_eq!(
        plugin.metric(&format!(
            "fulcrum_endpoint_circuit_open.service.checkout.endpoint.{DEAD}"
        ))?,
        0,
        "closed on both workers"
    );
    let picks = (0..3)
        .map(|_| send(&plugin, 1, true))
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert!(picks.iter().any(|pick| pick == DEAD), "{picks:?}");
    Ok(())
}

#[test]
fn garbage_in_the_shared_record_is_counted_and_replaced_by_the_next_ejection() -> anyhow::Result<()>
{
    let plugin = two_workers();
    serve_once_on_each_worker(&plugin)?;
    plugin.set_shared_data(RECORD_KEY, vec![1, 0xff, 0x03, 6, 0, 0]);
    plugin.tick_all()?;
    assert_eq!(plugin.metric("fulcrum_shared_ejections_invalid_total")?, 2);
    plugin.tick_all()?;
    assert_eq!(
        plugin.metric("fulcrum_shared_ejections_invalid_total")?,
        2,
        "an unchanged record is not read twice"
    );
    fail_on_dead(&plugin, 0, 3)?;
    plugin.tick_all()?;
    assert_eq!(
        plugin.metric("fulcrum_ejections_adopted_total.service.checkout")?,
        1
    );
    Ok(())
}

#[test]
fn a_record_judged_under_other_rules_is_not_applied() -> anyhow::Result<()> {
    let plugin = two_workers();
    serve_once_on_each_worker(&plugin)?;
    fail_on_dead(&plugin, 0, 3)?;
    let (mut bytes, _) = plugin
        .shared_data(RECORD_KEY)
        .expect("the ejection is shared");
    // Bytes 1..9 are the rules fingerprint: as if written under another policy.
    bytes[1] ^= 0xff;
    plugin.set_shared_data(RECORD_KEY, bytes);
    plugin.tick_all()?;
    assert_eq!(
        plugin.metric("fulcrum_ejections_adopted_total.service.checkout")?,
        0
    );
    assert_eq!(plugin.metric("fulcrum_shared_ejections_invalid_total")?, 0);
    Ok(())
}

#[test]
fn a_worker_catches_up_with_shared_ejections_on_its_first_request() -> anyhow::Result<()> {
    let plugin = two_workers();
    fail_on_dead(&plugin, 0, 3)?;
    plugin.tick_all()?;
    assert_eq!(
        plugin.metric("fulcrum_ejections_adopted_total.service.checkout")?,
        0,
        "a VM that never served (Envoy's main thread) applies nothing on its ticks"
    );
    let picks = (0..30)
        .map(|_| send(&plugin, 1, false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert!(!picks.iter().any(|pick| pick == DEAD), "{picks:?}");
    assert_eq!(
        plugin.metric("fulcrum_ejections_adopted_total.service.checkout")?,
        1
    );
    Ok(())
}

/// Sends one request on worker 0 (see [`send`]); returns the pick and the shared-data reads
/// and writes it cost.
fn send_costing(plugin: &Plugin, all_healthy: bool) -> anyhow::Result<(String, (u64, u64))> {
    let before = plugin.shared_data_calls();
    let pick = send(plugin, 0, all_healthy)?;
    let after = plugin.shared_data_calls();
    Ok((
        pick,
        (after.reads - before.reads, after.writes - before.writes),
    ))
}

/// The host calls sharing ejections and failure counts costs, exactly: none for a request
/// while the worker knows of no failure count; a read and a write for a failure (the read
/// before it is recorded is the first round of its count's compare-and-swap); a read before
/// each pick while the worker knows of a failure count (an ejection elsewhere is then seen
/// before the pick); a read and a write more for the success that resets the count, and for
/// a breaker transition.
#[test]
fn sharing_costs_no_host_call_per_success_and_a_read_and_a_write_per_failure() -> anyhow::Result<()>
{
    let plugin = two_workers();
    serve_once_on_each_worker(&plugin)?;
    for _ in 0..30 {
        assert_eq!(send_costing(&plugin, true)?.1, (0, 0), "successes");
    }
    let mut costs = Vec::new();
    // Until the first failure, then until the success on the same endpoint that resets it.
    for phase in [false, true] {
        loop {
            let (pick, cost) = send_costing(&plugin, phase)?;
            costs.push((pick == DEAD, cost));
            if pick == DEAD {
                break;
            }
        }
    }
    let expected: Vec<(bool, (u64, u64))> = costs
        .iter()
        .enumerate()
        .map(|(i, (dead, _))| {
            let first_failure = costs.iter().position(|(dead, _)| *dead).unwrap_or(0);
            let cost = match (i.cmp(&first_failure), dead) {
                (std::cmp::Ordering::Less, _) => (0, 0),
                (std::cmp::Ordering::Equal, _) => (1, 1),
                (std::cmp::Ordering::Greater, false) => (1, 0),
                (std::cmp::Ordering::Greater, true) => (2, 1),
            };
            (*dead, cost)
        })
        .collect();
    assert_eq!(costs, expected);
    for _ in 0..30 {
        assert_eq!(
            send_costing(&plugin, true)?.1,
            (0, 0),
            "successes once the count is reset"
        );
    }
    let mut failures = 0;
    let mut last = (0, 0);
    while failures < 3 {
        let (pick, cost) = send_costing(&plugin, false)?;
        if pick == DEAD {
            failures += 1;
            last = cost;
        }
    }
    assert_eq!(
        last,
        (3, 2),
        "the third failure: the read before its pick, its count, and its ejection"
    );
    Ok(())
}

#[test]
fn failures_observed_by_two_workers_add_up_to_one_ejection_at_the_threshold() -> anyhow::Result<()>
{
    let plugin = two_workers();
    serve_once_on_each_worker(&plugin)?;
    fail_on_dead(&plugin, 0, 2)?;
    assert_eq!(judged_ejections(&plugin)?, 0, "two failures, below three");
    fail_on_dead(&plugin, 1, 1)?;
    assert_eq!(
        judged_ejections(&plugin)?,
        1,
        "the proxy's third failure ejects, on the worker that saw only one"
    );
    plugin.tick_all()?;
    let picks = (0..30)
        .map(|_| send(&plugin, 0, false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert!(!picks.iter().any(|pick| pick == DEAD), "{picks:?}");
    assert_eq!(dead_picks(&plugin)?, 3, "the proxy paid one threshold");
    assert_eq!(
        plugin.metric(&format!(
            "fulcrum_endpoint_circuit_open.service.checkout.endpoint.{DEAD}"
        ))?,
        2,
        "both workers hold the circuit open"
    );
    assert_eq!(
        plugin.metric("fulcrum_shared_ejections_write_failures_total")?,
        0
    );
    Ok(())
}

#[test]
fn a_success_on_either_worker_resets_the_proxys_failure_count() -> anyhow::Result<()> {
    let plugin = two_workers();
    serve_once_on_each_worker(&plugin)?;
    // A success on the worker that counted the failures.
    fail_on_dead(&plugin, 0, 2)?;
    succeed_on_dead(&plugin, 0)?;
    fail_on_dead(&plugin, 1, 2)?;
    assert_eq!(
        judged_ejections(&plugin)?,
        0,
        "two failures since the success"
    );
    // A success on the other worker, once its tick has shown it the count.
    plugin.tick_all()?;
    succeed_on_dead(&plugin, 0)?;
    fail_on_dead(&plugin, 1, 2)?;
    assert_eq!(judged_ejections(&plugin)?, 0, "reset by worker 0");
    fail_on_dead(&plugin, 0, 1)?;
    assert_eq!(
        judged_ejections(&plugin)?,
        1,
        "three failures in a row, over both workers"
    );
    Ok(())
}
