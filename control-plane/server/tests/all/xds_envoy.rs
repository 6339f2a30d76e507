//! Envoy bootstrapped with ADS to the control plane: clusters, endpoint changes, NACKs, both
//! protocol variants, the upstream protocol of a gRPC service's cluster, and the propagation
//! latency from a file change to Envoy's admin.

use std::time::{Duration, Instant};

use fulcrum_core::{Endpoint, ServiceEndpoints, Snapshot};
use fulcrum_test_support::{AdsApi, Envoy, eventually};
use serde_json::Value;

use crate::support::{
    Fixture, PATIENCE, addresses, dump_section, endpoint, endpoints_file, hosts, stream_status,
    wait_for_hosts, wait_for_protocol,
};

fn api_name(api: AdsApi) -> &'static str {
    match api {
        AdsApi::Sotw => "sotw",
        AdsApi::Delta => "delta",
    }
}

fn dynamic_cluster<'a>(dump: &'a Value, name: &str) -> &'a Value {
    dump_section(dump, "ClustersConfigDump")["dynamic_active_clusters"]
        .as_array()
        .and_then(|clusters| clusters.iter().find(|c| c["cluster"]["name"] == name))
        .map(|entry| &entry["cluster"])
        .unwrap_or_else(|| panic!("no dynamic cluster {name} in config_dump"))
}

async fn assert_cluster_config(envoy: &Envoy) {
    let dump = envoy.config_dump(true).await.expect("config_dump");
    let cluster = dynamic_cluster(&dump, "checkout");
    assert_eq!(cluster["type"], "EDS");
    let policy = &cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"];
    assert_eq!(
        policy["name"],
        "envoy.load_balancing_policies.override_host"
    );
    assert_eq!(
        policy["typed_config"]["override_host_sources"][0]["header"],
        "x-fulcrum-endpoint"
    );
    assert_eq!(
        policy["typed_config"]["fallback_policy"]["policies"][0]["typed_extension_config"]["name"],
        "envoy.load_balancing_policies.least_request"
    );
    let options = &cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    let filters: Vec<&str> = options["http_filters"]
        .as_array()
        .expect("upstream http filters")
        .iter()
        .filter_map(|filter| filter["name"].as_str())
        .collect();
    assert_eq!(
        filters,
        [
            "envoy.filters.http.header_mutation",
            "envoy.filters.http.upstream_codec"
        ]
    );
    assert_eq!(
        options["http_filters"][0]["typed_config"]["mutations"]["request_mutations"][0]["remove"],
        "x-fulcrum-endpoint"
    );
    let endpoints = dump_section(&dump, "EndpointsConfigDump")["dynamic_endpoint_configs"]
        .as_array()
        .expect("EDS configs")
        .iter()
        .find(|config| config["endpoint_config"]["cluster_name"] == "checkout")
        .expect("EDS config of checkout");
    let zones: Vec<&str> = endpoints["endpoint_config"]["endpoints"]
        .as_array()
        .expect("localities")
        .iter()
        .map(|locality| locality["locality"]["zone"].as_str().unwrap_or(""))
        .collect();
    assert!(zones.contains(&"zone-a"), "zones {zones:?}");
}

/// Waits until the node acknowledged `version` for both CDS and EDS (both must have been
/// sent at `version`: CDS is only resent when the clusters change).
async fn wait_for_acks(fixture: &Fixture, node: &str, version: &str) -> Value {
    eventually(PATIENCE, "CDS and EDS acknowledged", || async {
        let stream = stream_status(fixture, node).await?;
        let acked = |ty: &str| stream["types"][ty]["last_acked_version"].as_str() == Some(version);
        (acked("cds") && acked("eds")).then_some(stream)
    })
    .await
    .unwrap_or_else(|_| panic!("{node} never acknowledged {version} for CDS and EDS"))
}

async fn endpoint_changes_reach_envoy(api: AdsApi) {
    let node = format!("changes-{}", api_name(api));
    let fixture = Fixture::start(&endpoints_file(&[
        (
            "checkout",
            vec![
                endpoint("127.0.0.1:19001", ""),
                endpoint("127.0.0.1:19002", ", weight: 3, zone: zone-a"),
            ],
        ),
        ("search", vec![endpoint("127.0.0.1:19101", "")]),
    ]))
    .await;
    fixture.snapshot_version().await;
    let envoy = fixture.envoy(&node, api).await;

    let checkout = wait_for_hosts(&envoy, "checkout", "both endpoints", |hosts| {
        addresses(hosts) == ["127.0.0.1:19001", "127.0.0.1:19002"]
    })
    .await;
    assert_eq!(checkout[1].weight, 3);
    wait_for_hosts(&envoy, "search", "its endpoint", |hosts| {
        addresses(hosts) == ["127.0.0.1:19101"]
    })
    .await;
    assert_cluster_config(&envoy).await;

    // An endpoint added.
    fixture.write(&endpoints_file(&[
        (
            "checkout",
            vec![
                endpoint("127.0.0.1:19001", ""),
                endpoint("127.0.0.1:19002", ", weight: 3, zone: zone-a"),
                endpoint("127.0.0.1:19003", ""),
            ],
        ),
        ("search", vec![endpoint("127.0.0.1:19101", "")]),
    ]));
    wait_for_hosts(&envoy, "checkout", "the added endpoint", |hosts| {
        hosts.len() == 3
    })
    .await;

    // One marked unhealthy, one draining.
    fixture.write(&endpoints_file(&[
        (
            "checkout",
            vec![
                endpoint("127.0.0.1:19001", ", health: unhealthy"),
                endpoint("127.0.0.1:19002", ", weight: 3, zone: zone-a"),
                endpoint("127.0.0.1:19003", ", health: draining"),
            ],
        ),
        ("search", vec![endpoint("127.0.0.1:19101", "")]),
    ]));
    let checkout = wait_for_hosts(&envoy, "checkout", "the health changes", |hosts| {
        hosts.len() == 3
            && hosts[0].eds_health_status == "UNHEALTHY"
            && hosts[2].eds_health_status == "DRAINING"
    })
    .await;
    assert_eq!(checkout[1].eds_health_status, "HEALTHY");

    // An endpoint and a whole service removed.
    fixture.write(&endpoints_file(&[(
        "checkout",
        vec![
            endpoint("127.0.0.1:19001", ""),
            endpoint("127.0.0.1:19003", ""),
        ],
    )]));
    wait_for_hosts(&envoy, "checkout", "the removal", |hosts| {
        addresses(hosts) == ["127.0.0.1:19001", "127.0.0.1:19003"]
            && hosts.iter().all(|host| host.eds_health_status == "HEALTHY")
    })
    .await;
    let gone = eventually(PATIENCE, "cluster search removed", || async {
        let clusters = envoy.cluster_hosts().await.expect("admin /clusters");
        (!clusters.contains_key("search")).then_some(())
    })
    .await;
    assert!(gone.is_ok(), "cluster search was not removed from Envoy");

    let version = fixture.snapshot_version().await;
    let stream = wait_for_acks(&fixture, &node, &version).await;
    assert_eq!(stream["kind"], api_name(api));
    assert!(stream["types"]["cds"]["last_nack"].is_null());
    assert!(stream["types"]["eds"]["last_nack"].is_null());
    let metrics = fixture.metrics().await;
    assert!(
        metrics.contains(&format!(
            "fulcrum_xds_connected_proxies{{stream=\"{}\"}} 1",
            api_name(api)
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "fulcrum_xds_push_latency_seconds_count{{resource_type=\"eds\",stream=\"{}\"}}",
            api_name(api)
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_stream_delivers_clusters_and_every_endpoint_change() {
    endpoint_changes_reach_envoy(AdsApi::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_stream_delivers_clusters_and_every_endpoint_change() {
    endpoint_changes_reach_envoy(AdsApi::Delta).await;
}

#[tokio::test]
async fn sotw_grpc_service_gets_an_http2_cluster_and_a_protocol_change_alone_reaches_envoy() {
    grpc_service_gets_an_http2_cluster(AdsApi::Sotw).await;
}

#[tokio::test]
async fn delta_grpc_service_gets_an_http2_cluster_and_a_protocol_change_alone_reaches_envoy() {
    grpc_service_gets_an_http2_cluster(AdsApi::Delta).await;
}

/// A changed cluster is warmed anew by Envoy, which waits for its (unchanged) assignment: the
/// protocol change only becomes active if the control plane sends it again.
async fn grpc_service_gets_an_http2_cluster(api: AdsApi) {
    let file = |protocol: &str| {
        format!(
            "services:\n  payments:\n    protocol: {protocol}\n    endpoints:\n{}  checkout:\n    endpoints:\n{}",
            endpoint("127.0.0.1:19201", ""),
            endpoint("127.0.0.1:19202", "")
        )
    };
    let fixture = Fixture::start(&file("grpc")).await;
    fixture.snapshot_version().await;
    let envoy = fixture
        .envoy(&format!("grpc-cluster-{}", api_name(api)), api)
        .await;
    wait_for_protocol(&envoy, "payments", "http2_protocol_options").await;
    wait_for_protocol(&envoy, "checkout", "http_protocol_options").await;

    // Only the protocol changes: a new snapshot version, a new cluster, the same endpoints.
    let before = fixture.snapshot_version().await;
    fixture.write(&file("http"));
    wait_for_protocol(&envoy, "payments", "http_protocol_options").await;
    assert_ne!(fixture.snapshot_version().await, before);
}

async fn invalid_assignment_is_nacked_and_the_last_good_version_stays(api: AdsApi) {
    let node = format!("nack-{}", api_name(api));
    let fixture = Fixture::start(&endpoints_file(&[(
        "checkout",
        vec![endpoint("127.0.0.1:19001", "")],
    )]))
    .await;
    let good_version = fixture.snapshot_version().await;
    let envoy = fixture.envoy(&node, api).await;
    wait_for_hosts(&envoy, "checkout", "its endpoint", |hosts| hosts.len() == 1).await;
    wait_for_acks(&fixture, &node, &good_version).await;

    // The pipeline leaves out what Envoy would refuse, so put an assignment Envoy's EDS
    // validation refuses (weight 0) straight into the cache the ADS server streams from, as
    // a control plane of another version might send it.
    let bad_version = "refused-by-envoy";
    let bad = Snapshot {
        version: bad_version.to_owned(),
        services: [(
            "checkout".to_owned(),
            std::sync::Arc::new(ServiceEndpoints {
                endpoints: vec![
                    Endpoint::new("127.0.0.1:19001".parse().expect("address")),
                    Endpoint::new("127.0.0.1:19002".parse().expect("address")).with_weight(0),
                ],
                protocol: None,
            }),
        )]
        .into(),
        policy: None,
    };
    fixture.control_plane.xds_cache().set(&bad);
    let stream = eventually(PATIENCE, "an EDS NACK", || async {
        let stream = stream_status(&fixture, &node).await?;
        (!stream["types"]["eds"]["last_nack"].is_null()).then_some(stream)
    })
    .await
    .expect("Envoy NACKs the assignment and /v1/status shows it");
    let nack = &stream["types"]["eds"]["last_nack"];
    eprintln!("{} NACK as reported in /v1/status: {nack}", api_name(api));
    assert_eq!(nack["rejected_version"], bad_version);
    assert!(
        nack["message"]
            .as_str()
            .is_some_and(|message| message.to_lowercase().contains("weight")),
        "NACK detail names the weight: {nack}"
    );
    assert_eq!(
        stream["types"]["eds"]["last_acked_version"],
        good_version.as_str()
    );
    let metrics = fixture.metrics().await;
    assert!(
        metrics.contains(&format!(
            "fulcrum_xds_nacks_total{{resource_type=\"eds\",stream=\"{}\"}} 1",
            api_name(api)
        )),
        "{metrics}"
    );
    assert_eq!(
        addresses(&hosts(&envoy, "checkout").await),
        ["127.0.0.1:19001"],
        "Envoy keeps the last good assignment"
    );

    // Fixing the file recovers.
    fixture.write(&endpoints_file(&[(
        "checkout",
        vec![
            endpoint("127.0.0.1:19001", ""),
            endpoint("127.0.0.1:19002", ", weight: 2"),
        ],
    )]));
    wait_for_hosts(&envoy, "checkout", "the fixed assignment", |hosts| {
        hosts.len() == 2
    })
    .await;
    // Only endpoints changed: EDS is acknowledged at the new version, CDS stays where it was.
    let fixed_version = fixture.snapshot_version().await;
    let stream = eventually(PATIENCE, "the fixed assignment acknowledged", || async {
        let stream = stream_status(&fixture, &node).await?;
        (stream["types"]["eds"]["last_acked_version"] == fixed_version.as_str()).then_some(stream)
    })
    .await
    .expect("the fixed assignment is acknowledged");
    assert_eq!(
        stream["types"]["cds"]["last_acked_version"],
        good_version.as_str()
    );
    assert_eq!(stream["types"]["eds"]["nacks"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_nack_is_reported_and_envoy_keeps_the_last_good_assignment() {
    invalid_assignment_is_nacked_and_the_last_good_version_stays(AdsApi::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_nack_is_reported_and_envoy_keeps_the_last_good_assignment() {
    invalid_assignment_is_nacked_and_the_last_good_version_stays(AdsApi::Delta).await;
}

/// What Envoy or the filters would refuse never leaves the control plane: a `weight: 0`
/// endpoint in the static file is left out, named in `/v1/status` and counted, while Envoy
/// and the filters' snapshot both get the rest of the service, and nothing is NACKed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_endpoint_is_left_out_for_envoy_and_the_filters_alike() {
    let node = "validated";
    let fixture = Fixture::start(&endpoints_file(&[(
        "checkout",
        vec![
            endpoint("127.0.0.1:19001", ""),
            endpoint("127.0.0.1:19002", ", weight: 0"),
        ],
    )]))
    .await;
    let version = fixture.snapshot_version().await;
    let envoy = fixture.envoy(node, AdsApi::Sotw).await;
    wait_for_hosts(&envoy, "checkout", "the valid endpoint", |hosts| {
        hosts.len() == 1
    })
    .await;
    wait_for_acks(&fixture, node, &version).await;
    assert_eq!(
        addresses(&hosts(&envoy, "checkout").await),
        ["127.0.0.1:19001"]
    );

    let snapshot = fixture.get_json("/v1/snapshot").await;
    assert_eq!(snapshot["version"], version.as_str());
    let served: Vec<&str> = snapshot["services"]["checkout"]["endpoints"]
        .as_array()
        .expect("checkout's endpoints")
        .iter()
        .filter_map(|endpoint| endpoint["address"].as_str())
        .collect();
    assert_eq!(
        served,
        ["127.0.0.1:19001"],
        "the filters get what Envoy gets"
    );

    let status = fixture.get_json("/v1/status").await;
    assert_eq!(status["dropped"]["endpoints"], 1, "{status}");
    assert_eq!(
        status["dropped"]["problems"][0],
        "services.checkout.endpoints[1].weight: must be at least 1, got 0"
    );
    let stream = stream_status(&fixture, node).await.expect("Envoy's stream");
    assert!(stream["types"]["eds"]["last_nack"].is_null(), "{stream}");
    let metrics = fixture.metrics().await;
    assert!(
        metrics.contains("fulcrum_snapshot_dropped{kind=\"endpoint\"} 1"),
        "{metrics}"
    );
}

/// Time from an endpoints file write to Envoy's admin listing the new endpoint, over a few
/// repetitions, for both protocol variants. Reported, not asserted (timing belongs to
/// benchmarks); each wait is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_latency_from_file_change_to_envoy_admin() {
    const REPETITIONS: u16 = 5;
    for api in [AdsApi::Sotw, AdsApi::Delta] {
        let node = format!("latency-{}", api_name(api));
        let mut lines = vec![endpoint("127.0.0.1:20000", "")];
        let fixture = Fixture::start(&endpoints_file(&[("checkout", lines.clone())])).await;
        fixture.snapshot_version().await;
        let envoy = fixture.envoy(&node, api).await;
        wait_for_hosts(&envoy, "checkout", "its endpoint", |hosts| hosts.len() == 1).await;
        let mut samples = Vec::new();
        for repetition in 1..=REPETITIONS {
            let address = format!("127.0.0.1:{}", 20000 + repetition);
            lines.push(endpoint(&address, ""));
            let started = Instant::now();
            fixture.write(&endpoints_file(&[("checkout", lines.clone())]));
            loop {
                let hosts = hosts(&envoy, "checkout").await;
                if hosts.iter().any(|host| host.address == address) {
                    break;
                }
                assert!(
                    started.elapsed() < PATIENCE,
                    "{address} never reached Envoy"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            samples.push(started.elapsed());
            // Let the poller see the next write as a separate change.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        samples.sort();
        eprintln!(
            "propagation file → Envoy admin ({}, poll {:?}, debounce {:?}): min {:?} median {:?} max {:?} over {} samples {:?}",
            api_name(api),
            crate::support::POLL_INTERVAL,
            crate::support::DEBOUNCE,
            samples[0],
            samples[samples.len() / 2],
            samples[samples.len() - 1],
            samples.len(),
            samples
        );
    }
}
