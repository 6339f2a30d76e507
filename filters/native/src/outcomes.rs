//! The companion HTTP filter `fulcrum_outcomes`: opens a [`Stream`](crate::balancer::Stream) per request, names it
//! for `choose_host`, and on the response charges the pick's outcome to the shared picker.
//!
//! The LB ABI has no per-response callback; an HTTP filter of the same `.so`, placed before
//! the router, sees every response and runs on the worker thread that chose the host, so the
//! two meet in the worker's [`Streams`] (a thread-local in `crate::ffi`). Per request:
//!
//! - request headers: the filter's own id is appended to [`STREAM_HEADER`] after any copy a
//!   client sent, and `choose_host` reads the last (a client cannot steer another stream's
//!   pick);
//! - the request's end of stream (its headers, its body's last chunk or its trailers) is
//!   noted: a stream the client ends before sending its whole request (a body stalled until
//!   Envoy's stream idle timeout, an upload abandoned) charges the endpoint nothing unless the
//!   upstream itself failed ([`Outcome::of_envoy_stream`]), as in the wasm filter;
//! - response headers: the status (a gRPC response's `grpc-status`, mapped as Envoy maps it,
//!   when present; else its trailers are awaited) and the latency to the response headers
//!   complete the pick; a sticky session's cookie is set; when the policy refused the request
//!   (the LB answered no host, Envoy a 503), the reply becomes the wasm filter's 429 with
//!   `retry-after` or 503 with `x-fulcrum-reason`;
//! - response trailers: a gRPC status that came only there completes the pick;
//! - stream end: a pick still open (no response: the client went away, or the upstream reset
//!   a gRPC stream before its trailers) completes with Envoy's response flags, so an
//!   upstream's reset counts and a client's cancel does not.
//!
//! Response values are read by the core's rules, the wasm filter's: `:status` is three digits
//! from 100 to 999 ([`parse_http_status`]), `grpc-status` is read only under a gRPC
//! `content-type` ([`is_grpc_content_type`]) and a value that is not a code is `UNKNOWN`, a
//! failure ([`parse_grpc_status`]); a value that is not UTF-8 matches none of them.
//!
//! Envoy's response flags (how attempts failed) are read only when they can change the
//! outcome ([`Outcome::needs_response_flags`]), as the wasm filter reads them, and mean the
//! same ([`Outcome::of_envoy_stream`]).
//!
//! Envoy's router answers an upstream timeout with a local 504 and a connection failure with
//! a local 503; both pass through this filter as responses, which the core counts as the
//! gateway errors they are.

use std::{net::IpAddr, time::Duration};

use fulcrum_core::{
    Outcome, Rejection, RequestSent, Served,
    service::{
        GRPC_UNKNOWN, grpc_http_status, is_grpc_content_type, parse_grpc_status, parse_http_status,
    },
};

pub use crate::balancer::STREAM_HEADER;
use crate::balancer::{Pick, Response, Streams};

/// What one request's filter remembers between callbacks.
#[derive(Debug, Default)]
pub struct OutcomeFilter {
    /// The stream's id in the worker's [`Streams`], while open.
    stream: Option<u64>,
    /// The HTTP status of a gRPC response whose `grpc-status` is awaited in its trailers,
    /// with the latency to its headers.
    awaiting_trailers: Option<(u16, Duration)>,
    /// How much of the request the client has sent.
    request_sent: RequestSent,
}

/// How the response headers are to be changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HeaderChanges {
    /// Replace `:status` with this.
    pub status: Option<u16>,
    /// Headers to set (replacing any value).
    pub set: Vec<(&'static str, String)>,
    /// A `Set-Cookie` to add.
    pub set_cookie: Option<String>,
}

/// The response headers the filter reads.
#[derive(Debug, Default, Clone, Copy)]
pub struct ResponseHead<'a> {
    /// `:status`.
    pub status: Option<&'a str>,
    /// `content-type`.
    pub content_type: Option<&'a str>,
    /// `grpc-status`.
    pub grpc_status: Option<&'a str>,
}

impl ResponseHead<'_> {
    /// Whether a `content-type` is gRPC's (`application/grpc`, or a subtype or parameters
    /// after it: the core's rule, the wasm filter's): only then is `grpc-status` read.
    pub fn is_grpc_content_type(value: &str) -> bool {
        is_grpc_content_type(value.as_bytes())
    }
}

impl OutcomeFilter {
    /// Request headers: opens the stream; returns the id to write into [`STREAM_HEADER`]
    /// (`None` when the worker tracks too many streams: the header is then removed).
    /// `request` says whether the headers ended the request.
    pub fn on_request(
        &mut self,
        streams: &mut Streams,
        now: Duration,
        source_ip: Option<IpAddr>,
        request: RequestSent,
    ) -> Option<u64> {
        self.request_sent = request;
        self.stream = streams.open(now, source_ip);
        self.stream
    }

    /// The request's end of stream, in its body or its trailers: the client sent it whole.
    pub fn on_request_end(&mut self) {
        self.request_sent = RequestSent::Whole;
    }

    /// Response headers: what to change in them; completes the pick unless a gRPC status is
    /// awaited in the trailers. `flags` reads Envoy's response flags, called only when they
    /// can change the outcome ([`Outcome::needs_response_flags`]).
    pub fn on_response_headers(
        &mut self,
        streams: &mut Streams,
        head: ResponseHead<'_>,
        end_of_stream: bool,
        now: Duration,
        flags: impl FnOnce() -> u64,
    ) -> HeaderChanges {
        let Some(id) = self.stream else {
            return HeaderChanges::default();
        };
        let Some(stream) = streams.get_mut(id) else {
            return HeaderChanges::default();
        };
        let mut changes = HeaderChanges {
            set_cookie: stream.pick.as_mut().and_then(|pick| pick.set_cookie.take()),
            ..HeaderChanges::default()
        };
        if let Some(rejection) = stream.rejection {
            reply_for(rejection, &mut changes);
        }
        let status = head
            .status
            .and_then(|value| parse_http_status(value.as_bytes()));
        let latency = now.saturating_sub(stream.started);
        let is_grpc = head
            .content_type
            .is_some_and(ResponseHead::is_grpc_content_type);
        let grpc = head.grpc_status.map(grpc_code);
        match (is_grpc, grpc) {
            (true, Some(code)) => {
                self.finish(streams, Some(grpc_http_status(code)), latency, now, flags)
            }
            (true, None) if !end_of_stream => {
                self.awaiting_trailers = Some((status.unwrap_or(200), latency));
            }
            _ => self.finish(streams, status, latency, now, flags),
        }
        changes
    }

    /// Response trailers: a gRPC status there completes the pick.
    pub fn on_response_trailers(
        &mut self,
        streams: &mut Streams,
        grpc_status: Option<&str>,
        now: Duration,
        flags: impl FnOnce() -> u64,
    ) {
        let Some((status, latency)) = self.awaiting_trailers.take() else {
            return;
        };
        let status = grpc_status.map(grpc_code).map_or(status, grpc_http_status);
        self.finish(streams, Some(status), latency, now, flags);
    }

    /// Whether a stream is open: only then does [`on_stream_end`](Self::on_stream_end) need
    /// the time.
    pub fn is_open(&self) -> bool {
        self.stream.is_some()
    }

    /// The stream's end: a pick not yet completed had no (complete) response. Envoy's
    /// response flags tell an upstream's failure (reset, timeout) from a client that went
    /// away, which charges the endpoint no failure, as the wasm filter judges it.
    pub fn on_stream_end(
        &mut self,
        streams: &mut Streams,
        now: Duration,
        flags: impl FnOnce() -> u64,
    ) {
        let Some(id) = self.stream else {
            return;
        };
        let (status, latency) = match self.awaiting_trailers.take() {
            Some((status, latency)) => (Some(status), latency),
            None => (
                None,
                streams
                    .get_mut(id)
                    .map_or(Duration::ZERO, |stream| now.saturating_sub(stream.started)),
            ),
        };
        self.finish(streams, status, latency, now, flags);
    }

    fn finish(
        &mut self,
        streams: &mut Streams,
        status: Option<u16>,
        latency: Duration,
        now: Duration,
        flags: impl FnOnce() -> u64,
    ) {
        let Some(mut stream) = self.stream.take().and_then(|id| streams.close(id)) else {
            return;
        };
        // Without a pick the stream is judged as the pick's own (nothing is charged); a pick
        // served by a host fulcrum cannot name is charged to nobody, so needs no flags.
        let served = stream
            .pick
            .as_ref()
            .map_or(Some(Served::ByPick), Pick::served);
        let flags = if served.is_some_and(|served| Outcome::needs_response_flags(status, served)) {
            flags()
        } else {
            0
        };
        stream.complete(
            &Response {
                status,
                flags,
                latency,
                request: self.request_sent,
            },
            now,
        );
    }
}

/// The wasm filter's local reply for a refusal, over Envoy's `no healthy upstream` 503.
fn reply_for(rejection: Rejection, changes: &mut HeaderChanges) {
    changes
        .set
        .push(("x-fulcrum-reason", rejection.reason().to_owned()));
    if let Rejection::RateLimited { retry_after } = rejection {
        let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        changes.status = Some(429);
        changes
            .set
            .push(("retry-after", seconds.max(1).to_string()));
    }
}

/// A `grpc-status` value's code: one that is not a decimal code is `UNKNOWN`, a failure, as
/// Envoy and the wasm filter read it.
fn grpc_code(value: &str) -> u64 {
    parse_grpc_status(value.as_bytes()).unwrap_or(GRPC_UNKNOWN)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fulcrum_core::response_flags;

    use super::*;
    use crate::{
        balancer::{
            Cluster, Counters, Event, RequestContext, STREAM_ID_DIGITS, WorkerLb, parse_stream_id,
            stream_id_text,
        },
        config::parse_policy,
        hosts::test_hosts::{TestHost, TestHosts},
    };

    #[derive(Debug)]
    struct NoCounters;

    impl Counters for NoCounters {
        fn count(&self, _event: Event) {}
    }

    struct Request(u64);

    impl RequestContext for Request {
        fn header(&self, name: &str) -> Option<String> {
            (name == STREAM_HEADER).then(|| {
                let mut buffer = [0; STREAM_ID_DIGITS];
                stream_id_text(self.0, &mut buffer).to_owned()
            })
        }
        fn refuses(&self, _priority: u32, _index: usize) -> bool {
            false
        }
    }

    /// A worker over one host, and a stream picked on it: the filter, the streams and the
    /// cluster, to see what a response does to the host's breaker.
    fn picked_stream() -> (OutcomeFilter, Streams, Arc<Cluster>) {
        picked_stream_of(RequestSent::Whole)
    }

    /// [`picked_stream`] whose request headers say `request`.
    fn picked_stream_of(request: RequestSent) -> (OutcomeFilter, Streams, Arc<Cluster>) {
        let hosts = TestHosts::one_priority(vec![TestHost::healthy("10.0.0.1:80")]);
        let policy = parse_policy(br#"{"outlier_detection": {"consecutive_failures": 5}}"#)
            .expect("a valid policy");
        let cluster = Arc::new(Cluster::new(policy, 1, Box::new(NoCounters)));
        let mut worker = WorkerLb::new(Arc::clone(&cluster), &hosts);
        let mut streams = Streams::default();
        let mut filter = OutcomeFilter::default();
        let id = filter
            .on_request(&mut streams, Duration::ZERO, None, request)
            .expect("a stream");
        worker
            .choose(&hosts, &Request(id), &mut streams, Duration::ZERO)
            .expect("the host");
        (filter, streams, cluster)
    }

    fn grpc_head(grpc_status: Option<&str>) -> ResponseHead<'_> {
        ResponseHead {
            status: Some("200"),
            content_type: Some("application/grpc"),
            grpc_status,
        }
    }

    /// Envoy reporting no response flag.
    fn no_flags() -> u64 {
        0
    }

    fn failing(cluster: &Cluster) -> bool {
        cluster.with_picker(|picker| picker.knows_of_failures())
    }

    fn inflight(cluster: &Cluster) -> u32 {
        cluster.with_picker(|picker| picker.endpoints().map(|view| view.inflight).sum())
    }

    #[test]
    fn a_grpc_call_is_judged_by_the_status_in_its_trailers() {
        let (mut filter, mut streams, cluster) = picked_stream();

        filter.on_response_headers(
            &mut streams,
            grpc_head(None),
            false,
            Duration::from_millis(2),
            no_flags,
        );
        assert_eq!(inflight(&cluster), 1, "the status is still to come");
        filter.on_response_trailers(&mut streams, Some("14"), Duration::from_millis(3), no_flags);

        assert_eq!(inflight(&cluster), 0);
        assert!(failing(&cluster), "UNAVAILABLE is a failure");
    }

    #[test]
    fn a_successful_grpc_call_counts_no_failure() {
        let (mut filter, mut streams, cluster) = picked_stream();

        filter.on_response_headers(
            &mut streams,
            grpc_head(None),
            false,
            Duration::from_millis(2),
            no_flags,
        );
        filter.on_response_trailers(&mut streams, Some("0"), Duration::from_millis(3), no_flags);
        filter.on_stream_end(&mut streams, Duration::from_millis(4), no_flags);

        assert_eq!(inflight(&cluster), 0);
        assert!(!failing(&cluster));
    }

    #[test]
    fn a_trailers_only_grpc_failure_completes_at_the_headers() {
        let (mut filter, mut streams, cluster) = picked_stream();

        filter.on_response_headers(
            &mut streams,
            grpc_head(Some("14")),
            true,
            Duration::from_millis(2),
            no_flags,
        );

        assert_eq!(inflight(&cluster), 0);
        assert!(failing(&cluster));
    }

    #[test]
    fn a_stream_the_upstream_reset_before_its_response_is_a_failure() {
        let (mut filter, mut streams, cluster) = picked_stream();

        filter.on_stream_end(&mut streams, Duration::from_millis(7), || {
            response_flags::UPSTREAM_REMOTE_RESET
        });

        assert_eq!(inflight(&cluster), 0);
        assert!(failing(&cluster));
    }

    #[test]
    fn a_client_that_goes_away_before_the_response_charges_the_endpoint_no_failure() {
        let (mut filter, mut streams, cluster) = picked_stream();

        // Envoy's `DC`, downstream connection termination: no upstream flag.
        filter.on_stream_end(&mut streams, Duration::from_millis(7), || 0x4000);

        assert_eq!(inflight(&cluster), 0, "the pick is released");
        assert!(!failing(&cluster));
    }

    /// Envoy's local reply when the stream idled past its `stream_idle_timeout`.
    fn idle_timeout(filter: &mut OutcomeFilter, streams: &mut Streams) {
        filter.on_response_headers(
            streams,
            ResponseHead {
                status: Some("408"),
                ..ResponseHead::default()
            },
            true,
            Duration::from_secs(300),
            || response_flags::STREAM_IDLE_TIMEOUT,
        );
    }

    #[test]
    fn a_client_stalling_its_body_until_the_idle_timeout_charges_the_endpoint_nothing() {
        let (mut filter, mut streams, cluster) = picked_stream_of(RequestSent::Partly);

        idle_timeout(&mut filter, &mut streams);

        assert_eq!(inflight(&cluster), 0, "the pick is released");
        assert!(
            !failing(&cluster),
            "the client's silence is not the endpoint's"
        );
    }

    #[test]
    fn an_idle_timeout_after_the_whole_body_was_sent_is_the_endpoints() {
        let (mut filter, mut streams, cluster) = picked_stream_of(RequestSent::Partly);
        filter.on_request_end();

        idle_timeout(&mut filter, &mut streams);

        assert_eq!(inflight(&cluster), 0);
        assert!(
            failing(&cluster),
            "the endpoint went quiet on a whole request"
        );
    }

    #[test]
    fn response_flags_are_read_only_when_the_pick_did_not_answer_below_400() {
        let reads = std::cell::Cell::new(0);
        let flags = || {
            reads.set(reads.get() + 1);
            response_flags::UPSTREAM_CONNECTION_FAILURE
        };
        let head = |status| ResponseHead {
            status: Some(status),
            ..ResponseHead::default()
        };
        let (mut ok, mut streams, _) = picked_stream();
        ok.on_response_headers(&mut streams, head("200"), true, Duration::ZERO, flags);
        assert_eq!(reads.get(), 0, "a success of the pick costs no read");

        let (mut failed, mut streams, cluster) = picked_stream();
        failed.on_response_headers(&mut streams, head("503"), true, Duration::ZERO, flags);
        assert_eq!(
            reads.get(),
            1,
            "a 503 reads them: a connect failure, Envoy's local reply"
        );
        assert!(failing(&cluster));
    }

    #[test]
    fn a_grpc_status_that_is_not_a_code_is_unknown_a_failure_as_on_the_wasm_filter() {
        let (mut filter, mut streams, cluster) = picked_stream();

        filter.on_response_headers(
            &mut streams,
            grpc_head(Some("abc")),
            true,
            Duration::from_millis(2),
            no_flags,
        );

        assert_eq!(inflight(&cluster), 0);
        assert!(failing(&cluster), "UNKNOWN is a failure");
    }

    #[test]
    fn a_content_type_that_only_starts_like_grpcs_is_not_grpc_as_on_the_wasm_filter() {
        let (mut filter, mut streams, cluster) = picked_stream();

        filter.on_response_headers(
            &mut streams,
            ResponseHead {
                status: Some("200"),
                content_type: Some("application/grpc-web"),
                grpc_status: Some("14"),
            },
            false,
            Duration::from_millis(2),
            no_flags,
        );

        assert_eq!(
            inflight(&cluster),
            0,
            "judged by its status, not awaiting trailers"
        );
        assert!(!failing(&cluster));
    }

    #[test]
    fn a_rate_limited_refusal_becomes_a_429_with_retry_after_in_whole_seconds() {
        let mut changes = HeaderChanges::default();
        reply_for(
            Rejection::RateLimited {
                retry_after: Duration::from_millis(1200),
            },
            &mut changes,
        );
        assert_eq!(changes.status, Some(429));
        assert_eq!(
            changes.set,
            [
                ("x-fulcrum-reason", "rate_limited".to_owned()),
                ("retry-after", "2".to_owned())
            ]
        );
    }

    #[test]
    fn a_request_without_an_open_stream_changes_nothing() {
        let mut filter = OutcomeFilter::default();
        let mut streams = Streams::default();
        let changes = filter.on_response_headers(
            &mut streams,
            ResponseHead {
                status: Some("200"),
                ..ResponseHead::default()
            },
            true,
            Duration::ZERO,
            no_flags,
        );
        assert_eq!(changes, HeaderChanges::default());
    }

    #[test]
    fn a_stream_is_closed_by_its_response_or_its_end() {
        let mut streams = Streams::default();
        let mut answered = OutcomeFilter::default();
        answered.on_request(&mut streams, Duration::ZERO, None, RequestSent::Whole);
        let mut reset = OutcomeFilter::default();
        reset.on_request(&mut streams, Duration::ZERO, None, RequestSent::Whole);
        assert_eq!(streams.len(), 2);

        answered.on_response_headers(
            &mut streams,
            ResponseHead {
                status: Some("200"),
                ..ResponseHead::default()
            },
            false,
            Duration::from_millis(5),
            no_flags,
        );
        reset.on_stream_end(&mut streams, Duration::from_millis(9), no_flags);

        assert!(streams.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn the_stream_header_value_is_the_id_in_hexadecimal_and_parses_back(id: u64) {
            let mut buffer = [0; STREAM_ID_DIGITS];
            let value = stream_id_text(id, &mut buffer);
            proptest::prop_assert_eq!(value, format!("{id:016x}"));
            proptest::prop_assert_eq!(Request(id).stream_id(), Some(id));
        }

        #[test]
        fn a_stream_header_value_parses_only_as_the_filter_writes_it(value: Vec<u8>) {
            let written = value.len() == STREAM_ID_DIGITS
                && value.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
            proptest::prop_assert_eq!(parse_stream_id(&value).is_some(), written);
        }
    }

    #[test]
    fn the_stream_header_value_covers_the_extremes() {
        let mut buffer = [0; STREAM_ID_DIGITS];
        assert_eq!(stream_id_text(0, &mut buffer), "0000000000000000");
        assert_eq!(stream_id_text(u64::MAX, &mut buffer), "ffffffffffffffff");
        for refused in [
            "",
            "0",
            "FFFFFFFFFFFFFFFF",
            "+000000000000001",
            "00000000000000001",
        ] {
            assert_eq!(parse_stream_id(refused.as_bytes()), None, "{refused}");
        }
    }

    #[test]
    fn grpc_status_is_read_only_for_a_grpc_content_type() {
        assert!(ResponseHead::is_grpc_content_type("application/grpc"));
        assert!(ResponseHead::is_grpc_content_type("application/grpc+proto"));
        assert!(!ResponseHead::is_grpc_content_type("application/json"));
        assert!(!ResponseHead::is_grpc_content_type(""));
    }
}
