//! Scenarios against the real fulcrum filter (`fulcrum_balancer.wasm`, release build), one
//! behaviour each, driven through the host the way Envoy would drive it.

use std::collections::BTreeMap;

use fulcrum_core::OVERRIDE_HEADER;
use fulcrum_wasm_host::{Plugin, Request, Response, response_flags};

use crate::test_support::{filter, ms};

/// A static-endpoints config for service `checkout` with `policy` as its default policy.
fn static_config(endpoints: &[&str], policy: &str) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|address| format!(r#"{{"address": "{address}"}}"#))
        .collect();
    format!(
        r#"{{"endpoints": {{"checkout": [{}]}}, "policy": {{"default": {policy}}}}}"#,
        endpoints.join(", ")
    )
}

/// Sends one request for `checkout` to `worker`, answers it with whatever `status_of` says
/// for the picked endpoint, and returns the pick.
fn round_trip(
    plugin: &Plugin,
    worker: usize,
    status_of: impl Fn(&str) -> (u16, u64),
) -> anyhow::Result<String> {
    let mut request = plugin
        .worker(worker)
        .request()
        .header(":authority", "checkout")
        .header(":path", "/")
        .header(":method", "GET")
        .send_headers()?;
    let pick = request
        .request_header(OVERRIDE_HEADER)
        .ok_or_else(|| anyhow::anyhow!("no pick; logs:\n{}", plugin.logs_text()))?;
    let first = pick.split(',').next().unwrap_or_default().to_string();
    let (status, latency_ms) = status_of(&first);
    request
        .respond(status)
        .upstream(&first)
        .latency(ms(latency_ms))
        .finish()?;
    Ok(first)
}

fn count(picks: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for pick in picks {
        *counts.entry(pick.as_str()).or_default() += 1;
    }
    counts
}

#[test]
fn round_robin_spreads_requests_evenly_and_counts_picks_per_endpoint() -> anyhow::Result<()> {
    let endpoints = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"];
    let plugin = filter()
        .configure(static_config(
            &endpoints,
            r#"{"load_balancer": {"type": "round_robin"}}"#,
        ))
        .start()?;
    let picks = (0..9)
        .map(|_| round_trip(&plugin, 0, |_| (200, 5)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert_eq!(
        count(&picks).values().copied().collect::<Vec<_>>(),
        [3, 3, 3]
    );
    for endpoint in endpoints {
        let name = format!("fulcrum_endpoint_picks_total.service.checkout.endpoint.{endpoint}");
        assert_eq!(
            plugin.metric(&name)?,
            0,
            "{name}: counted in the VM until the tick"
        );
    }
    plugin.tick_all()?;
    for endpoint in endpoints {
        let name = format!("fulcrum_endpoint_picks_total.service.checkout.endpoint.{endpoint}");
        assert_eq!(plugin.metric(&name)?, 3, "{name}");
    }
    Ok(())
}

#[test]
fn weighted_round_robin_follows_the_weights() -> anyhow::Result<()> {
    let config = r#"{"endpoints": {"checkout": [
            {"address": "10.0.0.1:8080", "weight": 3}, {"address": "10.0.0.2:8080", "weight": 1}]},
        "policy": {"default": {"load_balancer": {"type": "weighted_round_robin"}}}}"#;
    let plugin = filter().configure(config).start()?;
    let picks = (0..8)
        .map(|_| round_trip(&plugin, 0, |_| (200, 5)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let counts = count(&picks);
    assert_eq!(counts["10.0.0.1:8080"], 6);
    assert_eq!(counts["10.0.0.2:8080"], 2);
    Ok(())
}

#[test]
fn client_supplied_override_header_is_stripped_and_counted() -> anyhow::Result<()> {
    let plugin = filter()
        .configure(static_config(
            &["10.0.0.1:8080"],
            r#"{"load_balancer": {"type": "round_robin"}}"#,
        ))
        .start()?;
    let mut request = plugin
        .worker(0)
        .request()
        .header(":authority", "checkout")
        .header(OVERRIDE_HEADER, "6.6.6.6:1")
        .send_headers()?;
    assert_eq!(
        request.request_header(OVERRIDE_HEADER).as_deref(),
        Some("10.0.0.1:8080")
    );
    request.respond(200).upstream("10.0.0.1:8080").finish()?;
    assert_eq!(plugin.metric("fulcrum_override_header_stripped_total")?, 1);
    Ok(())
}

#[test]
fn failing_endpoint_is_ejected_then_readmitted_through_half_open() -> anyhow::Result<()> {
    let bad = "10.0.0.2:8080";
    let policy = r#"{"load_balancer": {"type": "round_robin"},
        "outlier_detection": {"consecutive_failures": 2, "base_ejection_time": "10s",
          "ejection_jitter_percent": 0, "max_ejection_percent": 50, "panic_threshold_percent": 0}}"#;
    let plugin = filter()
        .configure(static_config(&["10.0.0.1:8080", bad], policy))
        .start()?;
    let failing = |pick: &str| if pick == bad { (503, 5) } else { (200, 5) };
    // Round robin alternates: the bad endpoint fails twice within four requests.
    for _ in 0..4 {
        round_trip(&plugin, 0, failing)?;
    }
    let ejections = format!("fulcrum_endpoint_ejections_total.service.checkout.endpoint.{bad}");
    assert_eq!(plugin.metric(&ejections)?, 1);
    let while_open = (0..6)
        .map(|_| round_trip(&plugin, 0, failing))
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert!(
        !while_open.iter().any(|p| p == bad),
        "ejected endpoint picked: {while_open:?}"
    );

    // After the ejection time, the endpoint is probed (half-open); a success closes it.
    plugin.advance_clock(ms(10_001));
    let healthy = |_: &str| (200, 5);
    let after = (0..6)
        .map(|_| round_trip(&plugin, 0, healthy))
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert!(
        after.iter().filter(|p| *p == bad).count() >= 2,
        "not re-admitted: {after:?}"
    );
    assert_eq!(plugin.metric(&ejections)?, 1);
    Ok(())
}

/// Sends a request with a body for `checkout`, sends the body's end when `finish_body`,
/// and ends it as Envoy's stream idle timeout does: a local 408 with the `SI` flag, after
/// two seconds of silence (a listener's `stream_idle_timeout: 2s`). Returns the pick.
fn idle_timeout(plugin: &Plugin, finish_body: bool) -> anyhow::Result<String> {
    let mut request = plugin
        .worker(0)
        .request()
        .header(":authority", "checkout")
        .header(":path", "/upload")
        .header(":method", "POST")
        .header("content-length", "1048576")
        .send_headers_with_body()?;
    if finish_body {
        request.send_body(b"the whole body", true)?;
    }
    let pick = request
        .request_header(OVERRIDE_HEADER)
        .ok_or_else(|| anyhow::anyhow!("no pick; logs:\n{}", plugin.logs_text()))?;
    let first = pick.split(',').next().unwrap_or_default().to_string();
    request
        .respond(408)
        .flags(response_flags::STREAM_IDLE_TIMEOUT)
        .code_details("stream_idle_timeout")
        .upstream(&first)
        .latency(ms(2_000))
        .finish()?;
    Ok(first)
}

#[test]
fn a_client_stalling_its_body_until_the_idle_timeout_ejects_no_endpoint() -> anyhow::Result<()> {
    let endpoints = ["10.0.0.1:8080", "10.0.0.2:8080"];
    let policy = r#"{"load_balancer": {"type": "round_robin"},
        "outlier_detection": {"consecutive_failures": 2, "base_ejection_time": "10s",
          "ejection_jitter_percent": 0, "max_ejection_percent": 50, "panic_threshold_percent": 0}}"#;
    let plugin = filter()
        .configure(static_config(&endpoints, policy))
        .start()?;
    let ejections = |endpoint: &str| {
        format!("fulcrum_endpoint_ejections_total.service.checkout.endpoint.{endpoint}")
    };

    // Four stalled uploads, two per endpoint: each idles out with Envoy's local 408.
    let stalled = (0..4)
        .map(|_| idle_timeout(&plugin, false))
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert_eq!(
        count(&stalled).len(),
        2,
        "both endpoints served: {stalled:?}"
    );
    for endpoint in endpoints {
        // The series appears at the first ejection of the endpoint.
        assert_eq!(plugin.metric(&ejections(endpoint)).unwrap_or(0), 0);
    }
    let after = (0..4)
        .map(|_| round_trip(&plugin, 0, |_| (200, 5)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert_eq!(count(&after).len(), 2, "an endpoint was avoided: {after:?}");

    // The same idle timeout after the whole request was sent is the endpoint's silence:
    // both fail twice in a row, one is ejected (at most half of them may be).
    for _ in 0..4 {
        idle_timeout(&plugin, true)?;
    }
    let ejected: u64 = endpoints
        .iter()
        .map(|endpoint| plugin.metric(&ejections(endpoint)).unwrap_or(0))
        .sum();
    assert_eq!(ejected, 1);
    Ok(())
}

#[test]
fn slow_endpoint_is_avoided_by_peak_ewma() -> anyhow::Result<()> {
    let slow = "10.0.0.2:8080";
    let plugin = filter()
        .configure(static_config(
            &["10.0.0.1:8080", slow],
            r#"{"load_balancer": {"type": "peak_ewma"}}"#,
        ))
        .start()?;
    let latency = |pick: &str| if pick == slow { (200, 300) } else { (200, 5) };
    for _ in 0..10 {
        round_trip(&plugin, 0, latency)?;
    }
    let picks = (0..20)
        .map(|_| round_trip(&plugin, 0, latency))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let to_slow = picks.iter().filter(|p| *p == slow).count();
    // Power of two choices over two endpoints compares both every time: once the EWMA has
    // seen both, the slow one loses every comparison.
    assert_eq!(to_slow, 0, "{picks:?}");
    Ok(())
}

#[test]
fn invalid_plugin_config_is_refused_with_its_validation_errors() {
    let error = filter()
        .configure(r#"{"policy": {"default": {"retry": 9}}, "control_plane": {"cluster": ""}}"#)
        .start()
        .expect_err("an invalid config must be refused");
    let message = format!("{error:#}");
    assert!(message.contains("refused its configuration"), "{message}");
    assert!(message.contains("policy.default.retry"), "{message}");
    assert!(message.contains("control_plane.cluster"), "{message}");
    assert!(
        message.contains("only_services: required with control_plane"),
        "{message}"
    );
}

#[test]
fn control_plane_snapshot_is_fetched_once_and_shared_with_the_other_worker() -> anyhow::Result<()> {
    let config = r#"{"control_plane": {"cluster": "fulcrum_control_plane", "poll_interval": "1s"},
        "only_services": ["*"], "policy": {"default": {"load_balancer": {"type": "round_robin"}}}}"#;
    let plugin = filter()
        .configure(config)
        .cluster("fulcrum_control_plane")
        .workers(2)
        .start()?;
    assert_eq!(plugin.worker(1).tick_period(), ms(1000));
    // Before any snapshot, requests fail open to Envoy's fallback policy.
    let mut early = plugin
        .worker(1)
        .request()
        .header(":authority", "checkout")
        .send_headers()?;
    assert_eq!(early.request_header(OVERRIDE_HEADER), None);
    early.respond(200).finish()?;
    assert_eq!(
        plugin.metric("fulcrum_fail_open_total.reason.no_snapshot")?,
        1
    );

    plugin.serve_http_calls(|_| {
        Response::ok(
            r#"{"version": "v1", "services": {"checkout": {"endpoints": [{"address": "10.1.0.7:9000"}]}}}"#,
        )
    });
    plugin.tick_all()?; // one VM wins the poll lease and dispatches the call
    let calls = plugin.http_calls();
    assert_eq!(calls.len(), 1, "one poll for all workers: {calls:?}");
    assert_eq!(calls[0].header(":path"), Some("/v1/snapshot"));
    plugin.tick_all()?; // delivered, published in shared data; applied on the ticks
    plugin.tick_all()?;
    for worker in [0, 1] {
        let mut request = plugin
            .worker(worker)
            .request()
            .header(":authority", "checkout")
            .send_headers()?;
        assert_eq!(
            request.request_header(OVERRIDE_HEADER).as_deref(),
            Some("10.1.0.7:9000"),
            "worker {worker}; logs:\n{}",
            plugin.logs_text()
        );
        request.respond(200).upstream("10.1.0.7:9000").finish()?;
    }
    assert!(plugin.metric("fulcrum_snapshot_updates_total")? >= 2);
    Ok(())
}

#[test]
fn control_plane_timeout_keeps_no_snapshot_and_counts_the_failure() -> anyhow::Result<()> {
    let config = r#"{"control_plane": {"cluster": "fulcrum_control_plane", "timeout": "100ms"},
        "only_services": ["*"]}"#;
    let plugin = filter()
        .configure(config)
        .cluster("fulcrum_control_plane")
        .start()?;
    plugin.tick_all()?;
    plugin.advance_clock(ms(100));
    plugin.deliver_pending()?; // Envoy answers an unanswered call with 504 at its timeout
    assert_eq!(plugin.metric("fulcrum_snapshot_fetch_failures_total")?, 1);
    assert_eq!(plugin.metric("fulcrum_snapshot_updates_total")?, 0);
    Ok(())
}

#[test]
fn a_malformed_session_key_is_refused_without_being_echoed() {
    let secret = "not-a-key-but-secret-material!!";
    let error = filter()
        .configure(format!(
            r#"{{"endpoints": {{"checkout": [{{"address": "10.0.0.1:80"}}]}},
                "session_keys": ["000102030405060708090a0b0c0d0e0f", "{secret}"]}}"#
        ))
        .start()
        .expect_err("a malformed key must be refused");
    let message = format!("{error:#}");
    assert!(message.contains("session_keys[1]"), "{message}");
    assert!(!message.contains(secret), "the key leaked: {message}");
}

#[test]
fn sticky_cookies_are_signed_with_the_configured_session_key() -> anyhow::Result<()> {
    let policy = r#"{"load_balancer": {"type": "sticky", "fallback": {"type": "round_robin"}}}"#;
    let cookie_with = |keys: &str| -> anyhow::Result<String> {
        let plugin = filter()
            .configure(format!(
                r#"{{"endpoints": {{"checkout": [{{"address": "10.0.0.1:8080"}}]}},
                    "policy": {{"default": {policy}}}, "session_keys": [{keys}]}}"#
            ))
            .start()?;
        let mut request = plugin
            .worker(0)
            .request()
            .header(":authority", "checkout")
            .send_headers()?;
        request.respond(200).upstream("10.0.0.1:8080").finish()?;
        request
            .response_header("set-cookie")
            .ok_or_else(|| anyhow::anyhow!("no cookie; logs:\n{}", plugin.logs_text()))
    };
    let a = cookie_with(r#""000102030405060708090a0b0c0d0e0f""#)?;
    let b = cookie_with(r#""f0e0d0c0b0a090807060504030201000""#)?;
    assert_ne!(a, b, "the same endpoint under two keys must get two tokens");
    Ok(())
}

#[test]
fn only_listed_services_get_a_pick_and_the_rest_pass_with_no_header() -> anyhow::Result<()> {
    let plugin = filter()
        .configure(
            r#"{"endpoints": {"checkout": [{"address": "10.0.0.1:8080"}],
                              "payments": [{"address": "10.0.0.2:8080"}]},
                "only_services": ["checkout"]}"#,
        )
        .start()?;
    for (service, expected) in [("checkout", Some("10.0.0.1:8080")), ("payments", None)] {
        let mut request = plugin
            .worker(0)
            .request()
            .header(":authority", service)
            .header(OVERRIDE_HEADER, "10.0.0.9:1")
            .send_headers()?;
        assert_eq!(
            request.request_header(OVERRIDE_HEADER).as_deref(),
            expected,
            "{service}"
        );
        request.respond(200).finish()?;
    }
    assert_eq!(
        plugin.metric("fulcrum_fail_open_total.reason.not_listed")?,
        1
    );
    assert_eq!(plugin.metric("fulcrum_override_header_stripped_total")?, 2);
    Ok(())
}

/// A native service need not be in `only_services` (in Istio, the list of clusters patched
/// with `override_host`) to pass uncounted.
#[test]
fn a_service_on_the_native_data_plane_passes_with_no_header_and_no_fail_open() -> anyhow::Result<()>
{
    let plugin = filter()
        .configure(
            r#"{"endpoints": {"checkout": [{"address": "10.0.0.1:8080"}],
                              "payments": [{"address": "10.0.0.2:8080"}]},
                "only_services": ["checkout"],
                "policy": {"default": {},
                           "services": {"payments": {"data_plane": "native"}}}}"#,
        )
        .start()?;
    for (service, expected) in [("checkout", Some("10.0.0.1:8080")), ("payments", None)] {
        let mut request = plugin
            .worker(0)
            .request()
            .header(":authority", service)
            .header(OVERRIDE_HEADER, "10.0.0.9:1")
            .send_headers()?;
        assert_eq!(
            request.request_header(OVERRIDE_HEADER).as_deref(),
            expected,
            "{service}"
        );
        request.respond(200).upstream("10.0.0.2:8080").finish()?;
    }
    for reason in ["unknown_service", "no_endpoints", "not_listed", "internal"] {
        assert_eq!(
            plugin.metric(&format!("fulcrum_fail_open_total.reason.{reason}"))?,
            0,
            "{reason}"
        );
    }
    // A client's header is stripped whatever the data plane.
    assert_eq!(plugin.metric("fulcrum_override_header_stripped_total")?, 2);
    Ok(())
}

/// A plugin balancing checkout (10.0.0.1:8080) and payments (10.0.0.2:8080), with the
/// configuration's other fields in `fields` (JSON members and a trailing comma, or nothing).
fn checkout_and_payments(fields: &str) -> anyhow::Result<Plugin> {
    filter()
        .configure(format!(
            r#"{{{fields} "endpoints": {{"checkout": [{{"address": "10.0.0.1:8080"}}],
                                        "payments": [{{"address": "10.0.0.2:8080"}}]}}}}"#
        ))
        .start()
}

/// A request whose `:authority` is `authority` and that Envoy routed to `cluster`.
fn routed<'p>(plugin: &'p Plugin, authority: &str, cluster: &str) -> anyhow::Result<Request<'p>> {
    plugin
        .worker(0)
        .request()
        .header(":authority", authority)
        .cluster(cluster)
        .send_headers()
}

#[test]
fn by_default_the_service_is_the_routed_cluster_whatever_the_client_names() -> anyhow::Result<()> {
    let plugin = checkout_and_payments("")?;
    let mut request = routed(&plugin, "payments", "checkout")?;
    assert_eq!(
        request.request_header(OVERRIDE_HEADER).as_deref(),
        Some("10.0.0.1:8080")
    );
    request.respond(200).upstream("10.0.0.1:8080").finish()?;
    // No route, no cluster: the request passes without a pick.
    let mut request = plugin
        .worker(0)
        .request()
        .header(":authority", "checkout")
        .without_route()
        .send_headers()?;
    assert_eq!(request.request_header(OVERRIDE_HEADER), None);
    request.respond(200).finish()?;
    assert_eq!(
        plugin.metric("fulcrum_fail_open_total.reason.no_service")?,
        1
    );
    Ok(())
}

#[test]
fn a_client_named_service_other_than_the_routed_cluster_gets_no_pick() -> anyhow::Result<()> {
    let plugin = checkout_and_payments(r#""service": {"from": "authority"},"#)?;
    // The route sends the request to checkout; the client names payments in :authority.
    let mut request = routed(&plugin, "payments", "checkout")?;
    assert_eq!(request.request_header(OVERRIDE_HEADER), None);
    request.respond(200).finish()?;
    assert_eq!(
        plugin.metric("fulcrum_fail_open_total.reason.service_mismatch")?,
        1
    );
    // Named as routed, it is picked.
    let mut request = routed(&plugin, "checkout", "checkout")?;
    assert_eq!(
        request.request_header(OVERRIDE_HEADER).as_deref(),
        Some("10.0.0.1:8080")
    );
    request.respond(200).upstream("10.0.0.1:8080").finish()?;
    Ok(())
}

/// A client naming a service on the native data plane cannot pass uncounted: the routed
/// cluster is checked first.
#[test]
fn a_client_naming_a_native_service_other_than_the_routed_cluster_fails_open_counted()
-> anyhow::Result<()> {
    let plugin = checkout_and_payments(
        r#""service": {"from": "authority"},
           "policy": {"default": {}, "services": {"payments": {"data_plane": "native"}}},"#,
    )?;
    let mut request = routed(&plugin, "payments", "checkout")?;
    assert_eq!(request.request_header(OVERRIDE_HEADER), None);
    request.respond(200).finish()?;
    assert_eq!(
        plugin.metric("fulcrum_fail_open_total.reason.service_mismatch")?,
        1
    );
    // Routed to it, the native service passes uncounted.
    let mut request = routed(&plugin, "payments", "payments")?;
    assert_eq!(request.request_header(OVERRIDE_HEADER), None);
    request.respond(200).upstream("10.0.0.2:8080").finish()?;
    assert_eq!(
        plugin.metric("fulcrum_fail_open_total.reason.service_mismatch")?,
        1
    );
    Ok(())
}

/// A name from the client cannot be checked against a route Envoy did not resolve: no pick,
/// counted.
#[test]
fn a_client_named_service_with_no_routed_cluster_fails_open_counted() -> anyhow::Result<()> {
    let plugin = checkout_and_payments(r#""service": {"from": "header", "name": "x-service"},"#)?;
    let mut request = plugin
        .worker(0)
        .request()
        .header("x-service", "checkout")
        .header(OVERRIDE_HEADER, "10.0.0.9:1")
        .without_route()
        .send_headers()?;
    assert_eq!(request.request_header(OVERRIDE_HEADER), None);
    request.respond(200).finish()?;
    assert_eq!(plugin.metric("fulcrum_fail_open_total.reason.no_route")?, 1);
    Ok(())
}
