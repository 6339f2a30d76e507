//! The HTTP scenarios: four in-process sample backends, one Envoy, one `wrk` run.
//!
//! b4 serves with a fault (which may end mid-run), is a refused port, or joins mid-run. For a
//! join each side learns of b4 its own way: fulcrum's filter from the control plane, whose
//! endpoints file gets b4 the moment it listens; Envoy's native least request from its
//! active health check of a static cluster that lists b4 from the start. A dead or joining
//! b4's port is reserved ([`reserve_port`]), so nothing else takes it while it refuses.

use std::{fmt::Write as _, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use fulcrum_demo::{stack::ControlPlane, wrk};
use fulcrum_example_backend::Backend;
use fulcrum_test_support::{
    ClusterBalancing, ClusterOptions, Endpoints, Envoy, FailurePolicy, FilterSetup, HealthCheck,
    RETRY_ON_HTTP, envoy::CONTROL_PLANE_CLUSTER, eventually, loopback, reserve_port,
};
use serde_json::{Value, json};

use super::{
    JOINS_AFTER, Measured, Odd, Run, SERVICE, SLOW_START_WINDOW, TAIL_SECONDS, WARM_SHARE_OF_FAIR,
    fulcrum_policy, shares,
};

/// How often the control plane reads its endpoints file in `warm-up`.
const FILE_POLL: &str = "100";
/// How often the filter polls the control plane in `warm-up`.
const FILTER_POLL: &str = "100ms";
/// Envoy's active health check in `warm-up`.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// How long the filter may take to apply its first snapshot.
const SNAPSHOT_READY: Duration = Duration::from_secs(10);
/// How long each worker's filter takes at most to hand its pick counts to Envoy (its tick
/// runs every second): two ticks and a margin.
const PICKS_FLUSH_WAIT: Duration = Duration::from_millis(2500);

/// One HTTP scenario with one balancer: fresh backends, fresh Envoy, one wrk run.
pub async fn run(run: Run<'_>, script: &Path) -> Result<Measured> {
    let scenario = run.scenario;
    let fulcrum = *run.balancing == ClusterBalancing::Fulcrum;
    let mut others = Vec::new();
    for index in 1..=3 {
        let backend = Backend::bind(&format!("b{index}"), 0, 0).await?;
        backend
            .set_fault(scenario.base.clone())
            .map_err(anyhow::Error::msg)?;
        others.push(backend);
    }
    let (odd, odd_addr) = match &scenario.odd {
        Odd::Faulty { fault, .. } => {
            let backend = Backend::bind("b4", 0, 0).await?;
            backend
                .set_fault(fault.clone())
                .map_err(anyhow::Error::msg)?;
            let addr = backend.addr;
            (Some(backend), addr)
        }
        Odd::Refused | Odd::Joins => (None, loopback(reserve_port()?)),
        Odd::GrpcUnavailable { .. } => bail!("{} is a gRPC scenario", scenario.name),
    };
    let mut members: Vec<SocketAddr> = others.iter().map(|b| b.addr).collect();
    members.push(odd_addr);
    let joins = matches!(scenario.odd, Odd::Joins);

    // warm-up: fulcrum learns its endpoints from the control plane, which lists b4 once it
    // listens; native least request health-checks every member and slow-starts b4.
    let endpoints_file = run.dir.join(format!("{}.endpoints.json", run.label()));
    let control_plane = if joins && fulcrum {
        write_endpoints(&endpoints_file, &members[..3])?;
        let policy_file = run.dir.join(format!("{}.policy.json", run.label()));
        std::fs::write(&policy_file, policy(scenario).to_string())?;
        let policy_arg = policy_file.display().to_string();
        let binary = run
            .args
            .control_plane
            .as_deref()
            .context("warm-up needs --control-plane")?;
        let args = [
            "--policy-file",
            &policy_arg,
            "--poll-interval-ms",
            FILE_POLL,
        ];
        let name = format!("control-plane-{}", run.label());
        Some(ControlPlane::start(binary, &name, &endpoints_file, &args, run.dir).await?)
    } else {
        None
    };
    let filter = fulcrum.then(|| {
        let mut config = json!({
            "service": {"from": "fixed", "name": SERVICE},
            "policy": policy(scenario),
        });
        if control_plane.is_some() {
            config["control_plane"] =
                json!({"cluster": CONTROL_PLANE_CLUSTER, "poll_interval": FILTER_POLL});
            config["only_services"] = json!([SERVICE]);
        } else {
            config["endpoints"] = json!({SERVICE: members
                .iter()
                .map(|a| json!({"address": a.to_string()}))
                .collect::<Vec<_>>()});
        }
        FilterSetup {
            wasm: run.args.wasm.clone(),
            config,
            failure_policy: FailurePolicy::default(),
        }
    });
    let endpoints = match &control_plane {
        Some(control_plane) => Endpoints::StaticWithSnapshots {
            members: members.clone(),
            snapshot_http: control_plane.snapshot_http,
        },
        None => Endpoints::Static(members.clone()),
    };
    let cluster = if joins && !fulcrum {
        ClusterOptions {
            health_check: Some(HealthCheck {
                path: "/healthz".to_owned(),
                interval: HEALTH_CHECK_INTERVAL,
            }),
            slow_start_window: Some(SLOW_START_WINDOW),
            base_ejection_time: Some(scenario.ejection),
            ..ClusterOptions::default()
        }
    } else {
        ClusterOptions {
            base_ejection_time: Some(scenario.ejection),
            ..ClusterOptions::default()
        }
    };
    let mut envoy = run
        .start_envoy(endpoints, filter, RETRY_ON_HTTP, cluster)
        .await?;
    if control_plane.is_some() {
        wait_for_snapshot(&envoy).await?;
    }
    if joins && !fulcrum {
        wait_for_failed_health_check(&envoy, odd_addr).await?;
    }
    let listener = envoy.ingress_address().await?;

    let seconds = run.seconds();
    let counts = |odd: Option<&Backend>| -> Vec<u64> {
        others
            .iter()
            .chain(odd)
            .map(|b| b.stats().requests)
            .chain(odd.is_none().then_some(0))
            .collect()
    };
    // Ends b4's fault or lets it join on time, notes b4's share in each whole second of the
    // run, and the counts when the tail starts.
    let timeline = async {
        let started = tokio::time::Instant::now();
        let mut odd = odd;
        let mut pending = match &scenario.odd {
            Odd::Faulty {
                recovers_after: Some(after),
                ..
            } => Some(*after),
            Odd::Joins => Some(JOINS_AFTER),
            _ => None,
        };
        let mut last = counts(odd.as_ref());
        let mut tail_start = last.clone();
        let mut per_second = Vec::new();
        for second in 1..seconds {
            let boundary = started + Duration::from_secs(second);
            if let Some(at) = pending.filter(|at| started + *at <= boundary) {
                tokio::time::sleep_until(started + at).await;
                pending = None;
                match &odd {
                    Some(faulty) => faulty
                        .set_fault(scenario.base.clone())
                        .map_err(anyhow::Error::msg)?,
                    None => {
                        let joined = Backend::bind("b4", odd_addr.port(), 0).await?;
                        joined
                            .set_fault(scenario.base.clone())
                            .map_err(anyhow::Error::msg)?;
                        if fulcrum {
                            write_endpoints(&endpoints_file, &members)?;
                        }
                        odd = Some(joined);
                    }
                }
            }
            tokio::time::sleep_until(boundary).await;
            let now = counts(odd.as_ref());
            per_second.push(shares(&now, &last).1);
            if second == seconds.saturating_sub(TAIL_SECONDS) {
                tail_start.clone_from(&now);
            }
            last = now;
        }
        anyhow::Ok((tail_start, per_second, odd))
    };
    let url = format!("http://{listener}/");
    let load = wrk::run(&run.args.wrk, script, &url, scenario.connections, seconds);
    let (report, timeline) = tokio::join!(load, timeline);
    let (tail_start, per_second, odd) = timeline?;
    envoy.check_running()?;
    let detail = match &scenario.odd {
        Odd::Refused => Some(refused_detail(&envoy, fulcrum, odd_addr).await?),
        Odd::Joins => Some(format!(
            "{}; {}",
            ramp_detail("after it listens", &per_second, JOINS_AFTER),
            ejections(&envoy, fulcrum, odd_addr).await?
        )),
        Odd::Faulty {
            recovers_after: Some(after),
            ..
        } => Some(format!(
            "{}; {}",
            ramp_detail("after it recovered", &per_second, *after),
            ejections(&envoy, fulcrum, odd_addr).await?
        )),
        _ if scenario.slow_detail => Some(format!(
            "b4 % per second: {}; {}",
            percents(&per_second),
            ejections(&envoy, fulcrum, odd_addr).await?
        )),
        _ => None,
    };
    // Stops the traffic before the backends are counted.
    drop(envoy);
    drop(control_plane);
    let report = report?;
    let field = |name: &str| report.field(name);
    let finished = field("requests");
    let attempted = finished + field("connect") + field("read") + field("write") + field("timeout");
    let (odd_share, odd_tail_share, spread) = shares(&counts(odd.as_ref()), &tail_start);
    Ok(Measured {
        requests_per_second: report.requests_per_second(),
        success: if attempted > 0.0 {
            (finished - field("status")) / attempted
        } else {
            0.0
        },
        p50_ms: field("p50") / 1000.0,
        p99_ms: field("p99") / 1000.0,
        p999_ms: field("p999") / 1000.0,
        odd_share,
        odd_tail_share,
        spread,
        detail,
    })
}

/// fulcrum's policy for `scenario`: with slow start for `warm-up`, as the native side's.
fn policy(scenario: &super::Scenario) -> Value {
    let mut policy = fulcrum_policy(scenario);
    if matches!(scenario.odd, Odd::Joins) {
        policy["default"]["slow_start"] = json!({
            "window": format!("{}s", SLOW_START_WINDOW.as_secs()),
            "aggression": 1,
            "min_weight_percent": 10,
        });
    }
    policy
}

/// Writes the control plane's endpoints file listing `members`, atomically (a rename), so it
/// never reads half a file.
fn write_endpoints(path: &Path, members: &[SocketAddr]) -> Result<()> {
    let endpoints: Vec<Value> = members
        .iter()
        .map(|a| json!({"address": a.to_string()}))
        .collect();
    let text = json!({"services": {SERVICE: {"endpoints": endpoints}}}).to_string();
    let temporary = path.with_extension("json.new");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)?;
    Ok(())
}

/// Waits until a filter applied the control plane's first snapshot, then two more of its
/// polls so every worker's filter has it too.
async fn wait_for_snapshot(envoy: &Envoy) -> Result<()> {
    eventually(SNAPSHOT_READY, "the filter applied a snapshot", || async {
        envoy
            .stat("wasmcustom.fulcrum_snapshot_updates_total")
            .await
            .ok()
            .flatten()
            .filter(|&applied| applied > 0)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// Waits until Envoy's first health check of `odd` failed, so native least request knows b4
/// is down before the load starts, as fulcrum does (its control plane does not list b4 yet).
async fn wait_for_failed_health_check(envoy: &Envoy, odd: SocketAddr) -> Result<()> {
    let flags = format!("{SERVICE}::{odd}::health_flags::");
    eventually(SNAPSHOT_READY, "Envoy's health check failed b4", || async {
        let clusters = envoy.admin_get("/clusters").await.ok()?;
        clusters
            .lines()
            .any(|line| line.starts_with(&flags) && line.contains("failed_active_hc"))
            .then_some(())
    })
    .await?;
    Ok(())
}

/// How often b4 was ejected: by fulcrum's breakers (`fulcrum_endpoint_ejections_total`) or by
/// Envoy's outlier detection (`ejections_enforced_total`, every one b4's).
async fn ejections(envoy: &Envoy, fulcrum: bool, odd: SocketAddr) -> Result<String> {
    let stat = if fulcrum {
        format!("wasmcustom.fulcrum_endpoint_ejections_total.service.{SERVICE}.endpoint.{odd}")
    } else {
        format!("cluster.{SERVICE}.outlier_detection.ejections_enforced_total")
    };
    let ejections = envoy.stat(&stat).await?.unwrap_or(0);
    Ok(format!("b4 ejected {ejections} times"))
}

/// `dead`: Envoy's connect failures to the cluster (every one of them b4's) and, for fulcrum,
/// how often the filter picked b4 (`fulcrum_endpoint_picks_total`).
async fn refused_detail(envoy: &Envoy, fulcrum: bool, odd: SocketAddr) -> Result<String> {
    let connect_failures = envoy
        .stat(&format!("cluster.{SERVICE}.upstream_cx_connect_fail"))
        .await?
        .unwrap_or(0);
    let mut detail = format!("{connect_failures} connect failures");
    if fulcrum {
        tokio::time::sleep(PICKS_FLUSH_WAIT).await;
        let picks = envoy
            .stat(&format!(
                "wasmcustom.fulcrum_endpoint_picks_total.service.{SERVICE}.endpoint.{odd}"
            ))
            .await?
            .unwrap_or(0);
        let _ = write!(detail, "; fulcrum picked b4 {picks} times");
    }
    Ok(detail)
}

/// `warm-up` and `recovery`: b4's share in each second after `since` (when it started
/// listening, when it recovered; a whole second of the run), and the first second it reached
/// [`WARM_SHARE_OF_FAIR`] of a fair share.
fn ramp_detail(what: &str, per_second: &[f64], since: Duration) -> String {
    let fair = 0.25;
    let ramp = per_second
        .get(usize::try_from(since.as_secs()).unwrap_or(usize::MAX)..)
        .unwrap_or_default();
    let warm = ramp
        .iter()
        .position(|&share| share >= WARM_SHARE_OF_FAIR * fair)
        .map_or_else(
            || format!("not within {} s", ramp.len()),
            |second| format!("in second {}", second + 1),
        );
    format!(
        "b4 % per second {what}: {}; ≥ {:.0} % of fair ({:.0} %) {warm}",
        percents(ramp),
        WARM_SHARE_OF_FAIR * 100.0,
        WARM_SHARE_OF_FAIR * fair * 100.0,
    )
}

/// Shares as percentages with one decimal, `/`-separated.
fn percents(shares: &[f64]) -> String {
    shares
        .iter()
        .map(|share| format!("{:.1}", share * 100.0))
        .collect::<Vec<_>>()
        .join(" / ")
}
