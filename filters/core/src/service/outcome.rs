//! What a response does: [`ServicePicker::complete`] releases the pick's in-flight count and
//! charges the outcome to the endpoint that earned it ([`Served`]): its latency estimate and
//! its breaker, whose state changes come back as [`Transitions`] for the filter's metrics.
//!
//! Sharing the consecutive-failure counters between the workers of a proxy is the caller's
//! choice of [`FailureCounts`] ([`ServicePicker::complete_counted`]): a closed endpoint's
//! outcome is counted there first and its breaker judges the proxy's count
//! ([`Event::CompleteCounted`]). A success is counted there only when the breaker's counters
//! are not zero, so the common case asks the store nothing.
//!
//! A gRPC call fails with HTTP 200 and a `grpc-status`; [`Outcome::status`] carries the HTTP
//! status Envoy maps it to ([`grpc_http_status`]), so a gRPC `UNAVAILABLE` counts as a `503`
//! everywhere an HTTP one does, as Envoy's own outlier detection counts it.

use std::{net::SocketAddr, time::Duration};

use super::{RetryTargets, ServicePicker};
use crate::{
    breaker::{BreakerState, Event, Verdict},
    ejections::{FailureCounts, Unshared},
};

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

impl Outcome {
    /// Whether the response flags can change what `status` served by `served_by` says, so a
    /// data plane reads them (a host call) only then: not when the pick itself answered
    /// below 400. The endpoint is judged by its answer even when an earlier attempt of the
    /// stream failed and a retry came back to it. A 4xx still needs them: a stream idle
    /// timeout ends as a local 408.
    pub fn needs_response_flags(status: Option<u16>, served_by: Served) -> bool {
        !(status.is_some_and(|status| status < 400) && served_by == Served::ByPick)
    }

    /// A stream's outcome from what Envoy reports: its status (`None` when nothing was
    /// answered: the client went away, say), its [`response_flags`] (0 when not read), the
    /// latency to the response's headers or to the stream's end, and how much of its request
    /// the client had sent ([`RequestSent`]). A stream without a response and without an
    /// upstream flag (a client that cancelled) counts no failure: only its latency is
    /// recorded.
    ///
    /// `None` when the stream says nothing about the endpoint because the client ended it
    /// before sending its whole request: no response, a stream idle timeout (`SI`) or a 408,
    /// and no upstream failure (connect failure, reset). A client that stalls its body until
    /// Envoy's idle timeout must not get an endpoint ejected, nor feed its latency estimate
    /// minutes of its own silence; the data plane releases the pick and charges nobody
    /// ([`ServicePicker::abandon`]). An endpoint that answered before the request was sent
    /// whole (a 503 that does not wait for the body) is judged by its answer.
    pub fn of_envoy_stream(
        status: Option<u16>,
        flags: u64,
        latency: Duration,
        request: RequestSent,
    ) -> Option<Self> {
        use response_flags::*;
        let connect_failure = flags & UPSTREAM_CONNECTION_FAILURE != 0;
        let reset = flags & (UPSTREAM_REMOTE_RESET | UPSTREAM_CONNECTION_TERMINATION) != 0;
        let idle = flags & STREAM_IDLE_TIMEOUT != 0;
        if request == RequestSent::Partly
            && !connect_failure
            && !reset
            && (idle || status.is_none_or(|status| status == 408))
        {
            return None;
        }
        Some(Self {
            status,
            connect_failure,
            reset,
            timeout: flags & UPSTREAM_REQUEST_TIMEOUT != 0 || idle,
            latency,
        })
    }
}

/// How much of its request a client had sent when its stream's outcome was taken: what tells
/// an endpoint that went quiet from a client that did ([`Outcome::of_envoy_stream`]). Both
/// data planes follow the request's end of stream (its headers, its body's last chunk or its
/// trailers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RequestSent {
    /// The request's end of stream had been seen.
    Whole,
    /// The client was still sending (or never finished) its request: the state until its
    /// end of stream is seen.
    #[default]
    Partly,
}

impl RequestSent {
    /// `Whole` when the callback that delivered part of the request said it was the end.
    pub fn at(end_of_stream: bool) -> Self {
        if end_of_stream {
            Self::Whole
        } else {
            Self::Partly
        }
    }
}

/// The HTTP status of a gRPC status code, as Envoy maps it (`Grpc::Utility::grpcToHttpStatus`):
/// `OK` is 200, `UNAVAILABLE` 503, `DEADLINE_EXCEEDED` 504, `INTERNAL`, `UNKNOWN` and
/// `DATA_LOSS` 500, `RESOURCE_EXHAUSTED` 429, `UNIMPLEMENTED` 501, the caller's errors 4xx;
/// a code gRPC does not define is 500.
pub fn grpc_http_status(code: u64) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

/// gRPC's `UNKNOWN`: what a `grpc-status` that is not a decimal code reads as, as Envoy
/// reads it (a failure, HTTP 500).
pub const GRPC_UNKNOWN: u64 = 2;

/// A response's `:status`, as bytes: exactly three ASCII digits, the first not 0 (100 to 999,
/// what Envoy's codecs accept from an upstream); anything else is no status. Both data planes
/// read it this way.
pub fn parse_http_status(bytes: &[u8]) -> Option<u16> {
    match bytes {
        [
            hundreds @ b'1'..=b'9',
            tens @ b'0'..=b'9',
            units @ b'0'..=b'9',
        ] => Some(
            u16::from(hundreds - b'0') * 100
                + u16::from(tens - b'0') * 10
                + u16::from(units - b'0'),
        ),
        _ => None,
    }
}

/// A `grpc-status` value, as bytes: a decimal code of one to three ASCII digits; `None` for
/// anything else, which a data plane reads as [`GRPC_UNKNOWN`] (and counts as invalid).
pub fn parse_grpc_status(bytes: &[u8]) -> Option<u64> {
    (!bytes.is_empty() && bytes.len() <= 3 && bytes.iter().all(u8::is_ascii_digit)).then(|| {
        bytes
            .iter()
            .fold(0, |code, digit| code * 10 + u64::from(digit - b'0'))
    })
}

/// Whether a response's `content-type`, as bytes, is gRPC's: `application/grpc`, alone or
/// followed by `+` (a subtype, `application/grpc+proto`) or `;` (parameters). Only then does
/// a data plane read `grpc-status`.
pub fn is_grpc_content_type(bytes: &[u8]) -> bool {
    bytes
        .strip_prefix(b"application/grpc")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"+") || rest.starts_with(b";"))
}

/// Envoy's response flags fulcrum reads: bits of the legacy bitmask both data planes get from
/// Envoy (the wasm filter's `response.flags` property, the native module's `ResponseFlags`
/// attribute). They accumulate over a stream's attempts.
pub mod response_flags {
    /// `UT`: the upstream did not answer within the route's or the attempt's timeout.
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
    /// `UR`: the upstream reset the stream.
    pub const UPSTREAM_REMOTE_RESET: u64 = 0x10;
    /// `UF`: no connection to the upstream.
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
    /// `UC`: the upstream's connection closed under the stream.
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40;
    /// `SI`: the stream idled past its idle timeout (answered with a local 408).
    pub const STREAM_IDLE_TIMEOUT: u64 = 0x10000;
}

/// How a request ended, as the filter saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The response status, if a response arrived; for gRPC, the HTTP status of its
    /// `grpc-status` ([`grpc_http_status`]).
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

impl ServicePicker {
    /// Records the end of a request picked on `picked`, charging `outcome` to whoever
    /// [`Served`] it; each breaker counts alone ([`Unshared`]). See
    /// [`complete_counted`](Self::complete_counted).
    pub fn complete(
        &mut self,
        picked: SocketAddr,
        served_by: Served,
        outcome: Outcome,
        now: Duration,
    ) -> Transitions {
        self.complete_counted(picked, served_by, outcome, now, &mut Unshared)
    }

    /// Records the end of a request picked on `picked`, charging `outcome` to whoever
    /// [`Served`] it, with the consecutive-failure counters of the proxy kept in `counts`.
    ///
    /// Always releases `picked`'s in-flight count. [`Served::ByRetryTarget`] also records the
    /// pick's attempt as a failure (with the failure penalty); [`Served::ByFallback`]
    /// charges the pick nothing. The endpoint that served (if it is one of this service's)
    /// gets the outcome's latency and verdict. Returns the breaker transitions this caused so
    /// the filter can count ejections. Endpoints no longer present are ignored.
    ///
    /// A closed endpoint's outcome is counted in `counts` when the policy has a consecutive
    /// rule and the outcome is a failure, or a success while the breaker's counters are not
    /// zero; the breaker then judges the proxy's counters `counts` returns (its own when it
    /// returns `None`).
    pub fn complete_counted(
        &mut self,
        picked: SocketAddr,
        served_by: Served,
        outcome: Outcome,
        now: Duration,
        counts: &mut dyn FailureCounts,
    ) -> Transitions {
        let mut transitions = Transitions::default();
        let picked_slot = self.slots.find(picked);
        if let Some(slot) = picked_slot {
            self.release(slot);
        }
        let policy = &self.policy;
        let estimate = &self.latency_estimate;
        let served = match served_by {
            Served::ByPick => picked,
            Served::ByRetryTarget(served) | Served::ByFallback(served) => served,
        };
        if matches!(served_by, Served::ByRetryTarget(_))
            && let Some(slot) = picked_slot
        {
            self.slots.penalize(slot, estimate, now);
            let event = self.completion(slot, Verdict::RETRIED_ELSEWHERE, now, counts);
            transitions.push(self.slots.transition(
                slot,
                event,
                now,
                &self.policy.outlier_detection,
            ));
        }
        // The pick served most requests: its slot is known already.
        let served_slot = if served == picked {
            picked_slot
        } else {
            self.slots.find(served)
        };
        if let Some(slot) = served_slot {
            let typical = self.slots.typical_latency(now, &policy.outlier_detection);
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
            )
            .against_peers(policy.outlier_detection.relative_latency.as_ref(), typical);
            self.slots.observe(slot, outcome.latency, now, estimate);
            if verdict.failure {
                self.slots.penalize(slot, estimate, now);
            }
            let event = self.completion(slot, verdict, now, counts);
            transitions.push(self.slots.transition(
                slot,
                event,
                now,
                &self.policy.outlier_detection,
            ));
        }
        transitions
    }

    /// Releases the in-flight count of a pick whose outcome will never be known (the native
    /// load balancer's pick for a stream no outcome filter observes), charging nobody: no
    /// latency, no verdict, no breaker event. An address no longer present is ignored.
    pub fn abandon(&mut self, picked: SocketAddr) {
        if let Some(slot) = self.slots.find(picked) {
            self.release(slot);
        }
    }

    /// The breaker event of `verdict` on `slot`: counted in `counts` first when it may change
    /// the proxy's consecutive counters (see [`complete_counted`](Self::complete_counted)).
    fn completion(
        &self,
        slot: usize,
        verdict: Verdict,
        now: Duration,
        counts: &mut dyn FailureCounts,
    ) -> Event {
        let outlier_detection = &self.policy.outlier_detection;
        let counts_consecutive = outlier_detection.consecutive_failures > 0
            || outlier_detection.consecutive_gateway_errors > 0;
        let entry = &self.slots[slot];
        let breaker = &entry.stats.breaker;
        let may_change_counts =
            verdict.failure || verdict.gateway_error || !breaker.consecutive().is_zero();
        if !counts_consecutive
            || !may_change_counts
            || !matches!(breaker.state(), BreakerState::Closed { .. })
        {
            return Event::Complete(verdict);
        }
        match counts.count(entry.endpoint.address, &verdict, now) {
            Some(proxy) => Event::CompleteCounted { verdict, proxy },
            None => Event::Complete(verdict),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use super::{
        Outcome, RequestSent, Served, grpc_http_status, is_grpc_content_type, parse_grpc_status,
        parse_http_status, response_flags,
    };

    #[test]
    fn a_status_is_three_digits_from_100_to_999_and_nothing_else() {
        assert_eq!(parse_http_status(b"200"), Some(200));
        assert_eq!(parse_http_status(b"100"), Some(100));
        assert_eq!(parse_http_status(b"999"), Some(999));
        for hostile in [
            &b"099"[..],
            b"000",
            b"0",
            b"20x",
            b"+200",
            b" 200",
            b"2000",
            b"",
            b"\xd9\xa2\xd9\xa0\xd9\xa0",
            b"20",
            b"2x0",
            b"-20",
            &[0xff, b'0', b'0'],
        ] {
            assert_eq!(parse_http_status(hostile), None, "{hostile:?}");
        }
    }

    #[test]
    fn a_grpc_status_is_one_to_three_digits() {
        assert_eq!(parse_grpc_status(b"0"), Some(0));
        assert_eq!(parse_grpc_status(b"014"), Some(14));
        assert_eq!(parse_grpc_status(b"999"), Some(999));
        for hostile in [&b""[..], b"-1", b"+1", b"1a", b"1000", b" 1", b"\xff"] {
            assert_eq!(parse_grpc_status(hostile), None, "{hostile:?}");
        }
    }

    #[test]
    fn grpc_content_types_are_application_grpc_and_its_subtypes_only() {
        for grpc in [
            &b"application/grpc"[..],
            b"application/grpc+proto",
            b"application/grpc;charset=utf-8",
        ] {
            assert!(is_grpc_content_type(grpc), "{grpc:?}");
        }
        for other in [
            &b"application/grpc-web"[..],
            b"application/grpcx",
            b"APPLICATION/GRPC",
            b"text/html",
            b"",
        ] {
            assert!(!is_grpc_content_type(other), "{other:?}");
        }
    }

    #[test]
    fn envoys_flags_say_how_an_attempt_failed_and_a_clients_cancel_is_none_of_them() {
        let latency = Duration::from_millis(7);
        let whole = |status, flags| {
            Outcome::of_envoy_stream(status, flags, latency, RequestSent::Whole)
                .expect("a stream whose request was sent whole says something of its endpoint")
        };
        let connect = whole(Some(503), response_flags::UPSTREAM_CONNECTION_FAILURE);
        assert!(connect.connect_failure && !connect.reset && !connect.timeout);
        let reset = whole(None, response_flags::UPSTREAM_REMOTE_RESET);
        assert!(reset.reset);
        let closed = whole(None, response_flags::UPSTREAM_CONNECTION_TERMINATION);
        assert!(closed.reset);
        let timeout = whole(Some(504), response_flags::UPSTREAM_REQUEST_TIMEOUT);
        assert!(timeout.timeout);
        let idle = whole(Some(408), response_flags::STREAM_IDLE_TIMEOUT);
        assert!(idle.timeout);
        // `DC`: the downstream connection terminated.
        let cancelled = whole(None, 0x4000);
        assert_eq!(
            cancelled,
            Outcome {
                status: None,
                connect_failure: false,
                reset: false,
                timeout: false,
                latency,
            }
        );
    }

    #[test]
    fn a_client_that_stalls_or_leaves_before_its_request_is_sent_charges_the_endpoint_nothing() {
        let latency = Duration::from_secs(300);
        let partly =
            |status, flags| Outcome::of_envoy_stream(status, flags, latency, RequestSent::Partly);
        // Envoy's stream idle timeout while the client held back its body: a local 408.
        assert_eq!(partly(Some(408), response_flags::STREAM_IDLE_TIMEOUT), None);
        assert_eq!(partly(None, response_flags::STREAM_IDLE_TIMEOUT), None);
        // A request timeout (a 408 with no flag fulcrum reads), a client gone mid-upload.
        assert_eq!(partly(Some(408), 0), None);
        assert_eq!(partly(None, 0x4000), None);
    }

    #[test]
    fn an_endpoint_that_fails_before_the_request_is_sent_is_still_charged() {
        let latency = Duration::from_millis(3);
        let partly =
            |status, flags| Outcome::of_envoy_stream(status, flags, latency, RequestSent::Partly);
        let refused = partly(Some(503), response_flags::UPSTREAM_CONNECTION_FAILURE)
            .expect("a connect failure is the endpoint's");
        assert!(refused.connect_failure);
        let reset = partly(None, response_flags::UPSTREAM_REMOTE_RESET)
            .expect("a reset mid-upload is the endpoint's");
        assert!(reset.reset);
        let early = partly(Some(503), 0).expect("an answer that did not wait for the body");
        assert_eq!(early.status, Some(503));
        assert!(!early.timeout);
        let ok = partly(Some(200), 0).expect("an answer that did not wait for the body");
        assert_eq!(ok.status, Some(200));
    }

    #[test]
    fn a_request_is_sent_whole_at_its_end_of_stream() {
        assert_eq!(RequestSent::at(true), RequestSent::Whole);
        assert_eq!(RequestSent::at(false), RequestSent::Partly);
    }

    #[test]
    fn flags_are_needed_unless_the_pick_itself_answered_below_400() {
        let other: SocketAddr = "10.0.0.2:80".parse().expect("an address");
        assert!(!Outcome::needs_response_flags(Some(200), Served::ByPick));
        assert!(!Outcome::needs_response_flags(Some(302), Served::ByPick));
        assert!(Outcome::needs_response_flags(Some(408), Served::ByPick));
        assert!(Outcome::needs_response_flags(Some(503), Served::ByPick));
        assert!(Outcome::needs_response_flags(None, Served::ByPick));
        assert!(Outcome::needs_response_flags(
            Some(200),
            Served::ByRetryTarget(other)
        ));
        assert!(Outcome::needs_response_flags(
            Some(200),
            Served::ByFallback(other)
        ));
    }

    #[test]
    fn grpc_failures_map_onto_the_http_statuses_envoy_uses() {
        assert_eq!(grpc_http_status(0), 200);
        assert_eq!(grpc_http_status(14), 503, "UNAVAILABLE");
        assert_eq!(grpc_http_status(4), 504, "DEADLINE_EXCEEDED");
        assert_eq!(grpc_http_status(13), 500, "INTERNAL");
        assert_eq!(grpc_http_status(2), 500, "UNKNOWN");
        assert_eq!(grpc_http_status(8), 429, "RESOURCE_EXHAUSTED");
        assert_eq!(grpc_http_status(3), 400, "INVALID_ARGUMENT");
        assert_eq!(
            grpc_http_status(99),
            500,
            "undefined codes are server errors"
        );
    }
}
