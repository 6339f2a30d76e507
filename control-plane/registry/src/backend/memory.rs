//! The in-memory backend: registrations and leases in this process (the default).
//!
//! Leases are deadlines on tokio's clock, renewed by heartbeats; a reaper removes every
//! registration whose deadline passed, checking every [`REAP_EVERY`], so a registration
//! whose heartbeats stop disappears at most `TTL + REAP_EVERY` after its last renewal.
//! Nothing survives a restart: clients re-register on their next heartbeat's `NotFound`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::time::Instant;
use tracing::info;

use super::{BackendError, BackendFuture, RegistryBackend};
use crate::{
    model::Registration,
    unix_ms,
    view::{Record, View},
};

/// How often expired leases are looked for.
pub const REAP_EVERY: Duration = Duration::from_millis(100);

/// A registration's lease: its deadline alone, in whole milliseconds after the backend
/// started (8 bytes where an [`Instant`] takes 16, in a map of every registration), rounded
/// up so a lease never ends early. Its owner and TTL are the stored record's (read from the
/// view under the leases lock, which every write holds across its view update), not copied
/// into every lease.
#[derive(Debug)]
struct Lease {
    expires_ms: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct MemoryBackend {
    view: Arc<View>,
    /// Leases by instance id (the view's allocation of it, [`View::shared_id`]). Locked
    /// across the view update so the two change together.
    leases: Mutex<HashMap<Arc<str>, Lease>>,
    /// What lease deadlines count from.
    started: Instant,
    revision: std::sync::atomic::AtomicI64,
}

impl MemoryBackend {
    /// A backend keeping `view` current; starts its reaper on the current runtime, which
    /// stops when the backend is dropped.
    pub fn start(view: Arc<View>) -> Arc<Self> {
        let backend = Arc::new(Self {
            view,
            leases: Mutex::new(HashMap::new()),
            started: Instant::now(),
            revision: std::sync::atomic::AtomicI64::new(0),
        });
        tokio::spawn(reap(Arc::downgrade(&backend)));
        backend
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Lease>> {
        self.leases
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A lease renewed at `now` for `ttl`.
    fn lease(&self, now: Instant, ttl: Duration) -> Lease {
        let after = (now + ttl).saturating_duration_since(self.started);
        let ms = after.as_nanos().div_ceil(1_000_000);
        Lease {
            expires_ms: u64::try_from(ms).unwrap_or(u64::MAX),
        }
    }

    /// Whether `lease` ended by `now`.
    fn ended(&self, lease: &Lease, now: Instant) -> bool {
        let ms = now.saturating_duration_since(self.started).as_millis();
        u128::from(lease.expires_ms) <= ms
    }

    fn next_revision(&self) -> i64 {
        self.revision
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// Removes every registration whose lease expired by `now`.
    fn expire(&self, now: Instant) {
        let mut leases = self.leases();
        let expired: Vec<Arc<str>> = leases
            .iter()
            .filter(|(_, lease)| self.ended(lease, now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            leases.remove(&id);
            self.view.remove(&id, None);
            info!(instance = %id, "registration expired: no heartbeat within its TTL");
        }
    }

    fn register_now(
        &self,
        registration: Registration,
        owner: &str,
    ) -> Result<Arc<Record>, BackendError> {
        let mut leases = self.leases();
        let id = registration.id.to_string();
        let stored = leases.get(id.as_str()).and(self.view.get(&id));
        if let Some(stored) = &stored
            && *stored.record.owner != *owner
        {
            return Err(BackendError::NotOwner { id });
        }
        let registered_at_unix_ms = self
            .view
            .get(&id)
            .map_or_else(unix_ms, |entry| entry.record.registered_at_unix_ms);
        let ttl = registration.ttl();
        let record = Record {
            registration,
            owner: owner.into(),
            registered_at_unix_ms,
            lease: 0,
            mod_revision: self.next_revision(),
        };
        let lease = self.lease(Instant::now(), ttl);
        self.view.upsert(record);
        let (Some(stored), Some(key)) = (self.view.get(&id), self.view.shared_id(&id)) else {
            leases.remove(id.as_str());
            return Err(BackendError::NotFound { id });
        };
        leases.insert(key, lease);
        Ok(stored.record)
    }
}

async fn reap(backend: Weak<MemoryBackend>) {
    let mut ticker = tokio::time::interval(REAP_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(backend) = backend.upgrade() else {
            return;
        };
        backend.expire(Instant::now());
    }
}

impl RegistryBackend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn register<'a>(
        &'a self,
        registration: Registration,
        owner: &'a str,
    ) -> BackendFuture<'a, Arc<Record>> {
        Box::pin(async move { self.register_now(registration, owner) })
    }

    fn heartbeat<'a>(&'a self, id: &'a str, owner: &'a str) -> BackendFuture<'a, Duration> {
        Box::pin(async move {
            let mut leases = self.leases();
            let now = Instant::now();
            let stored = self.view.get(id);
            match (leases.get_mut(id), stored) {
                (Some(lease), _) if self.ended(lease, now) => {
                    Err(BackendError::NotFound { id: id.to_owned() })
                }
                (Some(_), Some(stored)) if *stored.record.owner != *owner => {
                    Err(BackendError::NotOwner { id: id.to_owned() })
                }
                (Some(lease), Some(stored)) => {
                    let ttl = stored.record.registration.ttl();
                    *lease = self.lease(now, ttl);
                    Ok(ttl)
                }
                _ => Err(BackendError::NotFound { id: id.to_owned() }),
            }
        })
    }

    fn deregister<'a>(&'a self, id: &'a str, owner: &'a str) -> BackendFuture<'a, ()> {
        Box::pin(async move {
            let mut leases = self.leases();
            if !leases.contains_key(id) {
                return Err(BackendError::NotFound { id: id.to_owned() });
            }
            if self
                .view
                .get(id)
                .is_some_and(|stored| *stored.record.owner != *owner)
            {
                return Err(BackendError::NotOwner { id: id.to_owned() });
            }
            leases.remove(id);
            self.view.remove(id, None);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::spec;

    fn registration(id: &str, ttl_ms: u32) -> Registration {
        let mut spec = spec("svc", id, 1);
        spec.ttl_ms = ttl_ms;
        spec.validate().expect("valid")
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_keyed_by_the_views_allocation_of_the_id_not_a_copy() {
        let view = Arc::new(View::new("e"));
        let backend = MemoryBackend::start(view.clone());
        for _ in 0..2 {
            backend
                .register(registration("a", 1000), "alice")
                .await
                .expect("registered");
            let leases = backend.leases();
            let (key, _) = leases.get_key_value("a").expect("leased");
            assert!(Arc::ptr_eq(key, &view.shared_id("a").expect("in the view")));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_registration_lives_while_heartbeats_arrive_within_its_ttl() {
        let view = Arc::new(View::new("e"));
        let backend = MemoryBackend::start(view.clone());
        backend
            .register(registration("a", 1000), "alice")
            .await
            .expect("registered");
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(900)).await;
            assert_eq!(
                backend.heartbeat("a", "alice").await.expect("renewed"),
                Duration::from_secs(1)
            );
        }
        assert!(view.get("a").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_registration_without_heartbeats_is_removed_after_ttl_plus_one_reap_period() {
        let view = Arc::new(View::new("e"));
        let backend = MemoryBackend::start(view.clone());
        backend
            .register(registration("a", 1000), "alice")
            .await
            .expect("registered");
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert!(view.get("a").is_some(), "alive before its TTL");
        tokio::time::sleep(Duration::from_millis(1) + REAP_EVERY).await;
        assert!(
            view.get("a").is_none(),
            "gone one reap period after its TTL"
        );
        assert!(matches!(
            backend.heartbeat("a", "alice").await,
            Err(BackendError::NotFound { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_kept_in_whole_milliseconds_never_ends_before_its_ttl() {
        let view = Arc::new(View::new("e"));
        let backend = MemoryBackend::start(view.clone());
        // Registered and renewed between two milliseconds of the backend's clock.
        tokio::time::advance(Duration::from_micros(400)).await;
        backend
            .register(registration("a", 1000), "alice")
            .await
            .expect("registered");
        tokio::time::advance(Duration::from_micros(999_900)).await;
        backend
            .heartbeat("a", "alice")
            .await
            .expect("renewed 0.1 ms before its TTL");
        tokio::time::advance(Duration::from_micros(999_900)).await;
        assert!(view.get("a").is_some(), "alive 0.1 ms before its TTL");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(
            backend.heartbeat("a", "alice").await,
            Err(BackendError::NotFound { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn re_registering_the_same_id_is_idempotent_and_keeps_the_first_time() {
        let view = Arc::new(View::new("e"));
        let backend = MemoryBackend::start(view.clone());
        let first = backend
            .register(registration("a", 1000), "alice")
            .await
            .expect("first");
        let cursor = view.cursor();
        let again = backend
            .register(registration("a", 1000), "alice")
            .await
            .expect("again");
        assert_eq!(view.len(), 1);
        assert_eq!(again.registered_at_unix_ms, first.registered_at_unix_ms);
        assert_eq!(again.registration, first.registration);
        assert_eq!(view.cursor(), cursor, "nothing a reader sees changed");
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_owner_can_heartbeat_deregister_or_replace() {
        let view = Arc::new(View::new("e"));
        let backend = MemoryBackend::start(view.clone());
        backend
            .register(registration("a", 1000), "alice")
            .await
            .expect("registered");
        assert!(matches!(
            backend.heartbeat("a", "mallory").await,
            Err(BackendError::NotOwner { .. })
        ));
        assert!(matches!(
            backend.deregister("a", "mallory").await,
            Err(BackendError::NotOwner { .. })
        ));
        assert!(matches!(
            backend.register(registration("a", 1000), "mallory").await,
            Err(BackendError::NotOwner { .. })
        ));
        assert_eq!(&*view.get("a").expect("still there").record.owner, "alice");
        backend
            .deregister("a", "alice")
            .await
            .expect("owner deregisters");
        assert!(view.is_empty());
    }
}
