//! gRPC outcomes: a gRPC call fails with HTTP 200 and a `grpc-status`, in the trailers or, for
//! a trailers-only response, in the headers. The filter judges the endpoint on that status, as
//! Envoy's outlier detection does, and on the time to the response headers.

use fulcrum_core::OVERRIDE_HEADER;
use fulcrum_wasm_host::Plugin;

use crate::test_support::{filter, ms};

const GOOD: &str = "10.0.0.1:8080";
const BAD: &str = "10.0.0.2:8080";

/// Round robin over two endpoints, ejecting one after two consecutive failures.
fn plugin() -> anyhow::Result<Plugin> {
    filter()
        .configure(format!(
            r#"{{"endpoints": {{"checkout": [{{"address": "{GOOD}"}}, {{"address": "{BAD}"}}]}},
                "policy": {{"default": {{"load_balancer": {{"type": "round_robin"}},
                  "outlier_detection": {{"consecutive_failures": 2, "base_ejection_time": "10s",
                    "ejection_jitter_percent": 0, "max_ejection_percent": 50,
                    "panic_threshold_percent": 0}}}}}}}}"#
        ))
        .start()
}

/// How the picked endpoint answers a gRPC call.
#[derive(Clone, Copy)]
enum Answer {
    /// Headers, a message, then `grpc-status` in the trailers.
    Trailers(&'static str),
    /// A trailers-only response: `grpc-status` in the headers.
    HeadersOnly(&'static str),
}

/// One gRPC call for `checkout`; `answer_of` says how the picked endpoint answers. The pick.
fn call(plugin: &Plugin, answer_of: impl Fn(&str) -> Answer) -> anyhow::Result<String> {
    let mut request = plugin
        .worker(0)
        .request()
        .header(":authority", "checkout")
        .header(":path", "/shop.Checkout/Pay")
        .header(":method", "POST")
        .header("content-type", "application/grpc")
        .send_headers()?;
    let pick = request
        .request_header(OVERRIDE_HEADER)
        .ok_or_else(|| anyhow::anyhow!("no pick; logs:\n{}", plugin.logs_text()))?;
    let first = pick.split(',').next().unwrap_or_default().to_owned();
    let response = request
        .respond(200)
        .header("content-type", "application/grpc")
        .upstream(&first)
        .latency(ms(5));
    match answer_of(&first) {
        Answer::Trailers(status) => response
            .body(b"\0\0\0\0\0".to_vec())
            .trailer("grpc-status", status)
            .finish()?,
        Answer::HeadersOnly(status) => response.header("grpc-status", status).finish()?,
    };
    Ok(first)
}

fn ejections(plugin: &Plugin) -> anyhow::Result<u64> {
    plugin.metric(&format!(
        "fulcrum_endpoint_ejections_total.service.checkout.endpoint.{BAD}"
    ))
}

#[test]
fn a_grpc_unavailable_in_the_trailers_is_a_failure_that_ejects_the_endpoint() -> anyhow::Result<()>
{
    let plugin = plugin()?;
    let answer = |pick: &str| Answer::Trailers(if pick == BAD { "14" } else { "0" });
    for _ in 0..4 {
        call(&plugin, answer)?;
    }
    assert_eq!(ejections(&plugin)?, 1);
    let picks = (0..6)
        .map(|_| call(&plugin, answer))
        .collect::<anyhow::Result<Vec<_>>>()?;
    assert!(!picks.iter().any(|p| p == BAD), "{picks:?}");
    Ok(())
}

#[test]
fn a_trailers_only_grpc_failure_counts_too() -> anyhow::Result<()> {
    let plugin = plugin()?;
    let answer = |pick: &str| Answer::HeadersOnly(if pick == BAD { "4" } else { "0" });
    for _ in 0..4 {
        call(&plugin, answer)?;
    }
    assert_eq!(ejections(&plugin)?, 1, "DEADLINE_EXCEEDED is a failure");
    Ok(())
}

#[test]
fn grpc_ok_and_caller_errors_do_not_count_against_the_endpoint() -> anyhow::Result<()> {
    let plugin = plugin()?;
    let answer = |pick: &str| Answer::Trailers(if pick == BAD { "3" } else { "0" });
    for _ in 0..8 {
        call(&plugin, answer)?;
    }
    assert_eq!(
        ejections(&plugin)?,
        0,
        "INVALID_ARGUMENT is the caller's error (400), not the endpoint's"
    );
    Ok(())
}

#[test]
fn a_grpc_status_that_is_not_a_code_reads_as_unknown_and_is_counted() -> anyhow::Result<()> {
    let plugin = plugin()?;
    let answer = |pick: &str| Answer::Trailers(if pick == BAD { "not-a-code" } else { "0" });
    for _ in 0..4 {
        call(&plugin, answer)?;
    }
    assert_eq!(ejections(&plugin)?, 1, "UNKNOWN is a failure");
    assert!(
        plugin.metric("fulcrum_request_input_invalid_total.input.grpc_status")? >= 2,
        "{}",
        plugin.logs_text()
    );
    Ok(())
}
