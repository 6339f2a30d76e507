//! Token-bucket rate limiting per service and, optionally, per client key, over buckets that
//! may be shared by every worker of a proxy.
//!
//! The classic token bucket (as in Envoy's local rate limit filter): capacity `burst`, refilled
//! continuously at `requests_per_second`; a request takes one token or is rejected with the
//! time until the next token. Tokens are counted in millionths so refill is exact integer
//! arithmetic.
//!
//! With a client key, a request must find a token in its client's bucket **and** in the
//! service bucket, and takes one from each: a client is held to its own share, and rotating
//! keys cannot lift the service's limit. A client's token is taken first and given back when
//! the service bucket is empty, so a rejected request costs the service nothing.
//!
//! **Where buckets live** is the [`BucketStore`]'s business: [`LocalBuckets`] keeps them in
//! memory (one picker, one thread); the filter keeps them in Envoy's shared data, so every
//! worker of a proxy draws from the same buckets and the limit is per proxy, as an operator
//! reads it. The store offers compare-and-swap (Envoy's shared data does): a bucket is read
//! with a version and written only if nobody wrote it since, so two workers never both spend
//! the last token.
//!
//! **Memory is bounded by the policy, not by clients.** A service has one service bucket and
//! `max_clients` client slots; a client key's 64-bit hash names its slot. A new client whose
//! slot holds another client's bucket takes the slot over with a full bucket: eviction is
//! one write, whatever the number of keys a client invents.

use crate::duration::nanos;
use std::{collections::HashMap, time::Duration};

use crate::{policy::RateLimit, select::hash::hash_bytes};

const MICROS_PER_TOKEN: u64 = 1_000_000;

/// Compare-and-swap rounds per bucket before the limiter gives up and admits: a store whose
/// every write loses (or fails) must not turn into rejected traffic. Two workers racing for
/// one bucket settle in one or two rounds.
const MAX_ROUNDS: usize = 16;

/// Which of a service's buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BucketId {
    /// The bucket every request of the service draws from.
    Service,
    /// The client slot `0..max_clients` a client key hashes to.
    Client(u32),
}

/// One token bucket as stored: 24 bytes ([`BucketState::to_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketState {
    /// Hash of the client key owning a client slot; 0 for the service bucket.
    owner: u64,
    /// Tokens available, in millionths.
    micro_tokens: u64,
    /// When `micro_tokens` was last brought up to date, in nanoseconds on the caller's clock.
    updated_at_nanos: u64,
}

impl BucketState {
    /// Size of [`to_bytes`](Self::to_bytes).
    pub const BYTES: usize = 24;

    fn full(owner: u64, burst: u64, now: Duration) -> Self {
        Self {
            owner,
            micro_tokens: burst * MICROS_PER_TOKEN,
            updated_at_nanos: nanos(now),
        }
    }

    /// The bucket as stored: owner, tokens and time, little-endian.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut bytes = [0; Self::BYTES];
        bytes[..8].copy_from_slice(&self.owner.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.micro_tokens.to_le_bytes());
        bytes[16..].copy_from_slice(&self.updated_at_nanos.to_le_bytes());
        bytes
    }

    /// A stored bucket, or `None` for bytes of another length (a store written by something
    /// else reads as a fresh bucket).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::BYTES] = bytes.try_into().ok()?;
        let word = |at: usize| {
            let mut le = [0; 8];
            le.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(le)
        };
        Some(Self {
            owner: word(0),
            micro_tokens: word(8),
            updated_at_nanos: word(16),
        })
    }

    /// Brings the bucket up to `now`; a clock that went backwards adds nothing. A time
    /// later than `now` by more than the bucket takes to fill from empty cannot have been
    /// written by a worker's clock (shared data corrupted): the bucket restarts full, so no
    /// stored time keeps it empty for longer than a real one could.
    fn refill(&mut self, rate_micro_per_sec: u64, burst: u64, now: Duration) {
        let now = nanos(now);
        let capacity = burst * MICROS_PER_TOKEN;
        let fill_nanos =
            u128::from(capacity) * 1_000_000_000 / u128::from(rate_micro_per_sec.max(1));
        if u128::from(self.updated_at_nanos) > u128::from(now) + fill_nanos {
            *self = Self::full(self.owner, burst, Duration::from_nanos(now));
            return;
        }
        let elapsed = now.saturating_sub(self.updated_at_nanos);
        let refill = u128::from(elapsed) * u128::from(rate_micro_per_sec) / 1_000_000_000;
        // Also caps a bucket written under a larger burst.
        let refilled = (u128::from(self.micro_tokens) + refill).min(u128::from(capacity));
        // Rounding loses under one millionth of a token per call.
        self.micro_tokens = refilled as u64;
        self.updated_at_nanos = now.max(self.updated_at_nanos);
    }

    /// After [`refill`](Self::refill): `Ok` if a token is there, else the time until one is.
    fn check(&self, rate_micro_per_sec: u64) -> Result<(), Duration> {
        if self.micro_tokens >= MICROS_PER_TOKEN {
            return Ok(());
        }
        let missing = u128::from(MICROS_PER_TOKEN - self.micro_tokens);
        let nanos = (missing * 1_000_000_000).div_ceil(u128::from(rate_micro_per_sec.max(1)));
        Err(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }
}

/// Where one service's buckets live, with compare-and-swap.
pub trait BucketStore {
    /// The bucket's state (`None` when never written or unreadable) and its version, to be
    /// passed to [`write`](Self::write).
    fn read(&mut self, bucket: BucketId) -> (Option<BucketState>, u32);
    /// Stores `state` if the bucket is still at `version`; `false` when another writer came
    /// first or the store refused. Version 0 (a bucket never written) writes whatever is
    /// there: Envoy's shared data cannot create a key only if absent, so two workers creating
    /// one bucket at the same instant may both take a token from its first burst — one token,
    /// once per bucket.
    fn write(&mut self, bucket: BucketId, state: BucketState, version: u32) -> bool;
}

/// Buckets in local memory: at most `max_clients + 1` of them.
#[derive(Debug, Clone, Default)]
pub struct LocalBuckets {
    buckets: HashMap<BucketId, (BucketState, u32)>,
}

impl LocalBuckets {
    /// Number of buckets held (client slots in use plus the service bucket).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket was written yet.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

impl BucketStore for LocalBuckets {
    fn read(&mut self, bucket: BucketId) -> (Option<BucketState>, u32) {
        self.buckets
            .get(&bucket)
            .map_or((None, 0), |(state, version)| (Some(*state), *version))
    }

    fn write(&mut self, bucket: BucketId, state: BucketState, version: u32) -> bool {
        let current = self.buckets.get(&bucket).map_or(0, |(_, version)| *version);
        if version != 0 && version != current {
            return false;
        }
        self.buckets
            .insert(bucket, (state, current.wrapping_add(1).max(1)));
        true
    }
}

/// A service's limit: rate, burst and client slots; its buckets are in a [`BucketStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimiter {
    rate_micro_per_sec: u64,
    burst: u64,
    max_clients: u32,
}

impl RateLimiter {
    /// The limiter of `config` (assumed validated; any value is safe).
    pub fn new(config: &RateLimit) -> Self {
        Self {
            rate_micro_per_sec: (config.requests_per_second.max(0.0) * MICROS_PER_TOKEN as f64)
                as u64,
            burst: u64::from(config.burst.max(1)),
            max_clients: config.max_clients.max(1),
        }
    }

    /// Admits one request (of `client`, when keyed) at `now`, taking its tokens from
    /// `buckets`, or returns how long to wait.
    pub fn admit(
        &self,
        buckets: &mut dyn BucketStore,
        client: Option<&str>,
        now: Duration,
    ) -> Result<(), Duration> {
        let Some(client) = client else {
            return self.take(buckets, BucketId::Service, 0, now);
        };
        // Never 0, the service bucket's owner.
        let owner = hash_bytes(client.as_bytes()) | 1;
        let slot = BucketId::Client((owner % u64::from(self.max_clients)) as u32);
        self.take(buckets, slot, owner, now)?;
        self.take(buckets, BucketId::Service, 0, now)
            .inspect_err(|_| self.give_back(buckets, slot, owner))
    }

    /// Takes one token from `bucket` (owned by `owner`) with compare-and-swap.
    fn take(
        &self,
        buckets: &mut dyn BucketStore,
        bucket: BucketId,
        owner: u64,
        now: Duration,
    ) -> Result<(), Duration> {
        for _ in 0..MAX_ROUNDS {
            let (stored, version) = buckets.read(bucket);
            let mut state = stored
                .filter(|state| state.owner == owner)
                .unwrap_or_else(|| BucketState::full(owner, self.burst, now));
            state.refill(self.rate_micro_per_sec, self.burst, now);
            state.check(self.rate_micro_per_sec)?;
            state.micro_tokens -= MICROS_PER_TOKEN;
            if buckets.write(bucket, state, version) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Returns the token [`take`](Self::take) took from a client slot, unless another client
    /// took the slot over meanwhile.
    fn give_back(&self, buckets: &mut dyn BucketStore, bucket: BucketId, owner: u64) {
        for _ in 0..MAX_ROUNDS {
            let (stored, version) = buckets.read(bucket);
            let Some(mut state) = stored.filter(|state| state.owner == owner) else {
                return;
            };
            // A stored count may be anything (shared data): saturate, then cap.
            state.micro_tokens = state
                .micro_tokens
                .saturating_add(MICROS_PER_TOKEN)
                .min(self.burst * MICROS_PER_TOKEN);
            if buckets.write(bucket, state, version) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rps: f64, burst: u32, max_clients: u32) -> RateLimiter {
        RateLimiter::new(&RateLimit {
            requests_per_second: rps,
            burst,
            client_key_header: Some("x-client".into()),
            max_clients,
        })
    }

    #[test]
    fn admits_a_burst_then_rejects_with_the_time_to_the_next_token() {
        let (limiter, mut buckets) = (limiter(10.0, 3, 8), LocalBuckets::default());
        for _ in 0..3 {
            assert_eq!(limiter.admit(&mut buckets, None, Duration::ZERO), Ok(()));
        }
        assert_eq!(
            limiter.admit(&mut buckets, None, Duration::ZERO),
            Err(Duration::from_millis(100))
        );
        assert_eq!(
            limiter.admit(&mut buckets, None, Duration::from_millis(40)),
            Err(Duration::from_millis(60))
        );
        assert_eq!(
            limiter.admit(&mut buckets, None, Duration::from_millis(100)),
            Ok(())
        );
    }

    #[test]
    fn refill_never_exceeds_the_burst() {
        let (limiter, mut buckets) = (limiter(1000.0, 2, 8), LocalBuckets::default());
        let later = Duration::from_secs(60);
        assert_eq!(limiter.admit(&mut buckets, None, later), Ok(()));
        assert_eq!(limiter.admit(&mut buckets, None, later), Ok(()));
        assert!(limiter.admit(&mut buckets, None, later).is_err());
    }

    #[test]
    fn clients_have_separate_buckets_within_the_service_bucket() {
        let (limiter, mut buckets) = (limiter(1.0, 2, 8), LocalBuckets::default());
        let at = Duration::ZERO;
        assert_eq!(limiter.admit(&mut buckets, Some("alice"), at), Ok(()));
        assert_eq!(limiter.admit(&mut buckets, Some("alice"), at), Ok(()));
        assert!(limiter.admit(&mut buckets, Some("alice"), at).is_err());
        // Bob has a full bucket of his own, but the service bucket is empty.
        assert_eq!(
            limiter.admit(&mut buckets, Some("bob"), at),
            Err(Duration::from_secs(1))
        );
        assert!(limiter.admit(&mut buckets, None, at).is_err());
    }

    #[test]
    fn a_client_refused_by_the_service_bucket_keeps_its_own_token() {
        let (limiter, mut buckets) = (limiter(1.0, 1, 8), LocalBuckets::default());
        let at = Duration::ZERO;
        assert_eq!(limiter.admit(&mut buckets, None, at), Ok(()));
        // The service bucket is empty: alice is refused and keeps her token.
        assert!(limiter.admit(&mut buckets, Some("alice"), at).is_err());
        let a_second = Duration::from_secs(1);
        assert_eq!(limiter.admit(&mut buckets, Some("alice"), a_second), Ok(()));
    }

    #[test]
    fn rotating_client_keys_cannot_exceed_the_service_limit() {
        let (limiter, mut buckets) = (limiter(10.0, 5, 1024), LocalBuckets::default());
        let admitted = (0..1_000)
            .filter(|i| {
                let at = Duration::from_millis(*i);
                let key = format!("client-{i}");
                limiter.admit(&mut buckets, Some(&key), at).is_ok()
            })
            .count();
        // One second at 10/s plus the burst of 5.
        assert!((14..=16).contains(&admitted), "{admitted}");
        // One bucket per slot at most, plus the service's.
        assert!(buckets.len() <= 1024 + 1, "{}", buckets.len());
    }

    #[test]
    fn a_new_client_takes_over_a_full_slot_with_a_full_bucket() {
        let (limiter, mut buckets) = (limiter(1000.0, 1, 1), LocalBuckets::default());
        let t = Duration::from_millis;
        assert_eq!(limiter.admit(&mut buckets, Some("a"), t(0)), Ok(()));
        assert!(limiter.admit(&mut buckets, Some("a"), t(0)).is_err());
        // One slot: "b" evicts "a" in one write and starts full.
        assert_eq!(limiter.admit(&mut buckets, Some("b"), t(2)), Ok(()));
        assert_eq!(buckets.len(), 2);
        // "a" was evicted: it starts again with a full bucket.
        assert_eq!(limiter.admit(&mut buckets, Some("a"), t(4)), Ok(()));
        assert_eq!(buckets.len(), 2);
    }

    /// Buckets another worker writes to between every other read of this worker and its
    /// write, so half of this worker's writes lose the race.
    struct Contended {
        shared: LocalBuckets,
        other: RateLimiter,
        other_admitted: usize,
        reads: usize,
        now: Duration,
    }

    impl BucketStore for Contended {
        fn read(&mut self, bucket: BucketId) -> (Option<BucketState>, u32) {
            let read = self.shared.read(bucket);
            self.reads += 1;
            if self.reads % 2 == 1 && self.other.admit(&mut self.shared, None, self.now).is_ok() {
                self.other_admitted += 1;
            }
            read
        }

        fn write(&mut self, bucket: BucketId, state: BucketState, version: u32) -> bool {
            self.shared.write(bucket, state, version)
        }
    }

    #[test]
    fn two_workers_racing_on_one_bucket_never_spend_a_token_twice() {
        let limiter = limiter(1.0, 10, 8);
        let mut store = Contended {
            shared: LocalBuckets::default(),
            other: limiter.clone(),
            other_admitted: 0,
            reads: 0,
            now: Duration::ZERO,
        };
        // The bucket's first write is unconditional (see `BucketStore::write`): made here.
        assert_eq!(
            limiter.admit(&mut store.shared, None, Duration::ZERO),
            Ok(())
        );
        let mine = (0..20)
            .filter(|_| limiter.admit(&mut store, None, Duration::ZERO).is_ok())
            .count();
        assert_eq!(1 + mine + store.other_admitted, 10);
        assert!(mine > 0 && store.other_admitted > 0);
    }

    #[test]
    fn a_store_that_refuses_every_write_admits() {
        struct Broken;
        impl BucketStore for Broken {
            fn read(&mut self, _: BucketId) -> (Option<BucketState>, u32) {
                (None, 0)
            }
            fn write(&mut self, _: BucketId, _: BucketState, _: u32) -> bool {
                false
            }
        }
        let limiter = limiter(1.0, 1, 8);
        for _ in 0..3 {
            assert_eq!(
                limiter.admit(&mut Broken, Some("a"), Duration::ZERO),
                Ok(())
            );
        }
    }

    /// Writes `state` into `bucket` as another worker (or corrupted shared data) would.
    fn store(buckets: &mut LocalBuckets, bucket: BucketId, state: BucketState) {
        let (_, version) = buckets.read(bucket);
        assert!(buckets.write(bucket, state, version));
    }

    #[test]
    fn an_empty_bucket_stamped_later_than_it_takes_to_fill_restarts_full() {
        // Fills from empty in 200 ms.
        let (limiter, mut buckets) = (limiter(10.0, 2, 8), LocalBuckets::default());
        let now = Duration::from_secs(5);
        let empty_at = |at: Duration| BucketState {
            owner: 0,
            micro_tokens: 0,
            updated_at_nanos: nanos(at),
        };
        // Within the fill time: an ordinary empty bucket, as a worker ahead could leave it.
        store(
            &mut buckets,
            BucketId::Service,
            empty_at(now + Duration::from_millis(200)),
        );
        assert!(limiter.admit(&mut buckets, None, now).is_err());
        // Beyond it, up to the end of time: corrupt, so full.
        for ahead in [
            now + Duration::from_millis(201),
            Duration::from_nanos(u64::MAX),
        ] {
            store(&mut buckets, BucketId::Service, empty_at(ahead));
            assert_eq!(limiter.admit(&mut buckets, None, now), Ok(()));
            assert_eq!(limiter.admit(&mut buckets, None, now), Ok(()));
            assert!(limiter.admit(&mut buckets, None, now).is_err(), "one burst");
        }
    }

    /// Buckets whose client slots always read as holding every token there is, as shared
    /// data written by something else might.
    struct Overfull(LocalBuckets);

    impl BucketStore for Overfull {
        fn read(&mut self, bucket: BucketId) -> (Option<BucketState>, u32) {
            let (state, version) = self.0.read(bucket);
            match bucket {
                BucketId::Client(_) => (
                    state.map(|state| BucketState {
                        micro_tokens: u64::MAX,
                        ..state
                    }),
                    version,
                ),
                BucketId::Service => (state, version),
            }
        }

        fn write(&mut self, bucket: BucketId, state: BucketState, version: u32) -> bool {
            self.0.write(bucket, state, version)
        }
    }

    #[test]
    fn a_stored_token_count_beyond_the_burst_is_capped_and_never_overflows() {
        let (limiter, mut buckets) = (limiter(1.0, 2, 1), Overfull(LocalBuckets::default()));
        let at = Duration::ZERO;
        store(
            &mut buckets.0,
            BucketId::Service,
            BucketState::full(0, 0, at),
        );
        // Alice's first take creates her slot; then every read of it holds u64::MAX tokens.
        for _ in 0..3 {
            // The service bucket is empty: alice's token is given back onto u64::MAX.
            assert!(limiter.admit(&mut buckets, Some("alice"), at).is_err());
            let (given_back, _) = buckets.0.read(BucketId::Client(0));
            assert_eq!(
                given_back.map(|state| state.micro_tokens),
                Some(2 * MICROS_PER_TOKEN),
                "capped at the burst"
            );
        }
    }

    #[test]
    fn a_bucket_round_trips_through_its_bytes_and_other_bytes_read_as_none() {
        let state = BucketState::full(7, 3, Duration::from_secs(2));
        assert_eq!(BucketState::from_bytes(&state.to_bytes()), Some(state));
        assert_eq!(BucketState::from_bytes(b"short"), None);
    }
}
