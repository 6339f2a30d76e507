//! `fulcrum proxies`: which proxies' filters poll the control plane, the snapshot version
//! each runs, and whether it is current — `istioctl proxy-status` for fulcrum's filters.
//!
//! Reads `GET /v1/proxies` of the read-only API. The control plane keeps that table from the
//! filters' own polls (each names its Envoy node and the version it is at, see the server's
//! `proxies` module), so a proxy shows up within one poll interval of starting, turns `stale`
//! when it stops polling and is forgotten later. Each replica lists only the proxies that
//! polled it: ask each replica (`--server`), as `istioctl` asks each istiod.
//!
//! The response is read leniently (fields added by a newer control plane are ignored); the
//! tests run this command against the real control plane, so the two agree on the format.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::{
    Verdict,
    client::{ControlPlane, Endpoints},
    output::{Format, print_json, table},
};

/// `fulcrum proxies`.
#[derive(Debug, Args)]
pub struct ProxiesCommand {
    /// Only the proxies in this state.
    #[arg(long, value_enum, conflicts_with = "wait")]
    state: Option<State>,
    /// Wait up to this many seconds until no polling proxy is behind, to confirm that a
    /// policy or endpoint change reached every proxy of this replica; exit code 1 if some
    /// still are then. Stale proxies do not poll, so they neither hold it up nor count.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    wait: Option<u64>,
}

/// How often `--wait` asks again: the filters' default poll interval.
const WAIT_POLL: Duration = Duration::from_millis(500);

/// Where a proxy stands against the snapshot the replica serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Polling, at the version served.
    Current,
    /// Polling, at another version (or none yet): a change is on its way, or was refused.
    Behind,
    /// Not heard from for the replica's stale time: stopped, or polling another replica.
    Stale,
}

impl State {
    fn label(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Behind => "behind",
            Self::Stale => "stale",
        }
    }
}

/// The body of `GET /v1/proxies`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Proxies {
    /// The version the replica serves, which `current` is judged against.
    pub snapshot_version: Option<String>,
    /// The replica answering.
    pub replica: String,
    /// A proxy unheard for this long is `stale`.
    pub stale_after_seconds: f64,
    /// A proxy unheard for this long is no longer listed.
    pub expire_after_seconds: f64,
    /// Every proxy, sorted by node id.
    pub proxies: Vec<Proxy>,
}

/// One proxy.
#[derive(Debug, Serialize, Deserialize)]
pub struct Proxy {
    pub node_id: String,
    pub node_cluster: Option<String>,
    pub version: Option<String>,
    pub state: State,
    pub last_poll_unix_ms: u64,
    pub age_seconds: f64,
    pub last_rejection: Option<Rejection>,
}

/// The last snapshot a proxy refused.
#[derive(Debug, Serialize, Deserialize)]
pub struct Rejection {
    pub reason: String,
    pub version: Option<String>,
}

impl ProxiesCommand {
    /// Lists the proxies; exit code 0 whatever their state (the table says it), unless
    /// `--wait` gave up on proxies behind.
    pub fn run(self, endpoints: &Endpoints, format: Format) -> Result<Verdict> {
        let control_plane = ControlPlane::new(endpoints)?;
        let deadline = self
            .wait
            .map(|seconds| Instant::now() + Duration::from_secs(seconds));
        let (listed, verdict) = loop {
            let listed = control_plane.proxies(self.state.map(State::label))?;
            let behind = listed
                .proxies
                .iter()
                .filter(|proxy| proxy.state == State::Behind)
                .count();
            match deadline {
                None => break (listed, Verdict::Yes),
                Some(_) if behind == 0 => break (listed, Verdict::Yes),
                Some(deadline) if Instant::now() >= deadline => {
                    eprintln!(
                        "{behind} proxies still behind snapshot {} after {} s",
                        short(listed.snapshot_version.as_deref().unwrap_or("none")),
                        self.wait.unwrap_or_default()
                    );
                    break (listed, Verdict::No);
                }
                Some(_) => std::thread::sleep(WAIT_POLL),
            }
        };
        match format {
            Format::Json => print_json(&listed)?,
            Format::Table => print!("{}", render(&listed)),
        }
        Ok(verdict)
    }
}

/// The table: one line per proxy under a line naming the replica and what it serves.
fn render(listed: &Proxies) -> String {
    let served = listed.snapshot_version.as_deref().unwrap_or("none yet");
    let mut text = format!(
        "replica {} serves snapshot {}; stale after {} s without a poll\n",
        listed.replica,
        short(served),
        listed.stale_after_seconds
    );
    if listed.proxies.is_empty() {
        text.push_str("no proxy has polled this replica\n");
        return text;
    }
    let rows: Vec<[String; 6]> = listed
        .proxies
        .iter()
        .map(|proxy| {
            [
                proxy.node_id.clone(),
                proxy.node_cluster.clone().unwrap_or_default(),
                proxy.state.label().to_owned(),
                proxy.version.as_deref().map_or_else(String::new, short),
                format!("{:.1}s ago", proxy.age_seconds),
                proxy.last_rejection.as_ref().map_or_else(
                    String::new,
                    |rejection| match &rejection.version {
                        Some(version) => format!("{} ({})", rejection.reason, short(version)),
                        None => rejection.reason.clone(),
                    },
                ),
            ]
        })
        .collect();
    text.push_str(&table(
        [
            "NODE",
            "CLUSTER",
            "STATE",
            "VERSION",
            "LAST POLL",
            "LAST REJECTED",
        ],
        &rows,
    ));
    text
}

/// A version cut to 12 characters, as `git log --oneline` shortens hashes; `-o json` has it
/// whole.
fn short(version: &str) -> String {
    version.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_replica_and_shortens_versions() {
        let listed = Proxies {
            snapshot_version: Some("0123456789abcdef".to_owned()),
            replica: "cp-0".to_owned(),
            stale_after_seconds: 1.5,
            expire_after_seconds: 600.0,
            proxies: vec![Proxy {
                node_id: "sidecar~10.0.0.7~cart-1.shop".to_owned(),
                node_cluster: Some("cart.shop".to_owned()),
                version: Some("fedcba9876543210".to_owned()),
                state: State::Behind,
                last_poll_unix_ms: 0,
                age_seconds: 0.31,
                last_rejection: Some(Rejection {
                    reason: "over_table_budget".to_owned(),
                    version: Some("0123456789abcdef".to_owned()),
                }),
            }],
        };
        assert_eq!(
            render(&listed),
            "replica cp-0 serves snapshot 0123456789ab; stale after 1.5 s without a poll\n\
             NODE                           CLUSTER     STATE    VERSION        LAST POLL   LAST REJECTED\n\
             sidecar~10.0.0.7~cart-1.shop   cart.shop   behind   fedcba987654   0.3s ago    over_table_budget (0123456789ab)\n"
        );
    }
}
