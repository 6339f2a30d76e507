use std::collections::{BTreeMap, BTreeSet};

use crate::{
    Attributes, Endpoint, Health,
    policy::ServicePolicy,
    receive::{ENDPOINT_FIELDS, receive, screen_service, validate_service},
};

fn body(value: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

#[test]
fn a_bad_service_is_skipped_with_its_name_and_the_rest_applies() {
    let received = receive(&body(serde_json::json!({
        "version": "v1",
        "services": {
            "good": {"endpoints": [{"address": "10.0.0.1:80"}]},
            "zero-weight": {"endpoints": [{"address": "10.0.0.2:80", "weight": 0}]},
            "not-an-address": {"endpoints": [{"address": "nowhere"}]},
            "twice": {"endpoints": [{"address": "10.0.0.3:80"}, {"address": "10.0.0.3:80"}]},
            "port-zero": {"endpoints": [{"address": "10.0.0.4:0"}]},
            "unspecified": {"endpoints": [{"address": "0.0.0.0:80"}]},
        }
    })))
    .unwrap();
    assert_eq!(
        received.snapshot.services.keys().collect::<Vec<_>>(),
        ["good"]
    );
    let skipped: BTreeMap<_, _> = received
        .skipped
        .iter()
        .map(|s| (s.service.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(
        skipped.keys().copied().collect::<Vec<_>>(),
        [
            "not-an-address",
            "port-zero",
            "twice",
            "unspecified",
            "zero-weight"
        ]
    );
    assert!(
        skipped["zero-weight"].contains("services.zero-weight.endpoints[0].weight"),
        "{}",
        skipped["zero-weight"]
    );
    assert!(
        skipped["twice"].contains("appears twice"),
        "{}",
        skipped["twice"]
    );
}

#[test]
fn fields_a_newer_control_plane_adds_are_ignored_at_every_level() {
    let received = receive(&body(serde_json::json!({
        "version": "v2",
        "generation": 7,
        "services": {
            "shop": {
                "protocol": "http2",
                "endpoints": [{"address": "10.0.0.1:80", "weight": 3, "locality": {"region": "eu"}}]
            }
        }
    })))
    .unwrap();
    assert!(received.skipped.is_empty(), "{:?}", received.skipped);
    let endpoint = &received.snapshot.services["shop"].endpoints[0];
    assert_eq!(endpoint.weight, 3);
}

#[test]
fn an_invalid_policy_is_left_out_and_the_endpoints_still_apply() {
    let received = receive(&body(serde_json::json!({
        "version": "v3",
        "services": {"shop": {"endpoints": [{"address": "10.0.0.1:80"}]}},
        "policy": {"default": {"retry": 99}}
    })))
    .unwrap();
    assert_eq!(received.snapshot.policy, None);
    assert!(
        received
            .policy_error
            .as_deref()
            .is_some_and(|e| e.contains("policy.default.retry")),
        "{:?}",
        received.policy_error
    );
    assert_eq!(received.snapshot.services.len(), 1);
}

#[test]
fn a_policy_field_this_filter_does_not_know_refuses_the_policy() {
    let received = receive(&body(serde_json::json!({
        "version": "v4",
        "services": {},
        "policy": {"default": {"brand_new_knob": true}}
    })))
    .unwrap();
    assert_eq!(received.snapshot.policy, None);
    assert!(received.policy_error.is_some());
}

#[test]
fn a_body_without_a_version_is_refused_whole() {
    assert!(receive(b"{\"services\": {}}").is_err());
    assert!(receive(b"\xff\xfe").is_err());
    assert!(receive(b"[]").is_err());
}

#[test]
fn the_known_endpoint_fields_are_exactly_what_an_endpoint_serializes() {
    let endpoint = Endpoint::new("10.0.0.1:80".parse().unwrap())
        .with_weight(2)
        .with_health(Health::Draining)
        .with_attributes(Attributes {
            zone: Some("z".into()),
            tags: BTreeSet::from(["t".to_owned()]),
            capabilities: BTreeSet::from(["c".to_owned()]),
            metadata: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
        });
    let serialized = serde_json::to_value(&endpoint).unwrap();
    let mut fields: Vec<&str> = serialized
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    let mut known = ENDPOINT_FIELDS.to_vec();
    known.sort_unstable();
    assert_eq!(fields, known);
}

#[test]
fn a_health_check_change_keeps_the_same_selection_and_a_retry_change_does_not() {
    let base = ServicePolicy::default();
    let mut checked = base.clone();
    checked.health_check = Some(
        crate::Policy::from_json(r#"{"default": {"health_check": {"tcp": {}}}}"#)
            .unwrap()
            .default
            .health_check
            .unwrap(),
    );
    assert!(base.same_selection(&checked));
    let mut retried = base.clone();
    retried.retry = 2;
    assert!(!base.same_selection(&retried));
}

#[test]
fn screening_keeps_the_valid_endpoints_and_names_each_dropped_one() {
    let endpoint =
        |address: &str, weight: u32| Endpoint::new(address.parse().unwrap()).with_weight(weight);
    let service = crate::ServiceEndpoints {
        endpoints: vec![
            endpoint("10.0.0.1:80", 1),
            endpoint("10.0.0.2:80", 0),
            endpoint("10.0.0.1:80", 3),
            endpoint("0.0.0.0:80", 1),
        ],
        protocol: Some(crate::UpstreamProtocol::Http2),
    };
    let screened = screen_service("shop", &service).unwrap();
    assert_eq!(
        screened.service.protocol, service.protocol,
        "screening keeps the service's protocol"
    );
    assert_eq!(screened.service.endpoints, [endpoint("10.0.0.1:80", 1)]);
    let paths: Vec<&str> = screened.dropped.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "services.shop.endpoints[1].weight",
            "services.shop.endpoints[2].address",
            "services.shop.endpoints[3].address",
        ]
    );
    assert!(
        screen_service("", &service).is_err(),
        "a service without a name is dropped whole"
    );
}

proptest::proptest! {
    /// What the control plane publishes after screening, the filter always accepts.
    #[test]
    fn a_screened_service_always_passes_the_filters_validation(
        endpoints in proptest::collection::vec(
            (0u8..4, 0u16..3, 0u32..3, proptest::bool::ANY), 0..12),
    ) {
        let endpoints = endpoints
            .into_iter()
            .map(|(host, port, weight, unspecified)| Endpoint::new(std::net::SocketAddr::from((
                    if unspecified { [0, 0, 0, 0] } else { [10, 0, 0, host] },
                    port,
                ))).with_weight(weight))
            .collect();
        let service = crate::ServiceEndpoints {
            endpoints,
            protocol: None,
        };
        let screened = screen_service("svc", &service).unwrap();
        proptest::prop_assert!(validate_service("svc", &screened.service).is_ok());
        let valid = validate_service("svc", &service).is_ok();
        proptest::prop_assert_eq!(valid, screened.dropped.is_empty());
        if valid {
            proptest::prop_assert_eq!(&screened.service, &service);
        }
    }
}
