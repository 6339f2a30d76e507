use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use fulcrum_core::{Endpoint, Health, Policy, ServiceEndpoints, Snapshot};
use fulcrum_example_backend::{Backend, Fault};
use fulcrum_health::HealthMetrics;
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::sync::{mpsc, watch};

fn merged(backends: &[&Backend]) -> Snapshot {
    let endpoints = backends.iter().map(|b| Endpoint::new(b.addr)).collect();
    let services = BTreeMap::from([("shop".to_owned(), ServiceEndpoints { endpoints })]);
    Snapshot {
        version: fulcrum_sources::merge::content_version(&services),
        services,
        policy: None,
    }
}

fn policy(check: serde_json::Value) -> Arc<Policy> {
    let text = serde_json::json!({"services": {"shop": {"health_check": check}}}).to_string();
    Arc::new(Policy::from_json(&text).expect("valid policy"))
}

/// The published health of each backend's address, in backend order.
fn health(snapshot: &Snapshot, backends: &[&Backend]) -> Vec<Health> {
    backends
        .iter()
        .map(|backend| {
            snapshot.services["shop"]
                .endpoints
                .iter()
                .find(|e| e.address == backend.addr)
                .map(|e| e.health)
                .expect("endpoint published")
        })
        .collect()
}

/// The next published snapshot satisfying `done`, within `timeout`.
async fn published_until(
    published: &mut mpsc::UnboundedReceiver<Snapshot>,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Snapshot) -> bool,
) -> Result<Snapshot> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, published.recv()).await {
            Ok(Some(snapshot)) if done(&snapshot) => return Ok(snapshot),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the stage stopped before {what}"),
            Err(_) => bail!("no snapshot with {what} within {timeout:?}"),
        }
    }
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
    let (_policies, policies_rx) = watch::channel(Some(policy(serde_json::json!({
        "http": {"path": "/healthz"}, "interval": "100ms", "timeout": "100ms",
        "jitter": "10ms", "healthy_threshold": 1, "unhealthy_threshold": 2
    }))));
    let metrics = HealthMetrics::default();
    let (sender, mut published) = mpsc::unbounded_channel();
    let stage = tokio::spawn(fulcrum_health::overlay::run(
        snapshots_rx,
        policies_rx,
        Option::clone,
        metrics.clone(),
        move |snapshot| {
            let _ = sender.send(snapshot);
        },
    ));

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
    assert_ne!(failed.version, source.version);
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
    let (policies, policies_rx) = watch::channel(None);
    let (sender, mut published) = mpsc::unbounded_channel();
    let stage = tokio::spawn(fulcrum_health::overlay::run(
        snapshots_rx,
        policies_rx,
        Option::clone,
        HealthMetrics::default(),
        move |snapshot| {
            let _ = sender.send(snapshot);
        },
    ));
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
        *s == both
    })
    .await?;

    // An HTTP check fails b2, whose /healthz answers 503.
    policies.send_replace(Some(policy(serde_json::json!({
        "http": {}, "interval": "100ms", "jitter": "10ms", "unhealthy_threshold": 1
    }))));
    published_until(
        &mut published,
        Duration::from_secs(5),
        "b2 unhealthy",
        |s| health(s, &[&b1, &b2]) == [Health::Healthy, Health::Unhealthy],
    )
    .await?;

    // The policy drops the check: b2 is published as its source says again.
    policies.send_replace(Some(Arc::new(Policy::default())));
    published_until(&mut published, Duration::from_secs(5), "no check", |s| {
        *s == both
    })
    .await?;
    stage.abort();
    Ok(())
}
