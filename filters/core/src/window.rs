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

/// One bucket's counts in 16 bytes, as every endpoint a proxy talks to holds [`BUCKETS`] of
/// them (10,000 endpoints: 1.6 MB where [`Counts`] per bucket would take 4.8):
///
/// - the period is kept modulo 2^32: a bucket is read as current when the period now is at
///   most `BUCKETS - 1` past it modulo 2^32, so a bucket untouched for an exact multiple of
///   2^32 periods (497 days at the shortest window's 10 ms buckets) would be read again;
/// - counts are 16-bit and the latency sum is in microseconds, 32-bit: a bucket about to
///   overflow either (65,535 requests in one bucket of one endpoint, or 71 minutes of summed
///   latency) halves all of them first, which keeps its failure and slow-call ratios and its
///   mean latency (within the rounding of halving, under 1 %) but gives it half its weight
///   against the window's other buckets.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket period (`now / bucket_len`) these counts belong to, modulo 2^32.
    period: u32,
    total: u16,
    failures: u16,
    slow: u16,
    slow_vs_peers: u16,
    latency_micros: u32,
}

impl Bucket {
    fn halve(&mut self) {
        self.total /= 2;
        self.failures /= 2;
        self.slow /= 2;
        self.slow_vs_peers /= 2;
        self.latency_micros /= 2;
    }

    fn record(&mut self, sample: Sample) {
        let latency = u32::try_from(sample.latency.as_micros()).unwrap_or(u32::MAX);
        if self.total == u16::MAX || self.latency_micros.checked_add(latency).is_none() {
            self.halve();
        }
        self.total += 1;
        self.failures += u16::from(sample.failure);
        self.slow += u16::from(sample.slow);
        self.slow_vs_peers += u16::from(sample.slow_vs_peers);
        self.latency_micros = self.latency_micros.saturating_add(latency);
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
        let nanos = crate::duration::nanos(window);
        Self {
            bucket_nanos: (nanos / BUCKETS as u64).max(1),
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    /// The bucket period of `now`, modulo 2^32 (see [`Bucket`]).
    fn period(&self, now: Duration) -> u32 {
        let period = crate::duration::nanos(now) / self.bucket_nanos;
        period as u32
    }

    /// Counts one completed request at `now`.
    pub fn record(&mut self, now: Duration, sample: Sample) {
        let period = self.period(now);
        let bucket = &mut self.buckets[period as usize % BUCKETS];
        if bucket.period != period {
            *bucket = Bucket {
                period,
                ..Bucket::default()
            };
        }
        bucket.record(sample);
    }

    /// The counts of the buckets that are still inside the window at `now`.
    ///
    /// Summed as the buckets' own integers (ten 16-bit counts cannot overflow a `u32`, nor ten
    /// 32-bit latency sums a `u64`), converted once: the breaker asks on every completion.
    pub fn counts(&self, now: Duration) -> Counts {
        let period = self.period(now);
        let (mut total, mut failures, mut slow, mut slow_vs_peers) = (0u32, 0u32, 0u32, 0u32);
        let mut latency_micros = 0u64;
        for bucket in &self.buckets {
            // A bucket ahead of now (time went backwards) wraps to a large age: left out.
            if (period.wrapping_sub(bucket.period) as usize) < BUCKETS {
                total += u32::from(bucket.total);
                failures += u32::from(bucket.failures);
                slow += u32::from(bucket.slow);
                slow_vs_peers += u32::from(bucket.slow_vs_peers);
                latency_micros += u64::from(bucket.latency_micros);
            }
        }
        Counts {
            total,
            failures,
            slow,
            slow_vs_peers,
            latency: Duration::from_micros(latency_micros),
        }
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
    fn a_bucket_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Bucket>(), 16);
    }

    #[test]
    fn a_bucket_about_to_overflow_halves_and_keeps_its_ratios_and_mean() {
        let mut window = Window::new(ms(10_000));
        // 70,000 requests in one bucket: 1 in 4 failing, every one 2 ms.
        for i in 0..70_000u32 {
            window.record(ms(5), sample(i % 4 == 0, false, 2));
        }
        let counts = window.counts(ms(5));
        assert!(counts.total > 30_000 && counts.total < 65_536, "{counts:?}");
        let failure_percent = f64::from(counts.failures) * 100.0 / f64::from(counts.total);
        assert!((failure_percent - 25.0).abs() < 0.1, "{failure_percent}");
        let mean = counts.mean_latency().expect("requests").as_secs_f64();
        assert!(
            (mean / 0.002 - 1.0).abs() < 0.01,
            "mean {mean}s, not 2 ms within 1 %"
        );
    }

    #[test]
    fn a_latency_sum_about_to_overflow_halves_and_keeps_the_mean() {
        let mut window = Window::new(ms(10_000));
        for _ in 0..100 {
            window.record(ms(5), sample(false, false, 60_000));
        }
        let counts = window.counts(ms(5));
        assert!(counts.total < 100, "halved at least once: {counts:?}");
        let mean = counts.mean_latency().expect("requests").as_secs_f64();
        assert!(
            (mean / 60.0 - 1.0).abs() < 0.01,
            "mean {mean}s, not 60 s within 1 %"
        );
    }

    #[test]
    fn a_bucket_from_a_later_time_is_not_counted_when_time_goes_back() {
        let mut window = Window::new(ms(1000));
        window.record(ms(5_000), sample(true, false, 1));
        assert_eq!(window.counts(ms(4_000)), Counts::default());
        assert_eq!(window.counts(ms(5_000)).total, 1);
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
