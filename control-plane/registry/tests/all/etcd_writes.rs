//! Writes to etcd when etcd fails, on a real three-member cluster: during an outage every
//! caller gets its 503 / `UNAVAILABLE` within the request deadline, queued or not.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use fulcrum_proto::registry::v1 as pb;
use fulcrum_registry::{EtcdBackend, EtcdConfig, Registry, View, registry::new_epoch};
use reqwest::StatusCode;
use tokio::task::JoinSet;
use tonic::Code;

use crate::{
    etcd_cluster::EtcdCluster,
    support::{ALICE, authed, grpc_client, http, instance, pb_instance, serve},
};

/// The request deadline of the replicas here.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// What an answer may take beyond the deadline: the HTTP round trip and scheduling on a
/// shared 2-core machine, far below one more deadline (what a queued write waited before).
const SLACK: Duration = Duration::from_millis(750);

async fn replica(
    cluster: &EtcdCluster,
    config: impl FnOnce(&mut EtcdConfig),
) -> Result<Arc<Registry>> {
    let view = Arc::new(View::new(new_epoch()));
    let mut etcd = EtcdConfig::new(cluster.endpoints());
    etcd.request_timeout = REQUEST_TIMEOUT;
    config(&mut etcd);
    let backend = EtcdBackend::connect(etcd, view.clone()).await?;
    Ok(Registry::new(backend, view))
}

/// `count` registrations over REST at once; each one's status and how long it took.
async fn register_at_once(rest: &str, count: u16) -> Result<Vec<(StatusCode, Duration)>> {
    let client = http();
    let mut calls = JoinSet::new();
    for port in 1000..1000 + count {
        let (client, url) = (client.clone(), format!("{rest}/v1/registry/instances"));
        calls.spawn(async move {
            let started = Instant::now();
            let response = client
                .post(url)
                .bearer_auth(ALICE)
                .json(&instance("outage", &format!("outage-{port}"), port))
                .send()
                .await?;
            anyhow::Ok((response.status(), started.elapsed()))
        });
    }
    let mut answers = Vec::new();
    while let Some(answer) = calls.join_next().await {
        answers.push(answer??);
    }
    Ok(answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_etcd_outage_every_write_is_refused_with_503_within_the_request_deadline()
-> Result<()> {
    let mut cluster = EtcdCluster::start(3).await?;
    let served = serve(replica(&cluster, |_| {}).await?).await?;
    let mut client = grpc_client(&served).await?;
    client
        .register(authed(
            pb::RegisterRequest {
                instance: Some(pb_instance("outage", "before", 9)),
            },
            ALICE,
        ))
        .await?;

    cluster.kill(0);
    cluster.kill(1);
    // More than the writes etcd gets at once (128): some wait their turn in the queue.
    let answers = register_at_once(&served.rest, 300).await?;
    let slowest = answers
        .iter()
        .map(|(_, took)| *took)
        .max()
        .unwrap_or_default();
    eprintln!("300 registrations during the outage: the slowest 503 took {slowest:?}");
    for (status, took) in &answers {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            *took <= REQUEST_TIMEOUT + SLACK,
            "a 503 took {took:?}, beyond the {REQUEST_TIMEOUT:?} deadline"
        );
    }

    let started = Instant::now();
    let heartbeat = client
        .heartbeat(authed(
            pb::HeartbeatRequest {
                id: "before".into(),
            },
            ALICE,
        ))
        .await
        .expect_err("no quorum");
    assert_eq!(heartbeat.code(), Code::Unavailable, "{heartbeat}");
    assert!(started.elapsed() <= REQUEST_TIMEOUT + SLACK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_finding_the_queue_full_is_refused_at_once() -> Result<()> {
    let mut cluster = EtcdCluster::start(3).await?;
    let served = serve(
        replica(&cluster, |etcd| {
            etcd.max_writes_in_flight = 2;
            etcd.max_queued_writes = 3;
        })
        .await?,
    )
    .await?;
    cluster.kill(0);
    cluster.kill(1);
    let answers = register_at_once(&served.rest, 20).await?;
    assert!(
        answers
            .iter()
            .all(|(status, _)| *status == StatusCode::SERVICE_UNAVAILABLE),
        "{answers:?}"
    );
    // Two in flight and three queued wait for the deadline; the fifteen others find no place.
    let at_once = answers
        .iter()
        .filter(|(_, took)| *took < REQUEST_TIMEOUT / 2)
        .count();
    assert_eq!(at_once, 15, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|(_, took)| *took <= REQUEST_TIMEOUT + SLACK),
        "{answers:?}"
    );
    Ok(())
}
