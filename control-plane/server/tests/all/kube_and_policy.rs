//! The Kubernetes source and the policy source wired into the control plane: EndpointSlices
//! from the fake API server and a policy file end up in `/v1/snapshot`, and the policy history
//! and rollback endpoints (the rollback on the admin listener) work on the same store.

use std::time::Duration;

use fulcrum_control_plane::{ControlPlane, OptionalSources, PolicySource};
use fulcrum_kube_source::KubeOptions;
use fulcrum_test_support::{
    eventually,
    kube_api::{
        FakeApiServer,
        objects::{endpoint_slice, ready, service},
    },
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::Value;

use crate::support::{PATIENCE, endpoint, endpoints_file, http_client, loopback_config};

const CHECKOUT: &str = "outbound|80||checkout.shop.svc.cluster.local";

/// Writes an endpoints file with one `local` service into `dir`; its path.
fn local_endpoints(dir: &std::path::Path) -> std::path::PathBuf {
    let static_file = dir.join("endpoints.yaml");
    std::fs::write(
        &static_file,
        endpoints_file(&[("local", vec![endpoint("127.0.0.1:9001", "")])]),
    )
    .expect("write endpoints");
    static_file
}

fn policy_yaml(failures: u32) -> String {
    format!("default:\n  outlier_detection:\n    consecutive_failures: {failures}\n")
}

struct Running {
    control_plane: ControlPlane,
    http: reqwest::Client,
    policy_file: std::path::PathBuf,
    _kube: FakeApiServer,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start() -> Self {
        let kube = FakeApiServer::start().await;
        kube.serve::<Service>();
        kube.serve::<EndpointSlice>();
        kube.apply(&service("shop", "checkout", &[("http", 80)]));
        kube.apply(&endpoint_slice(
            "shop",
            "checkout-a",
            "checkout",
            &[("http", 8080)],
            vec![ready("10.1.0.1")],
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let static_file = local_endpoints(dir.path());
        let policy_file = dir.path().join("policy.yaml");
        std::fs::write(&policy_file, policy_yaml(3)).expect("write policy");
        let control_plane = ControlPlane::start_with(
            loopback_config(Some(static_file)),
            OptionalSources {
                kubernetes: Some(KubeOptions {
                    namespaces: vec!["shop".to_owned()],
                    ..KubeOptions::default()
                }),
                policy: Some(PolicySource::File(policy_file.clone())),
                kube_client: Some(kube.client()),
                ..OptionalSources::default()
            },
        )
        .await
        .expect("control plane starts");
        let http = http_client();
        Self {
            control_plane,
            http,
            policy_file,
            _kube: kube,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.control_plane.http_address())
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.control_plane.admin_address())
    }

    async fn get_json(&self, path: &str) -> Value {
        let response = self.http.get(self.url(path)).send().await.expect("request");
        response.json().await.unwrap_or(Value::Null)
    }

    /// The snapshot once `wanted` holds for it.
    async fn snapshot_where(&self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        eventually(PATIENCE, what, || async {
            let snapshot = self.get_json("/v1/snapshot").await;
            wanted(&snapshot).then_some(snapshot)
        })
        .await
        .unwrap_or_else(|_| panic!("no snapshot with {what} within {PATIENCE:?}"))
    }
}

fn failures(snapshot: &Value) -> Option<u64> {
    snapshot["policy"]["default"]["outlier_detection"]["consecutive_failures"].as_u64()
}

#[tokio::test]
async fn snapshot_serves_kubernetes_endpoints_with_the_policy_and_rollback_restores_a_version() {
    let running = Running::start().await;
    let first = running
        .snapshot_where("the Kubernetes cluster and the policy", |snapshot| {
            snapshot["services"][CHECKOUT]["endpoints"][0]["address"] == "10.1.0.1:8080"
                && snapshot["services"]["local"].is_object()
                && failures(snapshot) == Some(3)
        })
        .await;

    std::fs::write(&running.policy_file, policy_yaml(4)).expect("write policy");
    let second = running
        .snapshot_where("the edited policy", |snapshot| {
            failures(snapshot) == Some(4)
        })
        .await;
    assert_ne!(first["version"], second["version"]);
    let history = running.get_json("/v1/policy/history").await;
    let versions: Vec<u64> = history
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|applied| applied["version"].as_u64())
        .collect();
    assert_eq!(versions, [1, 2]);

    let rollback = running
        .http
        .post(running.admin_url("/v1/policy/rollback?version=1"))
        .send()
        .await
        .expect("request");
    assert_eq!(rollback.status(), reqwest::StatusCode::OK);
    let restored: Value = rollback.json().await.expect("json");
    assert_eq!(
        (
            restored["version"].as_u64(),
            restored["rolled_back_from"].as_u64()
        ),
        (Some(3), Some(1))
    );
    let rolled_back = running
        .snapshot_where("the restored policy", |snapshot| {
            failures(snapshot) == Some(3)
        })
        .await;
    assert_eq!(
        rolled_back["version"], first["version"],
        "equal content, equal version"
    );

    let unknown = running
        .http
        .post(running.admin_url("/v1/policy/rollback?version=99"))
        .send()
        .await
        .expect("request");
    assert_eq!(unknown.status(), reqwest::StatusCode::NOT_FOUND);
    let message = unknown.text().await.expect("body");
    assert!(message.contains("[1, 2, 3]"), "{message}");
    tokio::time::sleep(Duration::from_millis(10)).await;
    running.control_plane.shutdown().await;
}

#[tokio::test]
async fn with_a_policy_source_nothing_is_served_and_the_control_plane_is_unready_until_a_policy_is_accepted()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let static_file = local_endpoints(dir.path());
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(
        &policy_file,
        "default:\n  outlier_detection:\n    max_ejection_percent: 150\n",
    )
    .expect("write an invalid policy");
    let control_plane = ControlPlane::start_with(
        loopback_config(Some(static_file)),
        OptionalSources {
            policy: Some(PolicySource::File(policy_file.clone())),
            ..OptionalSources::default()
        },
    )
    .await
    .expect("control plane starts");
    let http = http_client();
    let url = |path: &str| format!("http://{}{path}", control_plane.http_address());
    tokio::time::sleep(Duration::from_millis(500)).await;
    for path in ["/readyz", "/v1/snapshot"] {
        let response = http.get(url(path)).send().await.expect("request");
        assert_eq!(
            response.status(),
            reqwest::StatusCode::SERVICE_UNAVAILABLE,
            "{path} while the only policy is invalid"
        );
    }

    std::fs::write(&policy_file, policy_yaml(4)).expect("write a valid policy");
    let snapshot = eventually(PATIENCE, "a snapshot with the policy", || async {
        let response = http.get(url("/v1/snapshot")).send().await.ok()?;
        let snapshot: Value = response.json().await.ok()?;
        (failures(&snapshot) == Some(4)).then_some(snapshot)
    })
    .await;
    assert!(snapshot.is_ok(), "{snapshot:?}");
    let ready = http.get(url("/readyz")).send().await.expect("request");
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    control_plane.shutdown().await;
}
