//! The mapping from Services and EndpointSlices to clusters, without a watcher.

use std::sync::Arc;

use fulcrum_core::{Health, UpstreamProtocol, endpoint::REGION_KEY};
use fulcrum_kube_source::{Mapping, cluster_name, endpoint_health, port_protocol};
use fulcrum_test_support::kube_api::objects::{
    endpoint, endpoint_slice, ready, service, with_labels, with_many_labels,
};
use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, ServicePort},
        discovery::v1::{EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

const CHECKOUT_HTTP: &str = "outbound|80||checkout.shop.svc.cluster.local";

fn addresses(services: &fulcrum_sources::Services, cluster: &str) -> Vec<String> {
    services[cluster]
        .endpoints
        .iter()
        .map(|endpoint| endpoint.address.to_string())
        .collect()
}

#[test]
fn cluster_names_follow_istio_outbound_names() {
    assert_eq!(
        cluster_name("checkout", "shop", 80, "cluster.local"),
        CHECKOUT_HTTP
    );
    assert_eq!(
        cluster_name("db", "data", 5432, "corp.internal"),
        "outbound|5432||db.data.svc.corp.internal"
    );
}

#[test]
fn endpoint_health_follows_istio_endpoint_health_status() {
    let conditions = |ready, serving, terminating| EndpointConditions {
        ready,
        serving,
        terminating,
    };
    let cases = [
        // (ready, serving, terminating) → health without / with send_unhealthy_endpoints
        (
            (None, None, None),
            Some(Health::Healthy),
            Some(Health::Healthy),
        ),
        (
            (Some(true), Some(true), Some(false)),
            Some(Health::Healthy),
            Some(Health::Healthy),
        ),
        (
            (Some(false), Some(true), Some(true)),
            Some(Health::Draining),
            Some(Health::Draining),
        ),
        ((Some(false), Some(false), Some(true)), None, None),
        (
            (Some(false), Some(false), Some(false)),
            None,
            Some(Health::Unhealthy),
        ),
        ((Some(false), None, None), None, Some(Health::Unhealthy)),
    ];
    for ((ready, serving, terminating), default, sending_unhealthy) in cases {
        let conditions = conditions(ready, serving, terminating);
        assert_eq!(
            endpoint_health(Some(&conditions), false),
            default,
            "{conditions:?}"
        );
        assert_eq!(
            endpoint_health(Some(&conditions), true),
            sending_unhealthy,
            "{conditions:?} with send_unhealthy_endpoints"
        );
    }
    assert_eq!(endpoint_health(None, false), Some(Health::Healthy));
}

#[test]
fn each_service_port_is_a_cluster_with_the_slice_target_port() {
    let services = [Arc::new(service(
        "shop",
        "checkout",
        &[("http", 80), ("grpc", 9090)],
    ))];
    let slices = [Arc::new(endpoint_slice(
        "shop",
        "checkout-abc",
        "checkout",
        &[("http", 8080), ("grpc", 9091)],
        vec![ready("10.0.0.2"), ready("10.0.0.1")],
    ))];
    let mapped = Mapping::default().services(&services, &slices, &[], &[]);
    assert_eq!(
        mapped.keys().collect::<Vec<_>>(),
        [
            "outbound|80||checkout.shop.svc.cluster.local",
            "outbound|9090||checkout.shop.svc.cluster.local",
        ]
    );
    assert_eq!(
        addresses(&mapped, CHECKOUT_HTTP),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
    assert_eq!(
        addresses(&mapped, "outbound|9090||checkout.shop.svc.cluster.local"),
        ["10.0.0.1:9091", "10.0.0.2:9091"]
    );
}

#[test]
fn grpc_and_http2_ports_are_http2_clusters_by_app_protocol_then_by_istio_port_name() {
    let service_port = |name: &str, app_protocol: Option<&str>| ServicePort {
        name: Some(name.to_owned()),
        app_protocol: app_protocol.map(str::to_owned),
        port: 80,
        ..ServicePort::default()
    };
    let slice_port = |app_protocol: &str| EndpointPort {
        app_protocol: Some(app_protocol.to_owned()),
        ..EndpointPort::default()
    };
    let http2 = Some(UpstreamProtocol::Http2);
    let http1 = Some(UpstreamProtocol::Http1);
    let cases = [
        (service_port("web", Some("grpc")), None, http2),
        (service_port("web", Some("http2")), None, http2),
        (service_port("web", Some("kubernetes.io/h2c")), None, http2),
        // Service names compare case-insensitively (RFC 6335), as Istio reads them.
        (service_port("web", Some("GRPC")), None, http2),
        (service_port("web", Some("HTTP")), None, http1),
        (service_port("grpc", Some("http")), None, http1),
        (service_port("grpc", Some("kubernetes.io/ws")), None, None),
        (service_port("web", None), Some(slice_port("grpc")), http2),
        (
            service_port("grpc-web", Some("http")),
            Some(slice_port("grpc")),
            http1,
        ),
        (service_port("grpc", None), None, http2),
        (service_port("grpc-api", None), None, http2),
        (service_port("GRPC-api", None), None, http2),
        (service_port("http2", None), None, http2),
        (service_port("http2-internal", None), None, http2),
        (service_port("http", None), None, http1),
        (service_port("http-metrics", None), None, http1),
        (service_port("grpcx", None), None, None),
        (service_port("tcp-grpc", None), None, None),
        (service_port("", None), None, None),
    ];
    for (port, slice, expected) in cases {
        assert_eq!(
            port_protocol(&port, slice.as_ref()),
            expected,
            "{port:?} with slice port {slice:?}"
        );
    }
}

#[test]
fn a_cluster_carries_its_ports_protocol() {
    let services = [Arc::new(service(
        "shop",
        "checkout",
        &[("http", 80), ("grpc", 9090), ("metrics", 9100)],
    ))];
    let mapped = Mapping::default().services(&services, &[], &[], &[]);
    let protocol =
        |port: i32| mapped[&cluster_name("checkout", "shop", port, "cluster.local")].protocol;
    assert_eq!(protocol(80), Some(UpstreamProtocol::Http1));
    assert_eq!(protocol(9090), Some(UpstreamProtocol::Http2));
    assert_eq!(protocol(9100), None);
}

#[test]
fn unnamed_single_port_matches_the_unnamed_slice_port() {
    let services = [Arc::new(service("shop", "checkout", &[("", 80)]))];
    let slices = [Arc::new(endpoint_slice(
        "shop",
        "checkout-abc",
        "checkout",
        &[("", 8080)],
        vec![ready("10.0.0.1")],
    ))];
    let mapped = Mapping::default().services(&services, &slices, &[], &[]);
    assert_eq!(addresses(&mapped, CHECKOUT_HTTP), ["10.0.0.1:8080"]);
}

#[test]
fn slices_of_one_service_are_merged_and_a_duplicate_address_keeps_its_healthiest_state() {
    let services = [Arc::new(service("shop", "checkout", &[("http", 80)]))];
    let slices = [
        Arc::new(endpoint_slice(
            "shop",
            "checkout-a",
            "checkout",
            &[("http", 8080)],
            vec![ready("10.0.0.1"), endpoint("10.0.0.3", false, true, true)],
        )),
        Arc::new(endpoint_slice(
            "shop",
            "checkout-b",
            "checkout",
            &[("http", 8080)],
            vec![ready("10.0.0.2"), ready("10.0.0.3")],
        )),
    ];
    let mapped = Mapping::default().services(&services, &slices, &[], &[]);
    assert_eq!(
        addresses(&mapped, CHECKOUT_HTTP),
        ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
    );
    assert!(
        mapped[CHECKOUT_HTTP]
            .endpoints
            .iter()
            .all(|endpoint| endpoint.health == Health::Healthy)
    );
}

#[test]
fn service_without_slices_is_an_empty_cluster_and_slices_without_a_service_are_ignored() {
    let services = [Arc::new(service("shop", "checkout", &[("http", 80)]))];
    let slices = [Arc::new(endpoint_slice(
        "shop",
        "orphan-abc",
        "orphan",
        &[("http", 8080)],
        vec![ready("10.0.0.9")],
    ))];
    let mapped = Mapping::default().services(&services, &slices, &[], &[]);
    assert_eq!(mapped.len(), 1);
    assert!(mapped[CHECKOUT_HTTP].endpoints.is_empty());
}

#[test]
fn udp_ports_external_name_services_and_fqdn_slices_are_skipped() {
    let mut dns = service("shop", "dns", &[("dns", 53)]);
    if let Some(ports) = dns.spec.as_mut().and_then(|spec| spec.ports.as_mut()) {
        ports[0].protocol = Some("UDP".to_owned());
    }
    let mut external = service("shop", "payments", &[("https", 443)]);
    if let Some(spec) = external.spec.as_mut() {
        spec.type_ = Some("ExternalName".to_owned());
    }
    let mut fqdn = endpoint_slice(
        "shop",
        "checkout-fqdn",
        "checkout",
        &[("http", 8080)],
        vec![ready("checkout.example")],
    );
    fqdn.address_type = "FQDN".to_owned();
    let services = [
        Arc::new(dns),
        Arc::new(external),
        Arc::new(service("shop", "checkout", &[("http", 80)])),
    ];
    let mapped = Mapping::default().services(&services, &[Arc::new(fqdn)], &[], &[]);
    assert_eq!(mapped.keys().collect::<Vec<_>>(), [CHECKOUT_HTTP]);
    assert!(mapped[CHECKOUT_HTTP].endpoints.is_empty());
}

#[test]
fn zone_node_pod_and_labels_become_endpoint_attributes() {
    let mut checkout = service("shop", "checkout", &[("http", 80)]);
    checkout.metadata = with_labels(checkout.metadata, &[("app", "checkout"), ("tier", "web")]);
    let mut zoned = ready("10.0.0.1");
    zoned.zone = Some("eu-west-1a".to_owned());
    zoned.node_name = Some("node-7".to_owned());
    let mut slice = endpoint_slice(
        "shop",
        "checkout-a",
        "checkout",
        &[("http", 8080)],
        vec![zoned],
    );
    slice.metadata = with_labels(slice.metadata, &[("tier", "frontend")]);
    let mapped = Mapping::default().services(&[Arc::new(checkout)], &[Arc::new(slice)], &[], &[]);
    let endpoint = &mapped[CHECKOUT_HTTP].endpoints[0];
    assert_eq!(endpoint.zone(), Some("eu-west-1a"));
    let metadata: Vec<(&str, &str)> = endpoint
        .metadata()
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    assert_eq!(
        metadata,
        [
            ("app", "checkout"),
            (
                "endpointslice.kubernetes.io/managed-by",
                "endpointslice-controller.k8s.io"
            ),
            ("kubernetes.io/service-name", "checkout"),
            ("node_name", "node-7"),
            ("pod_name", "pod-10.0.0.1"),
            ("tier", "frontend"),
        ]
    );
}

#[test]
fn cluster_domain_is_configurable() {
    let mapping = Mapping {
        cluster_domain: "corp.internal".to_owned(),
        ..Mapping::default()
    };
    let mapped = mapping.services(
        &[Arc::new(service("shop", "checkout", &[("http", 80)]))],
        &[],
        &[],
        &[],
    );
    assert_eq!(
        mapped.keys().collect::<Vec<_>>(),
        ["outbound|80||checkout.shop.svc.corp.internal"]
    );
}

fn pod(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Arc<Pod> {
    Arc::new(Pod {
        metadata: with_labels(
            ObjectMeta {
                namespace: Some(namespace.to_owned()),
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            labels,
        ),
        ..Pod::default()
    })
}

#[test]
fn allowed_pod_labels_become_endpoint_metadata_so_policies_select_subsets() {
    let checkout = service("shop", "checkout", &[("http", 80)]);
    let slice = endpoint_slice(
        "shop",
        "checkout-a",
        "checkout",
        &[("http", 8080)],
        vec![ready("10.0.0.1"), ready("10.0.0.2"), ready("10.0.0.3")],
    );
    let pods = [
        pod(
            "shop",
            "pod-10.0.0.1",
            &[("version", "v1"), ("team", "payments")],
        ),
        pod(
            "shop",
            "pod-10.0.0.2",
            &[("version", "v2"), ("app.kubernetes.io/version", "2.1")],
        ),
        // Same name, other namespace: not the pod behind 10.0.0.3.
        pod("other", "pod-10.0.0.3", &[("version", "v9")]),
    ];
    let mapped = Mapping::default().services(&[Arc::new(checkout)], &[Arc::new(slice)], &pods, &[]);
    let label = |index: usize, key: &str| {
        mapped[CHECKOUT_HTTP].endpoints[index]
            .metadata()
            .get(key)
            .cloned()
    };
    assert_eq!(label(0, "version").as_deref(), Some("v1"));
    assert_eq!(label(0, "team"), None, "not on the allow-list");
    assert_eq!(label(1, "version").as_deref(), Some("v2"));
    assert_eq!(
        label(1, "app.kubernetes.io/version").as_deref(),
        Some("2.1")
    );
    assert_eq!(label(2, "version"), None);

    let none = Mapping {
        pod_labels: Default::default(),
        ..Mapping::default()
    };
    let endpoints = none.services(
        &[Arc::new(service("shop", "checkout", &[("http", 80)]))],
        &[Arc::new(endpoint_slice(
            "shop",
            "checkout-a",
            "checkout",
            &[("http", 8080)],
            vec![ready("10.0.0.1")],
        ))],
        &pods,
        &[],
    );
    assert_eq!(
        endpoints[CHECKOUT_HTTP].endpoints[0]
            .metadata()
            .get("version"),
        None
    );
}

/// Node `name` with region label `region`.
fn node(name: &str, region: &str) -> Arc<Node> {
    Arc::new(Node {
        metadata: with_labels(
            ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            &[("topology.kubernetes.io/region", region)],
        ),
        ..Node::default()
    })
}

/// Endpoint `ip` on node `node`, when given.
fn on_node(ip: &str, node: Option<&str>) -> k8s_openapi::api::discovery::v1::Endpoint {
    let mut endpoint = ready(ip);
    endpoint.node_name = node.map(str::to_owned);
    endpoint
}

#[test]
fn the_region_of_an_endpoints_node_becomes_its_region_metadata_and_only_the_node_says_it() {
    let mut checkout = service("shop", "checkout", &[("http", 80)]);
    // A Service label cannot place endpoints: the key is the node's alone.
    checkout.metadata = with_labels(checkout.metadata, &[(REGION_KEY, "spoofed")]);
    let slice = endpoint_slice(
        "shop",
        "checkout-a",
        "checkout",
        &[("http", 8080)],
        vec![
            on_node("10.0.0.1", Some("node-eu")),
            on_node("10.0.0.2", Some("node-us")),
            on_node("10.0.0.3", Some("node-unlabelled")),
            on_node("10.0.0.4", None),
        ],
    );
    let unlabelled = Arc::new(Node {
        metadata: ObjectMeta {
            name: Some("node-unlabelled".to_owned()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    });
    let nodes = [
        node("node-eu", "eu-west-1"),
        node("node-us", "us-east-1"),
        unlabelled,
    ];
    let mapped =
        Mapping::default().services(&[Arc::new(checkout)], &[Arc::new(slice)], &[], &nodes);
    let regions: Vec<Option<&str>> = mapped[CHECKOUT_HTTP]
        .endpoints
        .iter()
        .map(|endpoint| endpoint.region())
        .collect();
    assert_eq!(regions, [Some("eu-west-1"), Some("us-east-1"), None, None]);
}

/// What the mapping left out, each `kind namespace/name field reason`.
fn left_out(mapped: &fulcrum_kube_source::Mapped) -> Vec<String> {
    mapped
        .left_out
        .iter()
        .map(|entry| {
            format!(
                "{} {}/{} {} {}",
                entry.kind,
                entry.namespace,
                entry.name,
                entry.field,
                entry.reason.as_str()
            )
        })
        .collect()
}

fn checkout_slice(
    name: &str,
    endpoints: Vec<k8s_openapi::api::discovery::v1::Endpoint>,
) -> EndpointSlice {
    endpoint_slice("shop", name, "checkout", &[("http", 8080)], endpoints)
}

fn map_checkout(slices: Vec<EndpointSlice>) -> fulcrum_kube_source::Mapped {
    let slices: Vec<_> = slices.into_iter().map(Arc::new).collect();
    Mapping::default().map(
        &[Arc::new(service("shop", "checkout", &[("http", 80)]))],
        &slices,
        &[],
        &[],
    )
}

#[test]
fn an_address_kubernetes_refuses_in_a_slice_is_left_out_naming_the_slice_and_field() {
    // What the API server's ValidateEndpointIP refuses (the loopback and the node's cloud
    // metadata service among them, also spelled IPv4-mapped), and what is no IP at all.
    let refused = [
        "127.0.0.1",
        "::ffff:127.0.0.1",
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "0.0.0.0",
        "224.0.0.251",
        "not-an-ip",
        "10.0.0.1%eth0",
    ];
    let mut endpoints: Vec<_> = refused.iter().map(|address| ready(address)).collect();
    endpoints.push(ready("10.0.0.1"));
    let mapped = map_checkout(vec![checkout_slice("checkout-a", endpoints)]);
    assert_eq!(
        addresses(&mapped.services, CHECKOUT_HTTP),
        ["10.0.0.1:8080"]
    );
    let expected: Vec<String> = (0..refused.len())
        .map(|index| {
            format!("EndpointSlice shop/checkout-a endpoints[{index}].addresses[0] address")
        })
        .collect();
    assert_eq!(left_out(&mapped), expected);
    let message = mapped.left_out[2].to_string();
    assert!(
        message.contains("shop/checkout-a") && message.contains("link-local"),
        "{message}"
    );
}

#[test]
fn an_address_is_read_in_its_slices_address_type_and_an_ipv4_mapped_one_as_ipv4() {
    let mut ipv6 = checkout_slice(
        "checkout-v6",
        vec![
            ready("fd00::1"),
            ready("::ffff:10.0.0.3"),
            ready("fe80::1%eth0"),
        ],
    );
    ipv6.address_type = "IPv6".to_owned();
    let ipv4 = checkout_slice(
        "checkout-v4",
        vec![
            ready("10.0.0.1"),
            ready("::ffff:10.0.0.2"),
            ready("fd00::2"),
        ],
    );
    let mut unknown = checkout_slice("checkout-x", vec![ready("10.0.0.9")]);
    unknown.address_type = "IPv5".to_owned();
    let mapped = map_checkout(vec![ipv6, ipv4, unknown]);
    assert_eq!(
        addresses(&mapped.services, CHECKOUT_HTTP),
        ["10.0.0.1:8080", "10.0.0.2:8080", "[fd00::1]:8080"]
    );
    assert_eq!(
        left_out(&mapped),
        [
            "EndpointSlice shop/checkout-v4 endpoints[2].addresses[0] address",
            "EndpointSlice shop/checkout-v6 endpoints[1].addresses[0] address",
            "EndpointSlice shop/checkout-v6 endpoints[2].addresses[0] address",
            "EndpointSlice shop/checkout-x addressType address_type",
        ]
    );
}

#[test]
fn a_slice_port_that_is_zero_unset_out_of_range_or_named_twice_leaves_that_slice_out_of_the_cluster()
 {
    let with_port = |name: &str, ip: &str, ports: Vec<EndpointPort>| {
        let mut slice = checkout_slice(name, vec![ready(ip)]);
        slice.ports = Some(ports);
        slice
    };
    let port = |number: Option<i32>| EndpointPort {
        name: Some("http".to_owned()),
        port: number,
        protocol: Some("TCP".to_owned()),
        app_protocol: None,
    };
    let mapped = map_checkout(vec![
        with_port("checkout-a", "10.0.0.1", vec![port(Some(8080))]),
        with_port("checkout-b", "10.0.0.2", vec![port(Some(0))]),
        with_port("checkout-c", "10.0.0.3", vec![port(None)]),
        with_port("checkout-d", "10.0.0.4", vec![port(Some(70_000))]),
        with_port(
            "checkout-e",
            "10.0.0.5",
            vec![port(Some(8080)), port(Some(9090))],
        ),
        // No port of the Service's name, or none at all: nothing for this cluster, not an
        // error (a slice serves the ports it lists).
        with_port("checkout-f", "10.0.0.6", vec![]),
    ]);
    assert_eq!(
        addresses(&mapped.services, CHECKOUT_HTTP),
        ["10.0.0.1:8080"]
    );
    assert_eq!(
        left_out(&mapped),
        [
            "EndpointSlice shop/checkout-b ports[0].port port",
            "EndpointSlice shop/checkout-c ports[0].port port",
            "EndpointSlice shop/checkout-d ports[0].port port",
            "EndpointSlice shop/checkout-e ports[1].name port",
        ]
    );
}

#[test]
fn a_slice_over_the_api_limit_of_endpoints_is_left_out_and_the_other_slices_are_published() {
    let huge: Vec<_> = (0..=fulcrum_kube_source::mapping::MAX_SLICE_ENDPOINTS)
        .map(|index| ready(&format!("10.1.{}.{}", index / 250, index % 250 + 1)))
        .collect();
    let mapped = map_checkout(vec![
        checkout_slice("checkout-a", vec![ready("10.0.0.1")]),
        checkout_slice("checkout-huge", huge),
    ]);
    assert_eq!(
        addresses(&mapped.services, CHECKOUT_HTTP),
        ["10.0.0.1:8080"]
    );
    assert_eq!(
        left_out(&mapped),
        ["EndpointSlice shop/checkout-huge endpoints too_many_endpoints"]
    );
}

#[test]
fn a_service_over_its_size_budget_is_left_out_alone_keeping_its_last_published_clusters() {
    // Every label of a Service is copied into each of its endpoints: 500 valid labels on a
    // Service of 1,000 endpoints would be about 20 MB of snapshot, over the snapshot budget
    // of the whole mesh.
    let mut bloated = service("shop", "bloated", &[("http", 80)]);
    bloated.metadata = with_many_labels(bloated.metadata, 500, 20);
    let endpoints: Vec<_> = (0..1000)
        .map(|index| ready(&format!("10.2.{}.{}", index / 250, index % 250 + 1)))
        .collect();
    let services = [
        Arc::new(service("shop", "checkout", &[("http", 80)])),
        Arc::new(bloated),
    ];
    let slices = [
        Arc::new(checkout_slice("checkout-a", vec![ready("10.0.0.1")])),
        Arc::new(endpoint_slice(
            "shop",
            "bloated-a",
            "bloated",
            &[("http", 8080)],
            endpoints,
        )),
    ];
    let bloated_cluster = cluster_name("bloated", "shop", 80, "cluster.local");
    let mapped = Mapping::default().map(&services, &slices, &[], &[]);
    assert_eq!(
        addresses(&mapped.services, CHECKOUT_HTTP),
        ["10.0.0.1:8080"]
    );
    assert!(!mapped.services.contains_key(&bloated_cluster));
    assert_eq!(
        left_out(&mapped),
        ["Service shop/bloated metadata.labels over_budget"]
    );
    // The last good state of the Service stays while it is over budget.
    let mut previous = fulcrum_sources::Services::new();
    previous.insert(
        bloated_cluster.clone(),
        Arc::new(fulcrum_core::ServiceEndpoints::default()),
    );
    let kept = mapped.published_after(Some(&previous));
    assert!(kept.contains_key(&bloated_cluster));
    assert!(kept.contains_key(CHECKOUT_HTTP));
}

#[test]
fn the_clusters_do_not_depend_on_the_order_the_store_lists_slices_in() {
    // Two slices disagreeing on the port's appProtocol and on an endpoint's zone.
    let slice = |name: &str, app_protocol: &str, zone: &str| {
        let mut endpoint = ready("10.0.0.1");
        endpoint.zone = Some(zone.to_owned());
        let mut slice = checkout_slice(name, vec![endpoint]);
        if let Some(port) = slice.ports.as_mut().and_then(|ports| ports.first_mut()) {
            port.app_protocol = Some(app_protocol.to_owned());
        }
        Arc::new(slice)
    };
    let a = slice("checkout-a", "kubernetes.io/h2c", "zone-a");
    let b = slice("checkout-b", "http", "zone-b");
    let services = [Arc::new(service("shop", "checkout", &[("http", 80)]))];
    let forward = Mapping::default().services(&services, &[a.clone(), b.clone()], &[], &[]);
    let backward = Mapping::default().services(&services, &[b, a], &[], &[]);
    assert_eq!(forward, backward);
    assert_eq!(
        forward[CHECKOUT_HTTP].protocol,
        Some(UpstreamProtocol::Http2),
        "the first slice by name"
    );
    assert_eq!(forward[CHECKOUT_HTTP].endpoints[0].zone(), Some("zone-a"));
}

#[test]
fn unset_serving_reads_as_true_as_the_api_documents_so_a_terminating_endpoint_drains() {
    let terminating = EndpointConditions {
        ready: Some(false),
        serving: None,
        terminating: Some(true),
    };
    assert_eq!(
        endpoint_health(Some(&terminating), false),
        Some(Health::Draining)
    );
}
