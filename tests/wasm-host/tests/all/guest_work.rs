//! What a request costs in the filter's own instructions: WebAssembly operators the guest
//! executes (wasmtime's fuel), counted the same on every machine and run, where time is not.
//!
//! Envoy's V8 runs the same operators, so every one saved is saved on every request of every
//! sidecar. These tests hold a successful request to a budget, as `host_calls` holds it to
//! nine host calls, so that a change that adds work to the hot path (a hash table lookup, a
//! parse, an allocation) has to say why here. The budget has a tenth of headroom for
//! compiler changes. Measured on 2026-12-04 (BENCHMARKS.md, "The guest's own work, counted in
//! operators"): 18,732 operators per request through `{"from": "authority"}` before the cuts
//! of that day, 15,662 after (14,728 through `{"from": "route_cluster"}`); the do-nothing
//! floor filter's stream is 1,283.

use fulcrum_wasm_host::Plugin;

use crate::test_support::{filter, request_answered_by_the_pick};

/// The filter under its default policy (least request by power of two choices, the default
/// outlier detection) with two endpoints, the service named by `service_source`.
fn plugin(service_source: &str) -> Plugin {
    filter()
        .configure(format!(
            r#"{{"service": {service_source},
                 "endpoints": {{"checkout": [{{"address": "10.0.0.1:8080"}},
                                             {{"address": "10.0.0.2:8080"}}]}}}}"#
        ))
        .start()
        .expect("the filter starts")
}

/// Operators the guest executes for one request for `checkout` answered 200 by the pick.
fn operators_for_one_request(plugin: &Plugin) -> u64 {
    let before = plugin.worker(0).guest_fuel();
    request_answered_by_the_pick(plugin, 200, &[]);
    plugin.worker(0).guest_fuel() - before
}

/// The mean over 100 requests once every endpoint's stats exist (the first pick of an
/// endpoint defines them).
fn steady_operators(plugin: &Plugin) -> u64 {
    for _ in 0..20 {
        operators_for_one_request(plugin);
    }
    (0..100)
        .map(|_| operators_for_one_request(plugin))
        .sum::<u64>()
        / 100
}

#[test]
fn a_successful_request_executes_at_most_17_500_guest_operators() {
    for (source, budget) in [
        (r#"{"from": "authority"}"#, 17_500),
        (r#"{"from": "route_cluster"}"#, 16_500),
    ] {
        let operators = steady_operators(&plugin(source));
        eprintln!("service {source}: {operators} guest operators per successful request");
        assert!(
            operators <= budget,
            "service {source}: {operators} operators per request, over the budget of {budget}"
        );
    }
}

#[test]
fn guest_fuel_counts_the_guests_work_and_nothing_while_it_is_idle() {
    let plugin = plugin(r#"{"from": "authority"}"#);
    let worker = plugin.worker(0);
    let idle = worker.guest_fuel();
    assert_eq!(worker.guest_fuel(), idle, "no callback, no operator");
    assert!(operators_for_one_request(&plugin) > 1_000);
}
