//! The proxies whose filters poll this replica, and which snapshot version each runs: the
//! table behind `GET /v1/proxies` and the `fulcrum_proxies{state}` gauge (issue #17: see what
//! every proxy runs).
//!
//! Each `GET /v1/snapshot` from a filter names its Envoy node (`x-fulcrum-node-id`,
//! `x-fulcrum-node-cluster`), the version its proxy is at (`If-None-Match`) and the last
//! snapshot it refused (`x-fulcrum-rejected`); see the filter's `report` module. Every byte
//! comes from the network, so [`Report::parse`] takes each header as untrusted: a value out of
//! bounds or not printable ASCII is ignored and named ([`InvalidField`]); a poll without a
//! usable node id (a filter older than these headers, or a hostile one) is not recorded.
//!
//! The table is bounded and forgets: at most [`ProxyTableLimits::max_proxies`] entries keyed
//! by node id, the least recently seen evicted to admit a new one; an entry unheard for
//! `stale_after` reads [`ProxyState::Stale`], and one unheard for `expire_after` goes. Nothing
//! here reads a clock: every call takes `now`, so tests drive time exactly (as tower's
//! `peak_ewma` does) and the server passes the wall clock, which also dates each poll for the
//! API. A wall clock stepping backwards makes ages read 0, never negative.
//!
//! Each replica sees only the polls it answers: with several replicas, each lists the proxies
//! that polled it (a proxy's polls may spread over replicas), so a proxy can read `stale` on
//! one replica while it polls another. See the server README.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use serde::Serialize;

/// Default of [`ProxyTableLimits::max_proxies`].
pub const DEFAULT_MAX_PROXIES: usize = 10_000;

/// Default of [`ProxyTableLimits::stale_after`]: three times the filter's default
/// `control_plane.poll_interval` (500 ms), so a proxy is stale after three missed polls.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_millis(1_500);

/// Default of [`ProxyTableLimits::expire_after`].
pub const DEFAULT_EXPIRE_AFTER: Duration = Duration::from_secs(600);

/// Longest node id or node cluster recorded; the filter cuts its own to this length.
pub const MAX_NODE_NAME_BYTES: usize = 256;

/// Longest snapshot version recorded: the control plane's own are far shorter, so a longer
/// one is not a version this control plane served.
pub const MAX_VERSION_BYTES: usize = 256;

/// Longest reason code in `x-fulcrum-rejected`.
pub const MAX_REJECTION_REASON_BYTES: usize = 32;

/// Longest version named in `x-fulcrum-rejected` (the filter cuts longer ones).
pub const MAX_REJECTION_VERSION_BYTES: usize = 128;

/// How many proxies the table holds and when it forgets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyTableLimits {
    /// Most proxies held; a new one beyond evicts the least recently seen
    /// (`fulcrum_proxies_evicted_total`). Default: [`DEFAULT_MAX_PROXIES`].
    pub max_proxies: usize,
    /// A proxy unheard for this long reads `stale`. Default: [`DEFAULT_STALE_AFTER`].
    pub stale_after: Duration,
    /// A proxy unheard for this long is forgotten; longer than `stale_after`. Default:
    /// [`DEFAULT_EXPIRE_AFTER`].
    pub expire_after: Duration,
}

impl Default for ProxyTableLimits {
    fn default() -> Self {
        Self {
            max_proxies: DEFAULT_MAX_PROXIES,
            stale_after: DEFAULT_STALE_AFTER,
            expire_after: DEFAULT_EXPIRE_AFTER,
        }
    }
}

/// Why [`ProxyTableLimits`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// No proxy could be held.
    #[error("the proxy table must hold at least one proxy (--max-proxies)")]
    NoCapacity,
    /// A proxy would go before it could read stale.
    #[error(
        "proxies must expire after they turn stale: expire after {expire_after:?} is not longer than stale after {stale_after:?} (--proxy-expire-after-ms, --proxy-stale-after-ms)"
    )]
    ExpiresBeforeStale {
        stale_after: Duration,
        expire_after: Duration,
    },
}

impl ProxyTableLimits {
    /// Checks the limits fit together.
    pub fn check(&self) -> Result<(), LimitsError> {
        if self.max_proxies == 0 {
            return Err(LimitsError::NoCapacity);
        }
        if self.expire_after <= self.stale_after {
            return Err(LimitsError::ExpiresBeforeStale {
                stale_after: self.stale_after,
                expire_after: self.expire_after,
            });
        }
        Ok(())
    }
}

/// The last snapshot a proxy refused, as it reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// Why: `too_large`, `malformed`, `service_invalid`, `policy_invalid`,
    /// `over_table_budget`, or a code a newer filter knows (lowercase letters, digits, `_`).
    pub reason: String,
    /// The version refused, when the proxy knew it.
    pub version: Option<String>,
}

/// What one poll says about its proxy, every field validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The Envoy node id: the table's key.
    pub node_id: String,
    /// The Envoy node cluster, when sent and valid.
    pub node_cluster: Option<String>,
    /// The snapshot version the proxy is at, when it named one.
    pub version: Option<String>,
    /// The last snapshot the proxy refused, when it reported one.
    pub rejection: Option<Rejection>,
}

/// The raw values of one poll, as they came off the wire.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawReport<'a> {
    /// `x-fulcrum-node-id`.
    pub node_id: Option<&'a [u8]>,
    /// `x-fulcrum-node-cluster`.
    pub node_cluster: Option<&'a [u8]>,
    /// The first version named in `If-None-Match`, quotes stripped.
    pub version: Option<&'a [u8]>,
    /// `x-fulcrum-rejected`.
    pub rejected: Option<&'a [u8]>,
}

/// A header of a poll that was present but unusable, and so ignored: the `reason` label of
/// `fulcrum_proxy_reports_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidField {
    /// `x-fulcrum-node-id` empty, too long or not printable ASCII: the poll is not recorded.
    NodeId,
    /// `x-fulcrum-node-cluster` empty, too long or not printable ASCII: recorded without it.
    NodeCluster,
    /// The `If-None-Match` version too long: recorded without a version.
    Version,
    /// `x-fulcrum-rejected` not `<reason> [<version>]` within bounds: recorded without it.
    Rejected,
}

impl InvalidField {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NodeId => "node_id",
            Self::NodeCluster => "node_cluster",
            Self::Version => "version",
            Self::Rejected => "rejected",
        }
    }
}

/// What [`Report::parse`] made of a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The report, when the poll named a usable node id.
    pub report: Option<Report>,
    /// The headers present but ignored.
    pub invalid: Vec<InvalidField>,
}

impl Report {
    /// Validates a poll's headers. A poll with no node id at all (a filter older than these
    /// headers) gives no report and no invalid field.
    pub fn parse(raw: RawReport<'_>) -> Parsed {
        let mut invalid = Vec::new();
        let mut field = |bytes: Option<&[u8]>, max: usize, which: InvalidField| {
            let bytes = bytes?;
            let text = printable(bytes, max);
            if text.is_none() {
                invalid.push(which);
            }
            text
        };
        let node_id = field(raw.node_id, MAX_NODE_NAME_BYTES, InvalidField::NodeId);
        let node_cluster = field(
            raw.node_cluster,
            MAX_NODE_NAME_BYTES,
            InvalidField::NodeCluster,
        );
        let version = field(raw.version, MAX_VERSION_BYTES, InvalidField::Version);
        let rejection = raw.rejected.and_then(|bytes| {
            let rejection = parse_rejection(bytes);
            if rejection.is_none() {
                invalid.push(InvalidField::Rejected);
            }
            rejection
        });
        Parsed {
            report: node_id.map(|node_id| Report {
                node_id,
                node_cluster,
                version,
                rejection,
            }),
            invalid,
        }
    }
}

/// `bytes` as text when 1 to `max` bytes of printable ASCII (space to `~`), else `None`.
fn printable(bytes: &[u8], max: usize) -> Option<String> {
    if bytes.is_empty() || bytes.len() > max || !bytes.iter().all(|b| matches!(b, b' '..=b'~')) {
        return None;
    }
    String::from_utf8(bytes.to_vec()).ok()
}

/// `<reason>` or `<reason> <version>`: a reason of lowercase letters, digits and `_`, and a
/// printable version, each within its bound.
fn parse_rejection(bytes: &[u8]) -> Option<Rejection> {
    let (reason, version) = match bytes.iter().position(|b| *b == b' ') {
        Some(space) => (&bytes[..space], Some(&bytes[space + 1..])),
        None => (bytes, None),
    };
    let reason_ok = !reason.is_empty()
        && reason.len() <= MAX_REJECTION_REASON_BYTES
        && reason
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_');
    if !reason_ok {
        return None;
    }
    let version = match version {
        None => None,
        Some(version) => Some(printable(version, MAX_REJECTION_VERSION_BYTES)?),
    };
    Some(Rejection {
        reason: String::from_utf8(reason.to_vec()).ok()?,
        version,
    })
}

/// Where a proxy stands against the snapshot this replica serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyState {
    /// Heard within `stale_after`, at the served version.
    Current,
    /// Heard within `stale_after`, at another version (or none yet).
    Behind,
    /// Not heard for `stale_after` or longer, whatever version it was at.
    Stale,
}

impl ProxyState {
    /// Every state, in the order of the gauge's series.
    pub const ALL: [Self; 3] = [Self::Current, Self::Behind, Self::Stale];

    /// The state of a proxy at `version`, last heard `age` ago, against the `served`
    /// version: the one judgement every view and gauge uses.
    pub fn judge(
        version: Option<&str>,
        served: Option<&str>,
        age: Duration,
        stale_after: Duration,
    ) -> Self {
        if age >= stale_after {
            Self::Stale
        } else if version.is_some() && version == served {
            Self::Current
        } else {
            Self::Behind
        }
    }

    /// The `state` label and JSON value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Behind => "behind",
            Self::Stale => "stale",
        }
    }

    /// Parses a label, as `?state=` gives it.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.label() == label)
    }
}

/// One proxy as `GET /v1/proxies` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyView {
    /// The Envoy node id.
    pub node_id: String,
    /// The Envoy node cluster, when the proxy sent one.
    pub node_cluster: Option<String>,
    /// The snapshot version the proxy is at, when its last poll named one.
    pub version: Option<String>,
    /// Against the version this replica serves.
    pub state: ProxyState,
    /// When its last poll arrived, in ms since the Unix epoch.
    pub last_poll_unix_ms: u64,
    /// How long ago, in seconds.
    pub age_seconds: f64,
    /// The last snapshot it refused, as its last poll reported.
    pub last_rejection: Option<Rejection>,
}

/// How many proxies are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub current: usize,
    pub behind: usize,
    pub stale: usize,
}

impl StateCounts {
    /// The count of `state`.
    pub fn get(&self, state: ProxyState) -> usize {
        match state {
            ProxyState::Current => self.current,
            ProxyState::Behind => self.behind,
            ProxyState::Stale => self.stale,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    node_cluster: Option<String>,
    version: Option<String>,
    rejection: Option<Rejection>,
    last_seen: SystemTime,
    /// The entry's key in `by_recency`.
    touch: u64,
}

/// The proxies that polled, keyed by node id. See the module docs.
#[derive(Debug, Clone)]
pub struct ProxyTable {
    limits: ProxyTableLimits,
    entries: BTreeMap<String, Entry>,
    /// Node ids by the order of their last poll, least recent first: whom to evict and to
    /// expire. Invariant: one entry per proxy, under the proxy's `touch`.
    by_recency: BTreeMap<u64, String>,
    next_touch: u64,
}

impl ProxyTable {
    /// An empty table with `limits` (see [`ProxyTableLimits::check`]).
    pub fn new(limits: ProxyTableLimits) -> Self {
        Self {
            limits,
            entries: BTreeMap::new(),
            by_recency: BTreeMap::new(),
            next_touch: 0,
        }
    }

    /// The table's limits.
    pub fn limits(&self) -> ProxyTableLimits {
        self.limits
    }

    /// Proxies held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no proxy is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records a poll at `now`: the proxy's entry takes the report's fields whole (what it no
    /// longer sends, it no longer has). Returns how many proxies were evicted to make room
    /// (0 or 1); expired entries go first and are not counted as evicted.
    pub fn record(&mut self, report: Report, now: SystemTime) -> usize {
        self.expire(now);
        let touch = self.next_touch;
        self.next_touch += 1;
        let entry = Entry {
            node_cluster: report.node_cluster,
            version: report.version,
            rejection: report.rejection,
            last_seen: now,
            touch,
        };
        let mut evicted = 0;
        if let Some(previous) = self.entries.get(&report.node_id) {
            self.by_recency.remove(&previous.touch);
        } else if self.entries.len() >= self.limits.max_proxies
            && let Some((_, least_recent)) = self.by_recency.pop_first()
        {
            self.entries.remove(&least_recent);
            evicted = 1;
        }
        self.by_recency.insert(touch, report.node_id.clone());
        self.entries.insert(report.node_id, entry);
        debug_assert_eq!(
            self.entries.len(),
            self.by_recency.len(),
            "one recency entry per proxy"
        );
        evicted
    }

    /// Whether the table holds `node_id`.
    pub fn knows(&self, node_id: &str) -> bool {
        self.entries.contains_key(node_id)
    }

    /// Forgets the proxies unheard for `expire_after` at `now`; returns how many.
    pub fn expire(&mut self, now: SystemTime) -> usize {
        let mut expired = 0;
        while let Some((_, least_recent)) = self.by_recency.first_key_value() {
            let unheard = self
                .entries
                .get(least_recent)
                .is_none_or(|entry| age(entry.last_seen, now) >= self.limits.expire_after);
            if !unheard {
                break;
            }
            if let Some((_, node_id)) = self.by_recency.pop_first() {
                self.entries.remove(&node_id);
            }
            expired += 1;
        }
        expired
    }

    /// Every proxy at `now` against the `served` version, sorted by node id, keeping those
    /// in `only` when given.
    pub fn view(
        &self,
        now: SystemTime,
        served: Option<&str>,
        only: Option<ProxyState>,
    ) -> Vec<ProxyView> {
        self.entries
            .iter()
            .map(|(node_id, entry)| {
                let age = age(entry.last_seen, now);
                ProxyView {
                    node_id: node_id.clone(),
                    node_cluster: entry.node_cluster.clone(),
                    version: entry.version.clone(),
                    state: self.state(entry, now, served),
                    last_poll_unix_ms: entry
                        .last_seen
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |since| {
                            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
                        }),
                    age_seconds: age.as_secs_f64(),
                    last_rejection: entry.rejection.clone(),
                }
            })
            .filter(|view| only.is_none_or(|state| view.state == state))
            .collect()
    }

    /// How many proxies are in each state at `now` against the `served` version.
    pub fn counts(&self, now: SystemTime, served: Option<&str>) -> StateCounts {
        let mut counts = StateCounts::default();
        for entry in self.entries.values() {
            match self.state(entry, now, served) {
                ProxyState::Current => counts.current += 1,
                ProxyState::Behind => counts.behind += 1,
                ProxyState::Stale => counts.stale += 1,
            }
        }
        counts
    }

    fn state(&self, entry: &Entry, now: SystemTime, served: Option<&str>) -> ProxyState {
        ProxyState::judge(
            entry.version.as_deref(),
            served,
            age(entry.last_seen, now),
            self.limits.stale_after,
        )
    }
}

/// How long before `now` a poll at `seen` came; 0 when the clock stepped back past it.
fn age(seen: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(seen).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ProxyTableLimits = ProxyTableLimits {
        max_proxies: 3,
        stale_after: Duration::from_millis(1_500),
        expire_after: Duration::from_secs(600),
    };

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(ms)
    }

    fn report(node_id: &str, version: &str) -> Report {
        Report {
            node_id: node_id.to_owned(),
            node_cluster: Some("shop".to_owned()),
            version: Some(version.to_owned()),
            rejection: None,
        }
    }

    fn states(table: &ProxyTable, now: SystemTime, served: &str) -> Vec<(String, ProxyState)> {
        table
            .view(now, Some(served), None)
            .into_iter()
            .map(|view| (view.node_id, view.state))
            .collect()
    }

    #[test]
    fn a_proxy_goes_current_then_behind_on_a_new_version_then_stale_then_expires() {
        let mut table = ProxyTable::new(LIMITS);
        assert_eq!(table.record(report("web-1", "v1"), at(0)), 0);
        assert_eq!(
            states(&table, at(1_000), "v1"),
            [("web-1".to_owned(), ProxyState::Current)]
        );
        // The control plane publishes v2 (a policy change); the proxy still polls at v1.
        table.record(report("web-1", "v1"), at(1_200));
        assert_eq!(
            states(&table, at(1_300), "v2"),
            [("web-1".to_owned(), ProxyState::Behind)]
        );
        table.record(report("web-1", "v2"), at(1_500));
        assert_eq!(
            states(&table, at(1_600), "v2"),
            [("web-1".to_owned(), ProxyState::Current)]
        );
        // Silent from 1.5 s on: stale exactly at 1.5 s of silence, gone at 600 s.
        assert_eq!(
            states(&table, at(2_999), "v2"),
            [("web-1".to_owned(), ProxyState::Current)]
        );
        assert_eq!(
            states(&table, at(3_000), "v2"),
            [("web-1".to_owned(), ProxyState::Stale)]
        );
        assert_eq!(table.expire(at(601_499)), 0);
        assert_eq!(table.len(), 1);
        assert_eq!(table.expire(at(601_500)), 1);
        assert!(table.is_empty());
    }

    #[test]
    fn a_view_dates_the_last_poll_and_gives_its_age_in_seconds() {
        let mut table = ProxyTable::new(LIMITS);
        table.record(report("web-1", "v1"), at(0));
        let view = &table.view(at(1_250), Some("v1"), None)[0];
        assert_eq!(view.last_poll_unix_ms, 1_800_000_000_000);
        assert_eq!(view.age_seconds, 1.25);
        assert_eq!(view.node_cluster.as_deref(), Some("shop"));
        assert_eq!(view.version.as_deref(), Some("v1"));
    }

    #[test]
    fn a_proxy_that_named_no_version_is_behind_and_nothing_is_current_without_a_snapshot() {
        let mut table = ProxyTable::new(LIMITS);
        table.record(
            Report {
                version: None,
                ..report("web-1", "")
            },
            at(0),
        );
        table.record(report("web-2", "v1"), at(0));
        assert_eq!(
            table.counts(at(100), Some("v1")),
            StateCounts {
                current: 1,
                behind: 1,
                stale: 0
            }
        );
        assert_eq!(
            table.counts(at(100), None),
            StateCounts {
                current: 0,
                behind: 2,
                stale: 0
            }
        );
    }

    #[test]
    fn at_the_cap_a_new_proxy_evicts_the_least_recently_seen() {
        let mut table = ProxyTable::new(LIMITS);
        table.record(report("a", "v1"), at(0));
        table.record(report("b", "v1"), at(10));
        table.record(report("c", "v1"), at(20));
        // `a` polls again: `b` is now the least recently seen.
        assert_eq!(table.record(report("a", "v1"), at(30)), 0);
        assert_eq!(table.record(report("d", "v1"), at(40)), 1);
        let ids: Vec<String> = table
            .view(at(50), Some("v1"), None)
            .into_iter()
            .map(|view| view.node_id)
            .collect();
        assert_eq!(ids, ["a", "c", "d"]);
        // A known proxy polling again evicts nobody.
        assert_eq!(table.record(report("c", "v1"), at(60)), 0);
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn expired_proxies_make_room_without_counting_as_evicted() {
        let mut table = ProxyTable::new(LIMITS);
        table.record(report("a", "v1"), at(0));
        table.record(report("b", "v1"), at(0));
        table.record(report("c", "v1"), at(300_000));
        assert_eq!(table.record(report("d", "v1"), at(600_000)), 0);
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn the_view_is_sorted_by_node_id_and_filters_by_state() {
        let mut table = ProxyTable::new(LIMITS);
        table.record(report("web-2", "v1"), at(0));
        table.record(report("web-1", "v0"), at(2_000));
        table.record(report("api-1", "v1"), at(2_000));
        let all = states(&table, at(2_100), "v1");
        assert_eq!(
            all,
            [
                ("api-1".to_owned(), ProxyState::Current),
                ("web-1".to_owned(), ProxyState::Behind),
                ("web-2".to_owned(), ProxyState::Stale),
            ]
        );
        let behind = table.view(at(2_100), Some("v1"), Some(ProxyState::Behind));
        assert_eq!(behind.len(), 1);
        assert_eq!(behind[0].node_id, "web-1");
    }

    #[test]
    fn a_poll_replaces_what_the_proxy_reported_before() {
        let mut table = ProxyTable::new(LIMITS);
        table.record(
            Report {
                rejection: Some(Rejection {
                    reason: "over_table_budget".to_owned(),
                    version: Some("v2".to_owned()),
                }),
                ..report("web-1", "v1")
            },
            at(0),
        );
        let view = &table.view(at(0), Some("v1"), None)[0];
        assert_eq!(
            view.last_rejection.as_ref().map(|r| r.reason.as_str()),
            Some("over_table_budget")
        );
        table.record(
            Report {
                node_cluster: None,
                ..report("web-1", "v1")
            },
            at(100),
        );
        let view = &table.view(at(100), Some("v1"), None)[0];
        assert_eq!(view.last_rejection, None);
        assert_eq!(view.node_cluster, None);
    }

    #[test]
    fn a_clock_stepping_back_reads_as_no_time_passed() {
        let mut table = ProxyTable::new(LIMITS);
        table.record(report("web-1", "v1"), at(10_000));
        let view = &table.view(at(0), Some("v1"), None)[0];
        assert_eq!(view.age_seconds, 0.0);
        assert_eq!(view.state, ProxyState::Current);
        assert_eq!(table.expire(at(0)), 0);
    }

    fn parse(raw: RawReport<'_>) -> Parsed {
        Report::parse(raw)
    }

    #[test]
    fn a_poll_with_every_header_gives_a_full_report() {
        let parsed = parse(RawReport {
            node_id: Some(b"sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local"),
            node_cluster: Some(b"web.shop"),
            version: Some(b"7f3a"),
            rejected: Some(b"over_table_budget 8b2c"),
        });
        assert_eq!(parsed.invalid, []);
        assert_eq!(
            parsed.report,
            Some(Report {
                node_id: "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local".to_owned(),
                node_cluster: Some("web.shop".to_owned()),
                version: Some("7f3a".to_owned()),
                rejection: Some(Rejection {
                    reason: "over_table_budget".to_owned(),
                    version: Some("8b2c".to_owned()),
                }),
            })
        );
        let reason_only = parse(RawReport {
            node_id: Some(b"n"),
            rejected: Some(b"malformed"),
            ..RawReport::default()
        });
        assert_eq!(
            reason_only.report.and_then(|r| r.rejection),
            Some(Rejection {
                reason: "malformed".to_owned(),
                version: None
            })
        );
    }

    #[test]
    fn an_old_filter_sending_no_node_id_is_neither_recorded_nor_counted() {
        let parsed = parse(RawReport {
            version: Some(b"v1"),
            ..RawReport::default()
        });
        assert_eq!(
            parsed,
            Parsed {
                report: None,
                invalid: vec![]
            }
        );
    }

    #[test]
    fn a_hostile_node_id_drops_the_poll_and_is_counted() {
        let long = vec![b'a'; MAX_NODE_NAME_BYTES + 1];
        let at_bound = vec![b'a'; MAX_NODE_NAME_BYTES];
        for hostile in [
            &b""[..],
            &long,
            b"web\r\nx-injected: 1",
            b"web\x00",
            b"web\t1",
            "wéb".as_bytes(),
            &[0xff, 0xfe],
        ] {
            let parsed = parse(RawReport {
                node_id: Some(hostile),
                node_cluster: Some(b"shop"),
                ..RawReport::default()
            });
            assert_eq!(parsed.report, None, "{hostile:?}");
            assert_eq!(parsed.invalid, [InvalidField::NodeId], "{hostile:?}");
        }
        let parsed = parse(RawReport {
            node_id: Some(&at_bound),
            ..RawReport::default()
        });
        assert!(parsed.report.is_some(), "256 bytes is within the bound");
    }

    #[test]
    fn hostile_optional_fields_are_dropped_and_counted_while_the_poll_is_recorded() {
        let long_version = vec![b'v'; MAX_VERSION_BYTES + 1];
        let parsed = parse(RawReport {
            node_id: Some(b"web-1"),
            node_cluster: Some(b"shop\x1b[31m"),
            version: Some(&long_version),
            rejected: Some(b"Over-Budget v2"),
        });
        assert_eq!(
            parsed.invalid,
            [
                InvalidField::NodeCluster,
                InvalidField::Version,
                InvalidField::Rejected
            ]
        );
        assert_eq!(
            parsed.report,
            Some(Report {
                node_id: "web-1".to_owned(),
                node_cluster: None,
                version: None,
                rejection: None,
            })
        );
    }

    #[test]
    fn a_rejection_needs_a_bounded_code_and_a_printable_bounded_version() {
        let long_reason = vec![b'a'; MAX_REJECTION_REASON_BYTES + 1];
        let long_version = [b"malformed ".as_slice(), &[b'v'; 129]].concat();
        for bad in [
            &b""[..],
            b" v1",
            &long_reason,
            &long_version,
            b"malformed v\x001",
            b"malformed ",
            b"mal-formed",
        ] {
            assert_eq!(parse_rejection(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_rejection(b"too_large v 2"),
            Some(Rejection {
                reason: "too_large".to_owned(),
                version: Some("v 2".to_owned())
            }),
            "the version is everything after the first space"
        );
    }

    #[test]
    fn limits_must_hold_a_proxy_and_expire_after_stale() {
        assert_eq!(ProxyTableLimits::default().check(), Ok(()));
        assert_eq!(
            ProxyTableLimits {
                max_proxies: 0,
                ..LIMITS
            }
            .check(),
            Err(LimitsError::NoCapacity)
        );
        let inverted = ProxyTableLimits {
            expire_after: Duration::from_secs(1),
            ..LIMITS
        };
        assert!(matches!(
            inverted.check(),
            Err(LimitsError::ExpiresBeforeStale { .. })
        ));
    }

    /// Every field a report keeps is 1 to its bound of printable ASCII.
    fn within_bounds(text: &str, max: usize) -> bool {
        !text.is_empty() && text.len() <= max && text.bytes().all(|b| (b' '..=b'~').contains(&b))
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_give_a_bounded_printable_report_or_none_and_never_panic(
            node_id in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..300)),
            node_cluster in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..300)),
            version in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..300)),
            rejected in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..200)),
        ) {
            let parsed = Report::parse(RawReport {
                node_id: node_id.as_deref(),
                node_cluster: node_cluster.as_deref(),
                version: version.as_deref(),
                rejected: rejected.as_deref(),
            });
            proptest::prop_assert_eq!(parsed.report.is_some(), node_id.is_some() && !parsed.invalid.contains(&InvalidField::NodeId));
            if let Some(report) = parsed.report {
                proptest::prop_assert!(within_bounds(&report.node_id, MAX_NODE_NAME_BYTES));
                if let Some(cluster) = &report.node_cluster {
                    proptest::prop_assert!(within_bounds(cluster, MAX_NODE_NAME_BYTES));
                }
                if let Some(version) = &report.version {
                    proptest::prop_assert!(within_bounds(version, MAX_VERSION_BYTES));
                }
                if let Some(rejection) = &report.rejection {
                    proptest::prop_assert!(within_bounds(&rejection.reason, MAX_REJECTION_REASON_BYTES));
                    if let Some(version) = &rejection.version {
                        proptest::prop_assert!(within_bounds(version, MAX_REJECTION_VERSION_BYTES));
                    }
                }
            }
        }
    }

    #[test]
    fn states_parse_from_their_labels() {
        for state in ProxyState::ALL {
            assert_eq!(ProxyState::from_label(state.label()), Some(state));
        }
        assert_eq!(ProxyState::from_label("Current"), None);
    }
}
