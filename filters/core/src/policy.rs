//! The balancing policy: what the operator writes, per service, and its defaults.
//!
//! Named after Istio's `DestinationRule.trafficPolicy` where the concept matches
//! (`loadBalancer`, `localityLbSetting`, `outlierDetection`), in snake_case JSON (YAML with
//! the `yaml` feature). Every struct rejects unknown fields so a typo is an error, not a
//! silently ignored setting; every field has a default, so `{}` is a valid policy. Durations
//! are human strings (see [`crate::duration`]). Ranges are checked by
//! [`Policy::validate`](crate::validate); `docs/policy.md` lists the whole schema and the
//! mapping from DestinationRule.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Policies for every service the filter balances.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Per-service policies keyed by service (Envoy cluster) name.
    pub services: BTreeMap<String, ServicePolicy>,
    /// The policy for services not listed in `services`.
    pub default: ServicePolicy,
}

impl Policy {
    /// The policy that applies to `service`: its own entry, else `default`.
    pub fn for_service(&self, service: &str) -> &ServicePolicy {
        self.services.get(service).unwrap_or(&self.default)
    }

    /// The policy as a proxy in `zone` applies it: every service policy (and the default)
    /// without a `locality.local_zone` of its own takes `zone`; one that names a zone keeps
    /// it, so the policy's value overrides the proxy's. The filter calls this with the zone of
    /// its Envoy node (Istio sets it from the pod's node labels), since one policy reaches
    /// every proxy of the mesh and cannot know where each runs.
    pub fn in_zone(mut self, zone: &str) -> Self {
        for service in std::iter::once(&mut self.default).chain(self.services.values_mut()) {
            service
                .locality
                .local_zone
                .get_or_insert_with(|| zone.to_owned());
        }
        self
    }

    /// The policy as a proxy in `region` applies it: like [`Policy::in_zone`], every service
    /// policy without a `locality.local_region` of its own takes `region`, one that names a
    /// region keeps it. The filter calls this with the region of its Envoy node.
    pub fn in_region(mut self, region: &str) -> Self {
        for service in std::iter::once(&mut self.default).chain(self.services.values_mut()) {
            service
                .locality
                .local_region
                .get_or_insert_with(|| region.to_owned());
        }
        self
    }
}

/// How one service's requests are spread, filtered, protected and limited.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct ServicePolicy {
    /// The selection algorithm. Default: least request, power of two choices (Istio's default).
    pub load_balancer: LoadBalancer,
    /// Which endpoints may serve this service at all. Default: every endpoint.
    pub endpoint_selector: EndpointSelector,
    /// Zone preference and failover. Default: no preference.
    pub locality: Locality,
    /// Per-endpoint circuit breaking. Default: eject after 5 consecutive failures for 30s.
    pub outlier_detection: OutlierDetection,
    /// Which outcomes count as failures. Default: any 5xx, connect failure, reset, timeout.
    pub failure_kinds: FailureKinds,
    /// What to do when no endpoint is admissible. Default: `fail_open`.
    pub on_no_endpoint: OnNoEndpoint,
    /// Optional token-bucket rate limit. Default: none.
    pub rate_limit: Option<RateLimit>,
    /// How many extra, distinct endpoints to hand Envoy as retry targets (0..=5). Default: 0.
    pub retry: u32,
    /// Ramp an endpoint that joins, turns healthy or returns from an ejection up to its full
    /// share instead of giving it that share at once. Default: none (full share at once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<SlowStart>,
    /// Active health check the control plane runs against every endpoint of the service,
    /// whatever its source; endpoints failing it are published unhealthy. The filter ignores
    /// this field. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Where this policy runs: the proxy-wasm filter (`wasm`, default) or the native Envoy
    /// load-balancing module (`native`), which the control plane then configures as the
    /// service's cluster policy; the wasm filter leaves a `native` service alone. Left out
    /// of the JSON when `wasm`, so filters of releases without the field accept the policy.
    #[serde(skip_serializing_if = "DataPlane::is_wasm")]
    pub data_plane: DataPlane,
}

impl ServicePolicy {
    /// Whether `other` selects, protects and limits exactly like `self`: every field but
    /// `health_check`, which only the control plane acts on. A filter keeps a service's
    /// balancing state (breakers, latency estimates, in-flight counts) across a policy change
    /// for which this holds.
    pub fn same_selection(&self, other: &Self) -> bool {
        // Destructured so a new field must be placed on one side or the other.
        let Self {
            load_balancer,
            endpoint_selector,
            locality,
            outlier_detection,
            failure_kinds,
            on_no_endpoint,
            rate_limit,
            retry,
            slow_start,
            health_check: _,
            data_plane,
        } = self;
        *load_balancer == other.load_balancer
            && *endpoint_selector == other.endpoint_selector
            && *locality == other.locality
            && *outlier_detection == other.outlier_detection
            && *failure_kinds == other.failure_kinds
            && *on_no_endpoint == other.on_no_endpoint
            && *rate_limit == other.rate_limit
            && *retry == other.retry
            && *slow_start == other.slow_start
            && *data_plane == other.data_plane
    }
}

/// Slow start (Envoy's `slow_start_config`): an endpoint that joins the service, turns
/// healthy, or closes after an ejection gets `max(min_weight_percent / 100,
/// (elapsed / window)^(1 / aggression))` of the share the algorithm would give it, from its
/// first pick until `window` has passed. Applies to every algorithm but `ring_hash` and
/// `maglev`, whose point is that a key keeps its endpoint. The endpoints present when a
/// service first appears start at full share: they all start together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct SlowStart {
    /// How long the ramp lasts, 1s..=1h. Default: `"30s"`.
    #[cfg_attr(feature = "schema", schemars(with = "crate::duration::HumanDuration"))]
    #[serde(with = "crate::duration")]
    pub window: Duration,
    /// The ramp's shape, 0.1..=10: 1 is linear, above 1 gives more traffic early.
    /// Default: 1.
    pub aggression: f64,
    /// The share never starts below this percent of the full one, 1..=100. Default: 10.
    pub min_weight_percent: u32,
}

impl Default for SlowStart {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(30),
            aggression: 1.0,
            min_weight_percent: 10,
        }
    }
}

impl SlowStart {
    /// The fraction of its full share an endpoint warming up for `elapsed` gets, in
    /// `min_weight_percent / 100 ..= 1`.
    pub fn factor(&self, elapsed: Duration) -> f64 {
        let floor = f64::from(self.min_weight_percent.clamp(1, 100)) / 100.0;
        if elapsed >= self.window || self.window.is_zero() {
            return 1.0;
        }
        let aggression = if self.aggression.is_finite() && self.aggression > 0.0 {
            self.aggression
        } else {
            1.0
        };
        let progress = elapsed.as_secs_f64() / self.window.as_secs_f64();
        progress.powf(1.0 / aggression).clamp(floor, 1.0)
    }
}

/// The selection algorithm, tagged by `type` (e.g. `{"type": "least_request"}`).
// The algorithms without settings are empty struct variants, not unit variants: serde ignores
// every field next to the tag of a unit variant whatever `deny_unknown_fields` says, so
// `{"type": "round_robin", "choice_count": 2}` was accepted and the typo lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LoadBalancer {
    /// Each admissible endpoint in turn, ignoring weights (Istio `simple: ROUND_ROBIN`
    /// without weights).
    RoundRobin {},
    /// Weighted round robin by earliest deadline first, as Envoy's: deterministic; any `W`
    /// consecutive picks serve each endpoint exactly its weight.
    WeightedRoundRobin {},
    /// Random, proportional to weight (Istio `simple: RANDOM` with weights).
    WeightedRandom {},
    /// Least active requests (Istio `simple: LEAST_REQUEST`, Envoy `LEAST_REQUEST`).
    LeastRequest(LeastRequest),
    /// Peak-sensitive EWMA of latency × (inflight + 1), power of two choices (Linkerd, tower).
    PeakEwma(PeakEwma),
    /// Lowest health score of latency, inflight and recent failures, power of two choices.
    HealthScore(HealthScore),
    /// Consistent hashing on a ring (Istio `consistentHash.ringHash`, Envoy `RING_HASH`).
    RingHash(RingHash),
    /// Consistent hashing with a Maglev table (Istio `consistentHash.maglev`, Envoy `MAGLEV`).
    Maglev(Maglev),
    /// Sticky sessions by an opaque cookie; new sessions use `fallback`.
    Sticky(Sticky),
}

impl Default for LoadBalancer {
    fn default() -> Self {
        Self::LeastRequest(LeastRequest::default())
    }
}

/// Least request: Envoy's algorithm.
///
/// With equal weights, sample `choice_count` admissible endpoints and take the one with the
/// fewest active requests. With unequal weights, pick proportionally to
/// `weight / (active + 1)^active_request_bias`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct LeastRequest {
    /// Endpoints sampled per pick, 2..=16. Default: 2.
    pub choice_count: u32,
    /// Exponent on active requests for weighted picks, 0.0..=10.0. Default: 1.0.
    pub active_request_bias: f64,
}

impl Default for LeastRequest {
    fn default() -> Self {
        Self {
            choice_count: 2,
            active_request_bias: 1.0,
        }
    }
}

/// Peak EWMA: prefers the endpoint with the lowest `rtt_estimate × (inflight + 1)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct PeakEwma {
    /// Time constant of the exponential decay, 1ms..=1h. Default: `"10s"`.
    #[cfg_attr(feature = "schema", schemars(with = "crate::duration::HumanDuration"))]
    #[serde(with = "crate::duration")]
    pub decay: Duration,
    /// Estimate for an endpoint with no sample yet, 1ms..=1h. Default: `"30ms"`.
    #[cfg_attr(feature = "schema", schemars(with = "crate::duration::HumanDuration"))]
    #[serde(with = "crate::duration")]
    pub default_rtt: Duration,
    /// A failed response makes the estimate at least this, so fast errors do not look fast;
    /// 0..=1h. Default: `"500ms"`.
    #[cfg_attr(feature = "schema", schemars(with = "crate::duration::HumanDuration"))]
    #[serde(with = "crate::duration")]
    pub failure_penalty: Duration,
    /// Time constant in which a failure's penalty wears off, 1ms..=1h, apart from the latency
    /// estimate (which decays with `decay`): an endpoint that keeps failing keeps its penalty,
    /// one that stopped is back among its peers in a few of these, not in minutes. Default:
    /// `"1s"`; serialized only when set otherwise, so older filters read default policies.
    #[cfg_attr(feature = "schema", schemars(with = "crate::duration::HumanDuration"))]
    #[serde(
        with = "crate::duration",
        skip_serializing_if = "PeakEwma::is_default_penalty_decay"
    )]
    pub failure_penalty_decay: Duration,
    /// Time constant in which a latency peak wears off, 1ms..=1h, apart from the blended
    /// estimate: a peak (three slow answers in a row) holds an endpoint back
    /// at once, and an isolated stall does not hold it back for tens of seconds. Default:
    /// `"1s"`; serialized only when set otherwise.
    #[cfg_attr(feature = "schema", schemars(with = "crate::duration::HumanDuration"))]
    #[serde(
        with = "crate::duration",
        skip_serializing_if = "PeakEwma::is_default_peak_decay"
    )]
    pub peak_decay: Duration,
    /// How close two endpoints' estimates must be to count as equal, when the pick between
    /// them goes to the one with fewer requests in flight, then to chance. Default:
    /// `{"difference": "1ms", "percent": 20}`; serialized only when set otherwise, so older
    /// filters read default policies.
    #[serde(skip_serializing_if = "LatencyTolerance::is_default")]
    pub tolerance: LatencyTolerance,
}

impl PeakEwma {
    const DEFAULT_PENALTY_DECAY: Duration = Duration::from_secs(1);

    fn is_default_penalty_decay(decay: &Duration) -> bool {
        *decay == Self::DEFAULT_PENALTY_DECAY
    }

    const DEFAULT_PEAK_DECAY: Duration = Duration::from_secs(1);

    fn is_default_peak_decay(decay: &Duration) -> bool {
        *decay == Self::DEFAULT_PEAK_DECAY
    }
}

/// When two latency estimates count as equal: they differ by at most `difference`, or by at
/// most `percent` % of the lower one.
///
/// At low concurrency nothing is in flight anywhere and the estimates alone decide every
/// comparison: without a tolerance, equal endpoints' noise (a few microseconds, or a stall
/// one of them happened to hit) hands the lowest estimate every comparison it is drawn into,
/// and shares stray far from equal (measured on real Envoy at one connection: one endpoint
/// of four at 40 %). The default matches the relative-latency rule's `minimum_difference`:
/// what that rule will not call slow, the pick does not avoid either. `{"difference": "0s",
/// "percent": 0}` compares estimates exactly, as tower does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct LatencyTolerance {
    /// Estimates at most this far apart are equal, 0s..=1h. Default: `"1ms"`.
    #[cfg_attr(feature = "schema", schemars(with = "crate::duration::HumanDuration"))]
    #[serde(with = "crate::duration")]
    pub difference: Duration,
    /// Estimates at most this percentage of the lower one apart are equal, 0..=1000.
    /// Default: 20.
    pub percent: u32,
}

impl LatencyTolerance {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Whether estimates `a` and `b` (nanoseconds) count as equal.
    pub fn equal(&self, a: f64, b: f64) -> bool {
        let lower = a.min(b);
        let apart = (a - b).abs();
        apart <= crate::duration::nanos_f64(self.difference)
            || apart * 100.0 <= lower * f64::from(self.percent)
    }
}

impl Default for LatencyTolerance {
    fn default() -> Self {
        Self {
            difference: Duration::from_millis(1),
            percent: 20,
        }
    }
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
            failure_penalty: Duration::from_millis(500),
            failure_penalty_decay: Self::DEFAULT_PENALTY_DECAY,
            peak_decay: Self::DEFAULT_PEAK_DECAY,
            tolerance: LatencyTolerance::default(),
        }
    }
}

/// Health score: `latency × latency_ms + inflight × inflight + failures × failure_percent`,
/// lowest wins among two random admissible endpoints.
///
/// `latency_ms` is the peak EWMA latency (decay 10s, a failure's 500ms penalty wearing off in
/// about a second), and
/// `failure_percent` the failure rate over the outlier-detection window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct HealthScore {
    /// Weight per millisecond of latency, 0.0..=1000.0. Default: 1.0.
    pub latency: f64,
    /// Weight per active request, 0.0..=1000.0. Default: 5.0.
    pub inflight: f64,
    /// Weight per percent of recent failures, 0.0..=1000.0. Default: 2.0.
    pub failures: f64,
}

impl Default for HealthScore {
    fn default() -> Self {
        Self {
            latency: 1.0,
            inflight: 5.0,
            failures: 2.0,
        }
    }
}

/// What a consistent hash is computed on (Istio `consistentHash.httpHeaderName` /
/// `httpCookie` / `useSourceIp`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    /// The value of this request header (lower-case name).
    Header(String),
    /// This cookie; when absent, the picker generates one and asks the filter to set it.
    Cookie(HashCookie),
    /// The downstream source IP address.
    #[default]
    SourceIp,
}

/// A cookie used as hash key (Istio `httpCookie`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HashCookie {
    /// Cookie name; RFC 6265 token characters.
    pub name: String,
    /// Max-Age of a generated cookie; a session cookie when absent. Default: none.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<crate::duration::HumanDuration>")
    )]
    #[serde(default, with = "crate::duration::option")]
    pub ttl: Option<Duration>,
}

/// Ring hash (Envoy `RING_HASH`, Karger et al. consistent hashing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct RingHash {
    /// Hash key source. Default: `source_ip`.
    pub hash_on: HashOn,
    /// Smallest number of ring points, 1..=262144; the ring holds up to twice this (see
    /// [`crate::select::ring_hash`]). Default: 1024 (Envoy's default).
    pub minimum_ring_size: u32,
    /// Bounded load (Envoy `hash_balance_factor` / 100): an endpoint with more than
    /// `factor × average` active requests is skipped. At least 1.0; absent disables. Default: none.
    pub bounded_load: Option<f64>,
}

impl Default for RingHash {
    fn default() -> Self {
        Self {
            hash_on: HashOn::default(),
            minimum_ring_size: 1024,
            bounded_load: None,
        }
    }
}

/// Maglev (Eisenbud et al., NSDI 2016; Envoy `MAGLEV`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Maglev {
    /// Hash key source. Default: `source_ip`.
    pub hash_on: HashOn,
    /// Lookup table size; a prime up to 5000011. Default: 65537 (Envoy's default).
    pub table_size: u32,
    /// Bounded load factor as for [`RingHash::bounded_load`]. Default: none.
    pub bounded_load: Option<f64>,
}

impl Default for Maglev {
    fn default() -> Self {
        Self {
            hash_on: HashOn::default(),
            table_size: 65537,
            bounded_load: None,
        }
    }
}

/// Sticky sessions (Envoy `stateful_session` with a cookie).
///
/// A request carrying the cookie goes to the endpoint it names while that endpoint is known,
/// healthy or draining, selected and not ejected; otherwise `fallback` picks and the picker
/// asks the filter to set a new cookie. The cookie value is an opaque hash of the address, so
/// internal IPs do not leak.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Sticky {
    /// Cookie name; RFC 6265 token characters. Default: `"fulcrum-session"`.
    pub cookie: String,
    /// Max-Age of the cookie; a session cookie when absent. Default: none.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<crate::duration::HumanDuration>")
    )]
    #[serde(with = "crate::duration::option")]
    pub ttl: Option<Duration>,
    /// Picks new sessions; any algorithm but `sticky`. Default: least request.
    pub fallback: Box<LoadBalancer>,
}

impl Default for Sticky {
    fn default() -> Self {
        Self {
            cookie: "fulcrum-session".to_owned(),
            ttl: None,
            fallback: Box::default(),
        }
    }
}

/// Which endpoints may serve the service; all conditions must hold.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct EndpointSelector {
    /// Tags the endpoint must all carry. Default: none.
    pub tags: BTreeSet<String>,
    /// Capabilities the endpoint must all have. Default: none.
    pub capabilities: BTreeSet<String>,
    /// Metadata entries the endpoint must have with exactly these values. Default: none.
    pub metadata: BTreeMap<String, String>,
}

/// Zone and region preference (Istio `localityLbSetting` with `failover`).
///
/// Endpoints are ranked in tiers: the local zone, then each `failover` zone in order, then
/// the other zones of the local region, then all others. Requests go to the first tier in
/// which at least `min_healthy_percent` of the selected endpoints are admissible; when no tier
/// qualifies, to every admissible endpoint. Without a local zone the `failover` zones rank
/// nowhere in particular (the tiers are the local region, then all others); without a local
/// zone or region there is one tier. An endpoint's region is its metadata entry
/// [`REGION_KEY`](crate::endpoint::REGION_KEY).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Locality {
    /// The zone this proxy runs in. The filter takes it from its Envoy node's locality
    /// ([`Policy::in_zone`]); a value here overrides that for every proxy. Default: none.
    pub local_zone: Option<String>,
    /// The region this proxy runs in. The filter takes it from its Envoy node's locality
    /// ([`Policy::in_region`]); a value here overrides that for every proxy. Default: none.
    /// Serialized only when set, so a snapshot of a policy without it still parses in a
    /// filter from before regions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_region: Option<String>,
    /// Whether to prefer the local zone, `failover` zones and the local region at all.
    /// Default: true.
    pub prefer_local: bool,
    /// Zones to fail over to, in order, before all others. Default: none.
    pub failover: Vec<String>,
    /// Share of a tier's endpoints that must be admissible to keep traffic in it, 0..=100.
    /// Default: 70 (close to Envoy's overprovisioning factor 1.4).
    pub min_healthy_percent: u32,
}

impl Default for Locality {
    fn default() -> Self {
        Self {
            local_zone: None,
            local_region: None,
            prefer_local: true,
            failover: Vec::new(),
            min_healthy_percent: 70,
        }
    }
}

/// Per-endpoint outlier detection and circuit breaking (Istio `outlierDetection`), evaluated
/// on every completed request rather than on a periodic sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct OutlierDetection {
    /// Eject after this many consecutive failures of any counted kind; 0 disables.
    /// Default: 5 (Istio `consecutive5xxErrors`).
    pub consecutive_failures: u32,
    /// Eject after this many consecutive gateway errors (502, 503, 504, connect failure,
    /// reset, timeout); 0 disables. Default: 0 (Istio `consecutiveGatewayErrors`).
    pub consecutive_gateway_errors: u32,
    /// Length of the sliding window for the rate-based rules, 100ms..=1h, kept in 10 buckets.
    /// Default: `"10s"`.
    #[cfg_attr(feature = "schema", schemars(with = "crate::duration::HumanDuration"))]
    #[serde(with = "crate::duration")]
    pub window: Duration,
    /// Eject when the failure rate over `window` crosses a threshold. Default: disabled.
    pub failure_rate: Option<FailureRate>,
    /// Eject when too many calls over `window` are slow. Default: disabled.
    pub slow_calls: Option<SlowCalls>,
    /// Eject an endpoint whose calls are mostly far slower than its peers' typical latency,
    /// with no absolute threshold to guess. Default: enabled with [`RelativeLatency`]'s
    /// defaults; `null` disables it. Serialized only when not the default, so a snapshot of a
    /// policy that leaves it alone still parses in a filter from before the rule.
    #[serde(skip_serializing_if = "RelativeLatency::is_default_rule")]
    pub relative_latency: Option<RelativeLatency>,
    /// Ejection time of the first ejection; the n-th lasts n × this, up to `max_ejection_time`.
    /// 1ms..=1h. Default: `"30s"` (Istio `baseEjectionTime`).
    #[cfg_attr(feature = "schema", schemars(with = "crate::duration::HumanDuration"))]
    #[serde(with = "crate::duration")]
    pub base_ejection_time: Duration,
    /// Cap on an ejection's length, at least `base_ejection_time`; also, an endpoint that stays
    /// closed this long forgets its past ejections. Default: `"300s"` (Envoy).
    #[cfg_attr(feature = "schema", schemars(with = "crate::duration::HumanDuration"))]
    #[serde(with = "crate::duration")]
    pub max_ejection_time: Duration,
    /// Each ejection time is spread by ± this percent so ejected endpoints do not all return
    /// at once, 0..=100. Default: 10.
    pub ejection_jitter_percent: u32,
    /// Requests admitted to an endpoint whose ejection has expired; when all succeed it
    /// closes, any failure re-ejects it for longer. 1..=100. Default: 1.
    pub half_open_max_probes: u32,
    /// At most this percent of the service's endpoints are ejected at once, 0..=100; any value
    /// above 0 allows at least one ejection (as in Envoy), 0 disables ejection.
    /// Default: 10 (Istio `maxEjectionPercent`).
    pub max_ejection_percent: u32,
    /// When fewer than this percent of the selected endpoints are admissible, ejections are
    /// ignored (Envoy's panic threshold, Istio `minHealthPercent`), 0..=100. Default: 50.
    pub panic_threshold_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            consecutive_gateway_errors: 0,
            window: Duration::from_secs(10),
            failure_rate: None,
            slow_calls: None,
            relative_latency: Some(RelativeLatency::default()),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            ejection_jitter_percent: 10,
            half_open_max_probes: 1,
            max_ejection_percent: 10,
            panic_threshold_percent: 50,
        }
    }
}

/// Failure-rate ejection (Envoy `success_rate`-like, with a fixed threshold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct FailureRate {
    /// Eject when failures are at least this percent of requests, 1..=100. Default: 50.
    pub threshold_percent: u32,
    /// Only judge an endpoint with at least this many requests in the window, at least 1.
    /// Default: 20.
    pub minimum_requests: u32,
}

impl Default for FailureRate {
    fn default() -> Self {
        Self {
            threshold_percent: 50,
            minimum_requests: 20,
        }
    }
}

/// Slow-call ejection (resilience4j's slow-call rate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct SlowCalls {
    /// A call slower than this is slow, 1ms..=1h. Default: `"1s"`.
    #[cfg_attr(feature = "schema", schemars(with = "crate::duration::HumanDuration"))]
    #[serde(with = "crate::duration")]
    pub latency_threshold: Duration,
    /// Eject when slow calls are at least this percent of requests, 1..=100. Default: 50.
    pub threshold_percent: u32,
    /// Only judge an endpoint with at least this many requests in the window, at least 1.
    /// Default: 20.
    pub minimum_requests: u32,
}

impl Default for SlowCalls {
    fn default() -> Self {
        Self {
            latency_threshold: Duration::from_secs(1),
            threshold_percent: 50,
            minimum_requests: 20,
        }
    }
}

/// Latency-outlier ejection relative to the endpoint's peers.
///
/// The peers' typical latency is the median, over the service's closed endpoints with at
/// least `minimum_requests` calls in the window, of each one's mean latency; it is worked out
/// again at most once per tenth of the window. A call is *slow against its peers* when it
/// took at least `factor` × that median and at least `minimum_difference` more. An endpoint
/// is ejected when at least `threshold_percent` of its calls over the window (and at least
/// `minimum_requests` of them) were, within `max_ejection_percent`; a probe of an ejected
/// endpoint that is slow against its peers ejects it again, for longer. Nothing is judged
/// while fewer than `minimum_hosts` endpoints have enough calls to say what typical is.
///
/// A per-call majority rather than the endpoint's mean, so one stall (a GC pause, a
/// reconnect) on a fast endpoint does not eject it; the median across endpoints rather than
/// their mean, so the outlier does not move the yardstick it is measured against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct RelativeLatency {
    /// A call is slow against its peers at this multiple of their typical latency, 1.5..=100.
    /// Default: 3.
    pub factor: f64,
    /// ...and at least this much above it, so microsecond differences between fast endpoints
    /// never count, 0..=1h. Default: `"1ms"`.
    #[cfg_attr(feature = "schema", schemars(with = "crate::duration::HumanDuration"))]
    #[serde(with = "crate::duration")]
    pub minimum_difference: Duration,
    /// Eject when slow calls are at least this percent of the endpoint's calls, 1..=100.
    /// Default: 50.
    pub threshold_percent: u32,
    /// Calls in the window an endpoint needs to be judged, or to count as a peer, at least 1.
    /// Default: 20.
    pub minimum_requests: u32,
    /// Peers with enough calls needed before anyone is judged, 3..=10000 (a median of two is
    /// not a yardstick). Default: 3.
    pub minimum_hosts: u32,
}

impl Default for RelativeLatency {
    fn default() -> Self {
        Self {
            factor: 3.0,
            minimum_difference: Duration::from_millis(1),
            threshold_percent: 50,
            minimum_requests: 20,
            minimum_hosts: 3,
        }
    }
}

impl RelativeLatency {
    fn is_default_rule(rule: &Option<Self>) -> bool {
        rule.as_ref() == Some(&Self::default())
    }

    /// Whether a call that took `latency` is slow against peers whose typical latency is
    /// `typical`.
    pub fn is_slow(&self, latency: Duration, typical: Duration) -> bool {
        let factor = if self.factor.is_finite() {
            self.factor.max(1.0)
        } else {
            return false;
        };
        latency.as_secs_f64() >= typical.as_secs_f64() * factor
            && latency.saturating_sub(typical) >= self.minimum_difference
    }
}

/// Which outcomes count as failures for outlier detection and latency penalties.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct FailureKinds {
    /// Any 5xx status. Default: true (as Istio's `consecutive5xxErrors`).
    pub server_errors: bool,
    /// 502, 503 and 504 (implied by `server_errors`). Default: true.
    pub gateway_errors: bool,
    /// The connection to the endpoint could not be made. Default: true.
    pub connect_failure: bool,
    /// The endpoint reset the stream or connection. Default: true.
    pub reset: bool,
    /// The request timed out. Default: true.
    pub timeout: bool,
}

impl Default for FailureKinds {
    fn default() -> Self {
        Self {
            server_errors: true,
            gateway_errors: true,
            connect_failure: true,
            reset: true,
            timeout: true,
        }
    }
}

/// Which data plane applies a service's policy. Both run the same core with the same policy;
/// they differ in how Envoy reaches it (docs/native.md says when to choose which).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum DataPlane {
    /// The proxy-wasm filter picks and steers through the override header; the cluster
    /// balances with `override_host`.
    #[default]
    Wasm,
    /// The cluster's load-balancing policy is fulcrum's native Envoy module
    /// (`envoy.load_balancing_policies.dynamic_modules`), which picks the host itself.
    Native,
}

impl DataPlane {
    /// Whether this is the default, the wasm filter.
    pub fn is_wasm(&self) -> bool {
        *self == Self::Wasm
    }
}

/// What happens when no endpoint is admissible.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum OnNoEndpoint {
    /// Leave the request to Envoy's fallback load-balancing policy.
    #[default]
    FailOpen,
    /// Answer locally with 503 and the reason.
    FailFast,
}

/// A token bucket (rate `requests_per_second`, capacity `burst`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate, above 0 and at most 1000000. Default: 100.
    pub requests_per_second: f64,
    /// Bucket capacity, 1..=1000000. Default: 100.
    pub burst: u32,
    /// When set, each value of this request header gets its own bucket as well: a keyed
    /// request needs a token in its own bucket and in the service bucket. Default: none.
    pub client_key_header: Option<String>,
    /// Client bucket slots; a client key's hash names its slot, and a new client whose slot
    /// holds another client's bucket takes it over (one write). 1..=65536. Default: 1024.
    pub max_clients: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            requests_per_second: 100.0,
            burst: 100,
            client_key_header: None,
            max_clients: 1024,
        }
    }
}

impl EndpointSelector {
    /// Whether `endpoint` carries every required tag and capability and every metadata entry.
    pub fn matches(&self, endpoint: &crate::Endpoint) -> bool {
        let attributes = endpoint.attributes();
        self.tags.is_subset(&attributes.tags)
            && self.capabilities.is_subset(&attributes.capabilities)
            && self
                .metadata
                .iter()
                .all(|(key, value)| attributes.metadata.get(key) == Some(value))
    }
}

impl LoadBalancer {
    /// The algorithm that picks new requests: the fallback for `sticky`, itself otherwise.
    pub fn algorithm(&self) -> &LoadBalancer {
        match self {
            Self::Sticky(sticky) => &sticky.fallback,
            other => other,
        }
    }

    /// The algorithm's name as the policy spells its `type` (`"peak_ewma"`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::RoundRobin {} => "round_robin",
            Self::WeightedRoundRobin {} => "weighted_round_robin",
            Self::WeightedRandom {} => "weighted_random",
            Self::LeastRequest(_) => "least_request",
            Self::PeakEwma(_) => "peak_ewma",
            Self::HealthScore(_) => "health_score",
            Self::RingHash(_) => "ring_hash",
            Self::Maglev(_) => "maglev",
            Self::Sticky(_) => "sticky",
        }
    }
}

/// Probe interval when a health check sets none.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Probe timeout when a health check sets none (capped at the interval).
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive passes to become healthy, when unset.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
/// Consecutive failures to become unhealthy, when unset.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
/// HTTP check path when unset.
pub const DEFAULT_HTTP_PATH: &str = "/healthz";

/// An active health check (Envoy's `HealthCheck`, Kubernetes' readiness probe): one probe
/// every `interval` plus a random `0..jitter`, failed when it takes longer than `timeout`;
/// the endpoint turns healthy after `healthy_threshold` consecutive passes and unhealthy after
/// `unhealthy_threshold` consecutive failures.
///
/// The policy's `health_check` and the registry's registrations share this model. Written as
/// `{"http": {"path": "/healthz"}, "interval": "5s", ...}` with exactly one of `http`, `tcp`,
/// `grpc`; omitted fields take their defaults when parsed (`timeout`: 1s or the interval if
/// shorter, `jitter`: a tenth of the interval), so a parsed value has every field resolved.
/// Ranges are checked by [`ServicePolicy::validate`] (100ms..=60s interval, 10ms..=interval
/// timeout, thresholds 1..=10, jitter up to the interval).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(try_from = "HealthCheckDocument", into = "HealthCheckDocument")]
pub struct HealthCheck {
    /// What to probe.
    pub probe: Probe,
    /// Time between probes.
    pub interval: Duration,
    /// Probe deadline.
    pub timeout: Duration,
    /// Consecutive passes to become healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy.
    pub unhealthy_threshold: u32,
    /// Extra random delay before each probe, so probes of many endpoints do not align.
    pub jitter: Duration,
}

/// One probe kind. `port: None` probes the endpoint's own port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Probe {
    /// `GET path`; passes on one of `expected_statuses`, or any 2xx when empty.
    Http {
        /// Request path, starting with `/`.
        path: String,
        /// Passing statuses (100..=599); empty means 200..=299.
        expected_statuses: Vec<u16>,
        /// Probed port; the endpoint's when `None`.
        port: Option<u16>,
    },
    /// A TCP connection opens.
    Tcp {
        /// Probed port; the endpoint's when `None`.
        port: Option<u16>,
    },
    /// `grpc.health.v1.Health/Check` answers `SERVING`.
    Grpc {
        /// Service asked about; empty asks about the whole server.
        service: String,
        /// Probed port; the endpoint's when `None`.
        port: Option<u16>,
    },
}

impl Probe {
    /// The port this probe overrides, if any.
    pub fn port(&self) -> Option<u16> {
        match self {
            Self::Http { port, .. } | Self::Tcp { port } | Self::Grpc { port, .. } => *port,
        }
    }

    /// The address probed for an endpoint at `endpoint`: its IP, at the override port if set.
    pub fn target(&self, endpoint: std::net::SocketAddr) -> std::net::SocketAddr {
        std::net::SocketAddr::new(endpoint.ip(), self.port().unwrap_or(endpoint.port()))
    }
}

impl HealthCheck {
    /// A check of `probe` with every other field at its default.
    pub fn new(probe: Probe) -> Self {
        Self {
            probe,
            interval: DEFAULT_CHECK_INTERVAL,
            timeout: DEFAULT_CHECK_TIMEOUT,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
            jitter: default_jitter(DEFAULT_CHECK_INTERVAL),
        }
    }
}

/// A tenth of the interval, in whole milliseconds (so it formats and parses back exactly).
pub fn default_jitter(interval: Duration) -> Duration {
    Duration::from_millis(u64::try_from(interval.as_millis() / 10).unwrap_or(u64::MAX))
}

/// How a [`HealthCheck`] is written: optional fields, one probe kind per key. Its JSON Schema
/// (feature `schema`) is the one [`HealthCheck`] reports, requiring exactly one of `http`,
/// `tcp`, `grpc`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(extend("oneOf" = [{"required": ["http"]}, {"required": ["tcp"]}, {"required": ["grpc"]}]))
)]
#[serde(default, deny_unknown_fields)]
struct HealthCheckDocument {
    /// Probe with `GET path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<HttpProbeDocument>,
    /// Probe by opening a TCP connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<PortDocument>,
    /// Probe with `grpc.health.v1.Health/Check`, passing on `SERVING`.
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc: Option<GrpcProbeDocument>,
    /// Time between probes, 100ms..=60s. Default: `"5s"`.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<crate::duration::HumanDuration>")
    )]
    #[serde(
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    interval: Option<Duration>,
    /// Probe deadline, 10ms..=interval. Default: `"1s"`, or the interval if shorter.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<crate::duration::HumanDuration>")
    )]
    #[serde(
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    timeout: Option<Duration>,
    /// Consecutive passes to become healthy, 1..=10. Default: 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    healthy_threshold: Option<u32>,
    /// Consecutive failures to become unhealthy, 1..=10. Default: 3.
    #[serde(skip_serializing_if = "Option::is_none")]
    unhealthy_threshold: Option<u32>,
    /// Extra random delay before each probe, up to the interval. Default: a tenth of the
    /// interval.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<crate::duration::HumanDuration>")
    )]
    #[serde(
        with = "crate::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    jitter: Option<Duration>,
}

/// An HTTP probe: `GET path`, passing on one of `expected_statuses`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "HttpProbe")
)]
#[serde(deny_unknown_fields)]
struct HttpProbeDocument {
    /// Request path, starting with `/`. Default: `"/healthz"`.
    #[serde(default = "default_http_path")]
    path: String,
    /// Passing statuses, 100..=599. Default: any 2xx.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    expected_statuses: Vec<u16>,
    /// Probed port. Default: the endpoint's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

fn default_http_path() -> String {
    DEFAULT_HTTP_PATH.to_owned()
}

/// A TCP probe: passes when a connection opens.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "TcpProbe")
)]
#[serde(default, deny_unknown_fields)]
struct PortDocument {
    /// Probed port. Default: the endpoint's.
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

/// A gRPC health probe: `grpc.health.v1.Health/Check` answers `SERVING`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "GrpcProbe")
)]
#[serde(default, deny_unknown_fields)]
struct GrpcProbeDocument {
    /// Service asked about. Default: empty, which asks about the whole server.
    #[serde(skip_serializing_if = "String::is_empty")]
    service: String,
    /// Probed port. Default: the endpoint's.
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

/// A health check that names no probe kind, or several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "a health check needs exactly one of `http`, `tcp` or `grpc`, e.g. {{\"http\": {{\"path\": \"/healthz\"}}}}"
)]
pub struct ProbeKindError;

impl TryFrom<HealthCheckDocument> for HealthCheck {
    type Error = ProbeKindError;

    fn try_from(document: HealthCheckDocument) -> Result<Self, Self::Error> {
        let probe = match (document.http, document.tcp, document.grpc) {
            (Some(http), None, None) => Probe::Http {
                path: http.path,
                expected_statuses: http.expected_statuses,
                port: http.port,
            },
            (None, Some(tcp), None) => Probe::Tcp { port: tcp.port },
            (None, None, Some(grpc)) => Probe::Grpc {
                service: grpc.service,
                port: grpc.port,
            },
            _ => return Err(ProbeKindError),
        };
        let interval = document.interval.unwrap_or(DEFAULT_CHECK_INTERVAL);
        Ok(Self {
            probe,
            interval,
            timeout: document
                .timeout
                .unwrap_or(DEFAULT_CHECK_TIMEOUT.min(interval)),
            healthy_threshold: document
                .healthy_threshold
                .unwrap_or(DEFAULT_HEALTHY_THRESHOLD),
            unhealthy_threshold: document
                .unhealthy_threshold
                .unwrap_or(DEFAULT_UNHEALTHY_THRESHOLD),
            jitter: document.jitter.unwrap_or(default_jitter(interval)),
        })
    }
}

impl From<HealthCheck> for HealthCheckDocument {
    fn from(check: HealthCheck) -> Self {
        let mut document = Self {
            interval: Some(check.interval),
            timeout: Some(check.timeout),
            healthy_threshold: Some(check.healthy_threshold),
            unhealthy_threshold: Some(check.unhealthy_threshold),
            jitter: Some(check.jitter),
            ..Self::default()
        };
        match check.probe {
            Probe::Http {
                path,
                expected_statuses,
                port,
            } => {
                document.http = Some(HttpProbeDocument {
                    path,
                    expected_statuses,
                    port,
                })
            }
            Probe::Tcp { port } => document.tcp = Some(PortDocument { port }),
            Probe::Grpc { service, port } => {
                document.grpc = Some(GrpcProbeDocument { service, port })
            }
        }
        document
    }
}
