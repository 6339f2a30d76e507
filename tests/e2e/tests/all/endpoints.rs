//! `fulcrum endpoints` against real Envoys (issue #17): two proxies run the filter and poll
//! one control plane; a backend made to fail is ejected by the proxy that sends it traffic,
//! and asking the control plane for that proxy's view of the service (the
//! `GET /v1/proxies/{node}/endpoints` the CLI calls) shows the endpoint open with its reason
//! and time until re-admission, while the other proxy, which sent it nothing, holds it closed.

use std::time::Duration;

use fulcrum_control_plane::{Config, ControlPlane};
use fulcrum_e2e::{Proxy, SERVICE, backends, envoy_with_control_plane};
use fulcrum_example_backend::Fault;
use fulcrum_test_support::eventually;
use serde_json::{Value, json};

/// Envoy start-up and the first polls, at 200 ms each.
const PATIENCE: Duration = Duration::from_secs(15);

async fn node_id(proxy: &Proxy) -> String {
    let info: Value =
        serde_json::from_str(&proxy.envoy.admin_get("/server_info").await.unwrap()).unwrap();
    info["node"]["id"].as_str().unwrap().to_owned()
}

/// What `fulcrum endpoints SERVICE --proxy NODE -o json` prints: the control plane's answer.
async fn endpoints(http: std::net::SocketAddr, node: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("http://{http}/v1/proxies/{node}/endpoints"))
        .query(&[("service", SERVICE), ("wait", "10")])
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The aggregate row of `address` in a report.
fn row<'r>(report: &'r Value, address: &str) -> &'r Value {
    report["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == address)
        .unwrap_or_else(|| panic!("{address} in {report:#}"))
}

#[tokio::test]
async fn endpoints_shows_an_ejected_endpoint_with_its_reason_on_the_proxy_that_ejected_it() {
    let backends = backends(2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.json");
    let addresses: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let listed = fulcrum_e2e::endpoints_json(&addresses);
    std::fs::write(
        &file,
        json!({"services": {SERVICE: {"endpoints": listed}}}).to_string(),
    )
    .unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let control_plane = ControlPlane::start(Config {
        static_file: Some(file),
        poll_interval: Duration::from_millis(100),
        xds_address: any,
        http_address: any,
        debounce: Duration::from_millis(20),
        ..Config::default()
    })
    .await
    .unwrap();
    let (xds, http) = (control_plane.xds_address(), control_plane.http_address());
    let policy = json!({
        "load_balancer": {"type": "round_robin"},
        "outlier_detection": {
            "consecutive_gateway_errors": 3,
            "consecutive_failures": 0,
            "base_ejection_time": "60s",
            "ejection_jitter_percent": 0,
            "max_ejection_percent": 50
        }
    });
    let failing = envoy_with_control_plane(xds, http, policy.clone())
        .await
        .unwrap();
    let quiet = envoy_with_control_plane(xds, http, policy).await.unwrap();
    let (failing_id, quiet_id) = (node_id(&failing).await, node_id(&quiet).await);
    failing
        .wait_for_endpoints(&addresses, PATIENCE)
        .await
        .expect("the failing proxy learns both endpoints");
    quiet
        .wait_for_endpoints(&addresses, PATIENCE)
        .await
        .expect("the quiet proxy learns both endpoints");
    quiet.send(4).await;

    backends[0]
        .set_fault(Fault {
            error_rate: 1.0,
            ..Fault::default()
        })
        .unwrap();
    failing.send(20).await;

    let dead = backends[0].addr.to_string();
    let report = eventually(PATIENCE, "the failing proxy reports the ejection", || {
        let (node, dead) = (failing_id.clone(), dead.clone());
        async move {
            let (status, report) = endpoints(http, &node).await;
            (status == 200 && row(&report, &dead)["open_on"] == 1).then_some(report)
        }
    })
    .await
    .unwrap_or_else(|error| panic!("{error}"));
    let ejected = row(&report, &dead);
    assert_eq!(
        ejected["reasons"],
        json!(["consecutive_gateway_errors"]),
        "{report:#}"
    );
    let readmit = ejected["readmit_in_ms"].as_u64().unwrap();
    assert!(readmit > 0 && readmit <= 60_000, "{report:#}");
    let healthy = row(&report, &backends[1].addr.to_string());
    assert_eq!(healthy["open_on"], 0, "{report:#}");
    assert!(healthy["picks"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(
        report["workers"].as_array().unwrap().len(),
        1,
        "concurrency 1"
    );

    let (status, report) = endpoints(http, &quiet_id).await;
    assert_eq!(status, 200, "{report:#}");
    assert_eq!(row(&report, &dead)["open_on"], 0, "{report:#}");

    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fulcrum_endpoint_reports_accepted_total"),
        "{metrics}"
    );
    control_plane.shutdown().await;
}
