//! `fulcrum endpoints` against a running control plane: a proxy polls as a filter does and
//! answers the diagnostics request its poll answer carries with a report built by the core
//! functions the filter uses; the e2e suite runs the same through real Envoys.

use fulcrum_core::{
    Health,
    diagnostics::{BreakerKind, EndpointDiagnostics},
};

use crate::support::Served;

const NODE: &str = "sidecar~10.0.0.7~cart-1.shop";

fn endpoint(
    address: &str,
    breaker: BreakerKind,
    reason: Option<&str>,
    picks: u64,
) -> EndpointDiagnostics {
    EndpointDiagnostics {
        address: address.parse().expect("an address"),
        health: Health::Healthy,
        weight: 1,
        breaker,
        reason: reason.map(str::to_owned),
        ejections: u32::from(reason.is_some()),
        readmit_in_ms: reason.map(|_| 9_000),
        latency_ms: Some(3.0),
        inflight: 0,
        picks,
        consecutive_failures: 0,
        window_requests: 0,
        window_failures: 0,
    }
}

#[test]
fn endpoints_shows_the_proxy_view_with_an_ejected_endpoint_and_its_reason() {
    let served = Served::start("default: {retry: 1}\n");
    let version = served.snapshot_version();
    let _proxy = served.answer_diagnostics_as(
        NODE,
        &version,
        vec![
            (
                0,
                vec![
                    endpoint(
                        "127.0.0.1:19002",
                        BreakerKind::Open,
                        Some("consecutive_gateway_errors"),
                        0,
                    ),
                    endpoint("127.0.0.1:19001", BreakerKind::Closed, None, 4),
                ],
            ),
            (
                1,
                vec![
                    endpoint("127.0.0.1:19002", BreakerKind::Open, Some("shared"), 0),
                    endpoint("127.0.0.1:19001", BreakerKind::Closed, None, 4),
                ],
            ),
        ],
    );

    let run = served.fulcrum(&["endpoints", "checkout", "--proxy", NODE, "--wait", "10"]);
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines[0].starts_with(&format!(
            "proxy {NODE}, service checkout: 2 worker(s) reported"
        )),
        "{run:?}"
    );
    let ejected = lines
        .iter()
        .find(|line| line.starts_with("127.0.0.1:19002"))
        .expect("the ejected endpoint is listed");
    assert!(
        ejected.contains(" open ") && ejected.contains("consecutive_gateway_errors,shared"),
        "{run:?}"
    );

    // Without --proxy, the one proxy polling is asked; -o json has every worker.
    let run = served.fulcrum(&["endpoints", "checkout", "-o", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let report: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(report["node_id"], NODE);
    assert_eq!(report["workers"].as_array().map(Vec::len), Some(2));
    assert_eq!(report["endpoints"][0]["picks"], 8);
    assert_eq!(report["endpoints"][1]["open_on"], 2);
    assert_eq!(report["endpoints"][1]["readmit_in_ms"], 9_000);
}

#[test]
fn endpoints_says_so_and_fails_when_the_proxy_never_reports() {
    let served = Served::start("default: {retry: 1}\n");
    let version = served.snapshot_version();
    // A filter that predates diagnostics: it polls but never answers.
    let _proxy = served.keep_polling_as(NODE, &version);
    let run = served.fulcrum(&["endpoints", "checkout", "--proxy", NODE, "--wait", "1"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("sent no endpoint diagnostics within 1 s"),
        "{run:?}"
    );
}

#[test]
fn endpoints_names_a_proxy_that_does_not_poll_and_refuses_a_bad_service_name() {
    let served = Served::start("default: {retry: 1}\n");
    let run = served.fulcrum(&["endpoints", "checkout", "--proxy", "nobody"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("has not polled this replica"),
        "{run:?}"
    );
    let run = served.fulcrum(&["endpoints", "checkout"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("no proxy polls"), "{run:?}");
    served.poll_as(NODE, None);
    let run = served.fulcrum(&["endpoints", "two words", "--proxy", NODE]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("printable ASCII"), "{run:?}");
}
