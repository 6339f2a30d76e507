//! Writes to etcd when etcd fails, on real etcd: during an outage every caller gets its 503
//! / `UNAVAILABLE` within the request deadline, queued or not; and a write whose answer was
//! lost after it committed never costs the registration it wrote.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use etcd_client::{Client, KvClient, Txn};
use fulcrum_proto::registry::v1 as pb;
use fulcrum_registry::{
    BackendError, EtcdBackend, EtcdConfig, Identity, InstanceSpec, Query, Registry, RegistryError,
    View,
    backend::etcd::commit::{DirectTxn, TxnAnswer, TxnSender},
    registry::new_epoch,
};
use fulcrum_test_support::eventually;
use reqwest::StatusCode;
use tokio::task::JoinSet;
use tonic::Code;

use crate::{
    etcd_cluster::EtcdCluster,
    support::{
        ALICE, authed, grpc_client, http, instance, loopback, pb_instance, register_request, serve,
    },
};

/// The request deadline of the replicas here.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// What an answer may take beyond the deadline: the HTTP round trip and scheduling on a
/// shared 2-core machine, far below one more deadline (what a queued write waited before).
const SLACK: Duration = Duration::from_millis(750);

/// A control-plane replica on `cluster` with the deadline above, its etcd settings changed
/// by `config`.
async fn replica(
    cluster: &EtcdCluster,
    config: impl FnOnce(&mut EtcdConfig),
) -> Result<Arc<Registry>> {
    replica_sending(cluster, Arc::new(DirectTxn), config).await
}

/// [`replica`] sending its write transactions through `txns`.
async fn replica_sending(
    cluster: &EtcdCluster,
    txns: Arc<dyn TxnSender>,
    config: impl FnOnce(&mut EtcdConfig),
) -> Result<Arc<Registry>> {
    let view = Arc::new(View::new(new_epoch()));
    let mut etcd = EtcdConfig::new(cluster.endpoints());
    etcd.request_timeout = REQUEST_TIMEOUT;
    config(&mut etcd);
    let limits = loopback();
    let backend =
        EtcdBackend::connect_with(etcd, view.clone(), limits.addresses.clone(), txns).await?;
    Ok(Registry::new(backend, view, limits))
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
        .register(register_request(pb_instance("outage", "before", 9), ALICE))
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

/// How the next transaction's answer is lost after etcd applied it.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// Never arrives: the write's deadline passes.
    Silence,
    /// The connection breaks: etcd's "unavailable", which the backend retries.
    Unavailable,
}

/// Sends transactions to etcd for real, and loses the answer of the next one once armed.
#[derive(Debug, Default)]
struct LoseNextAnswer {
    armed: Mutex<Option<Loss>>,
    /// The revision of the transaction whose answer was lost.
    committed: Arc<Mutex<Option<i64>>>,
}

impl LoseNextAnswer {
    fn arm(&self, loss: Loss) {
        *self.armed.lock().expect("lock") = Some(loss);
    }

    fn committed(&self) -> Option<i64> {
        *self.committed.lock().expect("lock")
    }
}

impl TxnSender for LoseNextAnswer {
    fn send(&self, kv: KvClient, txn: Txn) -> TxnAnswer {
        let loss = self.armed.lock().expect("lock").take();
        let committed = self.committed.clone();
        let sent = DirectTxn.send(kv, txn);
        Box::pin(async move {
            let answer = sent.await?;
            if loss.is_some() {
                assert!(answer.succeeded(), "the transaction to lose did commit");
                *committed.lock().expect("lock") = answer.header().map(|h| h.revision());
            }
            match loss {
                None => Ok(answer),
                Some(Loss::Silence) => std::future::pending().await,
                Some(Loss::Unavailable) => Err(etcd_client::Error::GRpcStatus(
                    tonic::Status::unavailable("the connection broke after the commit"),
                )),
            }
        })
    }
}

/// A replica on a one-member cluster losing the answers it is told to, and a client of the
/// cluster to look at what etcd holds.
struct Lossy {
    registry: Arc<Registry>,
    txns: Arc<LoseNextAnswer>,
    etcd: Client,
    _cluster: EtcdCluster,
}

impl Lossy {
    async fn start() -> Result<Self> {
        let cluster = EtcdCluster::start(1).await?;
        let txns = Arc::new(LoseNextAnswer::default());
        Ok(Self {
            registry: replica_sending(&cluster, txns.clone(), |_| {}).await?,
            txns,
            etcd: Client::connect(cluster.endpoints(), None).await?,
            _cluster: cluster,
        })
    }
}

const KEY: &str = "/fulcrum/registry/instances/kept-1";

fn kept(weight: u32) -> InstanceSpec {
    InstanceSpec {
        name: "kept".into(),
        id: "kept-1".into(),
        address: "127.0.0.1".into(),
        port: 7001,
        weight,
        ttl_ms: 30_000,
        ..InstanceSpec::default()
    }
}

/// The lease `KEY` is attached to in etcd, if it exists.
async fn stored_lease(etcd: &mut Client) -> Result<Option<i64>> {
    Ok(etcd
        .get(KEY, None)
        .await?
        .kvs()
        .first()
        .map(|kv| kv.lease()))
}

async fn lease_alive(etcd: &mut Client, lease: i64) -> Result<bool> {
    Ok(etcd.lease_time_to_live(lease, None).await?.ttl() > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_registration_whose_answer_was_lost_after_it_committed_keeps_the_registration()
-> Result<()> {
    let mut lossy = Lossy::start().await?;
    let (registry, etcd) = (&lossy.registry, &mut lossy.etcd);
    let first = registry
        .register(&kept(1), &Identity::unscoped("alice"))
        .await?;
    let replaced = first.record.lease;
    lossy.txns.arm(Loss::Silence);
    let error = registry
        .register(&kept(2), &Identity::unscoped("alice"))
        .await
        .expect_err("the answer never came");
    let RegistryError::Backend(BackendError::Unavailable { .. }) = &error else {
        panic!("expected the backend unavailable, got {error}");
    };

    // The transaction did commit: etcd holds the new registration on a new lease. Once the
    // backend re-read the key, it revokes the replaced lease, and only that one.
    let committed = stored_lease(etcd).await?.context("committed")?;
    assert_ne!(committed, replaced);
    eventually(
        Duration::from_secs(10),
        "the replaced lease revoked, the committed one kept",
        || {
            let mut etcd = etcd.clone();
            async move {
                !lease_alive(&mut etcd, replaced).await.unwrap_or(true)
                    && stored_lease(&mut etcd).await.ok().flatten() == Some(committed)
                    && lease_alive(&mut etcd, committed).await.unwrap_or(false)
            }
        },
    )
    .await?;
    registry.heartbeat("kept-1", "alice").await?;
    let query = Query {
        service: "kept".into(),
        ..Query::default()
    };
    let found = registry.discover(&query)?;
    assert_eq!(found.entries.len(), 1);
    assert_eq!(found.entries[0].record.registration.weight, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_whose_answer_was_lost_and_retried_is_written_once_and_never_removed()
-> Result<()> {
    let mut lossy = Lossy::start().await?;
    // The retry of the committed transaction fails its guard: the key is no longer absent.
    lossy.txns.arm(Loss::Unavailable);
    let entry = lossy
        .registry
        .register(&kept(1), &Identity::unscoped("alice"))
        .await?;
    let committed = lossy.txns.committed().context("a transaction committed")?;
    assert_eq!(
        entry.record.mod_revision, committed,
        "the answer is the write that committed"
    );
    // Whatever the backend does after answering, it does within the deadline.
    tokio::time::sleep(REQUEST_TIMEOUT).await;
    let response = lossy.etcd.get(KEY, None).await?;
    let stored = response.kvs().first().context("still registered")?;
    assert_eq!(
        (stored.create_revision(), stored.version()),
        (committed, 1),
        "written once, by the transaction whose answer was lost, and never removed"
    );
    assert_eq!(stored.lease(), entry.record.lease);
    Ok(())
}
