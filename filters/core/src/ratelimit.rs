//! Token-bucket rate limiting per service and, optionally, per client key.
//!
//! The classic token bucket (as in Envoy's local rate limit filter): capacity `burst`, refilled
//! continuously at `requests_per_second`; a request takes one token or is rejected with the
//! time until the next token. Tokens are counted in millionths so refill is exact integer
//! arithmetic.
//!
//! With a client key, a request must find a token in its client's bucket **and** in the
//! service bucket, and takes one from each: a client is held to its own share, and rotating
//! keys cannot lift the service's limit. Client buckets are keyed by a 64-bit hash of the key
//! (memory per client is constant whatever the key length) and capped at `max_clients`: a new
//! client when full evicts the client whose bucket was created longest ago, in O(1) (a FIFO of
//! keys), so memory is bounded by the cap and a flood of new keys costs constant time each.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use crate::{policy::RateLimit, select::hash::hash_bytes};

const MICROS_PER_TOKEN: u64 = 1_000_000;

/// One token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens available, in millionths.
    micro_tokens: u64,
    /// When `micro_tokens` was last brought up to date.
    updated_at: Duration,
}

impl Bucket {
    fn full(burst: u64, now: Duration) -> Self {
        Self {
            micro_tokens: burst * MICROS_PER_TOKEN,
            updated_at: now,
        }
    }

    /// Brings the bucket up to `now`.
    fn refill(&mut self, rate_micro_per_sec: u64, burst: u64, now: Duration) {
        let elapsed = now.saturating_sub(self.updated_at);
        let refill = elapsed.as_nanos() * u128::from(rate_micro_per_sec) / 1_000_000_000;
        let capacity = burst * MICROS_PER_TOKEN;
        let refilled = (u128::from(self.micro_tokens) + refill).min(u128::from(capacity));
        // Rounding loses under one millionth of a token per call.
        self.micro_tokens = refilled as u64;
        self.updated_at = now.max(self.updated_at);
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

    /// Takes the token [`check`](Self::check) found.
    fn take(&mut self) {
        self.micro_tokens = self.micro_tokens.saturating_sub(MICROS_PER_TOKEN);
    }
}

/// The service's limiter: one shared bucket plus bounded per-client buckets.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate_micro_per_sec: u64,
    burst: u64,
    max_clients: usize,
    service: Bucket,
    clients: HashMap<u64, Bucket>,
    /// Client keys in the order their buckets were created: the front is evicted first.
    created: VecDeque<u64>,
}

impl RateLimiter {
    /// A limiter with full buckets at `now`.
    pub fn new(config: &RateLimit, now: Duration) -> Self {
        let burst = u64::from(config.burst.max(1));
        let max_clients = config.max_clients.max(1) as usize;
        Self {
            rate_micro_per_sec: (config.requests_per_second.max(0.0) * MICROS_PER_TOKEN as f64)
                as u64,
            burst,
            max_clients,
            service: Bucket::full(burst, now),
            clients: HashMap::with_capacity(max_clients),
            created: VecDeque::with_capacity(max_clients),
        }
    }

    /// Admits one request (of `client`, when keyed) or returns how long to wait: a keyed
    /// request needs a token in its client's bucket and in the service bucket.
    pub fn admit(&mut self, client: Option<&str>, now: Duration) -> Result<(), Duration> {
        let (rate, burst) = (self.rate_micro_per_sec, self.burst);
        self.service.refill(rate, burst, now);
        let Some(client) = client else {
            self.service.check(rate)?;
            self.service.take();
            return Ok(());
        };
        let key = hash_bytes(client.as_bytes());
        if !self.clients.contains_key(&key)
            && self.clients.len() >= self.max_clients
            && let Some(oldest) = self.created.pop_front()
        {
            self.clients.remove(&oldest);
        }
        let created = &mut self.created;
        let bucket = self.clients.entry(key).or_insert_with(|| {
            created.push_back(key);
            Bucket::full(burst, now)
        });
        bucket.refill(rate, burst, now);
        let client_wait = bucket.check(rate);
        let service_wait = self.service.check(rate);
        match (client_wait, service_wait) {
            (Ok(()), Ok(())) => {
                bucket.take();
                self.service.take();
                Ok(())
            }
            (Err(a), Err(b)) => Err(a.max(b)),
            (Err(wait), Ok(())) | (Ok(()), Err(wait)) => Err(wait),
        }
    }

    /// Number of client buckets held (at most `max_clients`).
    pub fn clients(&self) -> usize {
        self.clients.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rps: f64, burst: u32, max_clients: u32) -> RateLimiter {
        RateLimiter::new(
            &RateLimit {
                requests_per_second: rps,
                burst,
                client_key_header: Some("x-client".into()),
                max_clients,
            },
            Duration::ZERO,
        )
    }

    #[test]
    fn admits_a_burst_then_rejects_with_the_time_to_the_next_token() {
        let mut limiter = limiter(10.0, 3, 8);
        for _ in 0..3 {
            assert_eq!(limiter.admit(None, Duration::ZERO), Ok(()));
        }
        assert_eq!(
            limiter.admit(None, Duration::ZERO),
            Err(Duration::from_millis(100))
        );
        assert_eq!(
            limiter.admit(None, Duration::from_millis(40)),
            Err(Duration::from_millis(60))
        );
        assert_eq!(limiter.admit(None, Duration::from_millis(100)), Ok(()));
    }

    #[test]
    fn refill_never_exceeds_the_burst() {
        let mut limiter = limiter(1000.0, 2, 8);
        let later = Duration::from_secs(60);
        assert_eq!(limiter.admit(None, later), Ok(()));
        assert_eq!(limiter.admit(None, later), Ok(()));
        assert!(limiter.admit(None, later).is_err());
    }

    #[test]
    fn clients_have_separate_buckets_within_the_service_bucket() {
        let mut limiter = limiter(1.0, 2, 8);
        assert_eq!(limiter.admit(Some("alice"), Duration::ZERO), Ok(()));
        assert_eq!(limiter.admit(Some("alice"), Duration::ZERO), Ok(()));
        assert!(limiter.admit(Some("alice"), Duration::ZERO).is_err());
        // Bob has a full bucket of his own, but the service bucket is empty.
        assert_eq!(
            limiter.admit(Some("bob"), Duration::ZERO),
            Err(Duration::from_secs(1))
        );
        assert!(limiter.admit(None, Duration::ZERO).is_err());
    }

    #[test]
    fn rotating_client_keys_cannot_exceed_the_service_limit() {
        let mut limiter = limiter(10.0, 5, 1024);
        let admitted = (0..1_000)
            .filter(|i| {
                let at = Duration::from_millis(*i);
                limiter.admit(Some(&format!("client-{i}")), at).is_ok()
            })
            .count();
        // One second at 10/s plus the burst of 5.
        assert!((14..=16).contains(&admitted), "{admitted}");
    }

    #[test]
    fn evicts_the_oldest_client_when_full() {
        let mut limiter = limiter(1000.0, 1, 2);
        let t = Duration::from_millis;
        assert_eq!(limiter.admit(Some("a"), t(0)), Ok(()));
        assert_eq!(limiter.admit(Some("b"), t(1)), Ok(()));
        assert_eq!(limiter.admit(Some("c"), t(2)), Ok(()));
        assert_eq!(limiter.clients(), 2);
        // "a" was evicted: it starts again with a full bucket.
        assert_eq!(limiter.admit(Some("a"), t(3)), Ok(()));
        assert_eq!(limiter.clients(), 2);
    }
}
