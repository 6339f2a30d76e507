//! Equal endpoints get equal shares under every power-of-two-choices algorithm, at one
//! request at a time and at 64 concurrent: noise in their answers must not decide who gets
//! the traffic.
//!
//! The answers are those of healthy loopback backends: 120–180 µs, with 1 % stalls of 2–5 ms
//! (a scheduler hiccup, a GC pause) that any endpoint may hit. At one request at a time every
//! candidate has nothing in flight, so the latency estimate alone decides a comparison: a
//! stall that holds one endpoint's estimate up, or a few microseconds of difference between
//! two estimates, would hand the lowest estimate every comparison it is drawn into; and the
//! endpoint sampled last, still at the 30 ms `default_rtt`, would lose every comparison with
//! its sampled peers and never get the sample that corrects it (measured: 0 of 50,000
//! picks).

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
    net::SocketAddr,
    time::Duration,
};

use crate::{
    ServicePicker,
    policy::{HealthScore, LeastRequest, LoadBalancer, PeakEwma},
    rng::{Rng, SplitMix64},
    test_support::*,
};

/// Picks made per run.
const PICKS: u32 = 60_000;

/// One loopback answer: 120–180 µs, or 1 % of the time a stall of 2–5 ms.
fn loopback_answer(noise: &mut SplitMix64) -> Duration {
    if noise.unit() < 0.01 {
        Duration::from_micros(2_000 + (noise.unit() * 3_000.0) as u64)
    } else {
        Duration::from_micros(120 + (noise.unit() * 60.0) as u64)
    }
}

/// Each of four equal endpoints' share of [`PICKS`] picks with `concurrency` requests kept in
/// flight: a request is picked as soon as one completes.
fn shares(load_balancer: LoadBalancer, concurrency: usize, seed: u64) -> Vec<f64> {
    let mut picker = ServicePicker::new(&policy(load_balancer), &endpoints(4));
    let mut rng = SplitMix64::new(seed);
    let mut noise = SplitMix64::new(seed ^ 0x5eed);
    let mut counts: BTreeMap<SocketAddr, u32> = BTreeMap::new();
    // Completions in flight, earliest first: (when, sequence, endpoint, latency).
    let mut inflight = BinaryHeap::new();
    let mut now = Duration::ZERO;
    let mut sequence = 0u64;
    for _ in 0..PICKS {
        while inflight.len() >= concurrency {
            let Some(Reverse((at, _, endpoint, latency))) = inflight.pop() else {
                break;
            };
            now = at;
            picker.complete(endpoint, crate::Served::ByPick, ok(latency), now);
        }
        let pick = picker
            .pick(&Default::default(), now, &mut rng)
            .expect("admissible");
        *counts.entry(pick.endpoint).or_default() += 1;
        sequence += 1;
        let latency = loopback_answer(&mut noise);
        inflight.push(Reverse((now + latency, sequence, pick.endpoint, latency)));
    }
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

fn assert_within_ten_percent_of_equal(load_balancer: &LoadBalancer, concurrency: usize) {
    for seed in [1, 2, 3] {
        let shares = shares(load_balancer.clone(), concurrency, seed);
        assert!(
            shares.iter().all(|share| (share - 0.25).abs() <= 0.025),
            "{load_balancer:?} at {concurrency} in flight (seed {seed}): shares {shares:?}, \
             each must be within ±10 % of 25 %"
        );
    }
}

#[test]
fn equal_endpoints_get_equal_shares_one_request_at_a_time_under_every_p2c_algorithm() {
    for load_balancer in p2c_algorithms() {
        assert_within_ten_percent_of_equal(&load_balancer, 1);
    }
}

#[test]
fn equal_endpoints_get_equal_shares_at_64_in_flight_under_every_p2c_algorithm() {
    for load_balancer in p2c_algorithms() {
        assert_within_ten_percent_of_equal(&load_balancer, 64);
    }
}
