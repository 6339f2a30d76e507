//! `fulcrum endpoints SERVICE [--proxy NODE]`: what one proxy's filter believes about each
//! endpoint of a service — health and weight from the snapshot, breaker state and why it
//! opened, time until re-admission, latency estimate, in flight, share of picks — over all
//! its workers, and per worker with `--per-worker` (issue #17).
//!
//! Reads `GET /v1/proxies/{node}/endpoints?service=S&wait=W` of the read-only API: the
//! control plane asks the proxy on its next poll and answers once the proxy's report arrives,
//! so the command takes about one poll interval. A proxy whose filter predates diagnostics
//! never reports: the command says so after `--wait` seconds and exits 2. Ask the replica the
//! proxy polls (`fulcrum proxies` on each replica lists its own).
//!
//! The response is read into the core's own types (`fulcrum_core::diagnostics`), the ones
//! the control plane serializes, so the two cannot disagree on the format.

use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};
use clap::Args;
use fulcrum_core::diagnostics::{EndpointDiagnostics, EndpointsView, WorkerDiagnostics};

use crate::{
    Verdict,
    client::{ControlPlane, Endpoints},
    output::{Format, print_json, table},
    proxies::State,
};

/// `fulcrum endpoints`.
#[derive(Debug, Args)]
pub struct EndpointsCommand {
    /// The service, as the snapshot names it.
    service: String,
    /// The proxy's Envoy node id, as `fulcrum proxies` lists it; may be left out when
    /// exactly one proxy polls the replica.
    #[arg(long, value_name = "NODE")]
    proxy: Option<String>,
    /// Wait up to this many seconds for the proxy's report.
    #[arg(long, value_name = "SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=30))]
    wait: u64,
    /// Also list every worker's view of every endpoint.
    #[arg(long)]
    per_worker: bool,
}

impl EndpointsCommand {
    /// Prints the proxy's view of the service; exit code 0 whatever the endpoints' state (the
    /// table says it).
    pub fn run(self, endpoints: &Endpoints, format: Format) -> Result<Verdict> {
        let control_plane = ControlPlane::new(endpoints)?;
        let node = match self.proxy {
            Some(node) => node,
            None => only_proxy(&control_plane)?,
        };
        let report =
            control_plane.endpoints(&node, &self.service, Duration::from_secs(self.wait))?;
        match format {
            Format::Json => print_json(&report)?,
            Format::Table => print!("{}", render(&report, self.per_worker, SystemTime::now())),
        }
        Ok(Verdict::Yes)
    }
}

/// The one proxy polling the replica, when there is exactly one that is not stale.
fn only_proxy(control_plane: &ControlPlane) -> Result<String> {
    let listed = control_plane.proxies(None)?;
    let mut polling = listed
        .proxies
        .into_iter()
        .filter(|proxy| proxy.state != State::Stale)
        .map(|proxy| proxy.node_id);
    match (polling.next(), polling.next()) {
        (Some(node), None) => Ok(node),
        (None, _) => bail!(
            "no proxy polls replica {}: nothing to ask (see fulcrum proxies)",
            listed.replica
        ),
        (Some(_), Some(_)) => bail!(
            "several proxies poll replica {}: name one with --proxy NODE (see fulcrum proxies)",
            listed.replica
        ),
    }
}

/// Milliseconds as seconds with one decimal, or empty.
fn seconds(ms: Option<u64>) -> String {
    ms.map_or_else(String::new, |ms| format!("{:.1}s", ms as f64 / 1000.0))
}

fn latency(ms: Option<f64>) -> String {
    ms.map_or_else(String::new, |ms| format!("{ms:.1}ms"))
}

/// The tables: one line per endpoint over every worker, then per worker when asked.
fn render(report: &EndpointsView, per_worker: bool, now: SystemTime) -> String {
    let age = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
        .saturating_sub(report.received_unix_ms);
    let mut text = format!(
        "proxy {}, service {}: {} worker(s) reported {:.1}s ago\n",
        report.node_id,
        report.service,
        report.workers.len(),
        age as f64 / 1000.0
    );
    if report.endpoints.is_empty() {
        text.push_str(&format!(
            "the proxy has no endpoints of service {} (not in the snapshot it runs, or no worker has served yet)\n",
            report.service
        ));
        return text;
    }
    let omitted: u64 = report.workers.iter().map(|w| u64::from(w.omitted)).sum();
    if omitted > 0 {
        text.push_str(&format!(
            "{omitted} worker view(s) of closed endpoints were left out to bound the report; ejected endpoints come first\n"
        ));
    }
    let rows: Vec<[String; 9]> = report
        .endpoints
        .iter()
        .map(|endpoint| {
            let ejected = endpoint.open_on + endpoint.half_open_on;
            let state = if ejected > 0 && ejected < endpoint.workers {
                format!("{} ({ejected}/{})", endpoint.state(), endpoint.workers)
            } else {
                endpoint.state().to_owned()
            };
            [
                endpoint.address.to_string(),
                format!("{:?}", endpoint.health).to_lowercase(),
                endpoint.weight.to_string(),
                state,
                endpoint.reasons.join(","),
                seconds(endpoint.readmit_in_ms),
                latency(endpoint.latency_ms),
                endpoint.inflight.to_string(),
                format!("{} ({:.0}%)", endpoint.picks, endpoint.pick_share * 100.0),
            ]
        })
        .collect();
    text.push_str(&table(
        [
            "ENDPOINT",
            "HEALTH",
            "WEIGHT",
            "STATE",
            "REASON",
            "READMIT IN",
            "LATENCY",
            "INFLIGHT",
            "PICKS",
        ],
        &rows,
    ));
    if per_worker {
        text.push('\n');
        let rows: Vec<[String; 8]> = report
            .workers
            .iter()
            .flat_map(|worker| worker.endpoints.iter().map(move |e| worker_row(worker, e)))
            .collect();
        text.push_str(&table(
            [
                "WORKER",
                "ENDPOINT",
                "STATE",
                "REASON",
                "READMIT IN",
                "LATENCY",
                "INFLIGHT",
                "PICKS",
            ],
            &rows,
        ));
    }
    text
}

fn worker_row(worker: &WorkerDiagnostics, endpoint: &EndpointDiagnostics) -> [String; 8] {
    [
        worker.worker.to_string(),
        endpoint.address.to_string(),
        endpoint.breaker.name().to_owned(),
        endpoint.reason.clone().unwrap_or_default(),
        seconds(endpoint.readmit_in_ms),
        latency(endpoint.latency_ms),
        endpoint.inflight.to_string(),
        endpoint.picks.to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use fulcrum_core::{Health, diagnostics::BreakerKind};

    use super::*;

    fn endpoint(address: &str, breaker: BreakerKind, reason: Option<&str>) -> EndpointDiagnostics {
        EndpointDiagnostics {
            address: address.parse().expect("an address"),
            health: Health::Healthy,
            weight: 1,
            breaker,
            reason: reason.map(str::to_owned),
            ejections: u32::from(reason.is_some()),
            readmit_in_ms: reason.map(|_| 8_400),
            latency_ms: Some(2.25),
            inflight: 1,
            picks: if reason.is_some() { 0 } else { 3 },
            consecutive_failures: 0,
            window_requests: 3,
            window_failures: 0,
        }
    }

    #[test]
    fn the_table_shows_an_ejected_endpoint_with_its_reason_and_readmission_and_workers_on_request()
    {
        let workers = vec![
            WorkerDiagnostics {
                worker: 0,
                version: Some("v1".to_owned()),
                endpoints: vec![
                    endpoint(
                        "10.0.0.2:80",
                        BreakerKind::Open,
                        Some("consecutive_gateway_errors"),
                    ),
                    endpoint("10.0.0.1:80", BreakerKind::Closed, None),
                ],
                omitted: 0,
            },
            WorkerDiagnostics {
                worker: 1,
                version: Some("v1".to_owned()),
                endpoints: vec![
                    endpoint("10.0.0.2:80", BreakerKind::Open, Some("shared")),
                    endpoint("10.0.0.1:80", BreakerKind::Closed, None),
                ],
                omitted: 0,
            },
        ];
        let report = EndpointsView {
            node_id: "web-1".to_owned(),
            service: "checkout".to_owned(),
            request: 1,
            received_unix_ms: 1_000,
            endpoints: fulcrum_core::diagnostics::aggregate(&workers),
            workers,
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(3_500);
        let text = render(&report, true, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "proxy web-1, service checkout: 2 worker(s) reported 2.5s ago"
        );
        assert!(lines[1].starts_with("ENDPOINT"), "{text}");
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            [
                "10.0.0.1:80",
                "healthy",
                "1",
                "closed",
                "2.2ms",
                "2",
                "6",
                "(100%)"
            ],
            "{text}"
        );
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            [
                "10.0.0.2:80",
                "healthy",
                "1",
                "open",
                "consecutive_gateway_errors,shared",
                "8.4s",
                "2.2ms",
                "2",
                "0",
                "(0%)"
            ],
            "{text}"
        );
        assert!(lines[5].starts_with("WORKER"), "{text}");
        assert_eq!(lines.len(), 10, "{text}");
    }
}
