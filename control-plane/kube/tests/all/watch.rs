//! The source end to end: kube-rs's real client, watcher and reflector against the fake API
//! server, through the real snapshot pipeline.

use std::time::Duration;

use fulcrum_core::{Health, Snapshot};
use fulcrum_kube_source::{KubeOptions, KubeSource, KubeSourceMetrics, Mapping};
use fulcrum_pipeline::{Debounce, policy::attach};
use fulcrum_sources::Source;
use fulcrum_test_support::kube_api::{
    FakeApiServer,
    objects::{endpoint, endpoint_slice, ready, service, with_labels, with_many_labels},
};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::{mpsc, watch};

const CHECKOUT: &str = "outbound|80||checkout.shop.svc.cluster.local";
/// Bounds every wait; the watcher's first backoff after an error is about a second.
const WAIT: Duration = Duration::from_secs(15);

/// The source running in the real pipeline, its snapshots collected.
struct Harness {
    server: FakeApiServer,
    metrics: KubeSourceMetrics,
    snapshots: mpsc::UnboundedReceiver<Snapshot>,
    pipeline: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.pipeline.abort();
    }
}

impl Harness {
    /// Starts the fake API server, lets `setup` create the initial objects, then starts the
    /// source watching namespace `shop`.
    async fn start(setup: impl FnOnce(&FakeApiServer)) -> Self {
        Self::start_with(
            KubeOptions {
                namespaces: vec!["shop".to_owned()],
                ..KubeOptions::default()
            },
            setup,
        )
        .await
    }

    async fn start_with(options: KubeOptions, setup: impl FnOnce(&FakeApiServer)) -> Self {
        let server = FakeApiServer::start().await;
        server.serve::<Service>();
        server.serve::<EndpointSlice>();
        server.serve::<Pod>();
        server.serve::<Node>();
        setup(&server);
        let source = KubeSource::new(server.client(), options);
        let metrics = source.metrics().clone();
        let source: Box<dyn Source> = Box::new(source);
        let (sender, snapshots) = mpsc::unbounded_channel();
        let (merged, mut merges) = watch::channel(None);
        let merge = fulcrum_pipeline::merge::run(
            vec![source],
            Debounce::new(Duration::from_millis(10)),
            merged,
            fulcrum_pipeline::PipelineMetrics::default(),
        );
        let forward = async move {
            while merges.changed().await.is_ok() {
                let services = merges.borrow_and_update().clone();
                if let Some(services) = services {
                    let _ = sender.send(attach(&services, None));
                }
            }
        };
        let pipeline = tokio::spawn(async move {
            tokio::join!(merge, forward);
        });
        Self {
            server,
            metrics,
            snapshots,
            pipeline,
        }
    }

    /// Reads snapshots until one satisfies `wanted`, failing after [`WAIT`].
    async fn until(&mut self, what: &str, wanted: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.snapshots.recv()).await {
                Ok(Some(snapshot)) if wanted(&snapshot) => return snapshot,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the pipeline stopped before {what}"),
                Err(_) => panic!("no snapshot with {what} within {WAIT:?}"),
            }
        }
    }

    /// Waits until the server has answered what `done` looks for.
    async fn until_requested(&self, what: &str, done: impl Fn(&FakeApiServer) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(&self.server) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what} within {WAIT:?}: {:?}",
                self.server.requests()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until both kinds have had `count` watch requests (the watcher opens its watch
    /// right after the list it publishes from).
    async fn until_watching(&self, count: usize) {
        self.until_requested(&format!("watch #{count} of both kinds"), |server| {
            server.watches::<Service>().len() >= count
                && server.watches::<EndpointSlice>().len() >= count
        })
        .await;
    }
}

fn addresses(snapshot: &Snapshot, cluster: &str) -> Vec<String> {
    snapshot
        .services
        .get(cluster)
        .map(|service| {
            service
                .endpoints
                .iter()
                .map(|endpoint| endpoint.address.to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn has_addresses(
    cluster: &'static str,
    wanted: &'static [&'static str],
) -> impl Fn(&Snapshot) -> bool {
    move |snapshot| addresses(snapshot, cluster) == wanted
}

fn checkout_slice(
    name: &str,
    endpoints: Vec<k8s_openapi::api::discovery::v1::Endpoint>,
) -> EndpointSlice {
    endpoint_slice("shop", name, "checkout", &[("http", 8080)], endpoints)
}

fn checkout_service() -> Service {
    service("shop", "checkout", &[("http", 80)])
}

#[tokio::test]
async fn first_snapshot_holds_the_listed_endpoints_with_zone_and_labels() {
    let mut harness = Harness::start(|server| {
        let mut checkout = checkout_service();
        checkout.metadata = with_labels(checkout.metadata, &[("app", "checkout")]);
        server.apply(&checkout);
        let mut zoned = ready("10.0.0.1");
        zoned.zone = Some("zone-a".to_owned());
        zoned.node_name = Some("node-1".to_owned());
        server.apply(&checkout_slice("checkout-a", vec![zoned]));
    })
    .await;
    let snapshot = harness
        .until(
            "the listed endpoint",
            has_addresses(CHECKOUT, &["10.0.0.1:8080"]),
        )
        .await;
    let endpoint = &snapshot.services[CHECKOUT].endpoints[0];
    assert_eq!(endpoint.health, Health::Healthy);
    assert_eq!(endpoint.zone(), Some("zone-a"));
    assert_eq!(endpoint.metadata()["app"], "checkout");
    assert_eq!(endpoint.metadata()["node_name"], "node-1");
}

#[tokio::test]
async fn added_slice_appears_and_deleted_slice_disappears() {
    let mut harness = Harness::start(|server| {
        server.apply(&checkout_service());
    })
    .await;
    harness
        .until("an empty cluster", has_addresses(CHECKOUT, &[]))
        .await;
    harness
        .server
        .apply(&checkout_slice("checkout-a", vec![ready("10.0.0.1")]));
    harness
        .until(
            "the added endpoint",
            has_addresses(CHECKOUT, &["10.0.0.1:8080"]),
        )
        .await;
    harness.server.delete::<EndpointSlice>("shop", "checkout-a");
    harness
        .until("the slice's endpoints gone", has_addresses(CHECKOUT, &[]))
        .await;
}

#[tokio::test]
async fn not_ready_endpoint_is_removed_and_terminating_serving_endpoint_drains() {
    let mut harness = Harness::start(|server| {
        server.apply(&checkout_service());
        server.apply(&checkout_slice(
            "checkout-a",
            vec![ready("10.0.0.1"), ready("10.0.0.2"), ready("10.0.0.3")],
        ));
    })
    .await;
    harness
        .until(
            "three endpoints",
            has_addresses(
                CHECKOUT,
                &["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"],
            ),
        )
        .await;
    harness.server.apply(&checkout_slice(
        "checkout-a",
        vec![
            endpoint("10.0.0.1", false, false, false),
            endpoint("10.0.0.2", false, true, true),
            ready("10.0.0.3"),
        ],
    ));
    let snapshot = harness
        .until(
            "the not ready endpoint removed",
            has_addresses(CHECKOUT, &["10.0.0.2:8080", "10.0.0.3:8080"]),
        )
        .await;
    let health: Vec<Health> = snapshot.services[CHECKOUT]
        .endpoints
        .iter()
        .map(|endpoint| endpoint.health)
        .collect();
    assert_eq!(health, [Health::Draining, Health::Healthy]);
    harness.server.apply(&checkout_slice(
        "checkout-a",
        vec![endpoint("10.0.0.2", false, false, true), ready("10.0.0.3")],
    ));
    harness
        .until(
            "the terminated endpoint removed",
            has_addresses(CHECKOUT, &["10.0.0.3:8080"]),
        )
        .await;
}

#[tokio::test]
async fn deleted_service_removes_its_clusters() {
    let mut harness = Harness::start(|server| {
        server.apply(&checkout_service());
        server.apply(&service("shop", "cart", &[("http", 80)]));
    })
    .await;
    harness
        .until("two clusters", |snapshot| snapshot.services.len() == 2)
        .await;
    harness.server.delete::<Service>("shop", "cart");
    let snapshot = harness
        .until("one cluster", |snapshot| snapshot.services.len() == 1)
        .await;
    assert!(snapshot.services.contains_key(CHECKOUT));
}

#[tokio::test]
async fn slices_of_one_service_are_merged_as_they_come_and_go() {
    let mut harness = Harness::start(|server| {
        server.apply(&checkout_service());
        server.apply(&checkout_slice("checkout-a", vec![ready("10.0.0.1")]));
    })
    .await;
    harness
        .until(
            "the first slice",
            has_addresses(CHECKOUT, &["10.0.0.1:8080"]),
        )
        .await;
    harness
        .server
        .apply(&checkout_slice("checkout-b", vec![ready("10.0.0.2")]));
    harness
        .until(
            "both slices",
            has_addresses(CHECKOUT, &["10.0.0.1:8080", "10.0.0.2:8080"]),
        )
        .await;
    harness.server.delete::<EndpointSlice>("shop", "checkout-a");
    harness
        .until(
            "the second slice alone",
            has_addresses(CHECKOUT, &["10.0.0.2:8080"]),
        )
        .await;
}

#[tokio::test]
async fn relists_after_410_gone_and_recovers_changes_it_missed() {
    let mut harness = Harness::start(|server| {
        server.apply(&checkout_service());
        server.apply(&checkout_slice("checkout-a", vec![ready("10.0.0.1")]));
    })
    .await;
    harness
        .until(
            "the listed endpoint",
            has_addresses(CHECKOUT, &["10.0.0.1:8080"]),
        )
        .await;
    harness.until_watching(1).await;
    assert_eq!(harness.server.list_count::<EndpointSlice>(), 1);
    // A change whose event is lost to compaction, then the watch expires.
    harness.server.apply_unannounced(&checkout_slice(
        "checkout-a",
        vec![ready("10.0.0.1"), ready("10.0.0.2")],
    ));
    harness.server.expire_watches();
    harness
        .until(
            "the missed endpoint after a relist",
            has_addresses(CHECKOUT, &["10.0.0.1:8080", "10.0.0.2:8080"]),
        )
        .await;
    assert_eq!(harness.server.list_count::<EndpointSlice>(), 2);
    // Each watcher relists on its own schedule (its backoff is jittered).
    harness
        .until_requested("a relist of the Services", |server| {
            server.list_count::<Service>() == 2
        })
        .await;
}

#[tokio::test]
async fn resumes_the_watch_from_the_last_bookmark_without_relisting() {
    let mut harness = Harness::start(|server| {
        server.apply(&checkout_service());
        server.apply(&checkout_slice("checkout-a", vec![ready("10.0.0.1")]));
    })
    .await;
    harness
        .until(
            "the listed endpoint",
            has_addresses(CHECKOUT, &["10.0.0.1:8080"]),
        )
        .await;
    harness.until_watching(1).await;
    // Changes the source does not watch move the resource version on; a bookmark tells the
    // watcher, history up to there is compacted, and the watch ends normally (its timeout).
    harness.server.apply(&ConfigMap {
        metadata: ObjectMeta {
            name: Some("unrelated".to_owned()),
            namespace: Some("shop".to_owned()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    });
    let bookmarked = harness.server.bookmark();
    harness.server.compact();
    harness.server.close_watches();
    harness.until_watching(2).await;
    for watches in [
        harness.server.watches::<EndpointSlice>(),
        harness.server.watches::<Service>(),
    ] {
        assert!(
            watches.iter().all(|watch| watch.allow_bookmarks),
            "{watches:?}"
        );
        assert_eq!(watches[1].resource_version, Some(bookmarked.to_string()));
    }
    harness.server.apply(&checkout_slice(
        "checkout-a",
        vec![ready("10.0.0.1"), ready("10.0.0.2")],
    ));
    harness
        .until(
            "a change on the resumed watch",
            has_addresses(CHECKOUT, &["10.0.0.1:8080", "10.0.0.2:8080"]),
        )
        .await;
    assert_eq!(harness.server.list_count::<EndpointSlice>(), 1);
    assert_eq!(harness.server.list_count::<Service>(), 1);
}

#[tokio::test]
async fn watches_only_the_configured_namespaces_and_label_selector() {
    let options = KubeOptions {
        namespaces: vec!["shop".to_owned()],
        label_selector: Some("mesh=fulcrum".to_owned()),
        ..KubeOptions::default()
    };
    let meshed = |mut meta: ObjectMeta| {
        meta = with_labels(meta, &[("mesh", "fulcrum")]);
        meta
    };
    let mut harness = Harness::start_with(options, |server| {
        let mut checkout = checkout_service();
        checkout.metadata = meshed(checkout.metadata);
        server.apply(&checkout);
        let mut slice = checkout_slice("checkout-a", vec![ready("10.0.0.1")]);
        slice.metadata = meshed(slice.metadata);
        server.apply(&slice);
        server.apply(&service("shop", "unmeshed", &[("http", 80)]));
        let mut elsewhere = service("billing", "ledger", &[("http", 80)]);
        elsewhere.metadata = meshed(elsewhere.metadata);
        server.apply(&elsewhere);
    })
    .await;
    let snapshot = harness
        .until(
            "the meshed endpoint",
            has_addresses(CHECKOUT, &["10.0.0.1:8080"]),
        )
        .await;
    assert_eq!(snapshot.services.keys().collect::<Vec<_>>(), [CHECKOUT]);
    for request in harness.server.requests() {
        // Nodes are cluster-scoped: every node, whatever the namespaces watched.
        let namespace = (request.resource != "v1/nodes").then_some("shop");
        assert_eq!(request.namespace.as_deref(), namespace, "{request:?}");
        // Pods and nodes carry their own labels, not the Services': watched without the
        // selector.
        let own_labels = ["v1/pods", "v1/nodes"].contains(&request.resource.as_str());
        let selector = (!own_labels).then_some("mesh=fulcrum");
        assert_eq!(request.label_selector.as_deref(), selector, "{request:?}");
    }
}

fn checkout_pod(name: &str, version: &str) -> Pod {
    Pod {
        metadata: with_labels(
            ObjectMeta {
                namespace: Some("shop".to_owned()),
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            &[("version", version), ("team", "payments")],
        ),
        ..Pod::default()
    }
}

fn version_of(snapshot: &Snapshot) -> Option<String> {
    snapshot
        .services
        .get(CHECKOUT)?
        .endpoints
        .first()?
        .metadata()
        .get("version")
        .cloned()
}

#[tokio::test]
async fn a_pods_allowed_labels_follow_it_into_its_endpoints_metadata() {
    let mut harness = Harness::start(|server| {
        server.apply(&checkout_service());
        server.apply(&checkout_slice("checkout-a", vec![ready("10.0.0.1")]));
        server.apply(&checkout_pod("pod-10.0.0.1", "v1"));
    })
    .await;
    let first = harness
        .until("version v1", |snapshot| {
            version_of(snapshot).as_deref() == Some("v1")
        })
        .await;
    let metadata = first.services[CHECKOUT].endpoints[0].metadata();
    assert_eq!(metadata.get("team"), None, "not on the allow-list");
    harness.server.apply(&checkout_pod("pod-10.0.0.1", "v2"));
    harness
        .until("version v2 after the relabel", |snapshot| {
            version_of(snapshot).as_deref() == Some("v2")
        })
        .await;
}

#[tokio::test]
async fn endpoints_are_published_even_when_pods_and_nodes_cannot_be_watched() {
    // A control plane whose RBAC predates pod labels and node regions: the pod and node
    // lists fail (the fake serves neither here); clusters must not wait for them.
    let server = FakeApiServer::start().await;
    server.serve::<Service>();
    server.serve::<EndpointSlice>();
    server.apply(&checkout_service());
    server.apply(&checkout_slice("checkout-a", vec![ready("10.0.0.1")]));
    let source = KubeSource::new(
        server.client(),
        KubeOptions {
            namespaces: vec!["shop".to_owned()],
            ..KubeOptions::default()
        },
    );
    let (sender, mut updates) = mpsc::channel(8);
    let task = tokio::spawn(Box::new(source).run(fulcrum_sources::SourceSink::new(0, sender)));
    let update = tokio::time::timeout(WAIT, updates.recv())
        .await
        .expect("published in time")
        .expect("source running");
    assert_eq!(
        update.services[CHECKOUT].endpoints[0].address.to_string(),
        "10.0.0.1:8080"
    );
    task.abort();
}

fn node_in(name: &str, region: &str) -> Node {
    Node {
        metadata: with_labels(
            ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            &[("topology.kubernetes.io/region", region)],
        ),
        ..Node::default()
    }
}

fn region_of(snapshot: &Snapshot) -> Option<String> {
    snapshot
        .services
        .get(CHECKOUT)?
        .endpoints
        .first()?
        .region()
        .map(str::to_owned)
}

#[tokio::test]
async fn an_endpoint_takes_the_region_of_its_node_and_follows_a_relabel() {
    let mut harness = Harness::start(|server| {
        server.apply(&checkout_service());
        let mut endpoint = ready("10.0.0.1");
        endpoint.node_name = Some("node-1".to_owned());
        server.apply(&checkout_slice("checkout-a", vec![endpoint]));
        server.apply(&node_in("node-1", "eu-west-1"));
    })
    .await;
    harness
        .until("region eu-west-1", |snapshot| {
            region_of(snapshot).as_deref() == Some("eu-west-1")
        })
        .await;
    harness.server.apply(&node_in("node-1", "eu-central-1"));
    harness
        .until("region eu-central-1 after the relabel", |snapshot| {
            region_of(snapshot).as_deref() == Some("eu-central-1")
        })
        .await;
}

/// The `fulcrum_kube_left_out` gauge of `reason`.
fn left_out(metrics: &KubeSourceMetrics, reason: &'static str) -> i64 {
    metrics
        .left_out
        .get_or_create(&fulcrum_kube_source::LeftOutLabels { reason })
        .get()
}

#[tokio::test]
async fn an_address_kubernetes_refuses_is_counted_and_left_out_and_the_rest_of_its_slice_published()
{
    let mut harness = Harness::start(|server| {
        server.apply(&checkout_service());
        server.apply(&checkout_slice(
            "checkout-a",
            vec![ready("10.0.0.1"), ready("169.254.169.254")],
        ));
    })
    .await;
    harness
        .until(
            "the valid endpoint alone",
            has_addresses(CHECKOUT, &["10.0.0.1:8080"]),
        )
        .await;
    assert_eq!(left_out(&harness.metrics, "address"), 1);
    assert_eq!(left_out(&harness.metrics, "over_budget"), 0);
    harness.server.apply(&checkout_slice(
        "checkout-a",
        vec![ready("10.0.0.1"), ready("10.0.0.2")],
    ));
    harness
        .until(
            "the fixed slice",
            has_addresses(CHECKOUT, &["10.0.0.1:8080", "10.0.0.2:8080"]),
        )
        .await;
    assert_eq!(left_out(&harness.metrics, "address"), 0);
}

#[tokio::test]
async fn a_service_growing_over_its_budget_keeps_its_last_published_endpoints() {
    const CART: &str = "outbound|80||cart.shop.svc.cluster.local";
    let options = KubeOptions {
        namespaces: vec!["shop".to_owned()],
        mapping: Mapping {
            max_service_bytes: 2048,
            ..Mapping::default()
        },
        ..KubeOptions::default()
    };
    let mut harness = Harness::start_with(options, |server| {
        server.apply(&checkout_service());
        server.apply(&checkout_slice("checkout-a", vec![ready("10.0.0.1")]));
    })
    .await;
    harness
        .until(
            "the listed endpoint",
            has_addresses(CHECKOUT, &["10.0.0.1:8080"]),
        )
        .await;
    // 40 labels of 63 characters, copied into each endpoint, outgrow 2 KiB.
    let mut bloated = checkout_service();
    bloated.metadata = with_many_labels(bloated.metadata, 40, 63);
    // Each marker follows the change on the same watch, so seeing it means the change was
    // mapped.
    harness.server.apply(&bloated);
    harness
        .server
        .apply(&service("shop", "cart", &[("http", 80)]));
    let snapshot = harness
        .until("the cart Service", |snapshot| {
            snapshot.services.contains_key(CART)
        })
        .await;
    assert_eq!(addresses(&snapshot, CHECKOUT), ["10.0.0.1:8080"]);
    harness.server.apply(&checkout_slice(
        "checkout-a",
        vec![ready("10.0.0.1"), ready("10.0.0.2")],
    ));
    harness.server.apply(&endpoint_slice(
        "shop",
        "cart-a",
        "cart",
        &[("http", 8080)],
        vec![ready("10.0.1.1")],
    ));
    let snapshot = harness
        .until("the cart endpoint", has_addresses(CART, &["10.0.1.1:8080"]))
        .await;
    assert_eq!(
        addresses(&snapshot, CHECKOUT),
        ["10.0.0.1:8080"],
        "the last published endpoints, while over budget"
    );
    assert_eq!(left_out(&harness.metrics, "over_budget"), 1);
}

#[tokio::test]
async fn a_slice_relabelled_to_another_service_moves_its_endpoints_there() {
    const CART: &str = "outbound|80||cart.shop.svc.cluster.local";
    let mut harness = Harness::start(|server| {
        server.apply(&checkout_service());
        server.apply(&service("shop", "cart", &[("http", 80)]));
        server.apply(&checkout_slice("shared-a", vec![ready("10.0.0.1")]));
    })
    .await;
    harness
        .until(
            "the slice under checkout",
            has_addresses(CHECKOUT, &["10.0.0.1:8080"]),
        )
        .await;
    harness.server.apply(&endpoint_slice(
        "shop",
        "shared-a",
        "cart",
        &[("http", 8080)],
        vec![ready("10.0.0.1")],
    ));
    let snapshot = harness
        .until(
            "the slice under cart",
            has_addresses(CART, &["10.0.0.1:8080"]),
        )
        .await;
    assert_eq!(addresses(&snapshot, CHECKOUT), Vec::<String>::new());
}

#[tokio::test]
async fn an_update_shares_the_clusters_that_did_not_change_with_the_previous_one() {
    // The pipeline screens and encodes again only the services whose `Arc` changed.
    const CART: &str = "outbound|80||cart.shop.svc.cluster.local";
    let server = FakeApiServer::start().await;
    server.serve::<Service>();
    server.serve::<EndpointSlice>();
    server.apply(&checkout_service());
    server.apply(&checkout_slice("checkout-a", vec![ready("10.0.0.1")]));
    server.apply(&service("shop", "cart", &[("http", 80)]));
    let source = KubeSource::new(
        server.client(),
        KubeOptions {
            namespaces: vec!["shop".to_owned()],
            mapping: Mapping {
                pod_labels: Default::default(),
                node_regions: false,
                ..Mapping::default()
            },
            ..KubeOptions::default()
        },
    );
    let (sender, mut updates) = mpsc::channel(8);
    let task = tokio::spawn(Box::new(source).run(fulcrum_sources::SourceSink::new(0, sender)));
    let mut next = async || {
        tokio::time::timeout(WAIT, updates.recv())
            .await
            .expect("published in time")
            .expect("source running")
    };
    let first = next().await;
    server.apply(&endpoint_slice(
        "shop",
        "cart-a",
        "cart",
        &[("http", 8080)],
        vec![ready("10.0.1.1")],
    ));
    let second = next().await;
    assert_eq!(
        second.services[CART].endpoints[0].address.to_string(),
        "10.0.1.1:8080"
    );
    assert!(std::sync::Arc::ptr_eq(
        &first.services[CHECKOUT],
        &second.services[CHECKOUT]
    ));
    task.abort();
}
