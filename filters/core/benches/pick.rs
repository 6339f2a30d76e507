//! Cost of one `pick` + `complete` per algorithm at 10, 1,000 and 10,000 endpoints.
//!
//! Steady state: every endpoint healthy and closed, requests completed at once with a 200,
//! hash algorithms keyed by a varying header. Run: `cargo bench -p fulcrum-core --bench pick`.

use std::{hint::black_box, net::SocketAddr, time::Duration};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum_core::{
    Endpoint, LoadBalancer, Outcome, RequestAttributes, ServicePicker, ServicePolicy,
    policy::{HashOn, HealthScore, LeastRequest, Maglev, PeakEwma, RingHash, Sticky},
    rng::SplitMix64,
};

fn endpoints(n: u32) -> Vec<Endpoint> {
    (0..n)
        .map(|i| {
            let [_, a, b, c] = i.to_be_bytes();
            Endpoint {
                weight: 1 + i % 3,
                ..Endpoint::new(SocketAddr::from(([10, a, b, c], 8080)))
            }
        })
        .collect()
}

fn algorithms() -> Vec<(&'static str, LoadBalancer)> {
    let header = || HashOn::Header("x-user".into());
    vec![
        ("round_robin", LoadBalancer::RoundRobin),
        ("weighted_round_robin", LoadBalancer::WeightedRoundRobin),
        ("weighted_random", LoadBalancer::WeightedRandom),
        (
            "least_request",
            LoadBalancer::LeastRequest(LeastRequest::default()),
        ),
        ("peak_ewma", LoadBalancer::PeakEwma(PeakEwma::default())),
        (
            "health_score",
            LoadBalancer::HealthScore(HealthScore::default()),
        ),
        (
            "ring_hash",
            LoadBalancer::RingHash(RingHash {
                hash_on: header(),
                ..RingHash::default()
            }),
        ),
        (
            "maglev",
            LoadBalancer::Maglev(Maglev {
                hash_on: header(),
                ..Maglev::default()
            }),
        ),
        ("sticky", LoadBalancer::Sticky(Sticky::default())),
    ]
}

fn pick_and_complete(c: &mut Criterion) {
    let keys: Vec<String> = (0..1024).map(|i| format!("user-{i}")).collect();
    for (name, load_balancer) in algorithms() {
        let mut group = c.benchmark_group(format!("pick_complete/{name}"));
        for n in [10u32, 1_000, 10_000] {
            let policy = ServicePolicy {
                load_balancer: load_balancer.clone(),
                ..ServicePolicy::default()
            };
            let mut picker = ServicePicker::new(&policy, &endpoints(n));
            let mut rng = SplitMix64::new(42);
            let mut tick: u64 = 0;
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| {
                    tick += 1;
                    let now = Duration::from_micros(tick);
                    let attributes = RequestAttributes {
                        hash_header: Some(&keys[(tick % 1024) as usize]),
                        ..RequestAttributes::default()
                    };
                    let pick = picker
                        .pick(black_box(&attributes), now, &mut rng)
                        .expect("healthy endpoints");
                    let outcome = Outcome {
                        status: Some(200),
                        latency: Duration::from_millis(5),
                        ..Outcome::default()
                    };
                    black_box(picker.complete(
                        pick.endpoint,
                        fulcrum_core::Served::ByPick,
                        outcome,
                        now,
                    ));
                });
            });
        }
        group.finish();
    }
}

criterion_group!(benches, pick_and_complete);
criterion_main!(benches);
