//! How the real filter distributes snapshots among the VMs of a proxy: one shared-data key
//! per service behind an index, each VM parsing only the services whose content changed,
//! never a torn view, deltas asked for and checked against what is published, and table
//! memory budgeted.

use fulcrum_core::{OVERRIDE_HEADER, distribution::content_hash};
use fulcrum_wasm_host::{LogLevel, Plugin, Response};
use serde_json::{Value, json};

use crate::test_support::{filter, ms};

const CONTROL_PLANE: &str = "fulcrum_control_plane";
const PREFIX: &str = "fulcrum//snapshot/";

/// A filter polling the control plane every second on two workers.
fn two_workers() -> anyhow::Result<Plugin> {
    filter()
        .workers(2)
        .configure(format!(
            r#"{{"control_plane": {{"cluster": "{CONTROL_PLANE}", "poll_interval": "1s"}}, "only_services": ["*"]}}"#
        ))
        .cluster(CONTROL_PLANE)
        .start()
}

/// Answers the next poll with `answer` and lets every VM apply it.
fn deliver(plugin: &Plugin, answer: &Value) -> anyhow::Result<()> {
    let body = answer.to_string();
    plugin.serve_http_calls(move |_| Response::ok(body.clone()));
    plugin.advance_clock(ms(1_000));
    for _ in 0..3 {
        plugin.tick_all()?;
    }
    Ok(())
}

fn service(addresses: &[&str]) -> Value {
    json!({"endpoints": addresses.iter().map(|a| json!({"address": a})).collect::<Vec<_>>()})
}

/// The pick of one request to `service` on `worker`, answered 200.
fn pick(plugin: &Plugin, worker: usize, service: &str) -> anyhow::Result<Option<String>> {
    let mut request = plugin
        .worker(worker)
        .request()
        .header(":authority", service)
        .send_headers()?;
    let pick = request.request_header(OVERRIDE_HEADER);
    request
        .respond(200)
        .upstream(pick.as_deref().unwrap_or("192.0.2.1:80"))
        .attempts(1)
        .latency(ms(2))
        .finish()?;
    Ok(pick)
}

fn index(plugin: &Plugin) -> Value {
    let (bytes, _) = plugin
        .shared_data(&format!("{PREFIX}index"))
        .expect("an index is published");
    serde_json::from_slice(&bytes).expect("the index is JSON")
}

fn three_services() -> Value {
    json!({
        "shop": service(&["10.0.0.1:80"]),
        "cart": service(&["10.0.1.1:80"]),
        "search": service(&["10.0.2.1:80"]),
    })
}

#[test]
fn each_vm_parses_only_the_services_whose_content_changed() -> anyhow::Result<()> {
    let plugin = two_workers()?;
    deliver(
        &plugin,
        &json!({"version": "v1", "services": three_services()}),
    )?;
    assert_eq!(
        plugin.metric("fulcrum_snapshot_services_parsed_total")?,
        6,
        "3 services on each of 2 VMs"
    );
    assert_eq!(
        plugin.shared_data_keys(&format!("{PREFIX}services/")),
        [
            format!("{PREFIX}services/cart"),
            format!("{PREFIX}services/search"),
            format!("{PREFIX}services/shop")
        ]
    );
    let shop = json!({"endpoints": [{"address": "10.0.0.1:80"}]}).to_string();
    assert_eq!(
        index(&plugin)["services"]["shop"],
        content_hash(shop.as_bytes())
    );

    // A whole snapshot (an old control plane) in which only cart changed.
    let mut services = three_services();
    services["cart"] = service(&["10.0.1.2:80"]);
    deliver(&plugin, &json!({"version": "v2", "services": services}))?;
    assert_eq!(
        plugin.metric("fulcrum_snapshot_services_parsed_total")?,
        8,
        "cart alone, on each VM"
    );
    for worker in 0..2 {
        assert_eq!(
            pick(&plugin, worker, "cart")?.as_deref(),
            Some("10.0.1.2:80")
        );
        assert_eq!(
            pick(&plugin, worker, "shop")?.as_deref(),
            Some("10.0.0.1:80")
        );
    }
    Ok(())
}

#[test]
fn a_filter_asks_for_a_delta_from_the_published_version_and_applies_one() -> anyhow::Result<()> {
    let plugin = two_workers()?;
    deliver(
        &plugin,
        &json!({"version": "v1", "services": three_services()}),
    )?;
    deliver(
        &plugin,
        &json!({"version": "v2", "base": "v1",
            "services": {"shop": service(&["10.0.0.2:80"])}, "removed": ["search"]}),
    )?;
    let polls = plugin.http_calls();
    let second = polls.get(1).expect("a second poll");
    assert_eq!(second.header("if-none-match"), Some("\"v1\""));
    assert!(
        second
            .header("accept")
            .is_some_and(|accept| accept.starts_with(fulcrum_core::distribution::DELTA_MEDIA_TYPE)),
        "{second:?}"
    );
    assert_eq!(index(&plugin)["version"], "v2");
    assert_eq!(
        plugin.metric("fulcrum_snapshot_services_parsed_total")?,
        8,
        "shop alone, on each VM"
    );
    for worker in 0..2 {
        assert_eq!(
            pick(&plugin, worker, "shop")?.as_deref(),
            Some("10.0.0.2:80")
        );
        assert_eq!(
            pick(&plugin, worker, "cart")?.as_deref(),
            Some("10.0.1.1:80")
        );
        assert_eq!(pick(&plugin, worker, "search")?, None, "removed");
    }
    Ok(())
}

#[test]
fn a_removed_services_key_is_emptied_and_filled_again_when_it_returns() -> anyhow::Result<()> {
    let plugin = two_workers()?;
    let key = format!("{PREFIX}services/search");
    deliver(
        &plugin,
        &json!({"version": "v1", "services": three_services()}),
    )?;
    let held = |key: &str| plugin.shared_data(key).map(|(bytes, _)| bytes.len());
    assert!(held(&key).is_some_and(|bytes| bytes > 0));

    // Gone from a delta, then from a whole snapshot: its key holds nothing.
    deliver(
        &plugin,
        &json!({"version": "v2", "base": "v1", "services": {}, "removed": ["search"]}),
    )?;
    assert_eq!(held(&key), Some(0));
    let mut services = three_services();
    services.as_object_mut().expect("an object").remove("cart");
    deliver(&plugin, &json!({"version": "v3", "services": services}))?;
    assert_eq!(held(&format!("{PREFIX}services/cart")), Some(0));
    assert!(held(&format!("{PREFIX}services/shop")).is_some_and(|bytes| bytes > 0));

    // Back again: published and picked as before.
    deliver(
        &plugin,
        &json!({"version": "v4", "services": three_services()}),
    )?;
    assert!(held(&key).is_some_and(|bytes| bytes > 0));
    for worker in 0..2 {
        assert_eq!(
            pick(&plugin, worker, "search")?.as_deref(),
            Some("10.0.2.1:80")
        );
        assert_eq!(
            pick(&plugin, worker, "cart")?.as_deref(),
            Some("10.0.1.1:80")
        );
    }
    Ok(())
}

#[test]
fn a_delta_against_another_version_than_the_published_one_is_not_applied() -> anyhow::Result<()> {
    let plugin = two_workers()?;
    deliver(
        &plugin,
        &json!({"version": "v1", "services": three_services()}),
    )?;
    deliver(
        &plugin,
        &json!({"version": "v3", "base": "v2", "services": {"shop": service(&["10.0.0.2:80"])}}),
    )?;
    assert_eq!(index(&plugin)["version"], "v1");
    assert_eq!(pick(&plugin, 0, "shop")?.as_deref(), Some("10.0.0.1:80"));
    assert!(
        plugin.logged(LogLevel::Warn, "delta against version \"v2\""),
        "{}",
        plugin.logs_text()
    );
    Ok(())
}

#[test]
fn a_vm_that_finds_a_service_key_ahead_of_the_index_changes_nothing_until_the_index_catches_up()
-> anyhow::Result<()> {
    let plugin = two_workers()?;
    deliver(
        &plugin,
        &json!({"version": "v1", "services": three_services()}),
    )?;
    let torn_before = plugin.metric("fulcrum_snapshot_torn_reads_total")?;

    // A publisher mid-way, as another VM would see it: the index names shop's v2 content,
    // whose key a later publication (v3) has already overwritten.
    let v2 = json!({"endpoints": [{"address": "10.0.0.2:80"}]}).to_string();
    let v3 = json!({"endpoints": [{"address": "10.0.0.3:80"}]}).to_string();
    let mut published = index(&plugin);
    published["version"] = json!("v2");
    published["services"]["shop"] = json!(content_hash(v2.as_bytes()));
    plugin.set_shared_data(
        &format!("{PREFIX}services/shop"),
        format!("{}\n{v3}", content_hash(v3.as_bytes())),
    );
    plugin.set_shared_data(&format!("{PREFIX}index"), published.to_string());
    plugin.set_shared_data(&format!("{PREFIX}version"), "v2");
    plugin.tick_all()?;
    assert_eq!(
        plugin.metric("fulcrum_snapshot_torn_reads_total")?,
        torn_before + 2
    );
    for worker in 0..2 {
        assert_eq!(
            pick(&plugin, worker, "shop")?.as_deref(),
            Some("10.0.0.1:80"),
            "v1 stays whole"
        );
    }

    // The index catches up with the key: every VM applies v3.
    published["version"] = json!("v3");
    published["services"]["shop"] = json!(content_hash(v3.as_bytes()));
    plugin.set_shared_data(&format!("{PREFIX}index"), published.to_string());
    plugin.set_shared_data(&format!("{PREFIX}version"), "v3");
    plugin.tick_all()?;
    for worker in 0..2 {
        assert_eq!(
            pick(&plugin, worker, "shop")?.as_deref(),
            Some("10.0.0.3:80")
        );
    }
    Ok(())
}

#[test]
fn a_snapshot_whose_tables_exceed_max_table_bytes_is_refused_naming_service_and_field()
-> anyhow::Result<()> {
    let plugin = two_workers()?;
    deliver(
        &plugin,
        &json!({"version": "v1", "services": three_services()}),
    )?;
    // 3 services × a 5000011-entry Maglev table (19 MiB each) = 57 MiB; max_table_bytes is
    // 64 MiB by default, so a fourth service crosses it.
    let mut services = three_services();
    services["web"] = service(&["10.0.3.1:80"]);
    deliver(
        &plugin,
        &json!({"version": "v2", "services": services,
            "policy": {"default": {"load_balancer": {"type": "maglev", "table_size": 5000011}}}}),
    )?;
    assert_eq!(
        plugin.metric("fulcrum_snapshot_over_table_budget_total")?,
        2,
        "each VM refuses"
    );
    assert!(
        plugin.logged(
            LogLevel::Error,
            "service web: policy.default.load_balancer.maglev.table_size = 5000011"
        ),
        "{}",
        plugin.logs_text()
    );
    for worker in 0..2 {
        assert_eq!(
            pick(&plugin, worker, "shop")?.as_deref(),
            Some("10.0.0.1:80")
        );
        assert_eq!(pick(&plugin, worker, "web")?, None, "v1 stays in force");
    }
    plugin.tick_all()?;
    assert_eq!(
        plugin.metric("fulcrum_snapshot_over_table_budget_total")?,
        2,
        "a refused version is not read again"
    );
    Ok(())
}

#[test]
fn garbage_in_the_shared_snapshot_keys_changes_nothing_and_never_panics() -> anyhow::Result<()> {
    let plugin = two_workers()?;
    deliver(
        &plugin,
        &json!({"version": "v1", "services": three_services()}),
    )?;
    let garbage: [&[u8]; 4] = [b"", b"\xff\xfe not json", b"{\"version\": 7}", b"[]"];
    for (round, bytes) in garbage.iter().enumerate() {
        plugin.set_shared_data(&format!("{PREFIX}index"), *bytes);
        plugin.set_shared_data(&format!("{PREFIX}version"), format!("garbage-{round}"));
        plugin.set_shared_data(&format!("{PREFIX}services/shop"), *bytes);
        plugin.tick_all()?;
        for worker in 0..2 {
            assert_eq!(
                pick(&plugin, worker, "shop")?.as_deref(),
                Some("10.0.0.1:80")
            );
        }
    }
    assert!(
        plugin.logged(LogLevel::Error, "the published snapshot is invalid"),
        "{}",
        plugin.logs_text()
    );

    // The next answer from the control plane is published over the garbage, whole.
    deliver(
        &plugin,
        &json!({"version": "v2", "services": three_services()}),
    )?;
    assert_eq!(index(&plugin)["version"], "v2");
    for worker in 0..2 {
        assert_eq!(
            pick(&plugin, worker, "shop")?.as_deref(),
            Some("10.0.0.1:80")
        );
    }
    Ok(())
}

#[test]
fn an_invalid_published_snapshot_is_counted_on_every_tick_and_logged_once_per_failure()
-> anyhow::Result<()> {
    let plugin = two_workers()?;
    deliver(
        &plugin,
        &json!({"version": "v1", "services": three_services()}),
    )?;
    let invalid = || plugin.metric("fulcrum_snapshot_invalid_reads_total");
    let logged = |what: &str| plugin.logs_text().matches(what).count();
    assert_eq!(invalid()?, 0);

    // A service key at the hash the index names, holding what no publisher validated.
    let garbage = "{\"endpoints\": 7}";
    let mut published = index(&plugin);
    published["version"] = json!("v2");
    published["services"]["shop"] = json!(content_hash(garbage.as_bytes()));
    plugin.set_shared_data(
        &format!("{PREFIX}services/shop"),
        format!("{}\n{garbage}", content_hash(garbage.as_bytes())),
    );
    plugin.set_shared_data(&format!("{PREFIX}index"), published.to_string());
    plugin.set_shared_data(&format!("{PREFIX}version"), "v2");
    plugin.tick_all()?;
    let per_tick = invalid()?;
    assert!(per_tick > 0, "counted");
    plugin.tick_all()?;
    plugin.tick_all()?;
    assert_eq!(invalid()?, 3 * per_tick, "counted on every tick");
    let once = logged("the published snapshot is invalid");
    assert_eq!(u64::try_from(once)?, per_tick, "logged once by each VM");

    // Another failure: an index whose version is over-long is corrupt too, and logged anew.
    published["version"] = json!("v".repeat(1 << 10));
    plugin.set_shared_data(&format!("{PREFIX}index"), published.to_string());
    plugin.tick_all()?;
    plugin.tick_all()?;
    assert_eq!(invalid()?, 5 * per_tick);
    assert_eq!(logged("the published snapshot is invalid"), 2 * once);
    for worker in 0..2 {
        assert_eq!(
            pick(&plugin, worker, "shop")?.as_deref(),
            Some("10.0.0.1:80"),
            "v1 stays"
        );
    }
    Ok(())
}

#[test]
fn a_poll_lease_or_publish_lock_held_until_the_end_of_time_reads_as_expired() -> anyhow::Result<()>
{
    let plugin = two_workers()?;
    deliver(
        &plugin,
        &json!({"version": "v1", "services": three_services()}),
    )?;
    // Deadlines no VM takes (the poll interval is 1 s, the lock's hold 10 s): corrupted.
    let end_of_time = u64::MAX.to_le_bytes();
    plugin.set_shared_data(&format!("{PREFIX}poll_lease"), end_of_time);
    plugin.set_shared_data(&format!("{PREFIX}publisher"), end_of_time);
    deliver(
        &plugin,
        &json!({"version": "v2", "services": {"shop": service(&["10.0.0.2:80"])}}),
    )?;
    assert_eq!(index(&plugin)["version"], "v2", "polled and published");
    for worker in 0..2 {
        assert_eq!(
            pick(&plugin, worker, "shop")?.as_deref(),
            Some("10.0.0.2:80")
        );
    }
    Ok(())
}
