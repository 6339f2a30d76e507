//! Equal endpoints get equal shares under every power-of-two-choices algorithm, at one
//! request at a time and at 64 concurrent: noise in their answers must not decide who gets
//! the traffic.
//!
//! The answers are those of healthy loopback backends: 120–180 µs, with 1 % stalls of 2–5 ms
//! (a scheduler hiccup, a GC pause) that any endpoint may hit; and those of a busy machine,
//! where on top of that every answer takes milliseconds for tens of milliseconds at a time. At one request at a time every
//! candidate has nothing in flight, so the latency estimate alone decides a comparison: a
//! stall that holds one endpoint's estimate up, or a few microseconds of difference between
//! two estimates, would hand the lowest estimate every comparison it is drawn into; and the
//! endpoint sampled last, still at the 30 ms `default_rtt`, would lose every comparison with
//! its sampled peers and never get the sample that corrects it (measured: 0 of 50,000
//! picks).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use crate::{
    ServicePicker,
    policy::{HealthScore, LeastRequest, LoadBalancer, PeakEwma},
    rng::{Rng, SplitMix64},
    test_support::*,
};

use super::closed_loop::drive;

/// Picks made per run.
const PICKS: u32 = 60_000;

/// How long answers take.
#[derive(Debug, Clone, Copy)]
enum Answers {
    /// Loopback: 120–180 µs, or 1 % of the time a stall of 2–5 ms, each on its own.
    Loopback,
    /// A busy machine: the same, and now and then (an answer in 2,000 starts one) an
    /// episode of 20–100 ms in which every answer, to whichever endpoint, takes 2–10 ms.
    BusyMachine,
}

/// Draws answer times; `episode_until` is when the busy machine's current episode ends.
struct Noise {
    answers: Answers,
    rng: SplitMix64,
    episode_until: Duration,
}

impl Noise {
    fn answer(&mut self, now: Duration) -> Duration {
        let rng = &mut self.rng;
        if let Answers::BusyMachine = self.answers {
            if now >= self.episode_until && rng.unit() < 0.0005 {
                self.episode_until =
                    now + Duration::from_micros(20_000 + (rng.unit() * 80_000.0) as u64);
            }
            if now < self.episode_until {
                return Duration::from_micros(2_000 + (rng.unit() * 8_000.0) as u64);
            }
        }
        if rng.unit() < 0.01 {
            Duration::from_micros(2_000 + (rng.unit() * 3_000.0) as u64)
        } else {
            Duration::from_micros(120 + (rng.unit() * 60.0) as u64)
        }
    }
}

/// Each of four equal endpoints' share of [`PICKS`] picks with `concurrency` requests kept in
/// flight: a request is picked as soon as one completes.
fn shares(
    load_balancer: LoadBalancer,
    answers: Answers,
    concurrency: usize,
    seed: u64,
) -> Vec<f64> {
    let mut service = policy(load_balancer);
    service.outlier_detection.relative_latency = None;
    let mut picker = ServicePicker::new(&service, &endpoints(4));
    let mut rng = SplitMix64::new(seed);
    let mut noise = Noise {
        answers,
        rng: SplitMix64::new(seed ^ 0x5eed),
        episode_until: Duration::ZERO,
    };
    let mut counts: BTreeMap<SocketAddr, u32> = BTreeMap::new();
    let mut picks = 0;
    drive(
        &mut picker,
        concurrency,
        &mut rng,
        |_, now| noise.answer(now),
        |endpoint, _| {
            *counts.entry(endpoint).or_default() += 1;
            picks += 1;
            picks < PICKS
        },
    );
    (1..=4)
        .map(|endpoint| {
            f64::from(counts.get(&addr(endpoint)).copied().unwrap_or(0)) / f64::from(PICKS)
        })
        .collect()
}

fn p2c_algorithms() -> [LoadBalancer; 3] {
    [
        LoadBalancer::LeastRequest(LeastRequest::default()),
        LoadBalancer::PeakEwma(PeakEwma::default()),
        LoadBalancer::HealthScore(HealthScore::default()),
    ]
}

fn assert_within_ten_percent_of_equal(
    load_balancer: &LoadBalancer,
    answers: Answers,
    concurrency: usize,
) {
    for seed in [1, 2, 3] {
        let shares = shares(load_balancer.clone(), answers, concurrency, seed);
        assert!(
            shares.iter().all(|share| (share - 0.25).abs() <= 0.025),
            "{load_balancer:?}, {answers:?}, {concurrency} in flight (seed {seed}): shares \
             {shares:?}, each must be within ±10 % of 25 %"
        );
    }
}

#[test]
fn equal_endpoints_get_equal_shares_one_request_at_a_time_under_every_p2c_algorithm() {
    for load_balancer in p2c_algorithms() {
        assert_within_ten_percent_of_equal(&load_balancer, Answers::Loopback, 1);
    }
}

#[test]
fn equal_endpoints_get_equal_shares_at_64_in_flight_under_every_p2c_algorithm() {
    for load_balancer in p2c_algorithms() {
        assert_within_ten_percent_of_equal(&load_balancer, Answers::Loopback, 64);
    }
}

#[test]
fn equal_endpoints_get_equal_shares_one_request_at_a_time_on_a_busy_machine() {
    for load_balancer in p2c_algorithms() {
        assert_within_ten_percent_of_equal(&load_balancer, Answers::BusyMachine, 1);
    }
}

#[test]
fn equal_endpoints_get_equal_shares_at_64_in_flight_on_a_busy_machine() {
    for load_balancer in p2c_algorithms() {
        assert_within_ten_percent_of_equal(&load_balancer, Answers::BusyMachine, 64);
    }
}
