//! The real filter taking control-plane snapshots (a bad service degrades alone, unknown
//! fields pass, a policy change resets only what it changes) and charging outcomes only to
//! the endpoint that earned them.

use fulcrum_core::OVERRIDE_HEADER;
use fulcrum_wasm_host::{Plugin, Response};
use serde_json::{Value, json};

use crate::test_support::{filter, ms};

const CONTROL_PLANE: &str = "fulcrum_control_plane";

/// A filter polling the control plane every second, one worker.
fn polling_filter() -> anyhow::Result<Plugin> {
    filter()
        .configure(format!(
            r#"{{"control_plane": {{"cluster": "{CONTROL_PLANE}", "poll_interval": "1s"}}, "only_services": ["*"]}}"#
        ))
        .cluster(CONTROL_PLANE)
        .start()
}

/// Serves `snapshot` to the next poll and lets the filter apply it.
fn deliver(plugin: &Plugin, snapshot: &Value) -> anyhow::Result<()> {
    let body = snapshot.to_string();
    plugin.serve_http_calls(move |_| Response::ok(body.clone()));
    plugin.advance_clock(ms(1_000));
    plugin.tick_all()?;
    plugin.tick_all()?;
    plugin.tick_all()?;
    Ok(())
}

fn endpoints(addresses: &[&str]) -> Value {
    json!({"endpoints": addresses.iter().map(|a| json!({"address": a})).collect::<Vec<_>>()})
}

/// One request to `service`; the upstream that answers is chosen by `answer` from the pick,
/// with `status` and one attempt. Returns the pick (first address of the header), if any.
fn request(
    plugin: &Plugin,
    service: &str,
    answer: impl Fn(&str) -> (String, u16),
) -> anyhow::Result<Option<String>> {
    let mut request = plugin
        .worker(0)
        .request()
        .header(":authority", service)
        .send_headers()?;
    let pick = request
        .request_header(OVERRIDE_HEADER)
        .map(|value| value.split(',').next().unwrap_or_default().to_owned());
    let (upstream, status) = answer(pick.as_deref().unwrap_or("192.0.2.1:80"));
    request
        .respond(status)
        .upstream(&upstream)
        .attempts(1)
        .latency(ms(2))
        .finish()?;
    Ok(pick)
}

const STRICT: &str = r#"{"load_balancer": {"type": "round_robin"},
    "outlier_detection": {"consecutive_failures": 2, "base_ejection_time": "30s",
      "ejection_jitter_percent": 0, "max_ejection_percent": 50, "panic_threshold_percent": 0}}"#;

fn strict() -> Value {
    serde_json::from_str(STRICT).expect("policy JSON")
}

#[test]
fn a_pick_envoy_did_not_honour_is_charged_nothing_and_counted() -> anyhow::Result<()> {
    // The filter knows b1..b3; Envoy's cluster lacks b3, so override_host falls back to b1,
    // which answers those requests: b3 never saw them and must be charged nothing (before,
    // each counted as a failure of b3, which ejected it).
    let plugin = polling_filter()?;
    deliver(
        &plugin,
        &json!({"version": "v1",
            "services": {"shop": endpoints(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"])},
            "policy": {"default": strict()}}),
    )?;
    let mut picks = Vec::new();
    for _ in 0..12 {
        let pick = request(&plugin, "shop", |pick| {
            if pick == "10.0.0.3:80" {
                ("10.0.0.1:80".to_owned(), 200)
            } else {
                (pick.to_owned(), 200)
            }
        })?;
        picks.push(pick.expect("a pick"));
    }
    assert_eq!(
        picks.iter().filter(|p| *p == "10.0.0.3:80").count(),
        4,
        "{picks:?}"
    );
    assert_eq!(
        plugin.metric("fulcrum_override_ignored_total.service.shop")?,
        4
    );
    assert_eq!(
        plugin.metric("fulcrum_endpoint_ejections_total.service.shop.endpoint.10.0.0.3:80")?,
        0
    );
    Ok(())
}

#[test]
fn a_bad_service_is_skipped_named_and_counted_while_the_rest_applies() -> anyhow::Result<()> {
    let plugin = polling_filter()?;
    deliver(
        &plugin,
        &json!({"version": "v1",
        "services": {
            "shop": endpoints(&["10.0.0.1:80"]),
            "broken": {"endpoints": [{"address": "10.0.0.9:80", "weight": 0}]},
        }}),
    )?;
    assert_eq!(
        request(&plugin, "shop", |pick| (pick.to_owned(), 200))?.as_deref(),
        Some("10.0.0.1:80")
    );
    assert_eq!(
        request(&plugin, "broken", |pick| (pick.to_owned(), 200))?,
        None
    );
    assert_eq!(plugin.metric("fulcrum_snapshot_services_skipped_total")?, 1);
    assert_eq!(plugin.metric("fulcrum_snapshot_rejected_total")?, 0);
    let logs = plugin.logs_text();
    assert!(
        logs.contains("left out service broken") && logs.contains("weight"),
        "{logs}"
    );
    Ok(())
}

#[test]
fn fields_of_a_newer_control_plane_are_ignored() -> anyhow::Result<()> {
    let plugin = polling_filter()?;
    deliver(
        &plugin,
        &json!({"version": "v9", "generation": 3,
            "services": {"shop": {"protocol": "http2",
                "endpoints": [{"address": "10.0.0.1:80", "locality": {"region": "r"}}]}}}),
    )?;
    assert_eq!(
        request(&plugin, "shop", |pick| (pick.to_owned(), 200))?.as_deref(),
        Some("10.0.0.1:80")
    );
    assert_eq!(plugin.metric("fulcrum_snapshot_services_skipped_total")?, 0);
    Ok(())
}

/// Ejects `bad` of service `shop` (two 503s), returning the picks seen meanwhile.
fn eject(plugin: &Plugin, bad: &str) -> anyhow::Result<()> {
    for _ in 0..4 {
        request(plugin, "shop", |pick| {
            (pick.to_owned(), if pick == bad { 503 } else { 200 })
        })?;
    }
    let ejections = format!("fulcrum_endpoint_ejections_total.service.shop.endpoint.{bad}");
    assert_eq!(plugin.metric(&ejections)?, 1, "{}", plugin.logs_text());
    Ok(())
}

fn picks_of(plugin: &Plugin, service: &str, n: usize) -> anyhow::Result<Vec<String>> {
    (0..n)
        .map(|_| {
            request(plugin, service, |pick| (pick.to_owned(), 200))
                .map(|pick| pick.unwrap_or_default())
        })
        .collect()
}

#[test]
fn a_policy_change_resets_only_the_services_whose_selection_changed() -> anyhow::Result<()> {
    let bad = "10.0.0.2:80";
    let services = json!({
        "shop": endpoints(&["10.0.0.1:80", bad]),
        "cart": endpoints(&["10.0.1.1:80", "10.0.1.2:80"]),
    });
    let plugin = polling_filter()?;
    deliver(
        &plugin,
        &json!({"version": "v1", "services": services, "policy": {"default": strict()}}),
    )?;
    eject(&plugin, bad)?;

    // health_check only: the filter ignores it, the ejection stays.
    let mut checked = strict();
    checked["health_check"] = json!({"tcp": {}});
    deliver(
        &plugin,
        &json!({"version": "v2", "services": services, "policy": {"default": checked}}),
    )?;
    assert!(!picks_of(&plugin, "shop", 6)?.iter().any(|p| p == bad));

    // Another service's policy changes: shop keeps its state.
    let mut cart = strict();
    cart["retry"] = json!(1);
    deliver(
        &plugin,
        &json!({"version": "v3", "services": services,
            "policy": {"default": checked, "services": {"cart": cart}}}),
    )?;
    assert!(!picks_of(&plugin, "shop", 6)?.iter().any(|p| p == bad));

    // shop's own ejection rules change: it starts afresh and picks the endpoint again. (A
    // change that leaves the rules alone, such as `retry`, restarts the picker too, but it
    // takes back the ejection the proxy still holds under those rules: `shared_ejections`.)
    let mut shop = checked.clone();
    shop["outlier_detection"]["consecutive_failures"] = json!(3);
    deliver(
        &plugin,
        &json!({"version": "v4", "services": services,
            "policy": {"default": checked, "services": {"cart": cart, "shop": shop}}}),
    )?;
    assert!(picks_of(&plugin, "shop", 6)?.iter().any(|p| p == bad));
    Ok(())
}

#[test]
fn a_snapshot_without_a_policy_or_with_an_invalid_one_keeps_the_policy_in_force()
-> anyhow::Result<()> {
    let bad = "10.0.0.2:80";
    let services = json!({"shop": endpoints(&["10.0.0.1:80", bad])});
    let plugin = polling_filter()?;
    deliver(
        &plugin,
        &json!({"version": "v1", "services": services, "policy": {"default": strict()}}),
    )?;
    eject(&plugin, bad)?;
    deliver(&plugin, &json!({"version": "v2", "services": services}))?;
    assert!(!picks_of(&plugin, "shop", 6)?.iter().any(|p| p == bad));
    deliver(
        &plugin,
        &json!({"version": "v3", "services": services, "policy": {"default": {"retry": 42}}}),
    )?;
    assert!(!picks_of(&plugin, "shop", 6)?.iter().any(|p| p == bad));
    assert_eq!(plugin.metric("fulcrum_snapshot_policy_rejected_total")?, 1);
    assert!(plugin.logs_text().contains("policy.default.retry"));
    Ok(())
}
