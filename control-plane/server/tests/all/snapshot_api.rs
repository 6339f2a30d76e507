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
            .tags
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
        metrics.contains("fulcrum_snapshot_updates_total 2"),
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
