//! The rate limit is per proxy: every worker VM draws from the same buckets in shared data,
//! so a proxy with N workers admits the configured rate, not N times it; client buckets are
//! shared the same way, and their number is bounded by `max_clients` whatever keys clients
//! invent.

use fulcrum_core::OVERRIDE_HEADER;
use fulcrum_wasm_host::Plugin;

use crate::test_support::{filter, ms};

fn limited_plugin(workers: usize, rate_limit: &str) -> Plugin {
    filter()
        .configure(format!(
            r#"{{"endpoints": {{"checkout": [{{"address": "10.0.0.1:8080"}},
                                             {{"address": "10.0.0.2:8080"}}]}},
                "policy": {{"default": {{"load_balancer": {{"type": "round_robin"}},
                                        "rate_limit": {rate_limit}}}}}}}"#
        ))
        .workers(workers)
        .start()
        .expect("the filter starts")
}

/// Sends one request for checkout on `worker` (with `x-api-key: key` when given); returns
/// whether it was admitted (picked) rather than answered 429.
fn admitted(plugin: &Plugin, worker: usize, key: Option<&str>) -> anyhow::Result<bool> {
    let mut builder = plugin
        .worker(worker)
        .request()
        .header(":authority", "checkout");
    if let Some(key) = key {
        builder = builder.header("x-api-key", key);
    }
    let mut request = builder.send_headers()?;
    match request.local_response() {
        Some(reply) => {
            anyhow::ensure!(reply.status == 429, "unexpected local reply {reply:?}");
            anyhow::ensure!(request.request_header(OVERRIDE_HEADER).is_none());
            request.reset()?;
            Ok(false)
        }
        None => {
            let picked = request
                .request_header(OVERRIDE_HEADER)
                .ok_or_else(|| anyhow::anyhow!("neither picked nor limited"))?;
            request.respond(200).upstream(&picked).finish()?;
            Ok(true)
        }
    }
}

#[test]
fn two_workers_together_admit_the_configured_rate_not_twice_it() -> anyhow::Result<()> {
    let plugin = limited_plugin(2, r#"{"requests_per_second": 20, "burst": 10}"#);
    // 200 requests per second for 5 seconds, alternating between the workers.
    let mut admitted_total = 0;
    for i in 0..1_000 {
        if admitted(&plugin, i % 2, None)? {
            admitted_total += 1;
        }
        plugin.advance_clock(ms(5));
    }
    // The burst plus 5 s at 20/s; per-worker buckets would admit about twice that.
    assert!(
        (109..=111).contains(&admitted_total),
        "admitted {admitted_total}"
    );
    assert_eq!(
        plugin.metric("fulcrum_rate_limited_total.service.checkout")?,
        1_000 - admitted_total
    );
    Ok(())
}

#[test]
fn a_client_key_is_held_to_its_rate_whichever_worker_serves_it() -> anyhow::Result<()> {
    let plugin = limited_plugin(
        2,
        r#"{"requests_per_second": 2, "burst": 4, "client_key_header": "x-api-key", "max_clients": 64}"#,
    );
    let alice: Vec<bool> = (0..6)
        .map(|i| admitted(&plugin, i % 2, Some("alice")))
        .collect::<anyhow::Result<_>>()?;
    // Alice's burst of 4 spans both workers; the service bucket is empty too.
    assert_eq!(alice, [true, true, true, true, false, false]);
    plugin.advance_clock(ms(500));
    assert!(admitted(&plugin, 1, Some("alice"))?);
    assert!(!admitted(&plugin, 0, Some("alice"))?);
    Ok(())
}

#[test]
fn rotating_client_keys_cannot_lift_the_proxy_limit_and_buckets_stay_bounded() -> anyhow::Result<()>
{
    let plugin = limited_plugin(
        2,
        r#"{"requests_per_second": 10, "burst": 5, "client_key_header": "x-api-key", "max_clients": 16}"#,
    );
    let mut admitted_total = 0;
    for i in 0..2_000 {
        if admitted(&plugin, i % 2, Some(&format!("key-{i}")))? {
            admitted_total += 1;
        }
        plugin.advance_clock(ms(1));
    }
    // The burst plus 2 s at 10/s, whatever the number of keys.
    assert!(
        (24..=26).contains(&admitted_total),
        "admitted {admitted_total}"
    );
    let buckets = plugin.shared_data_keys("");
    let buckets: Vec<&String> = buckets
        .iter()
        .filter(|key| key.contains("/rate_limit/checkout/"))
        .collect();
    assert!(
        buckets.len() <= 16 + 1,
        "{} bucket keys: {buckets:?}",
        buckets.len()
    );
    Ok(())
}
