//! What a request costs in host calls, the unit Envoy's V8 charges for.
//!
//! A do-nothing proxy-wasm filter makes no host call; every call fulcrum's filter makes on a
//! request crosses the wasm boundary and runs Envoy code (a header-map lookup, a property
//! resolved through Envoy's attribute tables), which costs more than the pick itself. These
//! tests hold the filter to a budget per request for each way of naming the service, so a
//! change that adds a call to the hot path has to say why here. The budget of a successful
//! request through `{"from": "authority"}` (nine):
//!
//! - request headers: probe the override header (removed only when present), `:authority`,
//!   `xds.cluster_name` (the routed cluster must be the service), the clock, write the pick;
//! - response headers: `content-type` (gRPC or not), `response.code`, `upstream.address`
//!   (who served), the clock.
//!
//! A fixed service name or the routed cluster as the name saves the header read. Response
//! flags are read only when the answer is not a success from the pick, and pick counts reach
//! Envoy's stats on the tick, not per request. A failure also reads the service's shared
//! ejection record and writes its failure count there (counted once per proxy); while the
//! count is not reset, each request reads the record before its pick (so an ejection judged
//! by another worker is seen before this one fails on it), and the success that resets it
//! reads and writes it once more; the successes after that cost nothing more.
//!
//! Explaining picks (`explain_picks`, off by default and then free) costs, per request, one
//! header lookup under `on_request`, and when a pick is explained the debug log line and the
//! response header.

use fulcrum_wasm_host::Plugin;

use crate::test_support::{filter, request_answered_by_the_pick};

fn plugin(service_source: &str) -> Plugin {
    explaining(service_source, "off")
}

/// [`plugin`] with `explain_picks: explain`.
fn explaining(service_source: &str, explain: &str) -> Plugin {
    filter()
        .configure(format!(
            r#"{{"service": {service_source}, "explain_picks": "{explain}",
                 "endpoints": {{"checkout": [{{"address": "10.0.0.1:8080"}},
                                             {{"address": "10.0.0.2:8080"}}]}}}}"#
        ))
        .start()
        .expect("the filter starts")
}

/// Host calls of one request for `checkout` answered `status` by the endpoint picked.
fn calls_for_one_request(plugin: &Plugin, status: u16) -> u64 {
    calls_for_one_request_with(plugin, status, &[])
}

/// [`calls_for_one_request`] with extra request headers.
fn calls_for_one_request_with(plugin: &Plugin, status: u16, headers: &[(&str, &str)]) -> u64 {
    let before = plugin.worker(0).host_calls();
    request_answered_by_the_pick(plugin, status, headers);
    plugin.worker(0).host_calls() - before
}

/// Host calls of a request once both endpoints' stats exist (the first pick of an endpoint
/// defines them: 20 picks miss one of two endpoints with odds of 2 in a million).
fn steady_calls(plugin: &Plugin, status: u16) -> u64 {
    for _ in 0..20 {
        calls_for_one_request(plugin, 200);
    }
    calls_for_one_request(plugin, status)
}

#[test]
fn a_successful_request_costs_at_most_nine_host_calls_and_eight_without_a_name_header() {
    for (source, budget) in [
        (r#"{"from": "authority"}"#, 9),
        (r#"{"from": "header", "name": "x-service"}"#, 9),
        (r#"{"from": "fixed", "name": "checkout"}"#, 8),
        (r#"{"from": "route_cluster"}"#, 8),
    ] {
        let calls = steady_calls(&plugin(source), 200);
        eprintln!("service {source}: {calls} host calls per successful request");
        assert_eq!(calls, budget, "service {source}");
    }
}

#[test]
fn a_failed_request_also_reads_the_response_flags() {
    let plugin = plugin(r#"{"from": "authority"}"#);
    let success = steady_calls(&plugin, 200);
    let failure = steady_calls(&plugin, 503);
    eprintln!("{success} host calls per success, {failure} per 503");
    // The flags, the shared record that a possible failure consults first, and the write
    // of its failure count.
    assert_eq!(failure, success + 3);
}

#[test]
fn the_first_success_after_a_failure_resets_the_shared_failure_count_and_the_next_costs_nothing_more()
 {
    let plugin = filter()
        .configure(r#"{"endpoints": {"checkout": [{"address": "10.0.0.1:8080"}]}}"#)
        .start()
        .expect("the filter starts");
    let success = steady_calls(&plugin, 200);
    calls_for_one_request(&plugin, 503);
    let reset = calls_for_one_request(&plugin, 200);
    let after = calls_for_one_request(&plugin, 200);
    eprintln!("{success} host calls per success, {reset} for the first after a 503");
    assert_eq!(
        reset,
        success + 3,
        "a read before the pick, a read and a write to reset the count"
    );
    assert_eq!(after, success);
}

#[test]
fn explaining_costs_a_lookup_on_request_and_a_log_line_and_a_header_per_explained_pick() {
    let source = r#"{"from": "route_cluster"}"#;
    let off = steady_calls(&plugin(source), 200);
    let on_request = explaining(source, "on_request");
    let not_asked = steady_calls(&on_request, 200);
    let asked = calls_for_one_request_with(&on_request, 200, &[("x-fulcrum-explain", "1")]);
    let always = steady_calls(&explaining(source, "always"), 200);
    eprintln!("{off} host calls off, {not_asked}/{asked} on request, {always} always");
    assert_eq!(not_asked, off + 1, "the lookup of x-fulcrum-explain");
    assert_eq!(
        asked,
        off + 3,
        "the lookup, the debug line, the response header"
    );
    assert_eq!(always, off + 2, "the debug line, the response header");
}
