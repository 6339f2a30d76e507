//! The snapshot HTTP API the filters poll, and the health, readiness and metrics endpoints.

use fulcrum_core::Snapshot;
use fulcrum_test_support::eventually;
use reqwest::{StatusCode, header};

use crate::support::{Fixture, PATIENCE, endpoint, endpoints_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_is_served_with_its_version_as_etag_then_304_for_that_etag() {
    let fixture = Fixture::start(&endpoints_file(&[(
        "checkout",
        vec![
            endpoint("127.0.0.1:19001", ", zone: zone-a, tags: [canary]"),
            endpoint("127.0.0.1:19002", ""),
        ],
    )]))
    .await;
    let version = fixture.snapshot_version().await;

    let response = fixture
        .http
        .get(fixture.url("/v1/snapshot"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::OK);
    let etag = response.headers()[header::ETAG]
        .to_str()
        .expect("etag")
        .to_owned();
    assert_eq!(etag, format!("\"{version}\""));
    let snapshot: Snapshot = response.json().await.expect("snapshot JSON");
    assert_eq!(snapshot.version, version);
    assert_eq!(snapshot.services["checkout"].endpoints.len(), 2);
    assert!(
        snapshot.services["checkout"].endpoints[0]
            .tags()
            .contains("canary")
    );

    let response = fixture
        .http
        .get(fixture.url("/v1/snapshot"))
        .header(header::IF_NONE_MATCH, &etag)
        .send()
        .await
        .expect("conditional get");
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(response.headers()[header::ETAG], etag.as_str());
    assert!(response.bytes().await.expect("body").is_empty());

    fixture.write(&endpoints_file(&[(
        "checkout",
        vec![endpoint("127.0.0.1:19001", "")],
    )]));
    let changed = eventually(PATIENCE, "a new snapshot version", || async {
        let response = fixture
            .http
            .get(fixture.url("/v1/snapshot"))
            .header(header::IF_NONE_MATCH, &etag)
            .send()
            .await
            .expect("conditional get");
        (response.status() == StatusCode::OK).then_some(response)
    })
    .await
    .expect("a changed file yields a new version");
    let snapshot: Snapshot = changed.json().await.expect("snapshot JSON");
    assert_ne!(snapshot.version, version);
    assert_eq!(snapshot.services["checkout"].endpoints.len(), 1);

    let metrics = fixture.metrics().await;
    assert!(
        metrics.contains("fulcrum_cluster_endpoints{cluster=\"checkout\",health=\"healthy\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fulcrum_cluster_endpoints{cluster=\"checkout\",health=\"unhealthy\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "fulcrum_snapshot_info{{version=\"{}\"}} 1",
            snapshot.version
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("fulcrum_snapshots_published_total 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_first_valid_file() {
    let fixture = Fixture::start("services: [this is not a map]\n").await;
    let health = fixture
        .http
        .get(fixture.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), StatusCode::OK);
    // The invalid file has been read and refused well within this wait.
    tokio::time::sleep(crate::support::POLL_INTERVAL * 4).await;
    for path in ["/readyz", "/v1/snapshot"] {
        let response = fixture
            .http
            .get(fixture.url(path))
            .send()
            .await
            .expect("get");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
    }

    fixture.write(&endpoints_file(&[(
        "checkout",
        vec![endpoint("127.0.0.1:19001", "")],
    )]));
    let ready = eventually(PATIENCE, "ready", || async {
        let response = fixture
            .http
            .get(fixture.url("/readyz"))
            .send()
            .await
            .expect("readyz");
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
    assert!(ready.is_ok(), "ready once a valid file is loaded");
}

/// What a filter that takes deltas sends, as `(Accept, If-None-Match)`.
fn delta_request(fixture: &Fixture, version: &str) -> reqwest::RequestBuilder {
    fixture
        .http
        .get(fixture.url("/v1/snapshot"))
        .header(header::ACCEPT, fulcrum_core::distribution::DELTA_ACCEPT)
        .header(header::IF_NONE_MATCH, format!("\"{version}\""))
}

/// Three services; `checkout` gets one endpoint per port in `checkout_ports`, `cart` is
/// there only when `with_cart`.
fn three_services(checkout_ports: &[u16], with_cart: bool) -> String {
    let mut services = vec![
        (
            "checkout",
            checkout_ports
                .iter()
                .map(|port| endpoint(&format!("127.0.0.1:{port}"), ""))
                .collect(),
        ),
        ("search", vec![endpoint("127.0.0.1:19101", "")]),
    ];
    if with_cart {
        services.push(("cart", vec![endpoint("127.0.0.1:19201", "")]));
    }
    endpoints_file(&services)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_taking_deltas_gets_only_the_changed_and_removed_services_since_its_version() {
    let fixture = Fixture::start(&three_services(&[19001], true)).await;
    let v1 = fixture.snapshot_version().await;
    // The filter holds v1: it was answered with it (a version no proxy got is not kept).
    let held = delta_request(&fixture, &v1).send().await.expect("get");
    assert_eq!(held.status(), StatusCode::NOT_MODIFIED);
    let v2 = fixture
        .next_version(&three_services(&[19001, 19002], false), &v1)
        .await;

    let response = delta_request(&fixture, &v1).send().await.expect("get");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        fulcrum_core::distribution::DELTA_MEDIA_TYPE
    );
    assert_eq!(
        response.headers()[header::ETAG],
        format!("\"{v2}\"").as_str()
    );
    let delta: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(delta["version"], v2.as_str());
    assert_eq!(delta["base"], v1.as_str());
    let changed: Vec<&String> = delta["services"]
        .as_object()
        .expect("services")
        .keys()
        .collect();
    assert_eq!(changed, ["checkout"], "search did not change");
    assert_eq!(delta["removed"], serde_json::json!(["cart"]));
    assert_eq!(
        delta["services"]["checkout"]["endpoints"]
            .as_array()
            .expect("endpoints")
            .len(),
        2
    );

    let current = delta_request(&fixture, &v2).send().await.expect("get");
    assert_eq!(current.status(), StatusCode::NOT_MODIFIED);

    let metrics = fixture.metrics().await;
    assert_eq!(answer_metric(&metrics, "answers", "delta"), Some(1));
    assert_eq!(answer_metric(&metrics, "answers", "not_modified"), Some(2));
    assert_eq!(answer_metric(&metrics, "answers", "full"), None);
    let delta_bytes = answer_metric(&metrics, "answer_bytes", "delta").expect("delta bytes");
    assert!(delta_bytes > 0, "{metrics}");
}

/// `fulcrum_snapshot_{name}_total{kind="{kind}"}` from a `/metrics` text, if exported.
fn answer_metric(metrics: &str, name: &str, kind: &str) -> Option<u64> {
    let prefix = format!("fulcrum_snapshot_{name}_total{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|value| value.trim().parse().expect("a counter value"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_filter_and_a_filter_with_an_unknown_or_hostile_version_get_the_whole_snapshot() {
    let fixture = Fixture::start(&three_services(&[19001], true)).await;
    let v1 = fixture.snapshot_version().await;
    let v2 = fixture
        .next_version(&three_services(&[19001, 19002], true), &v1)
        .await;

    // An old filter: `Accept: application/json` and its version.
    let old = fixture
        .http
        .get(fixture.url("/v1/snapshot"))
        .header(header::ACCEPT, "application/json")
        .header(header::IF_NONE_MATCH, format!("\"{v1}\""))
        .send()
        .await
        .expect("get");
    assert_eq!(old.headers()[header::CONTENT_TYPE], "application/json");
    let whole: serde_json::Value = old.json().await.expect("JSON");
    assert!(whole.get("base").is_none(), "a whole snapshot has no base");
    assert_eq!(whole["services"].as_object().expect("services").len(), 3);
    assert_eq!(whole["version"], v2.as_str());

    let long_list = (0..200)
        .map(|i| format!("\"{i:016x}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let hostile = [
        "\"0000000000000000\"".to_owned(),
        "\"not a version at all\"".to_owned(),
        "W/\"\", ,,\"".to_owned(),
        long_list,
    ];
    for if_none_match in hostile {
        let response = fixture
            .http
            .get(fixture.url("/v1/snapshot"))
            .header(header::ACCEPT, fulcrum_core::distribution::DELTA_ACCEPT)
            .header(header::IF_NONE_MATCH, &if_none_match)
            .send()
            .await
            .expect("get");
        assert_eq!(response.status(), StatusCode::OK, "{if_none_match}");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let whole: serde_json::Value = response.json().await.expect("JSON");
        assert!(whole.get("base").is_none());
        assert_eq!(whole["services"].as_object().expect("services").len(), 3);
    }
    // An operator sees pollers that keep needing the whole snapshot.
    let metrics = fixture.metrics().await;
    assert_eq!(answer_metric(&metrics, "answers", "full"), Some(5));
    assert_eq!(answer_metric(&metrics, "answers", "delta"), None);
}
