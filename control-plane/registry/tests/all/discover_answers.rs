//! Discover answers are kept per query and service generation (the view's shared list, the
//! registry's filtered entries, the gRPC proto messages): over real gRPC calls, every kind of
//! change to the service (a new instance, a re-registration with new values, a health
//! transition, a removal) shows in the next answer, and repeated answers stay equal.

use anyhow::{Context, Result};
use fulcrum_proto::registry::v1::{self as pb, registry_client::RegistryClient};
use fulcrum_registry::{HealthStatus, Registry};
use tonic::transport::Channel;

use crate::support::{ALICE, BOB, authed, grpc_client, loopback, pb_instance, serve};

#[tokio::test]
async fn grpc_discovery_answers_follow_every_change_of_the_service() -> Result<()> {
    let served = serve(Registry::in_memory(loopback())).await?;
    let mut client = grpc_client(&served).await?;
    let discover = |client: &mut RegistryClient<Channel>| {
        let mut client = client.clone();
        async move {
            let found = client
                .discover(authed(
                    pb::DiscoverRequest {
                        name: "search".into(),
                        tags: vec!["gpu".into()],
                        ..pb::DiscoverRequest::default()
                    },
                    BOB,
                ))
                .await?
                .into_inner();
            anyhow::Ok(
                found
                    .registrations
                    .iter()
                    .map(|r| {
                        let instance = r.instance.as_ref().expect("instance");
                        (instance.id.clone(), instance.weight, r.health)
                    })
                    .collect::<Vec<_>>(),
            )
        }
    };
    let register = |id: &'static str, port: u16, weight: u32| {
        let mut instance = pb_instance("search", id, port);
        instance.tags = vec!["gpu".into()];
        instance.weight = weight;
        authed(
            pb::RegisterRequest {
                instance: Some(instance),
            },
            ALICE,
        )
    };
    let unknown = pb::HealthStatus::Unknown as i32;
    client.register(register("s-1", 1, 1)).await?;
    assert_eq!(discover(&mut client).await?, [("s-1".into(), 1, unknown)]);
    assert_eq!(discover(&mut client).await?, [("s-1".into(), 1, unknown)]);
    client.register(register("s-2", 2, 1)).await?;
    assert_eq!(
        discover(&mut client).await?,
        [("s-1".into(), 1, unknown), ("s-2".into(), 1, unknown)]
    );
    client.register(register("s-1", 1, 5)).await?;
    assert_eq!(
        discover(&mut client).await?,
        [("s-1".into(), 5, unknown), ("s-2".into(), 1, unknown)]
    );
    let entry = served.registry.view().get("s-2").context("s-2")?;
    served
        .registry
        .view()
        .set_health(&entry.record, HealthStatus::Unhealthy);
    assert_eq!(discover(&mut client).await?, [("s-1".into(), 5, unknown)]);
    client
        .deregister(authed(pb::DeregisterRequest { id: "s-1".into() }, ALICE))
        .await?;
    assert!(discover(&mut client).await?.is_empty());
    Ok(())
}
