//! Cost of one `pick` + `complete` per algorithm at 10, 1,000 and 10,000 endpoints.
//!
//! Steady state (`pick_complete`): every endpoint healthy and closed, requests completed at
//! once with a 200, hash algorithms keyed by a varying header. With ejections
//! (`pick_complete_tenth_ejected`, 10,000 endpoints): every tenth endpoint's breaker open for
//! the whole run (the default `max_ejection_percent`), so candidates are part of the tier.
//! Run: `cargo bench -p fulcrum-core --bench pick`.

use std::{hint::black_box, net::SocketAddr, time::Duration};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum_core::{
    Endpoint, LoadBalancer, Outcome, RequestAttributes, Served, ServicePicker, ServicePolicy,
    policy::{HashOn, HealthScore, LeastRequest, Maglev, PeakEwma, RingHash, Sticky},
    rng::SplitMix64,
};

fn endpoints(n: u32) -> Vec<Endpoint> {
    (0..n)
        .map(|i| {
            let [_, a, b, c] = i.to_be_bytes();
            Endpoint::new(SocketAddr::from(([10, a, b, c], 8080))).with_weight(1 + i % 3)
        })
        .collect()
}

fn algorithms() -> Vec<(&'static str, LoadBalancer)> {
    let header = || HashOn::Header("x-user".into());
    vec![
        ("round_robin", LoadBalancer::RoundRobin {}),
        ("weighted_round_robin", LoadBalancer::WeightedRoundRobin {}),
        ("weighted_random", LoadBalancer::WeightedRandom {}),
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

/// Benchmarks one `pick` + `complete` on `picker`, time advancing 1µs a request.
fn bench_picks(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    n: u32,
    mut picker: ServicePicker,
) {
    let keys: Vec<String> = (0..1024).map(|i| format!("user-{i}")).collect();
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
            black_box(picker.complete(pick.endpoint, Served::ByPick, outcome, now));
        });
    });
}

fn pick_and_complete(c: &mut Criterion) {
    for (name, load_balancer) in algorithms() {
        let mut group = c.benchmark_group(format!("pick_complete/{name}"));
        for n in [10u32, 1_000, 10_000] {
            let policy = ServicePolicy {
                load_balancer: load_balancer.clone(),
                ..ServicePolicy::default()
            };
            bench_picks(&mut group, n, ServicePicker::new(&policy, &endpoints(n)));
        }
        group.finish();
    }
}

fn pick_and_complete_with_ejections(c: &mut Criterion) {
    let n = 10_000;
    for (name, load_balancer) in algorithms() {
        let mut group = c.benchmark_group(format!("pick_complete_tenth_ejected/{name}"));
        let mut policy = ServicePolicy {
            load_balancer,
            ..ServicePolicy::default()
        };
        let hour = Duration::from_secs(3600);
        policy.outlier_detection.base_ejection_time = hour;
        policy.outlier_detection.max_ejection_time = hour;
        let fleet = endpoints(n);
        let mut picker = ServicePicker::new(&policy, &fleet);
        let failure = Outcome {
            status: Some(503),
            ..Outcome::default()
        };
        for endpoint in fleet.iter().step_by(10) {
            for _ in 0..policy.outlier_detection.consecutive_failures {
                picker.complete(endpoint.address, Served::ByPick, failure, Duration::ZERO);
            }
        }
        let open = picker.endpoints().filter(|v| v.breaker.name() == "open");
        assert_eq!(open.count(), n as usize / 10, "a tenth ejected");
        bench_picks(&mut group, n, picker);
        group.finish();
    }
}

criterion_group!(benches, pick_and_complete, pick_and_complete_with_ejections);
criterion_main!(benches);
