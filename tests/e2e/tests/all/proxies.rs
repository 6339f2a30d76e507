//! `GET /v1/proxies` against real Envoys: each proxy's filter names its Envoy node in its
//! snapshot polls, so the control plane lists which proxy runs which version, sees a policy
//! change reach every proxy, and marks a proxy that stopped polling stale, then forgets it.

use std::{net::SocketAddr, path::Path, time::Duration};

use fulcrum_control_plane::{
    Config, ControlPlane, OptionalSources, PolicySource, ProxyTableLimits,
};
use fulcrum_e2e::{Proxy, SERVICE, backends, envoy_with_control_plane};
use fulcrum_test_support::eventually;
use serde_json::{Value, json};

/// How long a change may take to show in `/v1/proxies`: Envoy start-up, polls every 200 ms.
const PATIENCE: Duration = Duration::from_secs(15);

/// The proxy table's limits here: stale after 1.5 s (the default: about seven missed polls
/// at the 200 ms the e2e filters poll), forgotten after 4 s (10 min by default).
const LIMITS: ProxyTableLimits = ProxyTableLimits {
    max_proxies: 100,
    stale_after: Duration::from_millis(1_500),
    expire_after: Duration::from_secs(4),
};

fn write_policy(path: &Path, load_balancer: &str) {
    std::fs::write(
        path,
        json!({"services": {SERVICE: {"load_balancer": {"type": load_balancer}}}}).to_string(),
    )
    .unwrap();
}

/// The Envoy node id of `proxy`, from its admin `/server_info`.
async fn node_id(proxy: &Proxy) -> String {
    let info: Value =
        serde_json::from_str(&proxy.envoy.admin_get("/server_info").await.unwrap()).unwrap();
    info["node"]["id"].as_str().unwrap().to_owned()
}

/// `GET /v1/proxies` of the control plane at `http`.
async fn listed(http: SocketAddr) -> Value {
    reqwest::get(format!("http://{http}/v1/proxies"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// (node id, node cluster, version, state) of every listed proxy.
fn rows(listed: &Value) -> Vec<(String, String, String, String)> {
    let text = |value: &Value| value.as_str().unwrap_or("-").to_owned();
    listed["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                text(&p["node_id"]),
                text(&p["node_cluster"]),
                text(&p["version"]),
                text(&p["state"]),
            )
        })
        .collect()
}

/// Waits until `/v1/proxies` lists exactly `expected` as (node id, state), each current one
/// at the served version and in node cluster `fulcrum` (the launcher's), while a version
/// other than `previous` is served; returns the served version.
async fn wait_for_states(
    http: SocketAddr,
    expected: &[(&str, &str)],
    previous: Option<&str>,
) -> String {
    let mut expected: Vec<(String, String)> = expected
        .iter()
        .map(|(id, state)| ((*id).to_owned(), (*state).to_owned()))
        .collect();
    expected.sort();
    let found = eventually(PATIENCE, "the proxies in their states", || {
        let expected = expected.clone();
        async move {
            let body = listed(http).await;
            let served = body["snapshot_version"].as_str()?.to_owned();
            let rows = rows(&body);
            let states: Vec<(String, String)> = rows
                .iter()
                .map(|(id, _, _, state)| (id.clone(), state.clone()))
                .collect();
            let current_at_served = rows
                .iter()
                .filter(|(_, _, _, state)| state == "current")
                .all(|(_, cluster, version, _)| cluster == "fulcrum" && *version == served);
            (states == expected && current_at_served && Some(served.as_str()) != previous)
                .then_some(served)
        }
    })
    .await;
    match found {
        Ok(served) => served,
        Err(error) => panic!("{error}; /v1/proxies: {:#}", listed(http).await),
    }
}

#[tokio::test]
async fn proxies_are_listed_current_follow_a_policy_change_and_turn_stale_then_go_when_stopped() {
    let backends = backends(2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let endpoints_file = dir.path().join("endpoints.json");
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|b| json!({"address": b.addr.to_string()}))
        .collect();
    std::fs::write(
        &endpoints_file,
        json!({"services": {SERVICE: {"endpoints": endpoints}}}).to_string(),
    )
    .unwrap();
    let policy_file = dir.path().join("policy.json");
    write_policy(&policy_file, "round_robin");
    let control_plane = ControlPlane::start_with(
        Config {
            static_file: Some(endpoints_file),
            poll_interval: Duration::from_millis(100),
            debounce: Duration::from_millis(20),
            proxies: LIMITS,
            ..Config::default()
        },
        OptionalSources {
            policy: Some(PolicySource::File(policy_file.clone())),
            ..OptionalSources::default()
        },
    )
    .await
    .unwrap();
    let (xds, http) = (control_plane.xds_address(), control_plane.http_address());
    let policy = json!({"load_balancer": {"type": "round_robin"}});
    let first = envoy_with_control_plane(xds, http, policy.clone())
        .await
        .unwrap();
    let second = envoy_with_control_plane(xds, http, policy).await.unwrap();
    let (first_id, second_id) = (node_id(&first).await, node_id(&second).await);
    assert_ne!(first_id, second_id);

    let both = [
        (first_id.as_str(), "current"),
        (second_id.as_str(), "current"),
    ];
    let v1 = wait_for_states(http, &both, None).await;

    // The policy change is a new snapshot version, which both proxies come to run.
    write_policy(&policy_file, "least_request");
    let v2 = wait_for_states(http, &both, Some(&v1)).await;

    drop(second);
    let stale = [
        (first_id.as_str(), "current"),
        (second_id.as_str(), "stale"),
    ];
    assert_eq!(wait_for_states(http, &stale, Some(&v1)).await, v2);
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fulcrum_proxies{state=\"stale\"} 1"),
        "{metrics}"
    );
    wait_for_states(http, &[(&first_id, "current")], Some(&v1)).await;
    control_plane.shutdown().await;
}
