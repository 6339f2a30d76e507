//! A sliding window of request counts in a fixed ring of buckets: bounded memory, O(1) record.
//!
//! The rolling-window counter of Hystrix and resilience4j's time-based window: the window is
//! split into [`BUCKETS`] buckets; a bucket older than the window is reset when its slot is
//! reused, so counts cover the last `window` give or take one bucket.

use std::time::Duration;

/// Buckets per window.
pub const BUCKETS: usize = 10;

/// Counts over the last window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Completed requests.
    pub total: u32,
    /// Those that counted as failures.
    pub failures: u32,
    /// Those slower than the slow-call threshold.
    pub slow: u32,
    /// Those slower than the relative-latency rule allows, given the peers' latency.
    pub slow_vs_peers: u32,
    /// The sum of their latencies, for the mean.
    pub latency: Duration,
}

impl Counts {
    /// The mean latency of the requests counted, `None` when there are none.
    pub fn mean_latency(&self) -> Option<Duration> {
        (self.total > 0).then(|| self.latency / self.total)
    }

    fn add(&mut self, other: &Counts) {
        self.total = self.total.saturating_add(other.total);
        self.failures = self.failures.saturating_add(other.failures);
        self.slow = self.slow.saturating_add(other.slow);
        self.slow_vs_peers = self.slow_vs_peers.saturating_add(other.slow_vs_peers);
        self.latency = self.latency.saturating_add(other.latency);
    }
}

/// One completed request as the window counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// It counted as a failure.
    pub failure: bool,
    /// It was slower than the slow-call threshold.
    pub slow: bool,
    /// It was slower than the relative-latency rule allows.
    pub slow_vs_peers: bool,
    /// How long it took.
    pub latency: Duration,
}

/// One bucket's counts, 32 bytes: [`Counts`] with the latency in nanoseconds (a `Duration`
/// takes 16 bytes), as every endpoint a proxy talks to holds [`BUCKETS`] of them.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket period (`now / bucket_len`) these counts belong to.
    period: u64,
    total: u32,
    failures: u32,
    slow: u32,
    slow_vs_peers: u32,
    latency_nanos: u64,
}

impl Bucket {
    fn counts(&self) -> Counts {
        Counts {
            total: self.total,
            failures: self.failures,
            slow: self.slow,
            slow_vs_peers: self.slow_vs_peers,
            latency: Duration::from_nanos(self.latency_nanos),
        }
    }
}

/// Request counts over a sliding window.
#[derive(Debug, Clone)]
pub struct Window {
    bucket_nanos: u64,
    buckets: [Bucket; BUCKETS],
}

impl Window {
    /// An empty window of length `window` (at least [`BUCKETS`] nanoseconds).
    pub fn new(window: Duration) -> Self {
        let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        Self {
            bucket_nanos: (nanos / BUCKETS as u64).max(1),
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn period(&self, now: Duration) -> u64 {
        u64::try_from(now.as_nanos()).unwrap_or(u64::MAX) / self.bucket_nanos
    }

    /// Counts one completed request at `now`.
    pub fn record(&mut self, now: Duration, sample: Sample) {
        let period = self.period(now);
        let bucket = &mut self.buckets[(period % BUCKETS as u64) as usize];
        if bucket.period != period {
            *bucket = Bucket {
                period,
                ..Bucket::default()
            };
        }
        bucket.total = bucket.total.saturating_add(1);
        bucket.failures = bucket.failures.saturating_add(u32::from(sample.failure));
        bucket.slow = bucket.slow.saturating_add(u32::from(sample.slow));
        bucket.slow_vs_peers = bucket
            .slow_vs_peers
            .saturating_add(u32::from(sample.slow_vs_peers));
        let latency = u64::try_from(sample.latency.as_nanos()).unwrap_or(u64::MAX);
        bucket.latency_nanos = bucket.latency_nanos.saturating_add(latency);
    }

    /// The counts of the buckets that are still inside the window at `now`.
    pub fn counts(&self, now: Duration) -> Counts {
        let period = self.period(now);
        let mut sum = Counts::default();
        for bucket in &self.buckets {
            if bucket.period <= period && period - bucket.period < BUCKETS as u64 {
                sum.add(&bucket.counts());
            }
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn sample(failure: bool, slow: bool, latency: u64) -> Sample {
        Sample {
            failure,
            slow,
            slow_vs_peers: slow,
            latency: ms(latency),
        }
    }

    #[test]
    fn counts_requests_inside_the_window_and_forgets_older_buckets() {
        let mut window = Window::new(ms(1000));
        window.record(ms(0), sample(true, false, 1));
        window.record(ms(150), sample(false, true, 20));
        window.record(ms(950), sample(true, false, 3));
        assert_eq!(
            window.counts(ms(999)),
            Counts {
                total: 3,
                failures: 2,
                slow: 1,
                slow_vs_peers: 1,
                latency: ms(24),
            }
        );
        // At 1050ms the bucket [0, 100) has left the window.
        assert_eq!(
            window.counts(ms(1050)),
            Counts {
                total: 2,
                failures: 1,
                slow: 1,
                slow_vs_peers: 1,
                latency: ms(23),
            }
        );
        // Reusing the slot of [100, 200) resets it.
        window.record(ms(1150), sample(false, false, 5));
        assert_eq!(
            window.counts(ms(1150)),
            Counts {
                total: 2,
                failures: 1,
                slow: 0,
                slow_vs_peers: 0,
                latency: ms(8),
            }
        );
        assert_eq!(window.counts(ms(5000)), Counts::default());
    }

    #[test]
    fn the_mean_latency_is_over_the_requests_in_the_window() {
        let mut window = Window::new(ms(1000));
        assert_eq!(window.counts(ms(0)).mean_latency(), None);
        window.record(ms(0), sample(false, false, 2));
        window.record(ms(10), sample(false, false, 4));
        assert_eq!(window.counts(ms(20)).mean_latency(), Some(ms(3)));
    }
}
