//! Write transactions whose answer may be lost, and which leases may be revoked after one.
//!
//! A registration is written by a transaction that attaches the key to a fresh lease. When
//! its answer is lost (the deadline passes, the connection breaks after etcd applied it, or
//! a retry of it fails its own guard because the first attempt did apply), the transaction
//! may have committed: revoking its lease then would delete a live registration. So no lease
//! is revoked on a failed write without re-reading the key first, and then only a lease the
//! stored registration does not hold and that no transaction still in flight can attach
//! (`LeaseFate`). A lease that might still be attached is left to expire on its own TTL.
//!
//! Every write transaction goes through a [`TxnSender`]: [`DirectTxn`] in production; the
//! tests wrap it to lose answers of transactions that did commit, against a real etcd.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use etcd_client::{Client, KvClient, Txn, TxnResponse};
use tokio::time::Instant;
use tracing::{debug, info};

use super::{EtcdConfig, call, call_failing_over, deadline, decode};
use crate::{backend::BackendError, view::Record};

/// The answer of a transaction sent by a [`TxnSender`].
pub type TxnAnswer = Pin<Box<dyn Future<Output = Result<TxnResponse, etcd_client::Error>> + Send>>;

/// Sends a write transaction to etcd and returns its answer: the step of a write whose answer
/// can be lost after etcd applied it. See the module docs.
pub trait TxnSender: Send + Sync + 'static {
    /// Sends `txn` with `kv`.
    fn send(&self, kv: KvClient, txn: Txn) -> TxnAnswer;
}

/// The etcd client's own transaction call.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectTxn;

impl TxnSender for DirectTxn {
    fn send(&self, mut kv: KvClient, txn: Txn) -> TxnAnswer {
        Box::pin(async move { kv.txn(txn).await })
    }
}

/// What a registration transaction requires of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Guard {
    /// The key does not exist (a new registration).
    Absent,
    /// The key is at this `mod_revision` (a re-registration of what was read).
    At(i64),
}

/// What may be done with the lease a registration transaction tried to attach, given the
/// key as read after the transaction's answer was lost or its guard failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseFate {
    /// The stored registration holds it: the transaction committed.
    Attached,
    /// Nothing stored holds it, and no transaction in flight can attach it where a live
    /// registration would be lost with it: revoke it.
    Revocable,
    /// The key is still as the transaction requires, so the transaction may yet apply:
    /// leave the lease to expire on its own.
    MayAttach,
}

impl LeaseFate {
    /// The fate of `lease`, attached by a transaction guarded by `guard`, when the key holds
    /// `stored`. With [`Guard::Absent`] no live registration can hang on the lease except
    /// one made by the very write that failed; with [`Guard::At`] the transaction can only
    /// still apply while the key stays at that revision (revisions only grow).
    pub(crate) fn of(stored: Option<&Record>, guard: Guard, lease: i64) -> Self {
        match (stored, guard) {
            (Some(record), _) if record.lease == lease => Self::Attached,
            (_, Guard::Absent) | (None, Guard::At(_)) => Self::Revocable,
            (Some(record), Guard::At(revision)) if record.mod_revision != revision => {
                Self::Revocable
            }
            (Some(_), Guard::At(_)) => Self::MayAttach,
        }
    }
}

/// What a write needs of etcd, cheap to clone into background tasks.
#[derive(Clone)]
pub(crate) struct Etcd {
    pub(crate) client: Client,
    pub(crate) config: EtcdConfig,
    pub(crate) txns: Arc<dyn TxnSender>,
}

impl Etcd {
    pub(crate) fn key(&self, id: &str) -> String {
        format!("{}{id}", self.config.prefix)
    }

    /// The current record of `id` straight from etcd (a linearizable read).
    pub(crate) async fn fetch(
        &self,
        id: &str,
        deadline: Instant,
    ) -> Result<Option<Record>, BackendError> {
        let kv = self.client.kv_client();
        let key = self.key(id);
        let response = call_failing_over(&self.config, deadline, "reading a registration", || {
            let (mut kv, key) = (kv.clone(), key.clone());
            async move { kv.get(key, None).await }
        })
        .await?;
        // Whatever its address: the owner may change or remove what it wrote. A value that
        // does not decode was reported by the watcher.
        Ok(response.kvs().first().and_then(|kv| match decode(id, kv) {
            Ok(record) => Some(record),
            Err(refusal) => {
                debug!(instance = %id, %refusal, "the stored registration is not a valid one");
                None
            }
        }))
    }

    /// Sends `txn` through the [`TxnSender`], failing over like any guarded write.
    pub(crate) async fn txn(
        &self,
        txn: Txn,
        what: &str,
        deadline: Instant,
    ) -> Result<TxnResponse, BackendError> {
        let kv = self.client.kv_client();
        call_failing_over(&self.config, deadline, what, || {
            self.txns.send(kv.clone(), txn.clone())
        })
        .await
    }

    /// Revokes `lease` in the background, with a deadline of its own: the write answers
    /// without waiting. Only for a lease nothing live holds (see the module docs).
    pub(crate) fn revoke(&self, lease: i64) {
        if lease == 0 {
            return;
        }
        let (mut leases, config) = (self.client.lease_client(), self.config.clone());
        tokio::spawn(async move {
            let revoking = leases.revoke(lease);
            if let Err(error) = call(&config, deadline(&config), "revoking a lease", revoking).await
            {
                debug!(lease, %error, "could not revoke a lease; it will expire by itself");
            }
        });
    }

    /// Acts on the fate of `lease` (which the write of `id` guarded by `guard` tried to
    /// attach, replacing `old_lease`) now that the key holds `stored`: revokes what nothing
    /// holds. Returns the fate.
    pub(crate) fn settle(
        &self,
        stored: Option<&Record>,
        guard: Guard,
        lease: i64,
        old_lease: i64,
    ) -> LeaseFate {
        let fate = LeaseFate::of(stored, guard, lease);
        match fate {
            LeaseFate::Attached if old_lease != lease => self.revoke(old_lease),
            LeaseFate::Attached => {}
            LeaseFate::Revocable => self.revoke(lease),
            LeaseFate::MayAttach => {
                debug!(
                    lease,
                    "a registration's lease may still be attached; leaving it to expire"
                );
            }
        }
        fate
    }

    /// [`settle`](Self::settle) after a write of `id` whose answer was lost: re-reads the
    /// key in the background, trying again while etcd does not answer, until the lease
    /// would have expired anyway (`ttl`).
    pub(crate) fn settle_later(
        &self,
        id: String,
        guard: Guard,
        lease: i64,
        old_lease: i64,
        ttl: Duration,
    ) {
        let etcd = self.clone();
        tokio::spawn(async move {
            let give_up = Instant::now() + ttl;
            let mut backoff = Duration::from_millis(100);
            loop {
                match etcd.fetch(&id, deadline(&etcd.config)).await {
                    Ok(stored) => {
                        let fate = etcd.settle(stored.as_ref(), guard, lease, old_lease);
                        info!(instance = %id, lease, ?fate, "settled a registration write whose answer was lost");
                        return;
                    }
                    Err(error) if Instant::now() + backoff < give_up => {
                        debug!(instance = %id, %error, "cannot re-read a registration yet");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    Err(error) => {
                        debug!(instance = %id, %error, "gave up re-reading a registration; its lease expires by itself");
                        return;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{record, spec};

    fn stored(lease: i64, mod_revision: i64) -> Record {
        Record {
            lease,
            mod_revision,
            ..record(spec("svc", "a", 1))
        }
    }

    #[test]
    fn a_lease_the_stored_registration_holds_is_attached_whatever_the_guard() {
        for guard in [Guard::Absent, Guard::At(7)] {
            assert_eq!(
                LeaseFate::of(Some(&stored(2, 9)), guard, 2),
                LeaseFate::Attached
            );
        }
    }

    #[test]
    fn a_lease_is_left_alone_while_its_transaction_may_still_apply() {
        // The key is still at the revision the transaction requires.
        assert_eq!(
            LeaseFate::of(Some(&stored(1, 7)), Guard::At(7), 2),
            LeaseFate::MayAttach
        );
    }

    #[test]
    fn a_lease_no_transaction_can_attach_to_a_live_registration_is_revocable() {
        // The key moved on, or went: a transaction requiring revision 7 can never apply.
        assert_eq!(
            LeaseFate::of(Some(&stored(3, 8)), Guard::At(7), 2),
            LeaseFate::Revocable
        );
        assert_eq!(LeaseFate::of(None, Guard::At(7), 2), LeaseFate::Revocable);
        // A new registration: only what this failed write made can hang on the lease.
        assert_eq!(LeaseFate::of(None, Guard::Absent, 2), LeaseFate::Revocable);
        assert_eq!(
            LeaseFate::of(Some(&stored(3, 8)), Guard::Absent, 2),
            LeaseFate::Revocable
        );
    }
}
