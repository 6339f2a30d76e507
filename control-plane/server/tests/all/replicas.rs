//! Two control-plane replicas sharing the policy through the status ConfigMap, against one
//! fake API server, as the Istio Deployment runs them: they serve the same policy version, a
//! rollback on one is served by both, and it outlives a restart of both while the operator's
//! ConfigMap holds an invalid policy. Every snapshot answer names its replica, so each filter
//! follows one (`fulcrum_core::replica`).

use std::collections::BTreeMap;

use fulcrum_control_plane::{ControlPlane, OptionalSources, PolicySource};
use fulcrum_test_support::{eventually, kube_api::FakeApiServer};
use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde_json::Value;

use crate::support::{PATIENCE, endpoint, endpoints_file, http_client, loopback_config};

fn policy_map(text: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some("fulcrum-policy".to_owned()),
            namespace: Some("fulcrum-system".to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "policy.yaml".to_owned(),
            text.to_owned(),
        )])),
        ..ConfigMap::default()
    }
}

fn policy_yaml(failures: u32) -> String {
    format!("default:\n  outlier_detection:\n    consecutive_failures: {failures}\n")
}

fn failures(snapshot: &Value) -> Option<u64> {
    snapshot["policy"]["default"]["outlier_detection"]["consecutive_failures"].as_u64()
}

async fn replica(kube: &FakeApiServer, static_file: &std::path::Path) -> ControlPlane {
    ControlPlane::start_with(
        loopback_config(Some(static_file.to_owned())),
        OptionalSources {
            policy: Some(PolicySource::ConfigMap {
                namespace: "fulcrum-system".to_owned(),
                name: "fulcrum-policy".to_owned(),
                key: "policy.yaml".to_owned(),
                status: "fulcrum-policy-accepted".to_owned(),
            }),
            kube_client: Some(kube.client()),
            ..OptionalSources::default()
        },
    )
    .await
    .expect("a replica starts")
}

/// `/v1/snapshot` of `replica` once `wanted` holds for it.
async fn snapshot_where(
    replica: &ControlPlane,
    what: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let http = http_client();
    let url = format!("http://{}/v1/snapshot", replica.http_address());
    eventually(PATIENCE, what, || async {
        let snapshot: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
        wanted(&snapshot).then_some(snapshot)
    })
    .await
    .unwrap_or_else(|_| panic!("no snapshot with {what} within {PATIENCE:?}"))
}

#[tokio::test]
async fn replicas_serve_one_policy_and_a_rollback_on_one_outlives_a_restart_of_both() {
    let kube = FakeApiServer::start().await;
    kube.apply(&policy_map(&policy_yaml(3)));
    let dir = tempfile::tempdir().expect("tempdir");
    let static_file = dir.path().join("endpoints.yaml");
    std::fs::write(
        &static_file,
        endpoints_file(&[("web", vec![endpoint("127.0.0.1:9001", "")])]),
    )
    .expect("write endpoints");
    let replicas = [
        replica(&kube, &static_file).await,
        replica(&kube, &static_file).await,
    ];
    for replica in &replicas {
        snapshot_where(replica, "the first policy", |s| failures(s) == Some(3)).await;
    }
    kube.apply(&policy_map(&policy_yaml(4)));
    let mut versions = Vec::new();
    for replica in &replicas {
        let snapshot = snapshot_where(replica, "the edit", |s| failures(s) == Some(4)).await;
        versions.push(snapshot["version"].clone());
    }
    assert_eq!(versions[0], versions[1], "both replicas serve one version");

    let rollback = http_client()
        .post(format!(
            "http://{}/v1/policy/rollback?version=1",
            replicas[0].admin_address()
        ))
        .send()
        .await
        .expect("request");
    assert_eq!(rollback.status(), reqwest::StatusCode::OK);
    let mut rolled_back = Vec::new();
    for replica in &replicas {
        let snapshot = snapshot_where(replica, "the rollback", |s| failures(s) == Some(3)).await;
        rolled_back.push(snapshot["version"].clone());
    }
    assert_eq!(rolled_back[0], rolled_back[1]);

    // Both restart while the operator's ConfigMap holds an invalid policy.
    kube.apply(&policy_map(
        "default:\n  outlier_detection:\n    max_ejection_percent: 150\n",
    ));
    for replica in replicas {
        replica.shutdown().await;
    }
    let replicas = [
        replica(&kube, &static_file).await,
        replica(&kube, &static_file).await,
    ];
    let http = http_client();
    for replica in &replicas {
        let snapshot =
            snapshot_where(replica, "the recorded rollback", |s| failures(s) == Some(3)).await;
        assert_eq!(
            snapshot["version"], rolled_back[0],
            "the same version as before"
        );
        let ready = http
            .get(format!("http://{}/readyz", replica.http_address()))
            .send()
            .await
            .expect("request");
        assert_eq!(ready.status(), reqwest::StatusCode::OK);
        let history: Value = http
            .get(format!(
                "http://{}/v1/policy/history",
                replica.http_address()
            ))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        let kept: Vec<u64> = history
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|applied| applied["version"].as_u64())
            .collect();
        assert_eq!(kept, [1, 2, 3]);
    }
    for replica in replicas {
        replica.shutdown().await;
    }
}

#[tokio::test]
async fn every_snapshot_answer_names_its_replica_and_replicas_have_distinct_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let static_file = dir.path().join("endpoints.yaml");
    std::fs::write(
        &static_file,
        endpoints_file(&[("web", vec![endpoint("127.0.0.1:9001", "")])]),
    )
    .expect("write endpoints");
    let http = http_client();
    let mut names = Vec::new();
    for _ in 0..2 {
        let replica = ControlPlane::start(loopback_config(Some(static_file.clone())))
            .await
            .expect("a replica starts");
        let url = format!("http://{}/v1/snapshot", replica.http_address());
        let full = eventually(PATIENCE, "a snapshot", || async {
            let response = http.get(&url).send().await.ok()?;
            (response.status() == reqwest::StatusCode::OK).then_some(response)
        })
        .await
        .expect("a snapshot");
        let name = full.headers()["x-fulcrum-replica"].clone();
        let etag = full.headers()[reqwest::header::ETAG].clone();
        let unchanged = http
            .get(&url)
            .header(reqwest::header::IF_NONE_MATCH, etag)
            .send()
            .await
            .expect("request");
        assert_eq!(unchanged.status(), reqwest::StatusCode::NOT_MODIFIED);
        assert_eq!(unchanged.headers()["x-fulcrum-replica"], name);
        names.push(name);
        replica.shutdown().await;
    }
    assert_ne!(names[0], names[1]);
}
