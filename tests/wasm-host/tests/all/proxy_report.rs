//! What each snapshot poll tells the control plane about its proxy: the Envoy node's id and
//! cluster (read once, as untrusted bytes) and the last snapshot a VM of the proxy refused.

use fulcrum_wasm_host::{HttpCall, Plugin, PluginBuilder, Property, Response};
use serde_json::json;

use crate::test_support::{filter, ms};

const CONTROL_PLANE: &str = "fulcrum_control_plane";

/// A filter polling every second on two workers, taking snapshots of at most 2 KiB, with
/// `extra` configuration fields.
fn polling(builder: PluginBuilder, extra: &str) -> anyhow::Result<Plugin> {
    builder
        .workers(2)
        .configure(format!(
            r#"{{"control_plane": {{"cluster": "{CONTROL_PLANE}", "poll_interval": "1s", "max_snapshot_bytes": 2048}}, "only_services": ["*"]{extra}}}"#
        ))
        .cluster(CONTROL_PLANE)
        .start()
}

/// Answers the next poll with `answer`, lets every VM apply it, and returns the poll after.
fn next_poll_after(plugin: &Plugin, answer: Response) -> anyhow::Result<HttpCall> {
    plugin.serve_http_calls(move |_| answer.clone());
    for _ in 0..2 {
        plugin.advance_clock(ms(1_000));
        for _ in 0..3 {
            plugin.tick_all()?;
        }
    }
    plugin
        .http_calls()
        .last()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no poll; logs:\n{}", plugin.logs_text()))
}

fn snapshot(version: &str, services: serde_json::Value) -> Response {
    Response::ok(json!({"version": version, "services": services}).to_string())
        .header("etag", &format!("\"{version}\""))
}

#[test]
fn a_poll_names_the_envoy_node_and_no_rejection_while_there_was_none() -> anyhow::Result<()> {
    let plugin = polling(
        filter()
            .property(
                "xds.node.id",
                Property::string("sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local"),
            )
            .property("xds.node.cluster", Property::string("web.shop")),
        "",
    )?;
    let poll = next_poll_after(
        &plugin,
        snapshot(
            "v1",
            json!({"shop": {"endpoints": [{"address": "10.0.0.1:80"}]}}),
        ),
    )?;
    assert_eq!(
        poll.header("x-fulcrum-node-id"),
        Some("sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local")
    );
    assert_eq!(poll.header("x-fulcrum-node-cluster"), Some("web.shop"));
    assert_eq!(poll.header("if-none-match"), Some("\"v1\""));
    assert_eq!(poll.header("x-fulcrum-rejected"), None);
    Ok(())
}

#[test]
fn the_node_is_read_where_older_envoys_serve_it_too() -> anyhow::Result<()> {
    let plugin = polling(
        filter()
            .property("node.id", Property::string("web-1"))
            .property("node.cluster", Property::string("web")),
        "",
    )?;
    let poll = next_poll_after(&plugin, Response::status(304))?;
    assert_eq!(poll.header("x-fulcrum-node-id"), Some("web-1"));
    assert_eq!(poll.header("x-fulcrum-node-cluster"), Some("web"));
    Ok(())
}

#[test]
fn a_hostile_node_id_is_left_out_and_counted_and_a_long_one_is_cut_to_256_bytes()
-> anyhow::Result<()> {
    let plugin = polling(
        filter()
            .property(
                "xds.node.id",
                Property::bytes(b"web-1\r\nx-injected: 1".to_vec()),
            )
            .property("xds.node.cluster", Property::bytes(vec![b'c'; 1000])),
        "",
    )?;
    let poll = next_poll_after(&plugin, Response::status(304))?;
    assert_eq!(poll.header_bytes("x-fulcrum-node-id"), None);
    assert_eq!(poll.header_bytes("x-injected"), None);
    assert_eq!(
        poll.header("x-fulcrum-node-cluster"),
        Some("c".repeat(256).as_str())
    );
    // Each VM reads the node once, at configuration.
    assert_eq!(
        plugin.metric("fulcrum_request_input_invalid_total.input.node_id")?,
        plugin.worker_count() as u64
    );
    assert_eq!(
        plugin.metric("fulcrum_request_input_invalid_total.input.node_cluster")?,
        0
    );

    let without = polling(filter(), "")?;
    let poll = next_poll_after(&without, Response::status(304))?;
    assert_eq!(
        poll.header_bytes("x-fulcrum-node-id"),
        None,
        "a node without an id"
    );
    assert_eq!(poll.header_bytes("x-fulcrum-node-cluster"), None);
    Ok(())
}

#[test]
fn a_service_left_out_is_reported_with_the_version_by_the_next_poll() -> anyhow::Result<()> {
    let plugin = polling(filter(), "")?;
    let poll = next_poll_after(
        &plugin,
        snapshot(
            "v1",
            json!({"shop": {"endpoints": [{"address": "10.0.0.1:80"}]},
                   "broken": {"endpoints": [{"address": "10.0.0.9:80", "weight": 0}]}}),
        ),
    )?;
    assert_eq!(
        poll.header("x-fulcrum-rejected"),
        Some("service_invalid v1")
    );
    Ok(())
}

#[test]
fn an_oversized_answer_is_reported_with_the_version_its_etag_names() -> anyhow::Result<()> {
    let plugin = polling(filter(), "")?;
    let endpoints: Vec<_> = (1..=100)
        .map(|i| json!({"address": format!("10.0.0.{i}:80")}))
        .collect();
    let poll = next_poll_after(
        &plugin,
        snapshot("v9", json!({"shop": {"endpoints": endpoints}})),
    )?;
    assert_eq!(poll.header("x-fulcrum-rejected"), Some("too_large v9"));
    assert_eq!(
        plugin.metric("fulcrum_snapshot_rejected_total")?,
        2,
        "both polls refused it"
    );
    Ok(())
}

#[test]
fn a_version_over_the_table_budget_refused_by_every_vm_is_reported_by_whichever_polls()
-> anyhow::Result<()> {
    // One 5000011-entry Maglev table takes 19 MiB, over a 1 MiB budget.
    let plugin = polling(filter(), r#", "max_table_bytes": 1048576"#)?;
    let poll = next_poll_after(
        &plugin,
        snapshot("v2", json!({"shop": {"endpoints": [{"address": "10.0.0.1:80"}]}}))
            .body(
                json!({"version": "v2",
                       "services": {"shop": {"endpoints": [{"address": "10.0.0.1:80"}]}},
                       "policy": {"default": {"load_balancer": {"type": "maglev", "table_size": 5000011}}}})
                .to_string(),
            ),
    )?;
    assert_eq!(
        poll.header("x-fulcrum-rejected"),
        Some("over_table_budget v2"),
        "{}",
        plugin.logs_text()
    );
    Ok(())
}
