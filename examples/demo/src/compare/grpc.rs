//! The gRPC scenario: four tonic backends behind an HTTP/2 static cluster, one Envoy, and a
//! bounded closed loop of tonic clients, since wrk speaks no gRPC.
//!
//! A gRPC failure travels inside an HTTP 200 (`grpc-status` in the trailers, or in the headers
//! of a trailers-only answer), so the route retries `unavailable` on both sides besides
//! connect failures and resets. Each client connection sends one `Check` at a time until the
//! run's deadline or its call budget, whichever comes first; success is a call that ends OK
//! at the client, after Envoy's retries.

use std::time::Duration;

use anyhow::{Context, Result};
use fulcrum_example_backend::grpc::{self, GrpcBackend};
use fulcrum_test_support::{
    ClusterBalancing, ClusterOptions, Endpoints, FailurePolicy, FilterSetup, RETRY_ON_GRPC,
    UpstreamProtocol,
};
use serde_json::json;
use tokio::time::Instant;

use super::{Measured, Run, SERVICE, TAIL_SECONDS, fulcrum_policy, shares};

/// The most calls one client connection makes in a run.
const MAX_CALLS_PER_CONNECTION: usize = 250_000;
/// How long the clients may overrun the run's deadline (a call in flight ends within the
/// route timeout) before the run fails.
const OVERRUN: Duration = Duration::from_secs(30);

/// One client connection's calls: each one's latency in microseconds, and how many ended OK.
#[derive(Debug, Default)]
struct Calls {
    latencies_us: Vec<u32>,
    ok: usize,
}

/// The gRPC scenario with one balancer: fresh backends (b4 failing `unavailable_percent` of
/// its calls), fresh Envoy, the clients' loop.
pub async fn run(run: Run<'_>, unavailable_percent: u64) -> Result<Measured> {
    let mut backends = Vec::new();
    for index in 1..=4 {
        let percent = if index == 4 { unavailable_percent } else { 0 };
        backends.push(GrpcBackend::start(&format!("b{index}"), percent).await?);
    }
    let members: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let filter = (*run.balancing == ClusterBalancing::Fulcrum).then(|| FilterSetup {
        wasm: run.args.wasm.clone(),
        config: json!({
            "service": {"from": "fixed", "name": SERVICE},
            "endpoints": {SERVICE: members
                .iter()
                .map(|a| json!({"address": a.to_string()}))
                .collect::<Vec<_>>()},
            "policy": fulcrum_policy(run.scenario),
        }),
        failure_policy: FailurePolicy::default(),
    });
    let cluster = ClusterOptions {
        protocol: UpstreamProtocol::Http2,
        base_ejection_time: Some(run.scenario.ejection),
        ..ClusterOptions::default()
    };
    let mut envoy = run
        .start_envoy(Endpoints::Static(members), filter, RETRY_ON_GRPC, cluster)
        .await?;
    let listener = envoy.ingress_address().await?;

    let seconds = run.seconds();
    let counts = || -> Vec<u64> { backends.iter().map(GrpcBackend::calls).collect() };
    let mut clients = Vec::new();
    for _ in 0..run.scenario.connections {
        clients.push(grpc::client(listener).await?);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for mut client in clients {
        tasks.spawn(async move {
            let mut calls = Calls::default();
            while Instant::now() < deadline && calls.latencies_us.len() < MAX_CALLS_PER_CONNECTION {
                let sent = Instant::now();
                let (_, code) = grpc::check(&mut client).await;
                let latency = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
                calls.latencies_us.push(latency);
                calls.ok += usize::from(code == tonic::Code::Ok);
            }
            calls
        });
    }
    let tail = async {
        tokio::time::sleep_until(
            started + Duration::from_secs(seconds.saturating_sub(TAIL_SECONDS)),
        )
        .await;
        counts()
    };
    let load = tokio::time::timeout(Duration::from_secs(seconds) + OVERRUN, tasks.join_all());
    let (calls, tail_start) = tokio::join!(load, tail);
    let calls = calls.context("the gRPC clients overran the run")?;
    let elapsed = started.elapsed();
    envoy.check_running()?;
    let retries = envoy
        .stat(&format!("cluster.{SERVICE}.upstream_rq_retry"))
        .await?
        .unwrap_or(0);
    let overflow = envoy
        .stat(&format!("cluster.{SERVICE}.upstream_rq_retry_overflow"))
        .await?
        .unwrap_or(0);
    // Stops the traffic before the backends are counted.
    drop(envoy);

    let ok: usize = calls.iter().map(|c| c.ok).sum();
    let mut latencies: Vec<u32> = calls.into_iter().flat_map(|c| c.latencies_us).collect();
    latencies.sort_unstable();
    let total = latencies.len();
    let end = counts();
    let (odd_share, odd_tail_share, spread) = shares(&end, &tail_start);
    let odd_calls = end[3];
    let odd_failed = odd_calls * unavailable_percent / 100;
    Ok(Measured {
        requests_per_second: total as f64 / elapsed.as_secs_f64(),
        success: ok as f64 / total.max(1) as f64,
        p50_ms: percentile_ms(&latencies, 0.50),
        p99_ms: percentile_ms(&latencies, 0.99),
        p999_ms: percentile_ms(&latencies, 0.999),
        odd_share,
        odd_tail_share,
        spread,
        detail: Some(format!(
            "b4 answered UNAVAILABLE to {odd_failed} of its {odd_calls} calls; {} of {total} \
             calls failed at the client; Envoy retried {retries} times and refused {overflow} \
             retries over the cluster's retry limit (`upstream_rq_retry_overflow`; Envoy's \
             default `max_retries`: 3 at once)",
            total - ok
        )),
    })
}

/// The `quantile` of sorted microsecond latencies, in milliseconds (0 with none): the
/// smallest value at least that share of the calls did not exceed.
fn percentile_ms(sorted_us: &[u32], quantile: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = (quantile * sorted_us.len() as f64).ceil() as usize;
    f64::from(sorted_us[rank.clamp(1, sorted_us.len()) - 1]) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_percentile_is_the_smallest_latency_that_share_of_calls_did_not_exceed() {
        let sorted: Vec<u32> = (1..=1000).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&sorted, 0.50), 500.0);
        assert_eq!(percentile_ms(&sorted, 0.99), 990.0);
        assert_eq!(percentile_ms(&sorted, 0.999), 999.0);
        assert_eq!(percentile_ms(&[7000], 0.5), 7.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
    }
}
