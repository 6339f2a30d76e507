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
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket period (`now / bucket_len`) these counts belong to.
    period: u64,
    counts: Counts,
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
    pub fn record(&mut self, now: Duration, failure: bool, slow: bool) {
        let period = self.period(now);
        let bucket = &mut self.buckets[(period % BUCKETS as u64) as usize];
        if bucket.period != period {
            *bucket = Bucket {
                period,
                counts: Counts::default(),
            };
        }
        let counts = &mut bucket.counts;
        counts.total = counts.total.saturating_add(1);
        counts.failures = counts.failures.saturating_add(u32::from(failure));
        counts.slow = counts.slow.saturating_add(u32::from(slow));
    }

    /// The counts of the buckets that are still inside the window at `now`.
    pub fn counts(&self, now: Duration) -> Counts {
        let period = self.period(now);
        let mut sum = Counts::default();
        for bucket in &self.buckets {
            if bucket.period <= period && period - bucket.period < BUCKETS as u64 {
                sum.total = sum.total.saturating_add(bucket.counts.total);
                sum.failures = sum.failures.saturating_add(bucket.counts.failures);
                sum.slow = sum.slow.saturating_add(bucket.counts.slow);
            }
        }
        sum
    }

    /// Forgets every count.
    pub fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn counts_requests_inside_the_window_and_forgets_older_buckets() {
        let mut window = Window::new(ms(1000));
        window.record(ms(0), true, false);
        window.record(ms(150), false, true);
        window.record(ms(950), true, false);
        assert_eq!(
            window.counts(ms(999)),
            Counts {
                total: 3,
                failures: 2,
                slow: 1
            }
        );
        // At 1050ms the bucket [0, 100) has left the window.
        assert_eq!(
            window.counts(ms(1050)),
            Counts {
                total: 2,
                failures: 1,
                slow: 1
            }
        );
        // Reusing the slot of [100, 200) resets it.
        window.record(ms(1150), false, false);
        assert_eq!(
            window.counts(ms(1150)),
            Counts {
                total: 2,
                failures: 1,
                slow: 0
            }
        );
        assert_eq!(window.counts(ms(5000)), Counts::default());
    }
}
