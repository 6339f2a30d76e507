//! The load-balancing policy: one [`Cluster`] per Envoy cluster, shared by its per-worker
//! [`WorkerLb`]s, choosing hosts with the core's [`ServicePicker`].
//!
//! # State and workers
//!
//! Envoy makes one policy config per cluster (`on_lb_config_new`) and one LB per worker
//! (`on_lb_new`). In-process there is no need for the wasm filter's shared-data record: the
//! cluster holds **one** picker behind a `Mutex`, which every worker picks from and every
//! outcome is charged to. Picks, in-flight counts, latency estimates, breakers and the rate
//! limit's buckets are therefore per proxy and agree across workers exactly (the wasm filter
//! approximates this with per-worker pickers and a shared ejection record). The lock is held
//! for one pick or one completion (microseconds, no IO, no allocation beyond the core's), so
//! workers never wait for long.
//!
//! Each worker keeps its own [`HostIndex`]: Envoy updates workers' priority sets one after
//! the other, and a host is returned by its index in the worker's own healthy list. A worker
//! rereads its hosts when they change (`on_host_membership_update`), when a healthy count
//! differs from the one it read (a health change), or when the place it is about to answer
//! no longer holds the host it read there (a health change that kept every count: one host
//! down and another up between two picks; each answer is checked with one ABI read); it
//! hands the endpoints to the shared picker only when they differ from what the picker has,
//! so workers catching up do not rebuild the picker's tables again.
//!
//! # One pick per stream, retries on its retry targets
//!
//! The companion HTTP filter (`crate::outcomes`) opens a [`Stream`] for every request and
//! names it in a request header ([`STREAM_HEADER`]) that `choose_host` reads: the first
//! `choose_host` of a stream picks with the core and records the pick; a later one (Envoy
//! retrying) takes the pick's next retry target that Envoy's retry predicate
//! (`should_select_another_host`) does not refuse, just as the wasm filter hands its retry
//! targets to `override_host`. The filter completes the pick once, when the response (or the
//! stream's end) comes, with the host of the last attempt as the one that served. A request
//! the filter did not open (no header, or an unknown one) still gets a pick, whose in-flight
//! count is released at once ([`ServicePicker::abandon`]) and counted as unobserved.
//!
//! # Failing open
//!
//! When the core rejects a request that its policy lets fail open, when a pick is not among
//! this worker's healthy hosts, or when any state is missing, the request goes to a healthy
//! host chosen by rotation (counted in `fulcrum_native_fail_open_total`); with no healthy host
//! the policy answers no host and Envoy replies 503 `no healthy upstream`. A rate-limited or
//! fail-fast rejection answers no host too, and the filter turns Envoy's 503 into the wasm
//! filter's 429 (`retry-after`) or 503 with `x-fulcrum-reason`.

use std::{
    collections::HashMap,
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use fulcrum_core::{
    BreakerState, Endpoint, Rejection, RequestInputs, RequestNeeds, RequestSent, RetryTargets,
    ServicePicker, ServicePolicy, Transition, rng::SplitMix64,
};

use crate::hosts::{HostIndex, HostSet, HostSlot, read_hosts};

/// The request header the outcome filter names its stream in, for `choose_host` to find:
/// the id as [`STREAM_ID_DIGITS`] lower-case hexadecimal digits ([`stream_id_text`]).
pub const STREAM_HEADER: &str = fulcrum_core::NATIVE_STREAM_HEADER;

/// Digits of a stream id in [`STREAM_HEADER`]: a `u64` in hexadecimal, zero-padded.
pub const STREAM_ID_DIGITS: usize = 16;

/// Stream `id` as [`STREAM_HEADER`]'s value, written into `buffer`: no allocation on the
/// request path. Hexadecimal, fixed width: written and read back by shifts, where decimal
/// took a division per digit (with the parse, 700 instructions per request of the module's
/// 6,600, callgrind).
pub fn stream_id_text(id: u64, buffer: &mut [u8; STREAM_ID_DIGITS]) -> &str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (place, digit) in buffer.iter_mut().rev().enumerate() {
        // A nibble indexes the 16 digits.
        *digit = DIGITS[((id >> (4 * place)) & 0xf) as usize];
    }
    // Only ASCII digits were written.
    std::str::from_utf8(buffer).unwrap_or_default()
}

/// The stream id of a [`STREAM_HEADER`] value: exactly [`STREAM_ID_DIGITS`] lower-case
/// hexadecimal digits, as [`stream_id_text`] writes them; `None` for anything else.
pub fn parse_stream_id(value: &[u8]) -> Option<u64> {
    if value.len() != STREAM_ID_DIGITS {
        return None;
    }
    value.iter().try_fold(0_u64, |id, &byte| {
        let nibble = match byte {
            b'0'..=b'9' => byte - b'0',
            b'a'..=b'f' => byte - b'a' + 10,
            _ => return None,
        };
        Some(id << 4 | u64::from(nibble))
    })
}

/// Most streams one worker tracks at once; a stream opened beyond is not tracked (its pick
/// is released at once and counted as unobserved), so memory stays bounded whatever the load.
pub const MAX_STREAMS: usize = 65_536;

/// Most endpoints of one cluster config that get their own metric series
/// (`fulcrum_native_endpoint_*{endpoint}`): Envoy never drops a stat, and endpoints churn
/// (every new pod is a new address), so the series stay bounded whatever the churn. The wasm
/// filter's cap is the same.
pub const MAX_ENDPOINT_SERIES: usize = 16_384;

/// Which endpoints have metric series, up to [`MAX_ENDPOINT_SERIES`].
#[derive(Debug, Default)]
pub struct EndpointSeries {
    known: std::collections::HashSet<SocketAddr>,
}

impl EndpointSeries {
    /// Whether `endpoint` may be reported: it has its series already, or there is room for
    /// one. Beyond the cap a new endpoint's events are not reported (its breaker works the
    /// same); the cluster's counters still are.
    pub fn admits(&mut self, endpoint: SocketAddr) -> bool {
        if self.known.contains(&endpoint) {
            return true;
        }
        if self.known.len() >= MAX_ENDPOINT_SERIES {
            return false;
        }
        self.known.insert(endpoint)
    }
}

/// What the module counts, through Envoy's stats (see `crate::ffi`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A request went to a host fulcrum did not pick (`fulcrum_native_fail_open_total`).
    FailOpen,
    /// A pick whose outcome no filter observes (`fulcrum_native_unobserved_total`).
    Unobserved,
    /// A request refused by the rate limit (`fulcrum_native_rate_limited_total`).
    RateLimited,
    /// A request refused because no endpoint is admissible and the policy fails fast
    /// (`fulcrum_native_fail_fast_total`).
    FailFast,
    /// A worker read the cluster's hosts and kept only [`MAX_HOSTS`](crate::hosts::MAX_HOSTS)
    /// of them (`fulcrum_native_hosts_truncated_total`): the others are never picked.
    HostsTruncated,
    /// The endpoint's breaker opened: ejected, or re-ejected after a failed probe
    /// (`fulcrum_native_endpoint_ejections_total`).
    Ejected(SocketAddr),
    /// The endpoint's circuit left closed: ejected, then probing until it closes
    /// (`fulcrum_native_endpoint_circuit_open` to 1).
    CircuitOpen(SocketAddr),
    /// The endpoint's circuit closed again, or the endpoint left the cluster while it was
    /// open (`fulcrum_native_endpoint_circuit_open` to 0).
    CircuitClosed(SocketAddr),
}

impl Event {
    /// Whether the event sets a gauge to a state (the circuit's) rather than adding to a
    /// counter: such events are counted under the cluster's lock, in the order the state
    /// changed, so that a circuit opened on one worker and closed on another (or leaving
    /// with an EDS update) cannot leave its gauge at the older value.
    fn sets_a_gauge(self) -> bool {
        matches!(self, Self::CircuitOpen(_) | Self::CircuitClosed(_))
    }

    /// The events one breaker transition makes: an ejection when it opens, and the circuit
    /// gauge's move when it leaves or returns to closed (the wasm filter's rules, per proxy
    /// here since the breaker is shared by the workers).
    fn of_transition(transition: &Transition, events: &mut Vec<Self>) {
        if matches!(transition.to, BreakerState::Open { .. }) {
            events.push(Self::Ejected(transition.endpoint));
        }
        match (transition.from.is_ejected(), transition.to.is_ejected()) {
            (false, true) => events.push(Self::CircuitOpen(transition.endpoint)),
            (true, false) => events.push(Self::CircuitClosed(transition.endpoint)),
            _ => {}
        }
    }
}

/// Where the module's [`Event`]s are counted.
pub trait Counters: Send + Sync + std::fmt::Debug {
    /// Counts one `event`.
    fn count(&self, event: Event);
}

/// One Envoy cluster under one service policy: the picker every worker shares.
#[derive(Debug)]
pub struct Cluster {
    policy: ServicePolicy,
    /// Which request attributes the policy reads, fixed with it.
    needs: Needs,
    state: Mutex<ClusterState>,
    counters: Box<dyn Counters>,
}

#[derive(Debug)]
struct ClusterState {
    picker: ServicePicker,
    /// The endpoints the picker has, to skip an update that changes nothing.
    endpoints: Vec<Endpoint>,
    /// Endpoints whose circuit is not closed, as the events told: an endpoint that leaves
    /// the cluster with its circuit open gets its gauge back to 0.
    open_circuits: Vec<SocketAddr>,
    rng: SplitMix64,
}

impl Cluster {
    /// Whether the policy hashes on the downstream source IP, which the outcome filter must
    /// then read when it opens each stream.
    pub fn reads_source_ip(&self) -> bool {
        self.needs.source_ip
    }

    /// A cluster under `policy` (validated) with no endpoints yet; `seed` seeds its random
    /// draws.
    pub fn new(policy: ServicePolicy, seed: u64, counters: Box<dyn Counters>) -> Self {
        let picker = ServicePicker::new(&policy, &[]);
        let needs = Needs::of(picker.request_needs());
        Self {
            policy,
            needs,
            state: Mutex::new(ClusterState {
                picker,
                endpoints: Vec::new(),
                open_circuits: Vec::new(),
                rng: SplitMix64::new(seed),
            }),
            counters,
        }
    }

    /// The policy the cluster applies.
    pub fn policy(&self) -> &ServicePolicy {
        &self.policy
    }

    /// Counts `event`.
    pub fn count(&self, event: Event) {
        self.counters.count(event);
    }

    /// The shared state; a worker that panicked while holding it left a picker whose
    /// invariants the core keeps on every path, so the state is used as is.
    fn lock(&self) -> MutexGuard<'_, ClusterState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands `endpoints` to the picker when they differ from what it has; the circuits of
    /// endpoints that left are counted closed (under the lock: [`Event::sets_a_gauge`]).
    fn update(&self, endpoints: Vec<Endpoint>) {
        let mut state = self.lock();
        if state.endpoints == endpoints {
            return;
        }
        state.picker.update_endpoints(&endpoints);
        state.open_circuits.retain(|address| {
            let stays = endpoints
                .iter()
                .any(|endpoint| endpoint.address == *address);
            if !stays {
                self.count(Event::CircuitClosed(*address));
            }
            stays
        });
        state.endpoints = endpoints;
    }

    /// The endpoints whose circuit is open, forgotten: the cluster's config is going away,
    /// and the circuits it reported open end with it.
    pub fn take_open_circuits(&self) -> Vec<SocketAddr> {
        std::mem::take(&mut self.lock().open_circuits)
    }

    /// Counts `events` that add to counters (outside the lock: counting calls into Envoy;
    /// gauge events were counted under it).
    fn count_all(&self, events: Vec<Event>) {
        for event in events {
            if !event.sets_a_gauge() {
                self.count(event);
            }
        }
    }

    /// Runs `f` on the picker (tests and diagnostics).
    pub fn with_picker<R>(&self, f: impl FnOnce(&mut ServicePicker) -> R) -> R {
        f(&mut self.lock().picker)
    }

    /// Charges the end of `pick` to the picker: see [`Stream::complete`].
    fn complete(&self, pick: &Pick, response: &Response, now: Duration) {
        let Some(served) = pick.served() else {
            // Served by a host fulcrum cannot name: release the pick, charge nobody.
            self.lock().picker.abandon(pick.picked);
            return;
        };
        let Some(outcome) = fulcrum_core::Outcome::of_envoy_stream(
            response.status,
            response.flags,
            response.latency,
            response.request,
        ) else {
            // The client stalled or left before sending its whole request: charge nobody.
            self.lock().picker.abandon(pick.picked);
            return;
        };
        let mut events = Vec::new();
        {
            let mut state = self.lock();
            let transitions = state.picker.complete(pick.picked, served, outcome, now);
            for transition in transitions.iter() {
                Event::of_transition(transition, &mut events);
            }
            for event in &events {
                match *event {
                    Event::CircuitOpen(address) => state.open_circuits.push(address),
                    Event::CircuitClosed(address) => {
                        state.open_circuits.retain(|open| *open != address);
                    }
                    _ => continue,
                }
                self.count(*event);
            }
        }
        self.count_all(events);
    }
}

/// What the core picked for a stream, and the attempts Envoy made with it.
#[derive(Debug, Clone)]
pub struct Pick {
    /// The cluster (one LB config's picker) that picked: not kept alive by the stream. A
    /// stream that outlives its config (a long gRPC stream across a policy change) charges
    /// nobody at its end, so an old picker's tables are freed with the config and its
    /// circuit gauges, reset when the config went, stay reset.
    cluster: Weak<Cluster>,
    picked: SocketAddr,
    retry_targets: RetryTargets,
    /// The host of the last attempt; `None` when it is a host fulcrum cannot name (not
    /// `IP:port`), whose outcome is charged to nobody.
    last: Option<SocketAddr>,
    /// How many attempts chose a host (1 for the pick itself).
    attempts: u32,
    /// A `Set-Cookie` value for the response (a new sticky session or hash cookie).
    pub set_cookie: Option<String>,
}

impl Pick {
    /// The address the core picked.
    pub fn picked(&self) -> SocketAddr {
        self.picked
    }

    /// The host of the last attempt; `None` when it is not `IP:port` (a pipe, say, which
    /// Envoy's host set may hold beside the endpoints fulcrum picks).
    pub fn last(&self) -> Option<SocketAddr> {
        self.last
    }

    /// Who served the stream, relative to the pick: the last attempt's host and the attempt
    /// count, classified as for the wasm filter; `None` when the last attempt went to a host
    /// fulcrum cannot name, whose outcome is then charged to nobody.
    pub fn served(&self) -> Option<fulcrum_core::Served> {
        let last = self.last?;
        Some(fulcrum_core::Served::classify(
            self.picked,
            &self.retry_targets,
            Some(last),
            Some(u64::from(self.attempts)),
        ))
    }
}

/// How a stream's response went, as the outcome filter saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Response {
    /// The response's status (a gRPC response's status mapped to HTTP); `None` when no
    /// response came.
    pub status: Option<u16>,
    /// Envoy's response flags when they were read, else 0
    /// ([`fulcrum_core::Outcome::needs_response_flags`]).
    pub flags: u64,
    /// From the request's headers to the response's headers.
    pub latency: Duration,
    /// How much of its request the client had sent.
    pub request: RequestSent,
}

/// One request the outcome filter follows, from its request headers to its end.
#[derive(Debug)]
pub struct Stream {
    /// When the request's headers arrived.
    pub started: Duration,
    /// The downstream address, for a policy hashing on the source IP.
    pub source_ip: Option<IpAddr>,
    /// The pick, once `choose_host` made one.
    pub pick: Option<Pick>,
    /// Why `choose_host` answered no host, when it did.
    pub rejection: Option<Rejection>,
    /// Which of Envoy's requests chose for the stream first ([`RequestContext::chooser`]):
    /// only that request's attempts are the stream's.
    pub chooser: Option<usize>,
}

impl Stream {
    /// Charges the pick's end to its cluster's picker, once: the outcome goes to the host of
    /// the last attempt and, when that is one of the pick's retry targets, the pick is
    /// charged a retried-away failure (the core's `Served` classification).
    pub fn complete(&mut self, response: &Response, now: Duration) {
        if let Some(pick) = self.pick.take()
            && let Some(cluster) = pick.cluster.upgrade()
        {
            cluster.complete(&pick, response, now);
        }
    }
}

/// The streams one worker's outcome filter follows, by id.
///
/// Ids are a keyed hash of a counter (SipHash under the process's random keys, which
/// `RandomState` draws from the OS), not the counter: where a listener lacks the outcome
/// filter, a client-sent [`STREAM_HEADER`] reaches `choose_host` as it is, and must not be
/// able to name another request's open stream. Being keyed hashes already, they index the
/// table as they are ([`IdHasher`]): hashing them again cost three SipHash rounds per
/// request, and a client-sent id can only be looked up, never inserted, so it cannot crowd
/// the table.
#[derive(Debug, Default)]
pub struct Streams {
    next: u64,
    keys: RandomState,
    open: HashMap<u64, Stream, BuildHasherDefault<IdHasher>>,
}

/// The hasher of [`Streams`]' table: a stream id is its own hash.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` ids are hashed (`write_u64`); any other key folds its bytes in.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id;
    }
}

impl Streams {
    /// Opens a stream started at `now`; `None` when [`MAX_STREAMS`] are open.
    pub fn open(&mut self, now: Duration, source_ip: Option<IpAddr>) -> Option<u64> {
        if self.open.len() >= MAX_STREAMS {
            return None;
        }
        let id = loop {
            self.next = self.next.wrapping_add(1);
            let id = self.keys.hash_one(self.next);
            // Two ids of 64 random-looking bits collide about never; an open one is skipped.
            if !self.open.contains_key(&id) {
                break id;
            }
        };
        self.open.insert(
            id,
            Stream {
                started: now,
                source_ip,
                pick: None,
                rejection: None,
                chooser: None,
            },
        );
        Some(id)
    }

    /// The open stream `id`.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut Stream> {
        self.open.get_mut(&id)
    }

    /// Closes stream `id`, handing it back for its completion.
    pub fn close(&mut self, id: u64) -> Option<Stream> {
        self.open.remove(&id)
    }

    /// How many streams are open.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

/// What `choose_host` reads of the request (the LB context's callbacks).
pub trait RequestContext {
    /// The first value of downstream request header `name` (lower case).
    fn header(&self, name: &str) -> Option<String>;
    /// [`header`](Self::header) when at most `cap` bytes long, else `None`. An
    /// implementation should not copy a longer value.
    fn header_within(&self, name: &str, cap: usize) -> Option<String> {
        self.header(name).filter(|value| value.len() <= cap)
    }
    /// The stream the outcome filter named in [`STREAM_HEADER`] ([`parse_stream_id`]),
    /// `None` when absent or anything else. The filter appends its id after any copy a
    /// client sent, so the header's **last** value is the one to read; the default reads
    /// [`header`](Self::header), the first, and suits only requests that carry one. An
    /// implementation may read it without copying the value; it must parse exactly this way.
    fn stream_id(&self) -> Option<u64> {
        parse_stream_id(self.header(STREAM_HEADER)?.as_bytes())
    }
    /// Whether Envoy's retry predicates refuse host `index` of `priority` (a host already
    /// tried, for instance).
    fn refuses(&self, priority: u32, index: usize) -> bool;
    /// Which of Envoy's requests asks: the address of its LB context, one object (the
    /// router) across a request's retries and hedges, another for a request Envoy makes from
    /// it, such as a mirror, which carries its headers, [`STREAM_HEADER`] included. A
    /// context that only ever makes one request's attempts may keep the default.
    fn chooser(&self) -> usize {
        0
    }
}

/// One worker's load balancer over a shared [`Cluster`].
#[derive(Debug)]
pub struct WorkerLb {
    cluster: Arc<Cluster>,
    index: HostIndex,
    /// Rotates fail-open choices over the healthy hosts.
    spread: u64,
}

impl WorkerLb {
    /// A worker's LB over `cluster`, reading `hosts` now.
    pub fn new(cluster: Arc<Cluster>, hosts: &impl HostSet) -> Self {
        let mut lb = Self {
            cluster,
            index: HostIndex::default(),
            spread: 0,
        };
        lb.reread(hosts);
        lb
    }

    /// The cluster this LB picks for.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Rereads the worker's hosts and hands them to the shared picker if they changed.
    pub fn reread(&mut self, hosts: &impl HostSet) {
        let (endpoints, index) = read_hosts(hosts, self.cluster.policy());
        if index.truncated {
            self.cluster.count(Event::HostsTruncated);
        }
        self.index = index;
        self.cluster.update(endpoints);
    }

    /// Chooses the host for one attempt of a request: `(priority, index among the
    /// priority's healthy hosts)`, or `None` for no host (Envoy answers 503). `streams` are
    /// the worker's streams, `now` the clock every pick and outcome is measured on.
    pub fn choose(
        &mut self,
        hosts: &impl HostSet,
        request: &impl RequestContext,
        streams: &mut Streams,
        now: Duration,
    ) -> Option<(u32, usize)> {
        if self.index.is_stale(hosts) {
            self.reread(hosts);
        }
        let chooser = request.chooser();
        let mut stream = request
            .stream_id()
            .and_then(|id| streams.get_mut(id))
            // A mirror of the stream's request: its pick is not the stream's attempt.
            .filter(|stream| stream.chooser.is_none_or(|first| first == chooser));
        if let Some(stream) = stream.as_deref_mut() {
            stream.chooser = Some(chooser);
        }
        let Some(stream) = stream else {
            // No filter follows this request (or it is another request's mirror): pick, but
            // release the pick at once.
            let chosen = self.pick(hosts, request, None, now);
            return match chosen {
                Picked::Host { pick, place } => {
                    self.cluster.lock().picker.abandon(pick.picked);
                    self.cluster.count(Event::Unobserved);
                    Some(place)
                }
                Picked::Rejected(_) => None,
                Picked::FailOpen => self.fail_open(),
            };
        };
        if let Some(pick) = &mut stream.pick {
            return self.retry(hosts, pick, request);
        }
        match self.pick(hosts, request, Some(stream), now) {
            Picked::Host { pick, place } => {
                stream.pick = Some(*pick);
                Some(place)
            }
            Picked::Rejected(rejection) => {
                stream.rejection = Some(rejection);
                None
            }
            Picked::FailOpen => self.fail_open(),
        }
    }

    /// The first pick of a request.
    fn pick(
        &mut self,
        hosts: &impl HostSet,
        request: &impl RequestContext,
        stream: Option<&Stream>,
        now: Duration,
    ) -> Picked {
        let cluster = Arc::clone(&self.cluster);
        let inputs = RequestInputs::read(
            cluster.needs.borrowed(),
            // Longer than the core's cap reads as absent, as on the wasm filter.
            |name, which| request.header_within(name, which.cap()),
            || stream.and_then(|stream| stream.source_ip),
        );
        let picked = {
            let mut state = cluster.lock();
            let ClusterState { picker, rng, .. } = &mut *state;
            picker.pick(&inputs.attributes(), now, rng)
        };
        match picked {
            Ok(pick) => {
                let Some(place) = self.healthy_place(hosts, pick.endpoint) else {
                    // Not among this worker's healthy hosts (its view lags the picker's, or
                    // the picker's lagged Envoy's until this check reread the hosts).
                    cluster.lock().picker.abandon(pick.endpoint);
                    return Picked::FailOpen;
                };
                Picked::Host {
                    place,
                    pick: Box::new(Pick {
                        cluster: Arc::downgrade(&cluster),
                        picked: pick.endpoint,
                        retry_targets: pick.retry_targets,
                        last: Some(pick.endpoint),
                        attempts: 1,
                        set_cookie: pick.set_sticky_cookie,
                    }),
                }
            }
            Err(rejection) if rejection.fails_open() => Picked::FailOpen,
            Err(rejection) => {
                cluster.count(match rejection {
                    Rejection::RateLimited { .. } => Event::RateLimited,
                    _ => Event::FailFast,
                });
                Picked::Rejected(rejection)
            }
        }
    }

    /// A retry's host: the pick's first retry target Envoy does not refuse and this worker
    /// has healthy, else the pick again if Envoy accepts it, else a fail-open choice.
    fn retry(
        &mut self,
        hosts: &impl HostSet,
        pick: &mut Pick,
        request: &impl RequestContext,
    ) -> Option<(u32, usize)> {
        pick.attempts = pick.attempts.saturating_add(1);
        let candidates = pick
            .retry_targets
            .as_slice()
            .iter()
            .copied()
            .chain(std::iter::once(pick.picked));
        for address in candidates {
            let Some(slot) = self.healthy_slot(hosts, address) else {
                continue;
            };
            let Some(healthy_index) = slot.healthy_index else {
                continue;
            };
            if request.refuses(slot.priority, slot.index) {
                continue;
            }
            pick.last = Some(address);
            return Some((slot.priority, healthy_index));
        }
        let place = self.fail_open()?;
        // Read from Envoy: a host listed twice, or one that is not `IP:port`, has no place
        // of its own in the index.
        pick.last = hosts.healthy_endpoint(place.0, place.1);
        Some(place)
    }

    /// Where `address` is among this worker's healthy hosts.
    fn healthy_place(&mut self, hosts: &impl HostSet, address: SocketAddr) -> Option<(u32, usize)> {
        let slot = self.healthy_slot(hosts, address)?;
        Some((slot.priority, slot.healthy_index?))
    }

    /// `address`'s slot when it is healthy, checked against Envoy's list: a health change
    /// that leaves every priority's healthy count as it was (one host down and another up
    /// between two picks; Envoy calls no hook for health) is invisible to
    /// [`HostIndex::is_stale`], so a place the index gives must still hold `address` (one
    /// ABI read), or the worker rereads its hosts and looks again.
    fn healthy_slot(&mut self, hosts: &impl HostSet, address: SocketAddr) -> Option<HostSlot> {
        let (slot, text) = self.index.get_with_text(address)?;
        let healthy_index = slot.healthy_index?;
        if hosts.healthy_address_is(slot.priority, healthy_index, text) {
            return Some(slot);
        }
        self.reread(hosts);
        self.index
            .get(address)
            .filter(|slot| slot.healthy_index.is_some())
    }

    /// A healthy host by rotation, counted as a fail-open; `None` without one.
    pub fn fail_open(&mut self) -> Option<(u32, usize)> {
        self.cluster.count(Event::FailOpen);
        self.spread = self.spread.wrapping_add(1);
        self.index.first_healthy(self.spread)
    }
}

/// What the first `choose_host` of a request came to.
enum Picked {
    /// The core's pick, at this place among the worker's healthy hosts.
    Host {
        pick: Box<Pick>,
        place: (u32, usize),
    },
    /// The core refused the request (rate limit, or fail fast).
    Rejected(Rejection),
    /// Envoy's choice, not fulcrum's.
    FailOpen,
}

/// [`RequestNeeds`], owned: what a cluster's policy reads of each request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Needs {
    hash_header: Option<String>,
    hash_cookie: Option<String>,
    source_ip: bool,
    sticky_cookie: Option<String>,
    client_key_header: Option<String>,
}

impl Needs {
    /// The needs as the core states them, borrowed from these.
    fn borrowed(&self) -> RequestNeeds<'_> {
        RequestNeeds {
            hash_header: self.hash_header.as_deref(),
            hash_cookie: self.hash_cookie.as_deref(),
            source_ip: self.source_ip,
            sticky_cookie: self.sticky_cookie.as_deref(),
            client_key_header: self.client_key_header.as_deref(),
        }
    }

    fn of(needs: RequestNeeds<'_>) -> Self {
        Self {
            hash_header: needs.hash_header.map(str::to_owned),
            hash_cookie: needs.hash_cookie.map(str::to_owned),
            source_ip: needs.source_ip,
            sticky_cookie: needs.sticky_cookie.map(str::to_owned),
            client_key_header: needs.client_key_header.map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::parse_policy,
        hosts::test_hosts::{Claiming, TestHost, TestHosts},
    };

    /// Every event counted, in order.
    type Events = Arc<Mutex<Vec<Event>>>;

    #[derive(Debug, Default)]
    struct Counted(Events);

    impl Counters for Counted {
        fn count(&self, event: Event) {
            self.0.lock().expect("events").push(event);
        }
    }

    fn counted(events: &Events, event: Event) -> usize {
        let events = events.lock().expect("events");
        events.iter().filter(|counted| **counted == event).count()
    }

    struct Request {
        headers: Vec<(&'static str, String)>,
        refused: Vec<(u32, usize)>,
        chooser: usize,
    }

    impl Request {
        fn of_stream(id: Option<u64>) -> Self {
            Self {
                headers: id
                    .map(|id| {
                        let mut digits = [0; STREAM_ID_DIGITS];
                        (STREAM_HEADER, stream_id_text(id, &mut digits).to_owned())
                    })
                    .into_iter()
                    .collect(),
                refused: Vec::new(),
                chooser: 0,
            }
        }
    }

    impl RequestContext for Request {
        fn header(&self, name: &str) -> Option<String> {
            self.headers
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.clone())
        }
        fn refuses(&self, priority: u32, index: usize) -> bool {
            self.refused.contains(&(priority, index))
        }
        fn chooser(&self) -> usize {
            self.chooser
        }
    }

    fn three_hosts() -> TestHosts {
        TestHosts::one_priority(vec![
            TestHost::healthy("10.0.0.1:80"),
            TestHost::healthy("10.0.0.2:80"),
            TestHost::healthy("10.0.0.3:80"),
        ])
    }

    fn worker(json: &str, hosts: &TestHosts) -> (WorkerLb, Events) {
        let counts = Events::default();
        let policy = parse_policy(json.as_bytes()).expect("a valid policy");
        let cluster = Arc::new(Cluster::new(policy, 7, Box::new(Counted(counts.clone()))));
        (WorkerLb::new(cluster, hosts), counts)
    }

    #[test]
    fn a_worker_that_cuts_the_clusters_hosts_at_the_cap_counts_it() {
        let policy = parse_policy(b"{}").expect("a valid policy");
        let events = Events::default();
        let cluster = Arc::new(Cluster::new(policy, 7, Box::new(Counted(events.clone()))));
        let beyond_the_cap = Claiming {
            hosts: three_hosts(),
            count: crate::hosts::MAX_HOSTS + 1,
        };

        let _worker = WorkerLb::new(cluster, &beyond_the_cap);

        assert_eq!(counted(&events, Event::HostsTruncated), 1);
        let (_, events) = worker("{}", &three_hosts());
        assert_eq!(counted(&events, Event::HostsTruncated), 0);
    }

    fn inflight(worker: &WorkerLb) -> u32 {
        worker
            .cluster()
            .with_picker(|picker| picker.endpoints().map(|view| view.inflight).sum())
    }

    #[test]
    fn a_retry_goes_to_the_picks_first_retry_target_envoy_accepts() {
        let hosts = three_hosts();
        let (mut worker, _) = worker(
            r#"{"load_balancer": {"type": "round_robin"}, "retry": 2}"#,
            &hosts,
        );
        let mut streams = Streams::default();
        let id = streams.open(Duration::ZERO, None);
        let mut request = Request::of_stream(id);

        let first = worker.choose(&hosts, &request, &mut streams, Duration::ZERO);
        assert_eq!(first, Some((0, 0)));
        // Envoy refuses the first retry target (already tried, say): the second is taken.
        request.refused.push((0, 1));
        let retry = worker.choose(&hosts, &request, &mut streams, Duration::ZERO);

        assert_eq!(retry, Some((0, 2)));
        let pick = streams
            .get_mut(id.expect("open"))
            .and_then(|stream| stream.pick.clone())
            .expect("the stream's pick");
        assert_eq!(
            pick.last(),
            Some("10.0.0.3:80".parse().expect("an address"))
        );
        assert_eq!(
            inflight(&worker),
            1,
            "one pick per stream, however many attempts"
        );
    }

    #[test]
    fn a_mirror_carrying_the_streams_id_picks_unobserved_and_leaves_the_streams_pick_alone() {
        let hosts = three_hosts();
        let (mut worker, counts) = worker(
            r#"{"load_balancer": {"type": "round_robin"}, "retry": 2}"#,
            &hosts,
        );
        let mut streams = Streams::default();
        let id = streams.open(Duration::ZERO, None);
        let request = Request::of_stream(id);
        // Envoy's shadow of the request: its headers, another LB context.
        let mirror = Request {
            chooser: 1,
            ..Request::of_stream(id)
        };

        let first = worker.choose(&hosts, &request, &mut streams, Duration::ZERO);
        let mirrored = worker.choose(&hosts, &mirror, &mut streams, Duration::ZERO);
        let retry = worker.choose(&hosts, &request, &mut streams, Duration::ZERO);

        assert_eq!(first, Some((0, 0)));
        assert!(mirrored.is_some(), "the mirror is balanced too");
        assert_eq!(
            retry,
            Some((0, 1)),
            "the request's retry still has its first target"
        );
        let pick = streams
            .get_mut(id.expect("open"))
            .and_then(|stream| stream.pick.clone())
            .expect("the stream's pick");
        assert_eq!(
            pick.last(),
            Some("10.0.0.2:80".parse().expect("an address"))
        );
        assert_eq!(counted(&counts, Event::Unobserved), 1, "the mirror's pick");
        assert_eq!(
            inflight(&worker),
            1,
            "the mirror's pick is released at once"
        );
    }

    #[test]
    fn a_pick_no_filter_follows_is_released_at_once_and_counted() {
        let hosts = three_hosts();
        let (mut worker, counts) =
            worker(r#"{"load_balancer": {"type": "least_request"}}"#, &hosts);
        let mut streams = Streams::default();

        let chosen = worker.choose(
            &hosts,
            &Request::of_stream(None),
            &mut streams,
            Duration::ZERO,
        );

        assert!(chosen.is_some());
        assert_eq!(inflight(&worker), 0);
        assert_eq!(counted(&counts, Event::Unobserved), 1);
    }

    #[test]
    fn a_completed_stream_releases_its_pick() {
        let hosts = three_hosts();
        let (mut worker, _) = worker(r#"{"load_balancer": {"type": "least_request"}}"#, &hosts);
        let mut streams = Streams::default();
        let id = picked_stream(&mut worker, &hosts, &mut streams, Duration::ZERO);
        assert_eq!(inflight(&worker), 1);

        let mut stream = streams.close(id).expect("open");
        stream.complete(
            &Response {
                status: Some(200),
                flags: 0,
                latency: Duration::from_millis(3),
                request: RequestSent::Whole,
            },
            Duration::from_millis(3),
        );

        assert_eq!(inflight(&worker), 0);
    }

    #[test]
    fn a_stream_that_outlives_its_cluster_keeps_nothing_alive_and_charges_nobody() {
        let hosts = three_hosts();
        let policy = r#"{"outlier_detection": {"consecutive_failures": 1}}"#;
        let (mut worker, counts) = worker(policy, &hosts);
        let mut streams = Streams::default();
        let id = picked_stream(&mut worker, &hosts, &mut streams, Duration::ZERO);
        let cluster = Arc::downgrade(worker.cluster());

        // Envoy replaces the LB config (a policy change): its workers' LBs go.
        drop(worker);
        assert!(
            cluster.upgrade().is_none(),
            "the open stream holds the old picker"
        );

        let mut stream = streams.close(id).expect("open");
        stream.complete(
            &Response {
                status: Some(503),
                flags: 0,
                latency: Duration::from_millis(3),
                request: RequestSent::Whole,
            },
            Duration::from_millis(3),
        );
        assert!(counts.lock().expect("events").is_empty(), "nothing counted");
    }

    #[test]
    fn a_cookie_header_beyond_8_kib_reads_as_no_cookie_as_on_the_wasm_filter() {
        let hosts = three_hosts();
        let (mut worker, _) = worker(
            r#"{"load_balancer": {"type": "sticky", "cookie": "session"}}"#,
            &hosts,
        );
        let mut streams = Streams::default();
        let mut session_of = |cookie: Option<String>| {
            let id = streams.open(Duration::ZERO, None).expect("open");
            let mut request = Request::of_stream(Some(id));
            request
                .headers
                .extend(cookie.map(|cookie| ("cookie", cookie)));
            worker.choose(&hosts, &request, &mut streams, Duration::ZERO);
            let mut stream = streams.close(id).expect("open");
            let cookie = stream.pick.as_mut().and_then(|pick| pick.set_cookie.take());
            stream.complete(&Response::default(), Duration::ZERO);
            cookie
        };
        let set_cookie = session_of(None).expect("a new session");
        let session = set_cookie.split(';').next().expect("name=value").to_owned();

        let within = session_of(Some(format!("pad={}; {session}", "a".repeat(1 << 10))));
        let beyond = session_of(Some(format!("pad={}; {session}", "a".repeat(9 << 10))));

        assert_eq!(within, None, "the session is kept");
        assert!(
            beyond.is_some(),
            "a longer header is no cookie: a new session"
        );
    }

    #[test]
    fn a_rate_limited_request_gets_no_host_and_its_stream_keeps_the_reason() {
        let hosts = three_hosts();
        let (mut worker, counts) = worker(
            r#"{"rate_limit": {"requests_per_second": 1, "burst": 1}}"#,
            &hosts,
        );
        let mut streams = Streams::default();
        let mut choose = |streams: &mut Streams| {
            let id = streams.open(Duration::ZERO, None).expect("open");
            let chosen = worker.choose(
                &hosts,
                &Request::of_stream(Some(id)),
                streams,
                Duration::ZERO,
            );
            (id, chosen)
        };

        let (_, admitted) = choose(&mut streams);
        let (refused_id, refused) = choose(&mut streams);

        assert!(admitted.is_some());
        assert_eq!(refused, None);
        assert!(matches!(
            streams.get_mut(refused_id).and_then(|s| s.rejection),
            Some(Rejection::RateLimited { .. })
        ));
        assert_eq!(counted(&counts, Event::RateLimited), 1);
    }

    #[test]
    fn a_host_turning_unhealthy_is_reread_before_the_next_pick() {
        let mut hosts = three_hosts();
        let (mut worker, _) = worker(r#"{"load_balancer": {"type": "round_robin"}}"#, &hosts);
        hosts.priorities[0][0].healthy = false;
        let mut streams = Streams::default();

        let picked: Vec<_> = (0..4)
            .map(|_| {
                let place = worker
                    .choose(
                        &hosts,
                        &Request::of_stream(None),
                        &mut streams,
                        Duration::ZERO,
                    )
                    .expect("a host");
                hosts.healthy_address(place.0, place.1).expect("healthy")
            })
            .collect();

        assert!(
            picked.iter().all(|address| address != "10.0.0.1:80"),
            "{picked:?}"
        );
    }

    #[test]
    fn a_health_change_that_keeps_every_healthy_count_is_seen_before_the_next_pick() {
        let mut hosts = three_hosts();
        hosts.priorities[0][1].healthy = false;
        let (mut worker, counts) = worker(r#"{"load_balancer": {"type": "round_robin"}}"#, &hosts);
        // One host goes down and another comes up between two picks: Envoy calls no hook,
        // and the priority still has two healthy hosts.
        hosts.priorities[0][0].healthy = false;
        hosts.priorities[0][1].healthy = true;
        let mut streams = Streams::default();

        let mut picked = Vec::new();
        for _ in 0..4 {
            let id = streams.open(Duration::ZERO, None).expect("open");
            let place = worker
                .choose(
                    &hosts,
                    &Request::of_stream(Some(id)),
                    &mut streams,
                    Duration::ZERO,
                )
                .expect("a host");
            let envoys = hosts.healthy_endpoint(place.0, place.1);
            // A pick made on the stale view fails open, once.
            let mut stream = streams.close(id).expect("open");
            if let Some(pick) = &stream.pick {
                assert_eq!(
                    pick.last(),
                    envoys,
                    "the host Envoy uses is the one charged"
                );
                picked.push(pick.picked());
            }
            stream.complete(&Response::default(), Duration::ZERO);
        }

        assert!(counted(&counts, Event::FailOpen) <= 1);
        assert!(picked.len() >= 3);
        let down: SocketAddr = "10.0.0.1:80".parse().expect("an address");
        assert!(!picked.contains(&down), "{picked:?}");
        assert_eq!(inflight(&worker), 0);
    }

    #[test]
    fn a_removed_host_leaves_the_shared_picker_and_its_pending_pick_completes_harmlessly() {
        let mut hosts = three_hosts();
        let (mut worker, _) = worker(r#"{"load_balancer": {"type": "round_robin"}}"#, &hosts);
        let mut streams = Streams::default();
        let id = picked_stream(&mut worker, &hosts, &mut streams, Duration::ZERO);

        hosts.priorities[0].remove(0);
        worker.reread(&hosts);
        let remaining = worker
            .cluster()
            .with_picker(|picker| picker.endpoints().len());
        let mut stream = streams.close(id).expect("open");
        stream.complete(&Response::default(), Duration::from_millis(1));

        assert_eq!(remaining, 2);
        assert_eq!(inflight(&worker), 0);
    }

    /// Hosts whose first priority holds `first` twice, healthy, and whose second holds the
    /// only `canary`, which a policy selecting that tag always picks; and a stream picked on
    /// the canary whose retry Envoy refuses everywhere, so it fails open by rotation onto the
    /// second host of the first priority. Its chosen place, and the stream.
    fn retry_failing_open_onto_the_second_of(
        first: &str,
    ) -> (Option<(u32, usize)>, Stream, WorkerLb) {
        let mut canary = TestHost::healthy("10.0.0.2:80");
        canary
            .metadata
            .insert("tags_csv".to_owned(), "canary".to_owned());
        let hosts = TestHosts {
            priorities: vec![
                vec![TestHost::healthy(first), TestHost::healthy(first)],
                vec![canary],
            ],
        };
        let (mut worker, _) = worker(
            r#"{"load_balancer": {"type": "round_robin"},
                "endpoint_selector": {"tags": ["canary"]},
                "outlier_detection": {"consecutive_failures": 5}}"#,
            &hosts,
        );
        let mut streams = Streams::default();
        let id = streams.open(Duration::ZERO, None).expect("open");
        let mut request = Request::of_stream(Some(id));
        let first_attempt = worker.choose(&hosts, &request, &mut streams, Duration::ZERO);
        assert_eq!(first_attempt, Some((1, 0)), "the canary");
        request.refused = vec![(0, 0), (0, 1), (1, 0)];

        let retry = worker.choose(&hosts, &request, &mut streams, Duration::ZERO);

        (retry, streams.close(id).expect("open"), worker)
    }

    #[test]
    fn a_retry_failing_open_onto_a_duplicate_address_is_charged_to_that_address() {
        let (retry, stream, _worker) = retry_failing_open_onto_the_second_of("10.0.0.1:80");

        assert_eq!(retry, Some((0, 1)));
        let pick = stream.pick.expect("the stream's pick");
        assert_eq!(
            pick.last(),
            Some("10.0.0.1:80".parse().expect("an address")),
            "Envoy sends the retry to 10.0.0.1:80, listed twice"
        );
    }

    #[test]
    fn a_retry_failing_open_onto_a_host_that_is_not_an_address_charges_nobody() {
        let (retry, mut stream, worker) =
            retry_failing_open_onto_the_second_of("/tmp/upstream.sock");
        assert_eq!(retry, Some((0, 1)));
        let cluster = Arc::clone(worker.cluster());

        stream.complete(
            &Response {
                status: Some(503),
                flags: 0,
                latency: Duration::from_millis(1),
                request: RequestSent::Whole,
            },
            Duration::from_millis(1),
        );

        assert!(
            !cluster.with_picker(|picker| picker.knows_of_failures()),
            "the pipe's 503 is not the canary's"
        );
        assert_eq!(
            cluster.with_picker(|picker| picker.endpoints().map(|view| view.inflight).sum::<u32>()),
            0
        );
    }

    #[test]
    fn no_healthy_host_fails_open_to_no_host() {
        let mut hosts = three_hosts();
        for host in &mut hosts.priorities[0] {
            host.healthy = false;
        }
        let (mut worker, counts) = worker("", &hosts);
        let mut streams = Streams::default();

        let chosen = worker.choose(
            &hosts,
            &Request::of_stream(None),
            &mut streams,
            Duration::ZERO,
        );

        assert_eq!(chosen, None);
        assert_eq!(counted(&counts, Event::FailOpen), 1);
    }

    /// A stream opened at `now` and picked for by `worker`: its id.
    fn picked_stream(
        worker: &mut WorkerLb,
        hosts: &TestHosts,
        streams: &mut Streams,
        now: Duration,
    ) -> u64 {
        let id = streams.open(now, None).expect("open");
        worker.choose(hosts, &Request::of_stream(Some(id)), streams, now);
        id
    }

    /// Picks and answers one request with `status`.
    fn answer(worker: &mut WorkerLb, hosts: &TestHosts, status: u16, now: Duration) {
        let mut streams = Streams::default();
        let id = picked_stream(worker, hosts, &mut streams, now);
        let mut stream = streams.close(id).expect("open");
        stream.complete(
            &Response {
                status: Some(status),
                flags: 0,
                latency: Duration::from_millis(1),
                request: RequestSent::Whole,
            },
            now,
        );
    }

    #[test]
    fn an_ejection_is_counted_once_and_its_circuit_closes_when_the_endpoint_leaves() {
        let one = TestHosts::one_priority(vec![TestHost::healthy("10.0.0.1:80")]);
        let (mut worker, counts) = worker(
            r#"{"outlier_detection": {"consecutive_failures": 2, "base_ejection_time": "30s", "max_ejection_percent": 100}}"#,
            &one,
        );
        let endpoint: SocketAddr = "10.0.0.1:80".parse().expect("an address");

        answer(&mut worker, &one, 503, Duration::from_millis(1));
        assert!(
            counts.lock().expect("events").is_empty(),
            "one failure ejects nobody"
        );
        answer(&mut worker, &one, 503, Duration::from_millis(2));

        assert_eq!(counted(&counts, Event::Ejected(endpoint)), 1);
        assert_eq!(counted(&counts, Event::CircuitOpen(endpoint)), 1);
        assert_eq!(counted(&counts, Event::CircuitClosed(endpoint)), 0);

        let other = TestHosts::one_priority(vec![TestHost::healthy("10.0.0.2:80")]);
        worker.reread(&other);
        assert_eq!(
            counted(&counts, Event::CircuitClosed(endpoint)),
            1,
            "an endpoint that left with its circuit open takes its gauge back to 0"
        );
        worker.reread(&one);
        worker.reread(&other);
        assert_eq!(
            counted(&counts, Event::CircuitClosed(endpoint)),
            1,
            "a circuit is closed once: the endpoint came back closed"
        );
    }

    #[test]
    fn a_transition_makes_the_wasm_filters_events() {
        let endpoint: SocketAddr = "10.0.0.1:80".parse().expect("an address");
        let closed = BreakerState::Closed {
            ejections: 0,
            since: Duration::ZERO,
        };
        let open = BreakerState::Open {
            until: Duration::from_secs(30),
            ejections: 1,
        };
        let half_open = BreakerState::HalfOpen {
            ejections: 1,
            probes_admitted: 0,
            successes: 0,
            since: Duration::ZERO,
        };
        let events = |from, to| {
            let mut events = Vec::new();
            Event::of_transition(&Transition { endpoint, from, to }, &mut events);
            events
        };

        assert_eq!(
            events(closed, open),
            [Event::Ejected(endpoint), Event::CircuitOpen(endpoint)]
        );
        assert_eq!(events(open, half_open), []);
        assert_eq!(
            events(half_open, open),
            [Event::Ejected(endpoint)],
            "a failed probe re-ejects: counted, the circuit stays open"
        );
        assert_eq!(events(half_open, closed), [Event::CircuitClosed(endpoint)]);
    }

    #[test]
    fn endpoint_series_stop_growing_at_the_cap_but_known_endpoints_keep_theirs() {
        let mut series = EndpointSeries::default();
        let address =
            |i: usize| SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 80));
        for i in 0..MAX_ENDPOINT_SERIES {
            assert!(series.admits(address(i)));
        }
        assert!(
            !series.admits(address(MAX_ENDPOINT_SERIES)),
            "a new one past the cap"
        );
        assert!(series.admits(address(0)), "a known one keeps its series");
    }
}
