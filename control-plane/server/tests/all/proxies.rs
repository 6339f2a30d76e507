//! `GET /v1/proxies`: the proxies whose filters poll `/v1/snapshot`, as the identification
//! headers of their polls name them, and the metrics that count them.

use reqwest::{StatusCode, header};
use serde_json::{Value, json};

use crate::support::{Fixture, endpoint, endpoints_file};

/// One poll as a filter sends it: its proxy at `version`, named `node_id`.
async fn poll(fixture: &Fixture, node_id: &[u8], version: &str, extra: &[(&str, &[u8])]) {
    let mut request = fixture
        .http
        .get(fixture.url("/v1/snapshot"))
        .header(header::ACCEPT, fulcrum_core::distribution::DELTA_ACCEPT)
        .header(header::IF_NONE_MATCH, format!("\"{version}\""))
        .header(
            "x-fulcrum-node-id",
            header::HeaderValue::from_bytes(node_id).expect("a value reqwest sends"),
        );
    for (name, value) in extra {
        request = request.header(
            *name,
            header::HeaderValue::from_bytes(value).expect("a value reqwest sends"),
        );
    }
    let status = request.send().await.expect("poll").status();
    assert!(
        status == StatusCode::OK || status == StatusCode::NOT_MODIFIED,
        "{status}"
    );
}

/// `name{labels} value` from a `/metrics` text, if exported.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().expect("a sample value"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_naming_their_proxy_are_listed_current_then_behind_once_a_new_version_is_served() {
    let one = |port: u16| {
        endpoints_file(&[("checkout", vec![endpoint(&format!("127.0.0.1:{port}"), "")])])
    };
    let fixture = Fixture::start(&one(19001)).await;
    let v1 = fixture.snapshot_version().await;

    poll(
        &fixture,
        b"sidecar~10.0.0.2~web-2.shop~shop.svc.cluster.local",
        &v1,
        &[("x-fulcrum-node-cluster", b"web.shop")],
    )
    .await;
    poll(
        &fixture,
        b"sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local",
        &v1,
        &[
            ("x-fulcrum-node-cluster", b"web.shop"),
            ("x-fulcrum-rejected", b"over_table_budget 0123abcd"),
        ],
    )
    .await;
    // An old filter (no identification) is answered and not listed; hostile values are
    // counted and ignored.
    let old = fixture
        .http
        .get(fixture.url("/v1/snapshot"))
        .send()
        .await
        .expect("poll");
    assert_eq!(old.status(), StatusCode::OK);
    poll(&fixture, b"web-\xff\xfe", &v1, &[]).await;
    poll(
        &fixture,
        b"api-1",
        &v1,
        &[
            ("x-fulcrum-node-cluster", b"api\tshop"),
            ("x-fulcrum-rejected", b"Not A Code"),
        ],
    )
    .await;

    let listed = fixture.get_json("/v1/proxies").await;
    assert_eq!(listed["snapshot_version"], v1.as_str());
    assert!(
        listed["replica"].as_str().is_some_and(|r| !r.is_empty()),
        "{listed}"
    );
    assert_eq!(listed["stale_after_seconds"], 1.5);
    assert_eq!(listed["expire_after_seconds"], 600.0);
    let proxies = listed["proxies"].as_array().expect("proxies");
    let ids: Vec<&str> = proxies
        .iter()
        .map(|p| p["node_id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        ids,
        [
            "api-1",
            "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local",
            "sidecar~10.0.0.2~web-2.shop~shop.svc.cluster.local"
        ],
        "sorted by node id"
    );
    let web_1 = &proxies[1];
    assert_eq!(web_1["node_cluster"], "web.shop");
    assert_eq!(web_1["version"], v1.as_str());
    assert_eq!(web_1["state"], "current");
    assert_eq!(
        web_1["last_rejection"],
        json!({"reason": "over_table_budget", "version": "0123abcd"})
    );
    assert!(
        web_1["age_seconds"]
            .as_f64()
            .is_some_and(|age| (0.0..1.5).contains(&age)),
        "{web_1}"
    );
    assert!(
        web_1["last_poll_unix_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 1_700_000_000_000),
        "{web_1}"
    );
    assert_eq!(
        proxies[0]["node_cluster"],
        Value::Null,
        "the invalid cluster is dropped"
    );
    assert_eq!(proxies[0]["last_rejection"], Value::Null);
    assert_eq!(proxies[2]["last_rejection"], Value::Null);

    let v2 = fixture.next_version(&one(19002), &v1).await;
    poll(
        &fixture,
        b"sidecar~10.0.0.2~web-2.shop~shop.svc.cluster.local",
        &v2,
        &[],
    )
    .await;
    let behind = fixture.get_json("/v1/proxies?state=behind").await;
    let behind: Vec<&str> = behind["proxies"]
        .as_array()
        .expect("proxies")
        .iter()
        .map(|p| p["node_id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        behind,
        [
            "api-1",
            "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local"
        ],
        "still at {v1} while {v2} is served"
    );
    let current = fixture.get_json("/v1/proxies?state=current").await;
    assert_eq!(current["proxies"][0]["version"], v2.as_str());
    assert_eq!(current["proxies"].as_array().map(Vec::len), Some(1));

    let unknown = fixture
        .http
        .get(fixture.url("/v1/proxies?state=ahead"))
        .send()
        .await
        .expect("get");
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);

    let metrics = fixture.metrics().await;
    assert_eq!(
        sample(&metrics, "fulcrum_proxies{state=\"current\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "fulcrum_proxies{state=\"behind\"}"),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "fulcrum_proxies{state=\"stale\"}"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "fulcrum_proxies_evicted_total"),
        Some(0.0),
        "{metrics}"
    );
    for reason in ["node_id", "node_cluster", "rejected"] {
        assert_eq!(
            sample(
                &metrics,
                &format!("fulcrum_proxy_reports_rejected_total{{reason=\"{reason}\"}}")
            ),
            Some(1.0),
            "{reason}: {metrics}"
        );
    }
}
