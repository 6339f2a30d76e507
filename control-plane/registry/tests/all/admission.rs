//! What a token may register, over the real REST and gRPC APIs: refused address classes,
//! per-identity service names, address ranges and quotas, the registry's cap; each refusal
//! names the field, says how to fix it, and is counted by reason.

use std::{collections::BTreeMap, sync::Arc};

use anyhow::{Context, Result};
use fulcrum_pipeline::policy::attach;
use fulcrum_registry::{
    EtcdConfig, Identity, InstanceSpec, Limits, Registry, TokenAuth, api::rest::ErrorJson,
    model::MAX_ENDPOINT_BYTES,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tonic::Code;

use crate::{
    etcd_cluster::EtcdCluster,
    support::{
        ALICE, Served, grpc_client, pb_instance, post_instance, register_request, scrape, serve,
        serve_with, value,
    },
};

const SHOP: &str = "shop-token-0123456789";
const OPS: &str = "ops-token-0123456789ab";

/// `shop` may register `shop-*` and `cart` in 10.0.0.0/8, two at a time; `ops` is unscoped.
fn tokens() -> Arc<TokenAuth> {
    Arc::new(
        TokenAuth::parse(&format!(
            "shop {SHOP} services=shop-*,cart addresses=10.0.0.0/8 max=2\nops {OPS}\n"
        ))
        .expect("valid token file"),
    )
}

fn body(name: &str, id: &str, address: &str) -> Value {
    json!({ "name": name, "id": id, "address": address, "port": 8080 })
}

/// Registers over REST; the status and the error body, if any.
async fn register(
    served: &Served,
    token: &str,
    body: &Value,
) -> Result<(StatusCode, Option<ErrorJson>)> {
    let response = post_instance(served, token, body).await?;
    let status = response.status();
    let error = if status.is_success() {
        None
    } else {
        Some(response.json().await?)
    };
    Ok((status, error))
}

fn refusals(served: &Served, reason: &str) -> Option<f64> {
    let text = scrape(served).expect("encodes");
    value(
        &text,
        &format!("fulcrum_registry_refusals_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test]
async fn loopback_link_local_and_metadata_addresses_are_refused_naming_the_address_field()
-> Result<()> {
    let served = serve(Registry::in_memory(Limits::default())).await?;
    for (index, address) in ["127.0.0.1", "169.254.169.254", "fe80::1", "::1"]
        .into_iter()
        .enumerate()
    {
        let mut evil = body("checkout", &format!("evil-{index}"), address);
        evil["port"] = json!(15000);
        let (status, error) = register(&served, ALICE, &evil).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{address}");
        let error = error.context("an error body")?;
        assert_eq!(error.error, "invalid_argument");
        assert_eq!(error.fields.len(), 1, "{address}");
        assert_eq!(error.fields[0].field, "address");
        assert!(
            error.fields[0]
                .reason
                .contains("--registry-allow-addresses"),
            "{}",
            error.fields[0].reason
        );
    }
    assert!(served.registry.view().is_empty());
    assert_eq!(refusals(&served, "address_class"), Some(4.0));
    Ok(())
}

#[tokio::test]
async fn an_explicitly_allowed_range_admits_its_addresses_and_no_others() -> Result<()> {
    let limits = Limits::allowing(vec!["127.0.0.0/8".parse()?]);
    let served = serve(Registry::in_memory(limits)).await?;
    let (status, _) = register(&served, ALICE, &body("checkout", "c-1", "127.0.0.1")).await?;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = register(&served, ALICE, &body("checkout", "c-2", "169.254.169.254")).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test]
async fn an_identity_registers_only_its_service_names_in_its_address_ranges() -> Result<()> {
    let served = serve_with(Registry::in_memory(Limits::default()), tokens()).await?;
    for (name, id) in [("shop-cart", "s-1"), ("cart", "s-2")] {
        let (status, error) = register(&served, SHOP, &body(name, id, "10.1.2.3")).await?;
        assert_eq!(status, StatusCode::OK, "{name}: {error:?}");
    }

    let (status, error) = register(&served, SHOP, &body("checkout", "s-3", "10.1.2.4")).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let error = error.context("an error body")?;
    assert_eq!(error.error, "permission_denied");
    assert_eq!(error.fields[0].field, "name");
    assert!(
        error
            .message
            .contains("identity `shop` may register services shop-*,cart"),
        "{}",
        error.message
    );

    let (status, error) = register(&served, SHOP, &body("cart", "s-4", "192.168.1.1")).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let error = error.context("an error body")?;
    assert_eq!(error.fields[0].field, "address");
    assert!(error.message.contains("10.0.0.0/8"), "{}", error.message);

    // The same refusal over gRPC.
    let mut client = grpc_client(&served).await?;
    let mut instance = pb_instance("checkout", "s-5", 8080);
    instance.address = "10.1.2.5".into();
    let refused = client
        .register(register_request(instance.clone(), SHOP))
        .await
        .expect_err("outside the scope");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().starts_with("name: "), "{refused}");
    // An unscoped identity may register the name.
    instance.id = "o-1".into();
    client.register(register_request(instance, OPS)).await?;

    assert_eq!(refusals(&served, "service_scope"), Some(2.0));
    assert_eq!(refusals(&served, "address_scope"), Some(1.0));
    let owners: Vec<(String, String)> = served
        .registry
        .view()
        .entries()
        .iter()
        .map(|e| {
            (
                e.record.registration.id.to_string(),
                e.record.owner.to_string(),
            )
        })
        .collect();
    assert_eq!(
        owners,
        [
            ("o-1".to_owned(), "ops".to_owned()),
            ("s-1".to_owned(), "shop".to_owned()),
            ("s-2".to_owned(), "shop".to_owned())
        ]
    );
    Ok(())
}

#[tokio::test]
async fn an_identity_holds_at_most_its_quota_and_a_re_registration_takes_no_new_slot() -> Result<()>
{
    let served = serve_with(Registry::in_memory(Limits::default()), tokens()).await?;
    for (id, address) in [("s-1", "10.0.0.1"), ("s-2", "10.0.0.2")] {
        let (status, _) = register(&served, SHOP, &body("shop-a", id, address)).await?;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, error) = register(&served, SHOP, &body("shop-a", "s-3", "10.0.0.3")).await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let error = error.context("an error body")?;
    assert_eq!(error.error, "resource_exhausted");
    assert!(error.message.contains("quota of 2"), "{}", error.message);
    assert!(error.message.contains("max="), "{}", error.message);
    // Replacing one it holds is not one more.
    let (status, _) = register(&served, SHOP, &body("shop-b", "s-1", "10.0.0.9")).await?;
    assert_eq!(status, StatusCode::OK);
    // Other identities are not held to it.
    let (status, _) = register(&served, OPS, &body("shop-a", "o-1", "10.0.0.4")).await?;
    assert_eq!(status, StatusCode::OK);
    served.registry.deregister("s-2", "shop").await?;
    let (status, _) = register(&served, SHOP, &body("shop-a", "s-3", "10.0.0.3")).await?;
    assert_eq!(status, StatusCode::OK, "a slot freed by a deregistration");
    assert_eq!(refusals(&served, "identity_quota"), Some(1.0));
    Ok(())
}

#[tokio::test]
async fn the_registry_holds_at_most_its_cap_of_live_registrations() -> Result<()> {
    let limits = Limits {
        max_instances: 3,
        ..Limits::default()
    };
    let served = serve(Registry::in_memory(limits)).await?;
    for (id, address) in [
        ("a-1", "10.0.0.1"),
        ("a-2", "10.0.0.2"),
        ("a-3", "10.0.0.3"),
    ] {
        let (status, _) = register(&served, ALICE, &body("a", id, address)).await?;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, error) = register(&served, ALICE, &body("b", "a-4", "10.0.0.1")).await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let error = error.context("an error body")?;
    assert!(
        error.message.contains("--registry-max-instances"),
        "{}",
        error.message
    );
    let mut client = grpc_client(&served).await?;
    let mut instance = pb_instance("b", "a-5", 1);
    instance.address = "10.0.0.4".into();
    let refused = client
        .register(register_request(instance, ALICE))
        .await
        .expect_err("the cap");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(served.registry.view().len(), 3);
    assert_eq!(refusals(&served, "global_cap"), Some(2.0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_on_etcd_never_exceed_the_identitys_quota() -> Result<()> {
    let cluster = EtcdCluster::start(1).await?;
    let registry =
        Registry::on_etcd(EtcdConfig::new(cluster.endpoints()), Limits::default()).await?;
    let shop = tokens()
        .identify(Some(&format!("Bearer {SHOP}")))
        .expect("known");
    let mut calls = JoinSet::new();
    for index in 0..20 {
        let (registry, shop) = (registry.clone(), shop.clone());
        calls.spawn(async move {
            let spec = InstanceSpec {
                name: "shop-a".into(),
                id: format!("s-{index}"),
                address: format!("10.0.0.{index}"),
                port: 8080,
                ..InstanceSpec::default()
            };
            registry.register(&spec, &shop).await.is_ok()
        });
    }
    let mut admitted = 0;
    while let Some(ok) = calls.join_next().await {
        admitted += usize::from(ok?);
    }
    assert_eq!(admitted, 2);
    assert_eq!(registry.view().owned_by("shop"), 2);
    Ok(())
}

/// The largest registration of `name`/`id` the endpoint budget admits: metadata entries
/// with the longest keys and values, the last one cut to fit.
fn largest(name: &str, id: &str, address: &str) -> InstanceSpec {
    let spec = |metadata: &BTreeMap<String, String>| InstanceSpec {
        name: name.into(),
        id: id.into(),
        address: address.into(),
        port: 65_535,
        weight: 10_000,
        metadata: metadata.clone(),
        ..InstanceSpec::default()
    };
    let mut metadata = BTreeMap::new();
    for index in 0..64 {
        let key = format!("{index:02}{}", "k".repeat(62));
        let fits = (0..=256).rev().find(|length| {
            let mut more = metadata.clone();
            more.insert(key.clone(), "v".repeat(*length));
            spec(&more).validate().is_ok()
        });
        let Some(length) = fits else { break };
        metadata.insert(key, "v".repeat(length));
        if length < 256 {
            break;
        }
    }
    spec(&metadata)
}

#[tokio::test]
async fn a_registry_full_of_the_largest_registrations_stays_under_the_filters_snapshot_cap()
-> Result<()> {
    /// `control_plane.max_snapshot_bytes`' default in filters/balancer/src/config.rs.
    const FILTER_SNAPSHOT_CAP: usize = 32 << 20;
    let registry = Registry::in_memory(Limits::default());
    let owner = Identity::unscoped("alice");
    let max = registry.limits().max_instances;
    // Every registration a service of its own, named as long as names go.
    let name = |index: usize| format!("{index:05}{}", "s".repeat(248));
    let address =
        |index: usize| format!("10.{}.{}.{}", index >> 16, (index >> 8) & 255, index & 255);
    let template = largest(&name(0), "i-00000", &address(0));
    let served_len = |spec: &InstanceSpec| {
        let endpoint = spec
            .validate()
            .expect("valid")
            .endpoint(fulcrum_core::Health::Unhealthy);
        serde_json::to_vec(&endpoint).map_or(0, |json| json.len())
    };
    for index in 0..max {
        let spec = InstanceSpec {
            name: name(index),
            id: format!("i-{index:05}"),
            address: address(index),
            ..template.clone()
        };
        registry.register(&spec, &owner).await?;
    }
    let one_more = InstanceSpec {
        name: "late".into(),
        id: "late".into(),
        ..template.clone()
    };
    let refused = registry
        .register(&one_more, &owner)
        .await
        .expect_err("the cap");
    assert!(refused.to_string().contains("cap of 10000"), "{refused}");
    let snapshot = serde_json::to_vec(&attach(&registry.view().services().services, None))?;
    let endpoint = served_len(&template);
    eprintln!(
        "{max} registrations of {endpoint} published bytes each: a snapshot of {} bytes",
        snapshot.len()
    );
    assert!(endpoint > MAX_ENDPOINT_BYTES - 64, "{endpoint} bytes");
    assert!(
        snapshot.len() < FILTER_SNAPSHOT_CAP,
        "{} bytes",
        snapshot.len()
    );
    Ok(())
}
