//! The real filter polling two control-plane replicas that disagree: it follows one, never
//! alternates between their views, and moves to the other once when the followed one falls
//! silent for `failover_after`.

use fulcrum_core::OVERRIDE_HEADER;
use fulcrum_wasm_host::{Plugin, Response};
use serde_json::json;

use crate::test_support::{filter, ms};

const CONTROL_PLANE: &str = "fulcrum_control_plane";

/// Two workers polling every second; replicas fail over after 10 s of silence.
fn polling_filter() -> anyhow::Result<Plugin> {
    filter()
        .configure(format!(
            r#"{{"control_plane": {{"cluster": "{CONTROL_PLANE}", "poll_interval": "1s", "failover_after": "10s"}}, "only_services": ["*"]}}"#
        ))
        .cluster(CONTROL_PLANE)
        .workers(2)
        .start()
}

/// The replicas' views: each puts `shop` on its own address, so a pick shows whose view a
/// worker applies.
const REPLICA_A: (&str, &str) = ("control-plane-a", "10.0.0.1:80");
const REPLICA_B: (&str, &str) = ("control-plane-b", "10.0.0.2:80");

/// One poll answered by `replica`, then every VM's tick.
fn poll(plugin: &Plugin, (replica, address): (&'static str, &'static str)) -> anyhow::Result<()> {
    let body = json!({"version": format!("view-of-{replica}"),
        "services": {"shop": {"endpoints": [{"address": address}]}}})
    .to_string();
    plugin
        .serve_http_calls(move |_| Response::ok(body.clone()).header("x-fulcrum-replica", replica));
    plugin.advance_clock(ms(1_000));
    for _ in 0..3 {
        plugin.tick_all()?;
    }
    Ok(())
}

/// The address every worker picks for `shop`; panics if workers disagree.
fn picked(plugin: &Plugin) -> anyhow::Result<String> {
    let mut picks = Vec::new();
    for worker in 0..2 {
        let mut request = plugin
            .worker(worker)
            .request()
            .header(":authority", "shop")
            .send_headers()?;
        let pick = request
            .request_header(OVERRIDE_HEADER)
            .unwrap_or_default()
            .to_owned();
        request.respond(200).upstream(&pick).attempts(1).finish()?;
        picks.push(pick);
    }
    assert_eq!(picks[0], picks[1], "the workers apply one view");
    Ok(picks.swap_remove(0))
}

#[test]
fn two_replicas_answering_in_turn_never_make_the_proxy_alternate_views() -> anyhow::Result<()> {
    let plugin = polling_filter()?;
    poll(&plugin, REPLICA_A)?;
    assert_eq!(picked(&plugin)?, REPLICA_A.1);
    for _ in 0..10 {
        poll(&plugin, REPLICA_B)?;
        assert_eq!(picked(&plugin)?, REPLICA_A.1, "B's view is left");
        poll(&plugin, REPLICA_A)?;
        assert_eq!(picked(&plugin)?, REPLICA_A.1);
    }
    assert_eq!(plugin.metric("fulcrum_snapshot_other_replica_total")?, 10);
    assert_eq!(
        plugin.metric("fulcrum_snapshot_replica_failovers_total")?,
        0
    );
    Ok(())
}

#[test]
fn the_proxy_moves_once_when_the_followed_replica_falls_silent_and_not_back() -> anyhow::Result<()>
{
    let plugin = polling_filter()?;
    poll(&plugin, REPLICA_A)?;
    // A is gone: only B answers. Its answers are left for 10 s, then followed.
    let mut moved_after = None;
    for second in 1..=12 {
        poll(&plugin, REPLICA_B)?;
        if picked(&plugin)? == REPLICA_B.1 {
            moved_after = Some(second);
            break;
        }
    }
    assert_eq!(
        moved_after,
        Some(10),
        "moved once A was silent for failover_after"
    );
    assert_eq!(
        plugin.metric("fulcrum_snapshot_replica_failovers_total")?,
        1
    );

    // A is back and both answer in turn: the proxy stays with B.
    for _ in 0..10 {
        poll(&plugin, REPLICA_A)?;
        assert_eq!(picked(&plugin)?, REPLICA_B.1, "no move back");
        poll(&plugin, REPLICA_B)?;
    }
    assert_eq!(
        plugin.metric("fulcrum_snapshot_replica_failovers_total")?,
        1
    );
    Ok(())
}

#[test]
fn answers_naming_no_replica_are_followed_as_before() -> anyhow::Result<()> {
    let plugin = polling_filter()?;
    poll(&plugin, REPLICA_A)?;
    let body = json!({"version": "unnamed",
        "services": {"shop": {"endpoints": [{"address": "10.0.0.3:80"}]}}})
    .to_string();
    plugin.serve_http_calls(move |_| Response::ok(body.clone()));
    plugin.advance_clock(ms(1_000));
    for _ in 0..3 {
        plugin.tick_all()?;
    }
    assert_eq!(picked(&plugin)?, "10.0.0.3:80");
    Ok(())
}
