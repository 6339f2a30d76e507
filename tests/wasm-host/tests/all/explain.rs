//! Why this pick (`explain_picks`): which responses carry `x-fulcrum-pick`, what it names,
//! that it replaces a copy the upstream sent, that a local 503 says what the service was short
//! of, and that nothing of the request that asked for it is ever echoed.

use fulcrum_core::{OVERRIDE_HEADER, service::MAX_EXPLANATION_BYTES};
use fulcrum_wasm_host::{LogLevel, Plugin};

use crate::test_support::filter;

const EXPLANATION: &str = "x-fulcrum-pick";
const ASK: &str = "x-fulcrum-explain";

/// Two endpoints of `checkout` under peak EWMA, explained under `mode` (none: the default).
fn plugin(mode: Option<&str>) -> Plugin {
    let explain = mode.map_or(String::new(), |mode| {
        format!(r#", "explain_picks": "{mode}""#)
    });
    filter()
        .configure(format!(
            r#"{{"endpoints": {{"checkout": [{{"address": "10.0.0.1:8080"}},
                                             {{"address": "10.0.0.2:8080"}}]}},
                "policy": {{"default": {{"load_balancer": {{"type": "peak_ewma"}}, "retry": 1}}}}{explain}}}"#
        ))
        .start()
        .expect("the filter starts")
}

/// One request for `checkout` with `headers`, answered 200 by the pick; returns the pick and
/// the response's `x-fulcrum-pick`.
fn explained(plugin: &Plugin, headers: &[(&str, &[u8])]) -> (String, Option<String>) {
    let mut builder = plugin.worker(0).request().header(":authority", "checkout");
    for (name, value) in headers {
        builder = builder.header_bytes(name, value);
    }
    let mut request = builder.send_headers().expect("request headers");
    let header = request.request_header(OVERRIDE_HEADER).expect("a pick");
    let pick = header.split(',').next().expect("an address").to_owned();
    request
        .respond(200)
        .upstream(&pick)
        .finish()
        .expect("the response");
    (pick, request.response_header(EXPLANATION))
}

#[test]
fn always_explains_every_pick_naming_the_endpoint_the_algorithm_and_the_rival() {
    let plugin = plugin(Some("always"));
    for _ in 0..4 {
        let (pick, explanation) = explained(&plugin, &[]);
        let explanation = explanation.expect("every response is explained");
        let rival = if pick == "10.0.0.1:8080" {
            "10.0.0.2:8080"
        } else {
            "10.0.0.1:8080"
        };
        assert!(
            explanation.starts_with(&format!(
                "endpoint={pick}; algorithm=peak_ewma; via=algorithm; candidates=2 of 2; \
                 excluded=none; panic=no; compared_with={rival}; "
            )),
            "{explanation}"
        );
        assert!(
            explanation.ends_with(&format!("; retry={rival}")),
            "{explanation}"
        );
        assert!(
            plugin.logged(
                LogLevel::Debug,
                &format!("fulcrum: pick for service checkout: {explanation}")
            ),
            "the same line is logged at debug: {}",
            plugin.logs_text()
        );
    }
}

#[test]
fn on_request_explains_only_the_requests_that_carry_x_fulcrum_explain() {
    let plugin = plugin(Some("on_request"));
    assert_eq!(explained(&plugin, &[]).1, None);
    let (pick, explanation) = explained(&plugin, &[(ASK, b"1")]);
    let explanation = explanation.expect("asked for");
    assert!(
        explanation.starts_with(&format!("endpoint={pick}; algorithm=peak_ewma; ")),
        "{explanation}"
    );
    assert!(
        explained(&plugin, &[(ASK, b"")]).1.is_some(),
        "any value asks"
    );
}

#[test]
fn by_default_no_response_is_explained_even_when_asked() {
    let plugin = plugin(None);
    assert_eq!(explained(&plugin, &[]).1, None);
    assert_eq!(explained(&plugin, &[(ASK, b"1")]).1, None);
    assert!(!plugin.logged(LogLevel::Debug, "fulcrum: pick for service"));
}

#[test]
fn an_explanation_sent_by_the_upstream_is_replaced_by_the_filter_s() {
    let plugin = plugin(Some("always"));
    let mut request = plugin
        .worker(0)
        .request()
        .header(":authority", "checkout")
        .send_headers()
        .expect("request headers");
    let header = request.request_header(OVERRIDE_HEADER).expect("a pick");
    let pick = header.split(',').next().expect("an address").to_owned();
    request
        .respond(200)
        .header(EXPLANATION, "endpoint=6.6.6.6:1; algorithm=forged")
        .upstream(&pick)
        .finish()
        .expect("the response");
    let explanation = request.response_header(EXPLANATION).expect("explained");
    assert!(
        explanation.starts_with(&format!("endpoint={pick}; algorithm=peak_ewma")),
        "{explanation}"
    );
    assert!(!explanation.contains("forged"), "{explanation}");
}

#[test]
fn a_hostile_request_asking_for_an_explanation_still_gets_one_with_none_of_its_bytes() {
    let plugin = plugin(Some("on_request"));
    // 60 KiB (Envoy's default request-header limit): not UTF-8, with a marker to look for.
    let mut hostile = vec![0xff_u8; 60 << 10];
    hostile[..6].copy_from_slice(b"MARKER");
    let (pick, explanation) =
        explained(&plugin, &[(ASK, hostile.as_slice()), (":path", b"/MARKER")]);
    let explanation = explanation.expect("asked for");
    assert!(
        explanation.starts_with(&format!("endpoint={pick}; ")),
        "{explanation}"
    );
    assert!(explanation.len() <= MAX_EXPLANATION_BYTES);
    assert!(
        explanation.is_ascii() && !explanation.contains("MARKER"),
        "{explanation}"
    );
    assert!(
        !plugin.logs_text().contains("MARKER"),
        "{}",
        plugin.logs_text()
    );
}

#[test]
fn a_local_503_says_how_many_endpoints_were_ejected() {
    let plugin = filter()
        .configure(
            r#"{"endpoints": {"checkout": [{"address": "10.0.0.1:8080"}]},
                "explain_picks": "always",
                "policy": {"default": {"load_balancer": {"type": "round_robin"},
                  "on_no_endpoint": "fail_fast",
                  "outlier_detection": {"consecutive_failures": 1, "base_ejection_time": "10s",
                    "ejection_jitter_percent": 0, "max_ejection_percent": 100,
                    "panic_threshold_percent": 0}}}}"#,
        )
        .start()
        .expect("the filter starts");
    let mut failing = plugin
        .worker(0)
        .request()
        .header(":authority", "checkout")
        .send_headers()
        .expect("request headers");
    failing
        .respond(503)
        .upstream("10.0.0.1:8080")
        .finish()
        .expect("the response");
    let rejected = plugin
        .worker(0)
        .request()
        .header(":authority", "checkout")
        .send_headers()
        .expect("request headers");
    let reply = rejected.local_response().expect("a local 503");
    assert_eq!(reply.status, 503);
    let header = |name: &str| {
        reply
            .headers
            .iter()
            .find(|(key, _)| key == name.as_bytes())
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    };
    assert_eq!(header("x-fulcrum-reason").as_deref(), Some("all_ejected"));
    assert_eq!(
        header(EXPLANATION).as_deref(),
        Some("candidates=0 of 1; excluded=ejected:1; panic=no")
    );
}
