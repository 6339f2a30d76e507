//! [`ServicePicker`]: one service's endpoints, policy and balancing state; the per-request API
//! the proxy-wasm filter (and the registry) call.
//!
//! Per request the caller calls [`ServicePicker::pick`] and, when the response ends,
//! [`ServicePicker::complete`]. When the control plane pushes a new endpoint set it calls
//! [`ServicePicker::update_endpoints`], which rebuilds the immutable selection structures
//! (pingora style) and keeps the stats of endpoints that survive, keyed by address. Time is
//! `now: Duration` since any monotonic epoch the caller picks (it must not go backwards; if it
//! does, elapsed time counts as zero). Nothing here panics on any input, memory is bounded by
//! the endpoint count and the policy's caps, and a pick allocates nothing except the
//! `Set-Cookie` value when a cookie must be set (and, for a pick explained on request,
//! [`ServicePicker::pick_explained`], the O(endpoints) scratch space of its explanation).
//!
//! By file:
//! - `request.rs`: what a request brings and gets back ([`RequestAttributes`],
//!   [`RequestNeeds`], [`Pick`], [`Rejection`]);
//! - `pick.rs`: how one request is picked (rate limit, sticky session, candidates, algorithm,
//!   retry targets);
//! - `eligible.rs`: which endpoints may serve (health, selector, locality tiers, breakers,
//!   panic threshold);
//! - `diagnose.rs`: what the picker believes about each endpoint
//!   ([`ServicePicker::diagnose`]), for `fulcrum endpoints`;
//! - `explain.rs`: why a pick went where it did ([`PickExplanation`]), when asked;
//! - `retry.rs`: which endpoints Envoy retries on ([`RetryTargets`]);
//! - `outcome.rs`: what a response does (in-flight count, latency estimate, breaker;
//!   [`Served`], [`Outcome`], [`Transitions`]);
//! - `shared.rs`: ejections judged by another worker of the proxy
//!   ([`ServicePicker::apply_shared_ejections`]);
//! - `slots.rs`: the endpoints with their stats and the counts kept in step with them;
//! - `warmup.rs`: slow start, a share ramped up after an endpoint joins or returns.
//!
//! The algorithms themselves are in [`crate::select`], one file each.

mod diagnose;
mod eligible;
mod explain;
mod outcome;
mod pick;
mod request;
mod retry;
mod shared;
mod slots;
mod warmup;

use std::time::Duration;

pub(crate) use self::warmup::Warmup;
use self::{eligible::Eligible, slots::Slots};
pub use self::{
    explain::{
        ChosenBy, Exclusions, ExplainedEndpoint, MAX_EXPLANATION_BYTES, PickExplanation, TRUNCATED,
    },
    outcome::{
        GRPC_UNKNOWN, Outcome, RequestSent, Served, Transition, Transitions, grpc_http_status,
        is_grpc_content_type, parse_grpc_status, parse_http_status, response_flags,
    },
    request::{
        MAX_COOKIE_BYTES, MAX_VALUE_BYTES, Pick, Rejection, RequestAttributes, RequestHeader,
        RequestInputs, RequestNeeds, cookie_value,
    },
    retry::RetryTargets,
    slots::EndpointView,
};
#[cfg(test)]
use crate::select::Slot;
use crate::{
    endpoint::Endpoint,
    policy::{LoadBalancer, PeakEwma, ServicePolicy},
    ratelimit::{LocalBuckets, RateLimiter},
    select::{
        Algorithm, EndpointSet, Select,
        sticky::{SessionKeys, Sessions},
    },
};

/// One service's picker. See the module docs.
#[derive(Debug, Clone)]
pub struct ServicePicker {
    policy: ServicePolicy,
    slots: Slots,
    eligible: Eligible,
    /// The algorithm that picks new requests (`sticky`'s fallback for `sticky`).
    algorithm: Algorithm,
    /// The sticky-session layer, when the policy is `sticky`.
    sessions: Option<Sessions>,
    /// How response times are folded into latency estimates, as the algorithm wants it.
    latency_estimate: PeakEwma,
    limiter: Option<RateLimiter>,
    /// The rate limit's buckets when the caller keeps none of its own ([`Self::pick`]).
    local_buckets: LocalBuckets,
}

impl ServicePicker {
    /// A picker for `endpoints` under `policy` (assumed validated; an unvalidated policy
    /// still never causes a panic). Duplicate addresses keep their first entry.
    pub fn new(policy: &ServicePolicy, endpoints: &[Endpoint]) -> Self {
        let algorithm = Algorithm::new(&policy.load_balancer);
        let sessions = match &policy.load_balancer {
            LoadBalancer::Sticky(sticky) => Some(Sessions::new(sticky)),
            _ => None,
        };
        let mut picker = Self {
            policy: policy.clone(),
            slots: Slots::default(),
            eligible: Eligible::default(),
            latency_estimate: algorithm.latency_estimate(),
            algorithm,
            sessions,
            limiter: policy.rate_limit.as_ref().map(RateLimiter::new),
            local_buckets: LocalBuckets::default(),
        };
        picker.update_endpoints(endpoints);
        picker
    }

    /// Makes and checks sticky-session cookies with `keys` (the first signs new sessions,
    /// every one is accepted) instead of the public default key.
    pub fn set_session_keys(&mut self, keys: &SessionKeys) {
        if let Some(sessions) = &mut self.sessions {
            sessions.set_keys(keys, &self.slots, &self.policy.endpoint_selector);
        }
    }

    /// Replaces the endpoint set, keeping inflight, latency and breaker state of every
    /// endpoint whose address is still present.
    pub fn update_endpoints(&mut self, endpoints: &[Endpoint]) {
        let previous = self.slots.replace(endpoints);
        self.eligible = Eligible::new(&self.policy, &self.slots);
        self.algorithm.rebuild(&EndpointSet {
            slots: &self.slots,
            eligible: self.eligible.members(),
            tiers: self.eligible.tiers(),
            previous: &previous,
        });
        if let Some(sessions) = &mut self.sessions {
            sessions.rebuild(&self.slots, &self.policy.endpoint_selector);
        }
    }

    /// The policy this picker applies.
    pub fn policy(&self) -> &ServicePolicy {
        &self.policy
    }

    /// Which request attributes [`pick`](Self::pick) reads under this policy.
    pub fn request_needs(&self) -> RequestNeeds<'_> {
        let mut needs = RequestNeeds::default();
        self.algorithm.needs(&mut needs);
        if let Some(sessions) = &self.sessions {
            sessions.needs(&mut needs);
        }
        needs.client_key_header = self
            .policy
            .rate_limit
            .as_ref()
            .and_then(|limit| limit.client_key_header.as_deref());
        needs
    }

    /// Whether this picker knows of an endpoint in a run of failures (a closed breaker whose
    /// consecutive counters, its own or the proxy's as last learnt, are not zero). The filter
    /// then reads the shared record before each pick, so an ejection another worker judged
    /// meanwhile is avoided before this worker fails on it rather than after.
    pub fn knows_of_failures(&self) -> bool {
        self.slots.failing() > 0
    }

    /// Every endpoint with its breaker state and inflight, sorted by address.
    pub fn endpoints(&self) -> impl ExactSizeIterator<Item = EndpointView<'_>> {
        self.slots.views()
    }

    /// Counts a request sent to `slot` (in flight, and a probe if its breaker is open) and
    /// tells the algorithm, so a structure over the loads follows every change.
    fn admit(&mut self, slot: usize, now: Duration) {
        self.slots.admit(
            slot,
            now,
            &self.policy.outlier_detection,
            self.policy.slow_start.as_ref(),
        );
        self.algorithm.load_changed(slot, &self.slots);
    }

    /// Takes a finished request off `slot`'s in-flight count and tells the algorithm.
    fn release(&mut self, slot: usize) {
        self.slots.release(slot);
        self.algorithm.load_changed(slot, &self.slots);
    }

    /// The service's latency level, for tests that inspect estimates.
    #[cfg(test)]
    pub(crate) fn level_for_tests(&self) -> f64 {
        self.slots.level()
    }

    /// A copy of the slots, for tests that inspect stats.
    #[cfg(test)]
    pub(crate) fn slots_for_tests(&self) -> Vec<Slot> {
        self.slots.to_vec()
    }
}
