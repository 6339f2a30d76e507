//! A service's endpoints as the picker holds them ([`Slot`]s, sorted by address) with the
//! counts kept in step with them: how many breakers are not closed (for `max_ejection_percent`
//! and the steady-state shortcut) and how many requests are in flight (for bounded load).
//! Every change of a breaker or an in-flight count goes through here, so the counts cannot
//! drift; an endpoint-set change keeps the stats of every endpoint still present. It also
//! works out the peers' typical latency the relative-latency rule measures calls against.

use std::{net::SocketAddr, ops::Deref, time::Duration};

use super::{Transition, Warmup};
use crate::{
    breaker::{BreakerState, Context, Event},
    endpoint::{Endpoint, Health, address_cmp, v4_key},
    policy::{OutlierDetection, PeakEwma, SlowStart},
    select::{
        EndpointStats, Slot,
        hash::address_hash,
        peak_ewma::{Ewma, Level},
    },
    window::BUCKETS,
};

/// A read-only view of one endpoint for metrics.
#[derive(Debug, Clone, Copy)]
pub struct EndpointView<'a> {
    /// The endpoint as last updated.
    pub endpoint: &'a Endpoint,
    /// Its breaker state.
    pub breaker: BreakerState,
    /// Requests picked and not yet completed.
    pub inflight: u32,
}

/// How many endpoints a service needs before [`Slots::find`] searches a key index: below,
/// the slots themselves are few enough to search, and a small service keeps its memory.
const KEYED_FROM: usize = 64;

/// The endpoints, sorted by address and unique, and their aggregate counts.
#[derive(Debug, Clone, Default)]
pub(super) struct Slots {
    list: Vec<Slot>,
    /// From [`KEYED_FROM`] endpoints, the IPv4 endpoints' `IP:port` as one integer each
    /// ([`v4_key`]), in `list`'s order (IPv4 addresses sort first, by IP then port, so
    /// `v4_keys[i]` is `list[i]`'s); empty below. [`Slots::find`] searches these 8 bytes
    /// per endpoint instead of the slots themselves, hundreds of bytes apart: at 10,000
    /// endpoints each probe of a completion's lookup missed the cache.
    v4_keys: Box<[u64]>,
    /// Endpoints whose breaker is open or half-open.
    not_closed: usize,
    /// Endpoints whose breaker's consecutive counters are not zero: in a run of failures.
    failing: usize,
    /// Sum of the endpoints' in-flight counts.
    total_inflight: u64,
    /// Counts the changes of breakers that are, or were until the change, not closed: what
    /// may change which endpoints a breaker admits, apart from time.
    ejection_changes: u64,
    /// The peers' typical latency, as last worked out.
    typical: TypicalLatency,
    /// The service's latency level, which latency estimates are kept relative to.
    level: Level,
}

/// The median, over closed endpoints with enough calls in their window, of their mean
/// latency; worked out again at most once per tenth of the window (one window bucket), so a
/// completion costs O(1) but once per bucket (O(endpoints)); ten times as often while there
/// is none yet.
#[derive(Debug, Clone, Default)]
struct TypicalLatency {
    /// The answer, `None` while too few endpoints have enough calls.
    value: Option<Duration>,
    /// When it was worked out; `None` before the first time and after an endpoint change.
    at: Option<Duration>,
    /// The means of the peers, kept to avoid an allocation each time.
    means: Vec<Duration>,
}

impl Deref for Slots {
    type Target = [Slot];

    fn deref(&self) -> &[Slot] {
        &self.list
    }
}

impl Slots {
    /// Replaces the endpoints with `endpoints` (duplicate addresses keep their first entry),
    /// keeping the stats of those still present and starting the others afresh. Returns, per
    /// new slot, its index before the change if it was there.
    pub fn replace(&mut self, endpoints: &[Endpoint]) -> Vec<Option<u32>> {
        let mut sorted: Vec<&Endpoint> = endpoints.iter().collect();
        sorted.sort_by_key(|endpoint| endpoint.address);
        sorted.dedup_by_key(|endpoint| endpoint.address);
        let previous = std::mem::take(&mut self.list);
        let mut carried = Vec::with_capacity(sorted.len());
        self.list = sorted
            .into_iter()
            .map(|endpoint| {
                let old = previous
                    .binary_search_by_key(&endpoint.address, |slot| slot.endpoint.address)
                    .ok();
                carried.push(old.map(|old| old as u32));
                let mut stats =
                    old.map_or_else(EndpointStats::default, |old| previous[old].stats.clone());
                // A newcomer warms up, unless the whole set is new (they all start together);
                // so does an endpoint that turned healthy.
                let was_healthy = old.map(|old| previous[old].endpoint.health == Health::Healthy);
                if !previous.is_empty()
                    && endpoint.health == Health::Healthy
                    && was_healthy != Some(true)
                {
                    stats.warmup = Warmup::Pending;
                }
                Slot {
                    endpoint: endpoint.clone(),
                    address_hash: address_hash(&endpoint.address),
                    stats,
                }
            })
            .collect();
        self.v4_keys = if self.list.len() >= KEYED_FROM {
            self.list
                .iter()
                .map_while(|slot| v4_key(slot.endpoint.address))
                .collect()
        } else {
            Box::default()
        };
        self.not_closed = self.count_not_closed();
        self.failing = self.count_failing();
        self.total_inflight = self
            .list
            .iter()
            .map(|slot| u64::from(slot.stats.inflight))
            .sum();
        self.typical.at = None;
        carried
    }

    /// The slot of `address`, if it is one of the endpoints.
    pub fn find(&self, address: SocketAddr) -> Option<usize> {
        let v4_count = self.v4_keys.len();
        match v4_key(address) {
            Some(key) if self.list.len() >= KEYED_FROM => self.v4_keys.binary_search(&key).ok(),
            _ => {
                // IPv6 addresses follow the IPv4 ones; below `KEYED_FROM`, the whole list.
                let rest = &self.list[v4_count..];
                rest.binary_search_by(|slot| address_cmp(&slot.endpoint.address, &address))
                    .ok()
                    .map(|index| v4_count + index)
            }
        }
    }

    /// How many breakers are open or half-open.
    pub fn not_closed(&self) -> usize {
        self.not_closed
    }

    /// How many endpoints are in a run of failures as their breakers know it (consecutive
    /// counters not zero).
    pub fn failing(&self) -> usize {
        self.failing
    }

    /// How many changes of not-closed breakers there have been: equal counts mean every
    /// breaker admits what it did, but for ejections ending with time
    /// ([`Breaker::admits_from`](crate::breaker::Breaker::admits_from)).
    pub fn ejection_changes(&self) -> u64 {
        self.ejection_changes
    }

    /// How many requests are in flight, over every endpoint.
    pub fn total_inflight(&self) -> u64 {
        self.total_inflight
    }

    /// Every endpoint with its breaker state and in-flight count.
    pub fn views(&self) -> impl ExactSizeIterator<Item = EndpointView<'_>> {
        self.list.iter().map(|slot| EndpointView {
            endpoint: &slot.endpoint,
            breaker: slot.stats.breaker.state(),
            inflight: slot.stats.inflight,
        })
    }

    /// Counts a request sent to `slot`: in flight, a probe if its breaker is open, and the
    /// start of its slow start if one is pending.
    pub fn admit(
        &mut self,
        slot: usize,
        now: Duration,
        outlier_detection: &OutlierDetection,
        slow_start: Option<&SlowStart>,
    ) {
        let stats = &mut self.list[slot].stats;
        stats.inflight = stats.inflight.saturating_add(1);
        stats.picks = stats.picks.saturating_add(1);
        stats.warmup = stats.warmup.admitted(slow_start, now);
        self.total_inflight = self.total_inflight.saturating_add(1);
        // A closed breaker ignores an admission: nothing to judge on the request path.
        if matches!(stats.breaker.state(), BreakerState::Closed { .. }) {
            return;
        }
        // Admitting never changes the state kind except open → half-open (both ejected).
        let _ = self.transition(slot, Event::Admit, now, outlier_detection);
    }

    /// Restarts `slot`'s count of picks ([`super::ServicePicker::diagnose`]).
    pub fn reset_picks(&mut self, slot: usize) {
        self.list[slot].stats.picks = 0;
    }

    /// Takes a finished request off `slot`'s in-flight count.
    pub fn release(&mut self, slot: usize) {
        let inflight = &mut self.list[slot].stats.inflight;
        if *inflight > 0 {
            *inflight -= 1;
            self.total_inflight = self.total_inflight.saturating_sub(1);
        }
    }

    /// The service's latency level, in nanoseconds.
    pub fn level(&self) -> f64 {
        self.level.nanos()
    }

    /// Folds one response time into the service's latency level and `slot`'s estimate.
    pub fn observe(&mut self, slot: usize, rtt: Duration, now: Duration, estimate: &PeakEwma) {
        let level = self.level.observe(rtt, now);
        self.list[slot]
            .stats
            .ewma
            .observe(rtt, level, now, estimate);
    }

    /// Records a failure on `slot`'s latency estimate: its penalty, under `estimate`'s policy.
    pub fn penalize(&mut self, slot: usize, estimate: &PeakEwma, now: Duration) {
        self.list[slot].stats.ewma.penalize(
            estimate.failure_penalty,
            now,
            estimate.failure_penalty_decay,
        );
    }

    /// Applies a breaker event to `slot`; returns the change of state kind, if any.
    pub fn transition(
        &mut self,
        slot: usize,
        event: Event,
        now: Duration,
        outlier_detection: &OutlierDetection,
    ) -> Option<Transition> {
        let may_eject = self.may_eject(outlier_detection);
        let entry = &mut self.list[slot];
        let context = Context {
            policy: outlier_detection,
            now,
            may_eject,
            jitter_seed: entry.address_hash,
        };
        let before = entry.stats.breaker.state();
        let was_failing = !entry.stats.breaker.consecutive().is_zero();
        let change = entry.stats.breaker.on(event, &context);
        let after = entry.stats.breaker.state();
        let is_failing = !entry.stats.breaker.consecutive().is_zero();
        if before != after && (before.is_ejected() || after.is_ejected()) {
            self.ejection_changes += 1;
        }
        match (was_failing, is_failing) {
            (false, true) => self.failing += 1,
            (true, false) => self.failing = self.failing.saturating_sub(1),
            _ => {}
        }
        debug_assert_eq!(
            self.failing,
            self.count_failing(),
            "failing must count the breakers in a run of failures"
        );
        let change = change?;
        match (change.from.is_ejected(), change.to.is_ejected()) {
            (false, true) => {
                self.not_closed += 1;
                // Forgotten: the probe after the ejection measures the endpoint afresh, and
                // a latency-aware algorithm must not shun the probe for a stale estimate (a
                // failure penalty decays for minutes). Probes are bounded by the breaker.
                self.list[slot].stats.ewma = Ewma::like_peers(now);
            }
            (true, false) => {
                self.not_closed = self.not_closed.saturating_sub(1);
                self.readmitted(slot, now);
            }
            _ => {}
        }
        debug_assert_eq!(
            self.not_closed,
            self.count_not_closed(),
            "not_closed must count the ejected breakers"
        );
        Some(Transition {
            endpoint: self.list[slot].endpoint.address,
            from: change.from,
            to: change.to,
        })
    }

    /// The peers' typical latency at `now` for the relative-latency rule: the median, over
    /// closed endpoints with at least `minimum_requests` calls in their window, of their mean
    /// latency. `None` without the rule or while fewer than `minimum_hosts` endpoints qualify.
    pub fn typical_latency(
        &mut self,
        now: Duration,
        outlier_detection: &OutlierDetection,
    ) -> Option<Duration> {
        let rule = outlier_detection.relative_latency.as_ref()?;
        let typical = &mut self.typical;
        // Once per bucket; while there is none yet, ten times as often, so that the rule
        // starts judging within a tenth of a bucket of the peers' having enough calls.
        let bucket = outlier_detection.window / BUCKETS as u32;
        let refresh = match typical.value {
            Some(_) => bucket,
            None => bucket / 10,
        }
        .max(Duration::from_millis(1));
        let fresh = typical
            .at
            .is_some_and(|at| at <= now && now.saturating_sub(at) < refresh);
        if !fresh {
            typical.means.clear();
            typical.means.extend(self.list.iter().filter_map(|slot| {
                let breaker = &slot.stats.breaker;
                let counts = breaker.recent(now);
                (!breaker.state().is_ejected() && counts.total >= rule.minimum_requests)
                    .then(|| counts.mean_latency())
                    .flatten()
            }));
            let hosts = typical.means.len();
            typical.value = (hosts > 0 && hosts >= rule.minimum_hosts as usize).then(|| {
                let (_, median, _) = typical.means.select_nth_unstable(hosts / 2);
                *median
            });
            typical.at = Some(now);
        }
        typical.value
    }

    /// An endpoint back from an ejection: its latency estimate restarts like its peers', so
    /// it is neither shunned nor flooded for what one probe measured; and it warms up again.
    fn readmitted(&mut self, slot: usize, now: Duration) {
        let stats = &mut self.list[slot].stats;
        stats.ewma = Ewma::like_peers(now);
        stats.warmup = Warmup::Pending;
    }

    /// Whether one more endpoint may be ejected under `max_ejection_percent`.
    fn may_eject(&self, outlier_detection: &OutlierDetection) -> bool {
        let percent = outlier_detection.max_ejection_percent.min(100) as usize;
        if percent == 0 {
            return false;
        }
        let allowed = (self.list.len() * percent / 100).max(1);
        self.not_closed < allowed
    }

    fn count_failing(&self) -> usize {
        self.list
            .iter()
            .filter(|slot| !slot.stats.breaker.consecutive().is_zero())
            .count()
    }

    fn count_not_closed(&self) -> usize {
        self.list
            .iter()
            .filter(|slot| slot.stats.breaker.state().is_ejected())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    use proptest::prelude::*;

    use super::*;

    fn address() -> impl Strategy<Value = SocketAddr> {
        // Few distinct values, so that sets repeat addresses and probes hit and miss.
        prop_oneof![
            (0u8..8, 0u8..8, 0u16..3).prop_map(|(high, low, port)| {
                SocketAddr::from((Ipv4Addr::new(10, high, 0, low), 8080 + port))
            }),
            (0u16..4, 0u16..3).prop_map(|(segment, port)| {
                let ip = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, segment);
                SocketAddr::V6(SocketAddrV6::new(ip, 8080 + port, 0, 0))
            }),
        ]
    }

    proptest! {
        #[test]
        fn find_names_the_slot_holding_the_address_and_nothing_for_an_absent_one(
            // Past `KEYED_FROM` distinct addresses and below it.
            members in proptest::collection::vec(address(), 0..300),
            probes in proptest::collection::vec(address(), 1..20),
        ) {
            let endpoints: Vec<Endpoint> = members.iter().map(|&a| Endpoint::new(a)).collect();
            let mut slots = Slots::default();
            slots.replace(&endpoints);
            for probe in probes.iter().chain(&members) {
                let expected = slots.iter().position(|slot| slot.endpoint.address == *probe);
                prop_assert_eq!(slots.find(*probe), expected);
            }
        }
    }
}
