//! `ServicePicker`: one service's endpoints, policy and state; the per-request API the
//! proxy-wasm filter calls.
//!
//! Per request the filter calls [`ServicePicker::pick`] (rate limit, sticky session,
//! selector / health / breaker / locality filtering, then the algorithm) and, when the response
//! ends, [`ServicePicker::complete`] (inflight, latency and outlier detection). When the
//! control plane pushes a new endpoint set it calls [`ServicePicker::update_endpoints`], which
//! rebuilds the immutable selection structures (pingora style) and keeps the stats of endpoints
//! that survive, keyed by address. Time is `now: Duration` since any monotonic epoch the caller
//! picks (it must not go backwards; if it does, elapsed time counts as zero). Nothing here
//! panics on any input, memory is bounded by the endpoint count and the policy's caps, and a
//! pick allocates nothing except the `Set-Cookie` value when a cookie must be set.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use crate::{
    breaker::{BreakerState, Context, Event, Verdict},
    endpoint::{Endpoint, Health},
    policy::{HashOn, LoadBalancer, OnNoEndpoint, PeakEwma, ServicePolicy},
    ratelimit::{BucketStore, LocalBuckets, RateLimiter},
    rng::Rng,
    select::{
        EndpointStats, Slot,
        hash::{HashTable, address_hash, hash_bytes, ip_hash},
        health_score, least_request, maglev, peak_ewma, ring_hash, round_robin,
        sticky::{self, SessionKeys},
        weighted,
    },
    validate::MAX_RETRY_TARGETS,
};

/// What the filter extracted from the request, as [`RequestNeeds`] asked. All borrowed, so
/// building it allocates nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestAttributes<'a> {
    /// Value of the hash-on header, when the policy hashes on a header.
    pub hash_header: Option<&'a str>,
    /// Value of the hash-on cookie, when the policy hashes on a cookie.
    pub hash_cookie: Option<&'a str>,
    /// The downstream source address, when the policy hashes on it.
    pub source_ip: Option<IpAddr>,
    /// Value of the sticky-session cookie, when the policy is sticky.
    pub sticky_cookie: Option<&'a str>,
    /// Value of the rate limit's client key header, when configured.
    pub client_key: Option<&'a str>,
}

/// Which request attributes this service's policy reads; the filter extracts only these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestNeeds<'a> {
    /// Header whose value is the hash key.
    pub hash_header: Option<&'a str>,
    /// Cookie whose value is the hash key.
    pub hash_cookie: Option<&'a str>,
    /// Whether the source IP is the hash key.
    pub source_ip: bool,
    /// Cookie naming the sticky endpoint.
    pub sticky_cookie: Option<&'a str>,
    /// Header keying per-client rate limits.
    pub client_key_header: Option<&'a str>,
}

/// Up to five distinct endpoints for Envoy to retry on, best first, in a fixed-size array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryTargets {
    addresses: [SocketAddr; MAX_RETRY_TARGETS as usize],
    len: u8,
}

impl Default for RetryTargets {
    fn default() -> Self {
        Self {
            addresses: [SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
                MAX_RETRY_TARGETS as usize],
            len: 0,
        }
    }
}

impl RetryTargets {
    /// The targets, best first.
    pub fn as_slice(&self) -> &[SocketAddr] {
        &self.addresses[..usize::from(self.len)]
    }

    /// Whether `address` is one of the targets.
    pub fn contains(&self, address: &SocketAddr) -> bool {
        self.as_slice().contains(address)
    }

    /// Adds `address` unless full; returns whether there is room for more.
    fn push(&mut self, address: SocketAddr) -> bool {
        if let Some(free) = self.addresses.get_mut(usize::from(self.len)) {
            *free = address;
            self.len += 1;
        }
        usize::from(self.len) < self.addresses.len()
    }
}

/// Where to send a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    /// The endpoint; the filter writes it as `IP:port` into the override-host header.
    pub endpoint: SocketAddr,
    /// Distinct admissible endpoints for Envoy's retries (`retry` in the policy), never
    /// including `endpoint` and never an endpoint that is ejected or probing.
    pub retry_targets: RetryTargets,
    /// A complete `Set-Cookie` header value (`name=value; Path=/; HttpOnly[; Max-Age=n]`) to
    /// add to the response: a new sticky session or a generated hash cookie.
    pub set_sticky_cookie: Option<String>,
}

/// Who produced a request's outcome, relative to the pick the filter wrote: decides which
/// endpoint's breaker and latency estimate the outcome is charged to.
///
/// Envoy reports the upstream that served the last attempt (`upstream.address`) and how many
/// attempts there were (`upstream.request_attempt_count`). On the first attempt the host is
/// the pick when `override_host` honoured it; any other host means it did not (the address
/// is not an endpoint of the routed cluster: EDS behind the snapshot, a cluster without the
/// override policy, a service name that is not the routed cluster) and its fallback policy
/// chose: the pick never received the request and is charged nothing. After a retry, a host
/// among the pick's retry targets means the pick failed its attempt; any other host is again
/// the fallback's choice, and the pick is given the benefit of the doubt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The pick served it (or Envoy named no upstream, e.g. no attempt connected).
    ByPick,
    /// A retry target of the pick served it after the pick's attempt failed.
    ByRetryTarget(SocketAddr),
    /// Envoy's fallback chose this host instead of the pick; the pick is charged nothing.
    ByFallback(SocketAddr),
}

impl Served {
    /// Classifies Envoy's `upstream` host and attempt count against the pick and its retry
    /// targets. An unknown attempt count is read as "maybe retried".
    pub fn classify(
        picked: SocketAddr,
        retry_targets: &RetryTargets,
        upstream: Option<SocketAddr>,
        attempts: Option<u64>,
    ) -> Self {
        match upstream {
            None => Self::ByPick,
            Some(upstream) if upstream == picked => Self::ByPick,
            Some(upstream) if attempts != Some(1) && retry_targets.contains(&upstream) => {
                Self::ByRetryTarget(upstream)
            }
            Some(upstream) => Self::ByFallback(upstream),
        }
    }
}

/// Why no endpoint was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No endpoint is healthy and selected by the policy.
    NoEndpoints {
        /// What the policy says to do: leave it to Envoy, or answer 503.
        action: OnNoEndpoint,
    },
    /// Every selected endpoint is ejected (only possible with a panic threshold of 0).
    AllEjected {
        /// What the policy says to do: leave it to Envoy, or answer 503.
        action: OnNoEndpoint,
    },
    /// The service's or the client's token bucket is empty; answer 429.
    RateLimited {
        /// When a token will be available (for `Retry-After`).
        retry_after: Duration,
    },
}

impl Rejection {
    /// A short snake_case reason for local replies, logs and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoEndpoints { .. } => "no_endpoints",
            Self::AllEjected { .. } => "all_ejected",
            Self::RateLimited { .. } => "rate_limited",
        }
    }

    /// Whether the request should go on to Envoy's fallback policy rather than be answered
    /// locally.
    pub fn fails_open(&self) -> bool {
        matches!(
            self,
            Self::NoEndpoints {
                action: OnNoEndpoint::FailOpen
            } | Self::AllEjected {
                action: OnNoEndpoint::FailOpen
            }
        )
    }
}

/// How a request ended, as the filter saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The response status, if a response arrived.
    pub status: Option<u16>,
    /// Envoy could not connect to the endpoint.
    pub connect_failure: bool,
    /// The stream or connection was reset.
    pub reset: bool,
    /// The request timed out.
    pub timeout: bool,
    /// Time from pick to the end of the response.
    pub latency: Duration,
}

/// A breaker changed state kind (closed / open / half-open) on an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The endpoint whose breaker changed.
    pub endpoint: SocketAddr,
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
}

/// The transitions caused by one completion: at most one on the picked endpoint (when Envoy
/// retried elsewhere) and one on the endpoint that served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transitions {
    items: [Option<Transition>; 2],
}

impl Transitions {
    /// The transitions, picked endpoint first.
    pub fn iter(&self) -> impl Iterator<Item = &Transition> {
        self.items.iter().flatten()
    }

    /// Whether nothing changed state.
    pub fn is_empty(&self) -> bool {
        self.items.iter().all(Option::is_none)
    }

    fn push(&mut self, transition: Option<Transition>) {
        if let Some(free) = self.items.iter_mut().find(|item| item.is_none()) {
            *free = transition;
        }
    }
}

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

const NOT_ELIGIBLE: u16 = u16::MAX;

/// The immutable part, rebuilt whenever the endpoint set changes.
#[derive(Debug, Clone, Default)]
struct Selection {
    /// Eligible (healthy, selected) slot indices per locality tier, best tier first; no tier
    /// is empty.
    tiers: Vec<Vec<u32>>,
    /// Per slot: its index in `tiers`, or `NOT_ELIGIBLE`.
    tier_of: Vec<u16>,
    /// Number of eligible endpoints (the sum of the tiers' lengths).
    eligible: usize,
    /// Whether all eligible endpoints have the same weight.
    uniform_weights: bool,
    /// Ring or Maglev table over the eligible endpoints, for the hash algorithms.
    hash_table: Option<HashTable>,
    /// Sticky token → slot for healthy and draining selected endpoints, sorted by token.
    sticky_index: Vec<(u64, u32)>,
}

/// Per-pick buffers, reused so a pick does not allocate.
#[derive(Debug, Clone, Default)]
struct Scratch {
    candidates: Vec<u32>,
    tier_ranges: Vec<(usize, usize)>,
    /// Per slot: equals `generation` when the slot is a candidate of the current pick.
    marks: Vec<u32>,
    generation: u32,
}

/// The admissible candidates of one pick.
#[derive(Debug, Clone, Copy)]
enum Found {
    /// Every endpoint of `selection.tiers[i]`.
    Tier(usize),
    /// `scratch.candidates[start..end]`.
    Scratch(usize, usize),
}

/// One service's picker. See the module docs.
#[derive(Debug, Clone)]
pub struct ServicePicker {
    policy: ServicePolicy,
    /// Endpoints sorted by address, unique.
    slots: Vec<Slot>,
    selection: Selection,
    /// Endpoints whose breaker is open or half-open. Changed only by `transition` and
    /// recomputed by `rebuild`.
    not_closed: usize,
    /// Sum of the slots' inflight. Changed only with a slot's inflight.
    total_inflight: u64,
    round_robin_cursor: u64,
    limiter: Option<RateLimiter>,
    /// The rate limit's buckets when the caller keeps none of its own ([`Self::pick`]).
    local_buckets: LocalBuckets,
    /// Keys of the sticky-session tokens.
    session_keys: SessionKeys,
    scratch: Scratch,
}

impl ServicePicker {
    /// A picker for `endpoints` under `policy` (assumed validated; an unvalidated policy
    /// still never causes a panic). Duplicate addresses keep their first entry.
    pub fn new(policy: &ServicePolicy, endpoints: &[Endpoint]) -> Self {
        let mut picker = Self {
            policy: policy.clone(),
            slots: Vec::new(),
            selection: Selection::default(),
            not_closed: 0,
            total_inflight: 0,
            round_robin_cursor: 0,
            limiter: policy.rate_limit.as_ref().map(RateLimiter::new),
            local_buckets: LocalBuckets::default(),
            session_keys: SessionKeys::default(),
            scratch: Scratch::default(),
        };
        picker.update_endpoints(endpoints);
        picker
    }

    /// Makes and checks sticky-session cookies with `keys` (the first signs new sessions,
    /// every one is accepted) instead of the public default key.
    pub fn set_session_keys(&mut self, keys: &SessionKeys) {
        if self.session_keys != *keys {
            self.session_keys = keys.clone();
            self.selection = Selection::build(&self.policy, &self.slots, &self.session_keys);
        }
    }

    /// Replaces the endpoint set, keeping inflight, latency and breaker state of every
    /// endpoint whose address is still present.
    pub fn update_endpoints(&mut self, endpoints: &[Endpoint]) {
        let mut sorted: Vec<&Endpoint> = endpoints.iter().collect();
        sorted.sort_by_key(|endpoint| endpoint.address);
        sorted.dedup_by_key(|endpoint| endpoint.address);
        let previous = std::mem::take(&mut self.slots);
        self.slots = sorted
            .into_iter()
            .map(|endpoint| {
                let stats = previous
                    .binary_search_by_key(&endpoint.address, |slot| slot.endpoint.address)
                    .map(|i| previous[i].stats.clone())
                    .unwrap_or_else(|_| EndpointStats::new(&self.policy.outlier_detection));
                Slot {
                    endpoint: endpoint.clone(),
                    address_hash: address_hash(&endpoint.address),
                    stats,
                }
            })
            .collect();
        self.not_closed = self.count_not_closed();
        self.total_inflight = self
            .slots
            .iter()
            .map(|slot| u64::from(slot.stats.inflight))
            .sum();
        self.selection = Selection::build(&self.policy, &self.slots, &self.session_keys);
        self.scratch.marks = vec![0; self.slots.len()];
        self.scratch.generation = 0;
    }

    /// The policy this picker applies.
    pub fn policy(&self) -> &ServicePolicy {
        &self.policy
    }

    /// Which request attributes [`pick`](Self::pick) reads under this policy.
    pub fn request_needs(&self) -> RequestNeeds<'_> {
        let mut needs = RequestNeeds::default();
        let hash_on = match self.policy.load_balancer.algorithm() {
            LoadBalancer::RingHash(ring) => Some(&ring.hash_on),
            LoadBalancer::Maglev(maglev) => Some(&maglev.hash_on),
            _ => None,
        };
        match hash_on {
            Some(HashOn::Header(name)) => needs.hash_header = Some(name),
            Some(HashOn::Cookie(cookie)) => needs.hash_cookie = Some(&cookie.name),
            Some(HashOn::SourceIp) => needs.source_ip = true,
            None => {}
        }
        if let LoadBalancer::Sticky(config) = &self.policy.load_balancer {
            needs.sticky_cookie = Some(&config.cookie);
        }
        needs.client_key_header = self
            .policy
            .rate_limit
            .as_ref()
            .and_then(|limit| limit.client_key_header.as_deref());
        needs
    }

    /// Every endpoint with its breaker state and inflight, sorted by address.
    pub fn endpoints(&self) -> impl ExactSizeIterator<Item = EndpointView<'_>> {
        self.slots.iter().map(|slot| EndpointView {
            endpoint: &slot.endpoint,
            breaker: slot.stats.breaker.state(),
            inflight: slot.stats.inflight,
        })
    }

    /// Picks the endpoint for one request and counts it as inflight there.
    ///
    /// Order: rate limit; the sticky endpoint if the cookie names an admissible one; else the
    /// admissible candidates (healthy, selected, not ejected unless in panic, best locality
    /// tier) and the algorithm. The caller must later call [`complete`](Self::complete) with
    /// `Pick::endpoint`.
    ///
    /// The rate limit's buckets are this picker's own: the limit holds for the requests it
    /// picks. [`pick_with_buckets`](Self::pick_with_buckets) shares them.
    pub fn pick<R: Rng + ?Sized>(
        &mut self,
        attributes: &RequestAttributes<'_>,
        now: Duration,
        rng: &mut R,
    ) -> Result<Pick, Rejection> {
        let mut buckets = std::mem::take(&mut self.local_buckets);
        let picked = self.pick_with_buckets(attributes, now, rng, &mut buckets);
        self.local_buckets = buckets;
        picked
    }

    /// [`pick`](Self::pick) with the rate limit's tokens taken from `buckets`: the filter
    /// passes buckets every worker of the proxy shares, so the limit is per proxy.
    pub fn pick_with_buckets<R: Rng + ?Sized>(
        &mut self,
        attributes: &RequestAttributes<'_>,
        now: Duration,
        rng: &mut R,
        buckets: &mut dyn BucketStore,
    ) -> Result<Pick, Rejection> {
        if let Some(limiter) = &self.limiter {
            let client = self
                .policy
                .rate_limit
                .as_ref()
                .and_then(|limit| limit.client_key_header.as_ref())
                .and(attributes.client_key);
            limiter
                .admit(buckets, client, now)
                .map_err(|retry_after| Rejection::RateLimited { retry_after })?;
        }
        let sticky_slot = self.sticky_hit(attributes, now);
        let found = self.find_candidates(now);
        let retries = self.policy.retry.min(MAX_RETRY_TARGETS) as usize;

        if let Some(slot) = sticky_slot {
            let mut retry_targets = RetryTargets::default();
            if let Ok(found) = found {
                let candidates = self.candidate_slice(found);
                let start =
                    (self.slots[slot].address_hash % candidates.len().max(1) as u64) as usize;
                linear_retry_targets(
                    candidates,
                    start,
                    slot,
                    &self.slots,
                    retries,
                    &mut retry_targets,
                );
            }
            self.admit(slot, now);
            return Ok(Pick {
                endpoint: self.slots[slot].endpoint.address,
                retry_targets,
                set_sticky_cookie: None,
            });
        }

        let found = found?;
        let mut set_cookie = None;
        let mut retry_targets = RetryTargets::default();
        let slot = match self.policy.load_balancer.algorithm() {
            LoadBalancer::RingHash(config) => {
                let key = hash_key(&config.hash_on, attributes, rng, &mut set_cookie);
                self.hash_pick(found, key, config.bounded_load, retries, &mut retry_targets)
            }
            LoadBalancer::Maglev(config) => {
                let key = hash_key(&config.hash_on, attributes, rng, &mut set_cookie);
                self.hash_pick(found, key, config.bounded_load, retries, &mut retry_targets)
            }
            algorithm => {
                let candidates: &[u32] = match found {
                    Found::Tier(tier) => &self.selection.tiers[tier],
                    Found::Scratch(start, end) => &self.scratch.candidates[start..end],
                };
                let position = match algorithm {
                    LoadBalancer::WeightedRoundRobin => {
                        weighted::smooth_pick(candidates, &mut self.slots)
                    }
                    LoadBalancer::WeightedRandom => {
                        weighted::random_pick(candidates, &self.slots, rng)
                    }
                    LoadBalancer::LeastRequest(config) => least_request::pick(
                        config,
                        candidates,
                        &self.slots,
                        self.selection.uniform_weights,
                        rng,
                    ),
                    LoadBalancer::PeakEwma(config) => {
                        peak_ewma::pick(config, candidates, &self.slots, now, rng)
                    }
                    LoadBalancer::HealthScore(config) => {
                        health_score::pick(config, candidates, &self.slots, now, rng)
                    }
                    _ => round_robin::pick(candidates.len(), &mut self.round_robin_cursor),
                };
                let slot = candidates.get(position).copied().unwrap_or(candidates[0]) as usize;
                linear_retry_targets(
                    candidates,
                    position + 1,
                    slot,
                    &self.slots,
                    retries,
                    &mut retry_targets,
                );
                slot
            }
        };
        if let LoadBalancer::Sticky(config) = &self.policy.load_balancer {
            let token = self.session_keys.token(&self.slots[slot].endpoint.address);
            set_cookie = Some(sticky::set_cookie(
                &config.cookie,
                &sticky::format_token(token),
                config.ttl,
            ));
        }
        self.admit(slot, now);
        Ok(Pick {
            endpoint: self.slots[slot].endpoint.address,
            retry_targets,
            set_sticky_cookie: set_cookie,
        })
    }

    /// Records the end of a request picked on `picked`, charging `outcome` to whoever
    /// [`Served`] it.
    ///
    /// Always releases `picked`'s in-flight count. [`Served::ByRetryTarget`] also records the
    /// pick's attempt as a failure (at the failure penalty latency); [`Served::ByFallback`]
    /// charges the pick nothing. The endpoint that served (if it is one of this service's)
    /// gets the outcome's latency and verdict. Returns the breaker transitions this caused so
    /// the filter can count ejections. Endpoints no longer present are ignored.
    pub fn complete(
        &mut self,
        picked: SocketAddr,
        served_by: Served,
        outcome: Outcome,
        now: Duration,
    ) -> Transitions {
        let mut transitions = Transitions::default();
        let picked_slot = self.find(picked);
        if let Some(slot) = picked_slot {
            let inflight = &mut self.slots[slot].stats.inflight;
            if *inflight > 0 {
                *inflight -= 1;
                self.total_inflight = self.total_inflight.saturating_sub(1);
            }
        }
        let ewma = match self.policy.load_balancer.algorithm() {
            LoadBalancer::PeakEwma(config) => config.clone(),
            _ => PeakEwma::default(),
        };
        let served = match served_by {
            Served::ByPick => picked,
            Served::ByRetryTarget(served) | Served::ByFallback(served) => served,
        };
        if matches!(served_by, Served::ByRetryTarget(_))
            && let Some(slot) = picked_slot
        {
            let stats = &mut self.slots[slot].stats;
            stats.ewma.observe(ewma.failure_penalty, now, ewma.decay);
            transitions.push(self.transition(
                slot,
                Event::Complete(Verdict::RETRIED_ELSEWHERE),
                now,
            ));
        }
        if let Some(slot) = self.find(served) {
            let policy = &self.policy;
            let verdict = Verdict::classify(
                outcome.status,
                outcome.connect_failure,
                outcome.reset,
                outcome.timeout,
                outcome.latency,
                &policy.failure_kinds,
                policy
                    .outlier_detection
                    .slow_calls
                    .as_ref()
                    .map(|slow| slow.latency_threshold),
            );
            let rtt = if verdict.failure {
                outcome.latency.max(ewma.failure_penalty)
            } else {
                outcome.latency
            };
            self.slots[slot].stats.ewma.observe(rtt, now, ewma.decay);
            transitions.push(self.transition(slot, Event::Complete(verdict), now));
        }
        transitions
    }

    /// A copy of the slots, for tests that inspect stats.
    #[cfg(test)]
    pub(crate) fn slots_for_tests(&self) -> Vec<Slot> {
        self.slots.clone()
    }

    fn find(&self, address: SocketAddr) -> Option<usize> {
        self.slots
            .binary_search_by_key(&address, |slot| slot.endpoint.address)
            .ok()
    }

    fn count_not_closed(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.stats.breaker.state().is_ejected())
            .count()
    }

    /// Whether one more endpoint may be ejected under `max_ejection_percent`.
    fn may_eject(&self) -> bool {
        let percent = self.policy.outlier_detection.max_ejection_percent.min(100) as usize;
        if percent == 0 {
            return false;
        }
        let allowed = (self.slots.len() * percent / 100).max(1);
        self.not_closed < allowed
    }

    /// Applies a breaker event to one slot, keeping `not_closed` in step.
    fn transition(&mut self, slot: usize, event: Event, now: Duration) -> Option<Transition> {
        let may_eject = self.may_eject();
        let entry = &mut self.slots[slot];
        let context = Context {
            policy: &self.policy.outlier_detection,
            now,
            may_eject,
            jitter_seed: entry.address_hash,
        };
        let change = entry.stats.breaker.on(event, &context)?;
        match (change.from.is_ejected(), change.to.is_ejected()) {
            (false, true) => self.not_closed += 1,
            (true, false) => self.not_closed = self.not_closed.saturating_sub(1),
            _ => {}
        }
        debug_assert_eq!(
            self.not_closed,
            self.count_not_closed(),
            "not_closed must count the ejected breakers"
        );
        Some(Transition {
            endpoint: self.slots[slot].endpoint.address,
            from: change.from,
            to: change.to,
        })
    }

    fn admit(&mut self, slot: usize, now: Duration) {
        let stats = &mut self.slots[slot].stats;
        stats.inflight = stats.inflight.saturating_add(1);
        self.total_inflight = self.total_inflight.saturating_add(1);
        // Admitting never changes the state kind except open → half-open (both ejected).
        let _ = self.transition(slot, Event::Admit, now);
    }

    /// The sticky endpoint named by the request's cookie, if it may still serve.
    fn sticky_hit(&self, attributes: &RequestAttributes<'_>, now: Duration) -> Option<usize> {
        let LoadBalancer::Sticky(_) = self.policy.load_balancer else {
            return None;
        };
        let token = sticky::parse_token(attributes.sticky_cookie?)?;
        let index = &self.selection.sticky_index;
        let position = index
            .binary_search_by_key(&token, |&(token, _)| token)
            .ok()?;
        let slot = index[position].1 as usize;
        self.slots[slot]
            .stats
            .breaker
            .admits(&self.policy.outlier_detection, now)
            .then_some(slot)
    }

    /// The admissible candidates at `now`, or why there are none.
    fn find_candidates(&mut self, now: Duration) -> Result<Found, Rejection> {
        let action = self.policy.on_no_endpoint;
        let selection = &self.selection;
        if selection.eligible == 0 {
            return Err(Rejection::NoEndpoints { action });
        }
        if self.not_closed == 0 {
            return Ok(Found::Tier(0));
        }
        let outlier_detection = &self.policy.outlier_detection;
        let scratch = &mut self.scratch;
        scratch.candidates.clear();
        scratch.tier_ranges.clear();
        for tier in &selection.tiers {
            let start = scratch.candidates.len();
            scratch
                .candidates
                .extend(tier.iter().copied().filter(|&slot| {
                    self.slots[slot as usize]
                        .stats
                        .breaker
                        .admits(outlier_detection, now)
                }));
            scratch.tier_ranges.push((start, scratch.candidates.len()));
        }
        let admissible = scratch.candidates.len();
        let panic_percent = outlier_detection.panic_threshold_percent.min(100) as usize;
        if admissible * 100 < panic_percent * selection.eligible {
            // Panic: too few endpoints left; ignore ejections rather than overload them.
            return Ok(Found::Tier(0));
        }
        if admissible == 0 {
            return Err(Rejection::AllEjected { action });
        }
        let min_healthy = self.policy.locality.min_healthy_percent.min(100) as usize;
        for (tier, &(start, end)) in scratch.tier_ranges.iter().enumerate() {
            let tier_len = selection.tiers[tier].len();
            if end > start && (end - start) * 100 >= min_healthy * tier_len {
                return Ok(Found::Scratch(start, end));
            }
        }
        Ok(Found::Scratch(0, admissible))
    }

    fn candidate_slice(&self, found: Found) -> &[u32] {
        match found {
            Found::Tier(tier) => &self.selection.tiers[tier],
            Found::Scratch(start, end) => &self.scratch.candidates[start..end],
        }
    }

    /// Walks the hash table from the key's entry: the first candidate within the load bound
    /// is the pick (the first candidate at all if every one is over it), the next distinct
    /// closed candidates are the retry targets.
    fn hash_pick(
        &mut self,
        found: Found,
        key: u64,
        bounded_load: Option<f64>,
        retries: usize,
        retry_targets: &mut RetryTargets,
    ) -> usize {
        let candidate_count = self.candidate_slice(found).len();
        if let Found::Scratch(start, end) = found {
            let scratch = &mut self.scratch;
            scratch.generation = scratch.generation.wrapping_add(1);
            if scratch.generation == 0 {
                scratch.marks.iter_mut().for_each(|mark| *mark = 0);
                scratch.generation = 1;
            }
            for &slot in &scratch.candidates[start..end] {
                scratch.marks[slot as usize] = scratch.generation;
            }
        }
        let is_candidate = |slot: u32| match found {
            Found::Tier(tier) => self.selection.tier_of[slot as usize] == tier as u16,
            Found::Scratch(..) => self.scratch.marks[slot as usize] == self.scratch.generation,
        };
        let limit = bounded_load.map(|factor| {
            factor * (self.total_inflight as f64 + 1.0) / candidate_count.max(1) as f64
        });
        let fallback = self.candidate_slice(found).first().copied().unwrap_or(0) as usize;
        let Some(table) = &self.selection.hash_table else {
            return fallback;
        };
        let start = table.start(key);
        let mut primary: Option<usize> = None;
        let mut first_candidate: Option<usize> = None;
        for step in 0..table.len() {
            let slot = table.slot_at(start + step);
            if !is_candidate(slot) {
                continue;
            }
            let slot = slot as usize;
            match primary {
                None => {
                    first_candidate.get_or_insert(slot);
                    let load = f64::from(self.slots[slot].stats.inflight) + 1.0;
                    if limit.is_none_or(|limit| load <= limit) {
                        primary = Some(slot);
                        if retries == 0 {
                            break;
                        }
                    }
                }
                Some(chosen) => {
                    let entry = &self.slots[slot];
                    let address = entry.endpoint.address;
                    if slot != chosen
                        && !entry.stats.breaker.state().is_ejected()
                        && !retry_targets.contains(&address)
                        && (!retry_targets.push(address)
                            || usize::from(retry_targets.len) >= retries)
                    {
                        break;
                    }
                }
            }
        }
        primary.or(first_candidate).unwrap_or(fallback)
    }
}

/// The hash key of a request; a random one when the attribute is missing (as Envoy does). For
/// a missing hash cookie, generates its value and the `Set-Cookie` to send.
fn hash_key<R: Rng + ?Sized>(
    hash_on: &HashOn,
    attributes: &RequestAttributes<'_>,
    rng: &mut R,
    set_cookie: &mut Option<String>,
) -> u64 {
    let key = match hash_on {
        HashOn::Header(_) => attributes
            .hash_header
            .map(|value| hash_bytes(value.as_bytes())),
        HashOn::Cookie(cookie) => Some(match attributes.hash_cookie {
            Some(value) => hash_bytes(value.as_bytes()),
            None => {
                let value = sticky::format_token(rng.next_u64());
                let key = hash_bytes(value.as_bytes());
                *set_cookie = Some(sticky::set_cookie(&cookie.name, &value, cookie.ttl));
                key
            }
        }),
        HashOn::SourceIp => attributes.source_ip.map(ip_hash),
    };
    key.unwrap_or_else(|| rng.next_u64())
}

/// Adds up to `retries` closed candidates other than `chosen`, in candidate order from `start`.
fn linear_retry_targets(
    candidates: &[u32],
    start: usize,
    chosen: usize,
    slots: &[Slot],
    retries: usize,
    retry_targets: &mut RetryTargets,
) {
    if retries == 0 || candidates.is_empty() {
        return;
    }
    for step in 0..candidates.len() {
        let slot = candidates[(start + step) % candidates.len()] as usize;
        if slot == chosen || slots[slot].stats.breaker.state().is_ejected() {
            continue;
        }
        if !retry_targets.push(slots[slot].endpoint.address)
            || usize::from(retry_targets.len) >= retries
        {
            return;
        }
    }
}

impl Selection {
    fn build(policy: &ServicePolicy, slots: &[Slot], session_keys: &SessionKeys) -> Self {
        let locality = &policy.locality;
        let local_zone = locality
            .local_zone
            .as_deref()
            .filter(|_| locality.prefer_local);
        let tier_count = if local_zone.is_some() {
            locality.failover.len() + 2
        } else {
            1
        };
        let mut raw_tiers: Vec<Vec<u32>> = vec![Vec::new(); tier_count];
        for (index, slot) in slots.iter().enumerate() {
            let endpoint = &slot.endpoint;
            if endpoint.health != Health::Healthy || !policy.endpoint_selector.matches(endpoint) {
                continue;
            }
            let tier = match local_zone {
                None => 0,
                Some(local) => {
                    let zone = endpoint.zone.as_deref();
                    if zone == Some(local) {
                        0
                    } else {
                        zone.and_then(|zone| locality.failover.iter().position(|f| f == zone))
                            .map_or(tier_count - 1, |position| position + 1)
                    }
                }
            };
            raw_tiers[tier].push(index as u32);
        }
        let tiers: Vec<Vec<u32>> = raw_tiers
            .into_iter()
            .filter(|tier| !tier.is_empty())
            .take(usize::from(NOT_ELIGIBLE))
            .collect();
        let mut tier_of = vec![NOT_ELIGIBLE; slots.len()];
        for (tier, members) in tiers.iter().enumerate() {
            for &slot in members {
                tier_of[slot as usize] = tier as u16;
            }
        }
        let mut members: Vec<u32> = tiers.iter().flatten().copied().collect();
        members.sort_unstable();
        let uniform_weights = members
            .windows(2)
            .all(|pair| slots[pair[0] as usize].weight() == slots[pair[1] as usize].weight());
        let hash_table = match policy.load_balancer.algorithm() {
            LoadBalancer::RingHash(config) => {
                Some(ring_hash::build(&members, slots, config.minimum_ring_size))
            }
            LoadBalancer::Maglev(config) => Some(maglev::build(&members, slots, config.table_size)),
            _ => None,
        };
        let mut sticky_index = Vec::new();
        if let LoadBalancer::Sticky(_) = policy.load_balancer {
            sticky_index = slots
                .iter()
                .enumerate()
                .filter(|(_, slot)| {
                    slot.endpoint.health != Health::Unhealthy
                        && policy.endpoint_selector.matches(&slot.endpoint)
                })
                .flat_map(|(index, slot)| {
                    session_keys
                        .tokens(slot.endpoint.address)
                        .map(move |token| (token, index as u32))
                })
                .collect();
            sticky_index.sort_unstable();
        }
        Self {
            eligible: members.len(),
            tiers,
            tier_of,
            uniform_weights,
            hash_table,
            sticky_index,
        }
    }
}
