//! Per-endpoint circuit breaker and outlier detector: one `enum` state machine, one
//! transition function, driven by every pick and every completed request.
//!
//! It merges Envoy's outlier detection (consecutive 5xx / gateway errors, ejection time growing
//! with the number of ejections up to a maximum, plus jitter) with the closed / open /
//! half-open breaker of Hystrix and resilience4j (failure rate and slow-call rate over a
//! sliding window with a minimum volume; bounded probes after the ejection expires). Unlike
//! Envoy it needs no periodic sweep: a state is judged when an outcome arrives, and an expired
//! ejection turns into half-open when the next pick admits a probe. Service-level limits
//! (max ejection percent, panic threshold) and the peers' typical latency (for the
//! relative-latency rule) are worked out by the picker and passed in.
//!
//! The consecutive counters may be the proxy's rather than this breaker's own: when the caller
//! shares them between the workers of a proxy ([`crate::ejections::FailureCounts`]), a
//! completion arrives as [`Event::CompleteCounted`] with the proxy-wide counts, this outcome
//! included, and the breaker judges those, as Envoy's outlier detection judges its per-host
//! counters whichever worker saw the failures. The sliding window stays this breaker's own.

use std::time::Duration;

use crate::{
    policy::{FailureKinds, OutlierDetection, RelativeLatency},
    rng::mix64,
    window::{Counts, Sample, Window},
};

/// Where an endpoint's breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Serving normally. `ejections` past ejections are remembered (so the next one lasts
    /// longer) until the endpoint has been closed for `max_ejection_time` since `since`.
    Closed {
        /// Ejections remembered.
        ejections: u32,
        /// When the endpoint last closed (the epoch for a new endpoint).
        since: Duration,
    },
    /// Ejected: never picked before `until` (unless the service panics).
    Open {
        /// When the ejection expires and probes may be admitted.
        until: Duration,
        /// This ejection's number, 1 for the first.
        ejections: u32,
    },
    /// Ejection expired: up to `half_open_max_probes` requests are admitted; when that many
    /// succeed it closes, any failure (or a probe slow against its peers) re-opens it for
    /// longer.
    HalfOpen {
        /// Number of the ejection that preceded this.
        ejections: u32,
        /// Probes admitted since `since`.
        probes_admitted: u32,
        /// Probes that succeeded.
        successes: u32,
        /// When the current round of probes started; a round whose probes never completed is
        /// restarted after `base_ejection_time`.
        since: Duration,
    },
}

impl BreakerState {
    /// A short lower-case name for metrics labels and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Closed { .. } => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen { .. } => "half_open",
        }
    }

    /// Whether the endpoint counts as ejected (open or half-open) for `max_ejection_percent`.
    pub fn is_ejected(&self) -> bool {
        !matches!(self, Self::Closed { .. })
    }
}

/// Why a breaker last opened: which rule judged the endpoint, or that another worker of the
/// proxy did. Kept while the breaker is open or half-open, forgotten when it closes, so an
/// operator reading an ejection sees the rule to look at (issue #17, endpoint diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EjectionReason {
    /// `consecutive_failures` failures in a row.
    ConsecutiveFailures,
    /// `consecutive_gateway_errors` gateway errors in a row.
    ConsecutiveGatewayErrors,
    /// The failure rate over the window reached `failure_rate.threshold_percent`.
    FailureRate,
    /// The slow-call rate over the window reached `slow_calls.threshold_percent`.
    SlowCalls,
    /// Calls slow against the peers' typical latency reached
    /// `relative_latency.threshold_percent`.
    RelativeLatency,
    /// A probe after an ejection failed (or was slow against its peers).
    ProbeFailed,
    /// Another worker of the proxy ejected it ([`Event::EjectedElsewhere`]).
    SharedFromAnotherWorker,
}

impl EjectionReason {
    /// Every reason, in declaration order.
    pub const ALL: [Self; 7] = [
        Self::ConsecutiveFailures,
        Self::ConsecutiveGatewayErrors,
        Self::FailureRate,
        Self::SlowCalls,
        Self::RelativeLatency,
        Self::ProbeFailed,
        Self::SharedFromAnotherWorker,
    ];

    /// The reason's code in reports and logs: lowercase letters and `_`.
    pub fn code(self) -> &'static str {
        match self {
            Self::ConsecutiveFailures => "consecutive_failures",
            Self::ConsecutiveGatewayErrors => "consecutive_gateway_errors",
            Self::FailureRate => "failure_rate",
            Self::SlowCalls => "slow_calls",
            Self::RelativeLatency => "relative_latency",
            Self::ProbeFailed => "probe_failed",
            Self::SharedFromAnotherWorker => "shared",
        }
    }

    /// The reason of `code`, as [`code`](Self::code) names it.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.code() == code)
    }
}

/// How one completed request counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    /// It failed in a way the policy counts.
    pub failure: bool,
    /// It was a gateway error (502/503/504, connect failure, reset, timeout) the policy counts.
    pub gateway_error: bool,
    /// It took longer than the slow-call threshold.
    pub slow: bool,
    /// It was slow against the service's typical latency (the relative-latency rule).
    pub slow_vs_peers: bool,
    /// How long it took.
    pub latency: Duration,
}

impl Verdict {
    /// Classifies an outcome under the policy's failure kinds and slow-call threshold.
    pub fn classify(
        status: Option<u16>,
        connect_failure: bool,
        reset: bool,
        timeout: bool,
        latency: Duration,
        kinds: &FailureKinds,
        slow_threshold: Option<Duration>,
    ) -> Self {
        let gateway_status = matches!(status, Some(502..=504));
        let server_error = matches!(status, Some(500..=599));
        let gateway_error = (kinds.gateway_errors && gateway_status)
            || (kinds.connect_failure && connect_failure)
            || (kinds.reset && reset)
            || (kinds.timeout && timeout);
        let failure = gateway_error || (kinds.server_errors && server_error);
        Self {
            failure,
            gateway_error,
            slow: slow_threshold.is_some_and(|threshold| latency > threshold),
            slow_vs_peers: false,
            latency,
        }
    }

    /// This verdict with `slow_vs_peers` judged by `rule` against the peers' `typical`
    /// latency (left false while there is no rule or no typical latency yet).
    pub fn against_peers(
        mut self,
        rule: Option<&RelativeLatency>,
        typical: Option<Duration>,
    ) -> Self {
        self.slow_vs_peers = match (rule, typical) {
            (Some(rule), Some(typical)) => rule.is_slow(self.latency, typical),
            _ => false,
        };
        self
    }

    fn sample(&self) -> Sample {
        Sample {
            failure: self.failure,
            slow: self.slow,
            slow_vs_peers: self.slow_vs_peers,
            latency: self.latency,
        }
    }

    /// An attempt that Envoy retried on another endpoint: it failed, kind unknown, counted as
    /// a gateway error (Envoy retries on 5xx, gateway errors, connect failures and resets).
    pub const RETRIED_ELSEWHERE: Self = Self {
        failure: true,
        gateway_error: true,
        slow: false,
        slow_vs_peers: false,
        latency: Duration::ZERO,
    };
}

/// An endpoint's consecutive-failure counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Consecutive {
    /// Failures in a row (any kind the policy counts).
    pub failures: u32,
    /// Gateway errors in a row.
    pub gateway_errors: u32,
}

impl Consecutive {
    /// Whether both counters are zero: the last outcome counted was a success, or none was.
    pub fn is_zero(&self) -> bool {
        self.failures == 0 && self.gateway_errors == 0
    }

    /// The counters after `verdict`: each grows by one on its kind of failure and restarts at
    /// zero otherwise.
    pub fn after(self, verdict: &Verdict) -> Self {
        let next = |count: u32, failed: bool| if failed { count.saturating_add(1) } else { 0 };
        Self {
            failures: next(self.failures, verdict.failure),
            gateway_errors: next(self.gateway_errors, verdict.gateway_error),
        }
    }
}

/// What happens to a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The picker sends a request to the endpoint (a probe when not closed).
    Admit,
    /// A request to the endpoint completed.
    Complete(Verdict),
    /// A request to the endpoint completed, and the proxy's consecutive counters for it, this
    /// outcome included, are `proxy` (every worker's outcomes counted through shared data): a
    /// closed breaker records the verdict in its window as for [`Event::Complete`] but judges
    /// the consecutive rules on `proxy` instead of its own counters. In any other state it is
    /// [`Event::Complete`].
    CompleteCounted {
        /// How the request counts.
        verdict: Verdict,
        /// The proxy's counters after it.
        proxy: Consecutive,
    },
    /// Another worker's outcomes changed the proxy's consecutive counters to these (a success
    /// elsewhere resets them): a closed breaker takes them without judging them (the worker
    /// whose failure reaches a threshold judges it), so that its own next success knows to
    /// reset the proxy's counters. Nothing happens in another state.
    CountedElsewhere(Consecutive),
    /// Another worker of the proxy ejected the endpoint until `until` (in the caller's clock)
    /// as its ejection number `ejections`: a closed or half-open breaker opens until then
    /// (a closed one only if the service allows one more ejection), an open one keeps the later
    /// deadline. The ejection count becomes the larger of the two, so the next ejection lasts
    /// longer everywhere. An `until` already past changes nothing, and so does one further
    /// ahead than `max_ejection_time` (no worker ejects for longer: shared data corrupted).
    EjectedElsewhere {
        /// When the shared ejection expires.
        until: Duration,
        /// That ejection's number.
        ejections: u32,
    },
    /// Another worker closed the endpoint after its ejection expired: a half-open breaker, or
    /// an open one whose ejection has expired too, closes; an ejection still running here
    /// (one this worker judged itself and could not share) stays.
    RestoredElsewhere,
}

/// What the transition function needs besides the state.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The service's outlier detection settings.
    pub policy: &'a OutlierDetection,
    /// The current time since the caller's epoch.
    pub now: Duration,
    /// Whether the service allows one more ejection (max ejection percent).
    pub may_eject: bool,
    /// Per-endpoint seed for the ejection jitter (the picker hashes the address).
    pub jitter_seed: u64,
}

/// A change of state kind (closed / open / half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateChange {
    /// The state before the event.
    pub from: BreakerState,
    /// The state after it.
    pub to: BreakerState,
}

/// One endpoint's breaker: the state plus the counters the rules read.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: BreakerState,
    /// The consecutive counters: this breaker's own, or the proxy's as last learnt.
    consecutive: Consecutive,
    /// The sliding window's counts, made at the first count and dropped with the counters:
    /// an endpoint that gets no requests (for one proxy, most endpoints of a large mesh)
    /// holds none. 408 bytes each, they were most of a VM's memory at 10,000 endpoints.
    window: Option<Box<Window>>,
    /// Why it last opened; `None` while closed.
    reason: Option<EjectionReason>,
}

impl Breaker {
    /// A closed breaker with empty counters, created at `now`.
    pub fn new(now: Duration) -> Self {
        Self {
            state: BreakerState::Closed {
                ejections: 0,
                since: now,
            },
            consecutive: Consecutive::default(),
            window: None,
            reason: None,
        }
    }

    /// Why the breaker last opened, while it is open or half-open; `None` while closed.
    pub fn reason(&self) -> Option<EjectionReason> {
        self.reason
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// The consecutive counters as this breaker last knew them (zero unless closed).
    pub fn consecutive(&self) -> Consecutive {
        self.consecutive
    }

    /// The request counts over the sliding window at `now`.
    pub fn recent(&self, now: Duration) -> Counts {
        self.window
            .as_ref()
            .map_or_else(Counts::default, |window| window.counts(now))
    }

    /// Whether a request may be sent now: closed, an expired ejection, or a half-open endpoint
    /// with probes left (or whose probe round went stale).
    pub fn admits(&self, policy: &OutlierDetection, now: Duration) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until, .. } => now >= until,
            BreakerState::HalfOpen {
                probes_admitted,
                since,
                ..
            } => {
                probes_admitted < policy.half_open_max_probes
                    || now.saturating_sub(since) >= policy.base_ejection_time
            }
        }
    }

    /// When [`admits`](Self::admits), false at `now`, turns true with time alone: the end of
    /// an ejection, or of a probe round's wait. `None` when it admits at `now` or only an
    /// event can change it. Time never turns it from true to false.
    pub fn admits_from(&self, policy: &OutlierDetection, now: Duration) -> Option<Duration> {
        match self.state {
            BreakerState::Closed { .. } => None,
            BreakerState::Open { until, .. } => (now < until).then_some(until),
            BreakerState::HalfOpen {
                probes_admitted,
                since,
                ..
            } => (!self.admits(policy, now) && probes_admitted >= policy.half_open_max_probes)
                .then(|| since.saturating_add(policy.base_ejection_time)),
        }
    }

    /// The transition function: applies `event` and returns the change of state kind, if any.
    pub fn on(&mut self, event: Event, ctx: &Context<'_>) -> Option<StateChange> {
        let from = self.state;
        let now = ctx.now;
        let policy = ctx.policy;
        let next = match (self.state, event) {
            (BreakerState::Closed { .. }, Event::CountedElsewhere(counted)) => {
                self.consecutive = counted;
                None
            }
            (_, Event::CountedElsewhere(_)) => None,
            (state, Event::EjectedElsewhere { until, ejections }) => {
                self.adopt_ejection(state, until, ejections, ctx)
            }
            (BreakerState::Closed { .. }, Event::RestoredElsewhere) => None,
            (BreakerState::Open { until, .. }, Event::RestoredElsewhere) if now < until => None,
            (
                BreakerState::Open { ejections, .. } | BreakerState::HalfOpen { ejections, .. },
                Event::RestoredElsewhere,
            ) => {
                self.reset_counters();
                Some(BreakerState::Closed {
                    ejections,
                    since: now,
                })
            }
            (BreakerState::Closed { .. }, Event::Admit) => None,
            (BreakerState::Open { until, ejections }, Event::Admit) => {
                (now >= until).then_some(BreakerState::HalfOpen {
                    ejections,
                    probes_admitted: 1,
                    successes: 0,
                    since: now,
                })
            }
            (
                BreakerState::HalfOpen {
                    ejections,
                    probes_admitted,
                    successes,
                    since,
                },
                Event::Admit,
            ) => Some(if now.saturating_sub(since) >= policy.base_ejection_time {
                BreakerState::HalfOpen {
                    ejections,
                    probes_admitted: 1,
                    successes: 0,
                    since: now,
                }
            } else {
                BreakerState::HalfOpen {
                    ejections,
                    probes_admitted: probes_admitted.saturating_add(1),
                    successes,
                    since,
                }
            }),
            (
                BreakerState::Closed { ejections, since },
                Event::Complete(verdict) | Event::CompleteCounted { verdict, .. },
            ) => {
                self.count(policy, verdict, now);
                if let Event::CompleteCounted { proxy, .. } = event {
                    self.consecutive = proxy;
                }
                match self.should_trip(policy, now) {
                    Some(reason) if ctx.may_eject => {
                        let remembered = if now.saturating_sub(since) >= policy.max_ejection_time {
                            0
                        } else {
                            ejections
                        };
                        Some(self.eject(remembered.saturating_add(1), reason, ctx))
                    }
                    _ => None,
                }
            }
            (
                BreakerState::Open { .. },
                Event::Complete(verdict) | Event::CompleteCounted { verdict, .. },
            ) => {
                // A request admitted before the ejection; it no longer changes anything.
                self.record(policy, verdict, now);
                None
            }
            (
                BreakerState::HalfOpen {
                    ejections,
                    probes_admitted,
                    successes,
                    since,
                },
                Event::Complete(verdict) | Event::CompleteCounted { verdict, .. },
            ) => {
                if verdict.failure || verdict.slow_vs_peers {
                    Some(self.eject(
                        ejections.saturating_add(1),
                        EjectionReason::ProbeFailed,
                        ctx,
                    ))
                } else if successes.saturating_add(1) >= policy.half_open_max_probes {
                    self.reset_counters();
                    Some(BreakerState::Closed {
                        ejections,
                        since: now,
                    })
                } else {
                    Some(BreakerState::HalfOpen {
                        ejections,
                        probes_admitted,
                        successes: successes + 1,
                        since,
                    })
                }
            }
        };
        let to = next?;
        self.state = to;
        if let BreakerState::Closed { .. } = to {
            self.reason = None;
        }
        (std::mem::discriminant(&from) != std::mem::discriminant(&to))
            .then_some(StateChange { from, to })
    }

    /// The state after [`Event::EjectedElsewhere`], `None` when it changes nothing.
    fn adopt_ejection(
        &mut self,
        state: BreakerState,
        until: Duration,
        ejections: u32,
        ctx: &Context<'_>,
    ) -> Option<BreakerState> {
        // No worker ejects for longer than the policy's cap: a later end is corrupt shared
        // data, which must not eject an endpoint for ever.
        let longest = ctx
            .policy
            .max_ejection_time
            .max(ctx.policy.base_ejection_time);
        if until <= ctx.now || until > ctx.now.saturating_add(longest) {
            return None;
        }
        let adopted = |local: u32| BreakerState::Open {
            until,
            ejections: ejections.max(local).max(1),
        };
        match state {
            BreakerState::Closed {
                ejections: local, ..
            } if ctx.may_eject => {
                self.reset_counters();
                self.reason = Some(EjectionReason::SharedFromAnotherWorker);
                Some(adopted(local))
            }
            BreakerState::Closed { .. } => None,
            BreakerState::Open {
                until: local_until,
                ejections: local,
            } => (until > local_until).then(|| adopted(local)),
            BreakerState::HalfOpen {
                ejections: local, ..
            } => {
                self.reset_counters();
                self.reason = Some(EjectionReason::SharedFromAnotherWorker);
                Some(adopted(local))
            }
        }
    }

    fn count(&mut self, policy: &OutlierDetection, verdict: Verdict, now: Duration) {
        self.record(policy, verdict, now);
        self.consecutive = self.consecutive.after(&verdict);
    }

    /// Counts `verdict` in the sliding window, made (of `policy.window`) if there is none.
    fn record(&mut self, policy: &OutlierDetection, verdict: Verdict, now: Duration) {
        self.window
            .get_or_insert_with(|| Box::new(Window::new(policy.window)))
            .record(now, verdict.sample());
    }

    /// The first rule the counters break, if any.
    fn should_trip(&self, policy: &OutlierDetection, now: Duration) -> Option<EjectionReason> {
        let reached = |count: u32, limit: u32| limit > 0 && count >= limit;
        if reached(
            self.consecutive.gateway_errors,
            policy.consecutive_gateway_errors,
        ) {
            return Some(EjectionReason::ConsecutiveGatewayErrors);
        }
        if reached(self.consecutive.failures, policy.consecutive_failures) {
            return Some(EjectionReason::ConsecutiveFailures);
        }
        if policy.failure_rate.is_none()
            && policy.slow_calls.is_none()
            && policy.relative_latency.is_none()
        {
            return None;
        }
        let counts = self.recent(now);
        let over = |part: u32, percent: u32, minimum: u32| {
            counts.total >= minimum.max(1)
                && u64::from(part) * 100 >= u64::from(percent) * u64::from(counts.total)
        };
        if policy.failure_rate.as_ref().is_some_and(|rate| {
            over(
                counts.failures,
                rate.threshold_percent,
                rate.minimum_requests,
            )
        }) {
            return Some(EjectionReason::FailureRate);
        }
        if policy
            .slow_calls
            .as_ref()
            .is_some_and(|slow| over(counts.slow, slow.threshold_percent, slow.minimum_requests))
        {
            return Some(EjectionReason::SlowCalls);
        }
        policy
            .relative_latency
            .as_ref()
            .is_some_and(|relative| {
                over(
                    counts.slow_vs_peers,
                    relative.threshold_percent,
                    relative.minimum_requests,
                )
            })
            .then_some(EjectionReason::RelativeLatency)
    }

    fn eject(&mut self, ejections: u32, reason: EjectionReason, ctx: &Context<'_>) -> BreakerState {
        self.reset_counters();
        self.reason = Some(reason);
        BreakerState::Open {
            until: ctx.now.saturating_add(ejection_time(
                ctx.policy,
                ejections,
                ctx.jitter_seed,
                ctx.now,
            )),
            ejections,
        }
    }

    fn reset_counters(&mut self) {
        self.consecutive = Consecutive::default();
        self.window = None;
    }
}

/// `base_ejection_time × ejections`, spread by ± `ejection_jitter_percent`, capped at
/// `max_ejection_time`.
///
/// The jitter is a hash of the endpoint's seed, the ejection number and the time, so it needs
/// no RNG on the completion path and is exact under test.
pub fn ejection_time(
    policy: &OutlierDetection,
    ejections: u32,
    jitter_seed: u64,
    now: Duration,
) -> Duration {
    let base = policy.base_ejection_time.saturating_mul(ejections.max(1));
    let max = policy.max_ejection_time.max(policy.base_ejection_time);
    let nominal = base.min(max);
    let jitter = f64::from(policy.ejection_jitter_percent.min(100)) / 100.0;
    if jitter == 0.0 {
        return nominal;
    }
    let draw = mix64(jitter_seed ^ u64::from(ejections) ^ (now.as_nanos() as u64));
    let unit = (draw >> 11) as f64 / (1u64 << 53) as f64;
    Duration::try_from_secs_f64(nominal.as_secs_f64() * (1.0 + jitter * (2.0 * unit - 1.0)))
        .unwrap_or(nominal)
        .min(max)
}
