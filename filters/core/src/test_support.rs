//! Shared test fixtures: endpoints, policies, clocks and outcomes that read like the scenario.

use std::{net::SocketAddr, time::Duration};

use crate::{
    Attributes, Endpoint, Outcome, ServicePicker,
    policy::{LoadBalancer, OutlierDetection, ServicePolicy},
    rng::SplitMix64,
};

/// `10.0.0.i:8080`.
pub fn addr(i: u32) -> SocketAddr {
    let [_, a, b, c] = i.to_be_bytes();
    SocketAddr::from(([10, a, b, c], 8080))
}

/// `n` healthy endpoints of weight 1, `10.0.0.1:8080` upward.
pub fn endpoints(n: u32) -> Vec<Endpoint> {
    (1..=n).map(|i| Endpoint::new(addr(i))).collect()
}

/// Healthy endpoints with these weights, `10.0.0.1:8080` upward.
pub fn weighted(weights: &[u32]) -> Vec<Endpoint> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| Endpoint::new(addr(i as u32 + 1)).with_weight(weight))
        .collect()
}

/// An endpoint in `zone`.
pub fn in_zone(i: u32, zone: &str) -> Endpoint {
    Endpoint::new(addr(i)).with_attributes(Attributes {
        zone: Some(zone.to_owned()),
        ..Attributes::default()
    })
}

/// A service policy with this algorithm and otherwise defaults.
pub fn policy(load_balancer: LoadBalancer) -> ServicePolicy {
    ServicePolicy {
        load_balancer,
        ..ServicePolicy::default()
    }
}

/// Outlier detection that ejects after `n` consecutive failures for 10s, no jitter, any share
/// of the fleet, no panic threshold.
pub fn strict_outlier_detection(n: u32) -> OutlierDetection {
    OutlierDetection {
        consecutive_failures: n,
        base_ejection_time: secs(10),
        max_ejection_time: secs(300),
        ejection_jitter_percent: 0,
        max_ejection_percent: 100,
        panic_threshold_percent: 0,
        ..OutlierDetection::default()
    }
}

pub fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

pub fn secs(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

/// A seeded RNG for distribution tests.
pub fn seeded() -> SplitMix64 {
    SplitMix64::new(0x5EED)
}

pub fn ok(latency: Duration) -> Outcome {
    Outcome {
        status: Some(200),
        latency,
        ..Outcome::default()
    }
}

pub fn status(code: u16) -> Outcome {
    Outcome {
        status: Some(code),
        latency: ms(5),
        ..Outcome::default()
    }
}

pub fn connect_failure() -> Outcome {
    Outcome {
        connect_failure: true,
        latency: ms(1),
        ..Outcome::default()
    }
}

/// Picks once with no request attributes and completes with `outcome` at `now`; returns the
/// endpoint picked.
pub fn pick_and_complete(
    picker: &mut ServicePicker,
    outcome: Outcome,
    now: Duration,
    rng: &mut SplitMix64,
) -> SocketAddr {
    let pick = picker
        .pick(&Default::default(), now, rng)
        .expect("an endpoint is admissible");
    picker.complete(pick.endpoint, crate::Served::ByPick, outcome, now);
    pick.endpoint
}

/// Sends `outcome` to `endpoint` directly, as if it had been picked, `times` times.
pub fn fail_on(
    picker: &mut ServicePicker,
    endpoint: SocketAddr,
    outcome: Outcome,
    times: u32,
    now: Duration,
) -> Vec<crate::Transition> {
    let mut transitions = Vec::new();
    for _ in 0..times {
        transitions.extend(
            picker
                .complete(endpoint, crate::Served::ByPick, outcome, now)
                .iter()
                .copied(),
        );
    }
    transitions
}
