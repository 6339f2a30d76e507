//! The health stage against real backends: probes follow the endpoints and the policy, and
//! failing endpoints are published unhealthy until they pass again.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use fulcrum_core::{Endpoint, Health, ServiceEndpoints};
use fulcrum_example_backend::{Backend, Fault};
use fulcrum_health::{HealthMetrics, ProbeHub};
use fulcrum_pipeline::Traced;
use fulcrum_policy::{PolicyFormat, PolicyStore};
use fulcrum_sources::Services;
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::sync::watch;

fn merged(backends: &[&Backend]) -> Traced<Services> {
    let endpoints = backends.iter().map(|b| Endpoint::new(b.addr)).collect();
    Traced::untraced(Arc::new(BTreeMap::from([(
        "shop".to_owned(),
        std::sync::Arc::new(ServiceEndpoints {
            endpoints,
            protocol: None,
        }),
    )])))
}

/// Makes `store`'s current policy one that checks `shop` with `check`.
async fn check_shop(store: &PolicyStore, check: serde_json::Value) {
    let text = serde_json::json!({"services": {"shop": {"health_check": check}}}).to_string();
    store
        .offer(&text, PolicyFormat::Json, "test")
        .await
        .expect("valid policy");
}

/// The published health of each backend's address, in backend order.
fn health(services: &Services, backends: &[&Backend]) -> Vec<Health> {
    backends
        .iter()
        .map(|backend| {
            services["shop"]
                .endpoints
                .iter()
                .find(|e| e.address == backend.addr)
                .map(|e| e.health)
                .expect("endpoint published")
        })
        .collect()
}

/// The stage's output once it satisfies `done`, within `timeout`.
async fn published_until(
    published: &mut watch::Receiver<Option<Traced<Services>>>,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Services) -> bool,
) -> Result<Traced<Services>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(services) = published.borrow_and_update().clone()
            && done(&services)
        {
            return Ok(services);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, published.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => bail!("the stage stopped before {what}"),
            Err(_) => bail!("no output with {what} within {timeout:?}"),
        }
    }
}

/// Starts the health stage over `endpoints` and `policies`' current policy.
fn start_stage(
    endpoints: watch::Receiver<Option<Traced<Services>>>,
    policies: &PolicyStore,
    metrics: HealthMetrics,
) -> (
    tokio::task::JoinHandle<()>,
    watch::Receiver<Option<Traced<Services>>>,
) {
    let (output, published) = watch::channel(None);
    let stage = tokio::spawn(fulcrum_pipeline::health::run(
        endpoints,
        policies.subscribe(),
        ProbeHub::new(metrics),
        output,
    ));
    (stage, published)
}

fn checks_metric(metrics: &HealthMetrics, result: &str) -> f64 {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    encode(&mut text, &registry).expect("encode");
    let series = format!("fulcrum_health_checks_total{{cluster=\"shop\",result=\"{result}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_failing_http_check_publishes_the_endpoint_unhealthy_until_it_passes_again() -> Result<()>
{
    let (b1, b2) = (
        Backend::bind("b1", 0, 0).await?,
        Backend::bind("b2", 0, 0).await?,
    );
    let both = [&b1, &b2];
    let source = merged(&both);
    let (_snapshots, snapshots_rx) = watch::channel(Some(source.clone()));
    let policies = PolicyStore::default();
    check_shop(
        &policies,
        serde_json::json!({
            "http": {"path": "/healthz"}, "interval": "100ms", "timeout": "100ms",
            "jitter": "10ms", "healthy_threshold": 1, "unhealthy_threshold": 2
        }),
    )
    .await;
    let metrics = HealthMetrics::default();
    let (stage, mut published) = start_stage(snapshots_rx, &policies, metrics.clone());

    let first = published_until(
        &mut published,
        Duration::from_secs(5),
        "a first snapshot",
        |_| true,
    )
    .await?;
    assert_eq!(
        first, source,
        "nothing fails yet: the merged snapshot as it is"
    );

    b1.set_fault(Fault {
        fail_health_checks: true,
        ..Fault::default()
    })
    .map_err(anyhow::Error::msg)?;
    let failed = published_until(
        &mut published,
        Duration::from_secs(5),
        "b1 unhealthy",
        |s| health(s, &both) == [Health::Unhealthy, Health::Healthy],
    )
    .await?;
    assert_ne!(
        failed, source,
        "a health change is new content: a new version"
    );
    assert_eq!(
        b1.stats().requests,
        0,
        "only /healthz was called, no traffic"
    );

    b1.set_fault(Fault::default()).map_err(anyhow::Error::msg)?;
    let recovered = published_until(
        &mut published,
        Duration::from_secs(5),
        "b1 healthy again",
        |s| health(s, &both) == [Health::Healthy, Health::Healthy],
    )
    .await?;
    assert_eq!(
        recovered, source,
        "recovered: the merged snapshot again, same version"
    );
    assert!(checks_metric(&metrics, "success") >= 2.0);
    assert!(checks_metric(&metrics, "failure") >= 2.0);

    stage.abort();
    let _ = stage.await;
    let after = checks_metric(&metrics, "success");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        checks_metric(&metrics, "success"),
        after,
        "stopping the stage stops its probes"
    );
    Ok(())
}

#[tokio::test]
async fn endpoints_and_policy_changes_start_and_stop_probes() -> Result<()> {
    let (b1, b2) = (
        Backend::bind("b1", 0, 0).await?,
        Backend::bind("b2", 0, 0).await?,
    );
    b2.set_fault(Fault {
        fail_health_checks: true,
        ..Fault::default()
    })
    .map_err(anyhow::Error::msg)?;
    let (snapshots, snapshots_rx) = watch::channel(Some(merged(&[&b1])));
    let policies = PolicyStore::default();
    let (stage, mut published) = start_stage(snapshots_rx, &policies, HealthMetrics::default());
    published_until(
        &mut published,
        Duration::from_secs(5),
        "a first snapshot",
        |_| true,
    )
    .await?;

    // b2 joins while no policy asks for checks: published as the source says.
    let both = merged(&[&b1, &b2]);
    snapshots.send_replace(Some(both.clone()));
    published_until(&mut published, Duration::from_secs(5), "b2 added", |s| {
        *s == *both
    })
    .await?;

    // An HTTP check fails b2, whose /healthz answers 503.
    check_shop(
        &policies,
        serde_json::json!({
            "http": {}, "interval": "100ms", "jitter": "10ms", "unhealthy_threshold": 1
        }),
    )
    .await;
    published_until(
        &mut published,
        Duration::from_secs(5),
        "b2 unhealthy",
        |s| health(s, &[&b1, &b2]) == [Health::Healthy, Health::Unhealthy],
    )
    .await?;

    // The policy drops the check: b2 is published as its source says again.
    policies
        .offer("{}", PolicyFormat::Json, "test")
        .await
        .expect("the empty policy is valid");
    published_until(&mut published, Duration::from_secs(5), "no check", |s| {
        *s == *both
    })
    .await?;
    stage.abort();
    Ok(())
}
