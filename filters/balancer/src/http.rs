//! The per-request context: strip, pick, steer; then feed the outcome back.
//!
//! `on_http_request_headers` removes any client-sent override header (clients must not steer
//! traffic), finds the service, asks the core for a pick and writes `IP:port[,IP:port…]` into
//! the override header (the rest are retry targets, which Envoy's `override_host` policy hands
//! to retries in order). A rejection becomes a local 429/503 or, when the policy says
//! `fail_open`, no header at all so Envoy's fallback policy picks. On the response path the
//! outcome (status, Envoy's response flags, the upstream that really served, latency to the
//! first response byte) goes back to the core. `on_log`, which Envoy calls for every stream,
//! completes a request that ended without response headers (reset, timeout), so in-flight
//! counts never leak.
//!
//! Every header and property is read through [`crate::input`], as bytes: anything not UTF-8,
//! too long or unusable is treated as absent and counted, never a panic. A VM whose plugin is
//! not configured hands out [`PassThrough`] contexts instead of none.

use std::{
    cell::RefCell,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    rc::Rc,
    time::Duration,
};

use fulcrum_core::{Outcome, Rejection, RequestAttributes, RequestNeeds};
use proxy_wasm::{
    hostcalls,
    traits::{Context, HttpContext},
    types::{Action, MapType},
};

use crate::{
    config::{FilterConfig, ServiceSource},
    input::{self, Input},
    metrics::{FailOpen, Metrics},
    now,
    worker::{Routed, Worker},
};

/// Envoy response flags (`StreamInfo::CoreResponseFlag` bits, as `response.flags` reports).
mod flags {
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
    pub const UPSTREAM_REMOTE_RESET: u64 = 0x10;
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40;
    pub const STREAM_IDLE_TIMEOUT: u64 = 0x10000;
}

/// A pick whose outcome is still to be recorded.
#[derive(Debug)]
struct Pending {
    service: Rc<str>,
    endpoint: SocketAddr,
    started: Duration,
    set_cookie: Option<String>,
}

/// One HTTP stream's context.
#[derive(Debug)]
pub struct Request {
    config: Rc<FilterConfig>,
    worker: Rc<RefCell<Worker>>,
    /// The VM's stats (the worker's), reachable without borrowing the worker.
    metrics: Rc<Metrics>,
    pending: Option<Pending>,
}

impl Request {
    pub fn new(config: Rc<FilterConfig>, worker: Rc<RefCell<Worker>>) -> Self {
        let metrics = worker.borrow().metrics.clone();
        Self {
            config,
            worker,
            metrics,
            pending: None,
        }
    }

    /// The request's service name, per the configured source.
    fn service_name(&self) -> Option<String> {
        let metrics = &self.metrics;
        match &self.config.service {
            ServiceSource::Authority => {
                let authority = input::request_header(":authority", Input::Authority, metrics)?;
                Some(strip_port(&authority).to_owned())
            }
            ServiceSource::Header { name } => input::request_header(name, Input::Service, metrics),
            ServiceSource::Fixed { name } => Some(name.clone()),
            ServiceSource::RouteCluster => {
                input::string_property(&["xds", "cluster_name"], Input::RouteCluster, metrics)
            }
        }
    }

    fn pick(&mut self) -> Action {
        let Some(name) = self.service_name().filter(|name| !name.is_empty()) else {
            return self.fail_open(FailOpen::NoService);
        };
        let worker_cell = self.worker.clone();
        let Ok(mut worker) = worker_cell.try_borrow_mut() else {
            return self.fail_open(FailOpen::Internal);
        };
        let Some(Routed {
            key,
            service,
            rng,
            metrics,
        }) = worker.route(&name)
        else {
            return Action::Continue;
        };
        let now = now();
        let inputs = RequestInputs::read(service.balancer.request_needs(), metrics);
        let attributes = inputs.attributes();
        match service.balancer.pick(&attributes, now, rng) {
            Ok(pick) => {
                // One allocation: addresses are written straight into the header value.
                let mut value =
                    String::with_capacity(22 * (1 + pick.retry_targets.as_slice().len()));
                let _ = write!(value, "{}", pick.endpoint);
                for target in pick.retry_targets.as_slice() {
                    let _ = write!(value, ",{target}");
                }
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    &self.config.override_header,
                    Some(&value),
                );
                service.metrics.picked(pick.endpoint);
                self.pending = Some(Pending {
                    service: key,
                    endpoint: pick.endpoint,
                    started: now,
                    set_cookie: pick.set_sticky_cookie,
                });
                Action::Continue
            }
            Err(rejection) if rejection.fails_open() => {
                metrics.fail_open(FailOpen::Rejected(rejection));
                Action::Continue
            }
            Err(Rejection::RateLimited { retry_after }) => {
                service.metrics.rate_limited();
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                let seconds = seconds.max(1).to_string();
                let _ = hostcalls::send_http_response(
                    429,
                    vec![
                        ("retry-after", seconds.as_str()),
                        ("x-fulcrum-reason", "rate_limited"),
                    ],
                    Some(format!("fulcrum: rate limit of service {name} exceeded\n").as_bytes()),
                );
                Action::Pause
            }
            Err(rejection) => {
                service.metrics.fail_fast();
                let _ = hostcalls::send_http_response(
                    503,
                    vec![("x-fulcrum-reason", rejection.reason())],
                    Some(
                        format!(
                            "fulcrum: no admissible endpoint for service {name} ({})\n",
                            rejection.reason()
                        )
                        .as_bytes(),
                    ),
                );
                Action::Pause
            }
        }
    }

    fn fail_open(&self, why: FailOpen) -> Action {
        self.metrics.fail_open(why);
        Action::Continue
    }

    /// Feeds the outcome of the pending pick to the core, once.
    fn complete(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let metrics = &self.metrics;
        let flags =
            input::int_property(&["response", "flags"], Input::ResponseFlags, metrics).unwrap_or(0);
        let status = input::int_property(&["response", "code"], Input::ResponseCode, metrics)
            .and_then(|code| u16::try_from(code).ok())
            .filter(|code| *code > 0);
        let outcome = Outcome {
            status,
            connect_failure: flags & flags::UPSTREAM_CONNECTION_FAILURE != 0,
            reset: flags & (flags::UPSTREAM_REMOTE_RESET | flags::UPSTREAM_CONNECTION_TERMINATION)
                != 0,
            timeout: flags & (flags::UPSTREAM_REQUEST_TIMEOUT | flags::STREAM_IDLE_TIMEOUT) != 0,
            latency: now().saturating_sub(pending.started),
        };
        let served_by = input::parsed_property(
            &["upstream", "address"],
            Input::UpstreamAddress,
            metrics,
            |address| address.parse::<SocketAddr>().ok(),
        )
        .filter(|address| *address != pending.endpoint);
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            return;
        };
        let Some(service) = worker.service_by_key(&pending.service) else {
            return;
        };
        let transitions = service
            .balancer
            .complete(pending.endpoint, served_by, outcome, now());
        for transition in transitions.iter() {
            service.metrics.transition(transition);
        }
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        input::strip_override_headers(&self.config.override_header, &self.metrics);
        self.pick()
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if let Some(cookie) = self
            .pending
            .as_mut()
            .and_then(|pending| pending.set_cookie.take())
        {
            let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, "set-cookie", &cookie);
        }
        self.complete();
        Action::Continue
    }

    fn on_log(&mut self) {
        self.complete();
    }
}

/// The context of a request on a VM whose plugin is not configured (its `on_configure` failed
/// or has not run): the SDK panics when `create_http_context` has no context to give, so the
/// request gets this one. It strips the override header, counts a `not_configured` fail-open
/// and lets the cluster's fallback policy pick.
#[derive(Debug)]
pub struct PassThrough {
    /// The configured override header if the configuration parsed, else the default.
    override_header: Rc<str>,
    metrics: Rc<Metrics>,
}

impl PassThrough {
    pub fn new(override_header: Rc<str>, metrics: Rc<Metrics>) -> Self {
        Self {
            override_header,
            metrics,
        }
    }
}

impl Context for PassThrough {}

impl HttpContext for PassThrough {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        input::strip_override_headers(&self.override_header, &self.metrics);
        self.metrics.fail_open(FailOpen::NotConfigured);
        Action::Continue
    }
}

/// The request attributes a policy reads, copied out of the request once.
#[derive(Debug, Default)]
struct RequestInputs {
    hash_header: Option<String>,
    cookies: Option<String>,
    hash_cookie_name: Option<String>,
    sticky_cookie_name: Option<String>,
    source_ip: Option<IpAddr>,
    client_key: Option<String>,
}

impl RequestInputs {
    fn read(needs: RequestNeeds<'_>, metrics: &Metrics) -> Self {
        let header = |name: Option<&str>, input| {
            name.and_then(|name| input::request_header(name, input, metrics))
        };
        let wants_cookies = needs.hash_cookie.is_some() || needs.sticky_cookie.is_some();
        Self {
            hash_header: header(needs.hash_header, Input::HashHeader),
            cookies: header(wants_cookies.then_some("cookie"), Input::Cookie),
            hash_cookie_name: needs.hash_cookie.map(str::to_owned),
            sticky_cookie_name: needs.sticky_cookie.map(str::to_owned),
            source_ip: if needs.source_ip {
                source_ip(metrics)
            } else {
                None
            },
            client_key: header(needs.client_key_header, Input::ClientKey),
        }
    }

    fn attributes(&self) -> RequestAttributes<'_> {
        let cookie = |name: &Option<String>| {
            let (cookies, name) = (self.cookies.as_deref()?, name.as_deref()?);
            cookie_value(cookies, name)
        };
        RequestAttributes {
            hash_header: self.hash_header.as_deref(),
            hash_cookie: cookie(&self.hash_cookie_name),
            source_ip: self.source_ip,
            sticky_cookie: cookie(&self.sticky_cookie_name),
            client_key: self.client_key.as_deref(),
        }
    }
}

/// The downstream IP (`source.address` is `ip:port`, or an IP); anything else (a pipe path)
/// is unusable and counted.
fn source_ip(metrics: &Metrics) -> Option<IpAddr> {
    input::parsed_property(
        &["source", "address"],
        Input::SourceAddress,
        metrics,
        |address| {
            address
                .parse::<SocketAddr>()
                .map(|socket| socket.ip())
                .or_else(|_| address.parse::<IpAddr>())
                .ok()
        },
    )
}

/// `host` of `host:port` or `[v6]:port`; the input itself when there is no port.
pub fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(authority, |(host, _)| host);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => authority,
    }
}

/// The value of cookie `name` in a `Cookie` header (`a=1; b=2`).
pub fn cookie_value<'a>(cookies: &'a str, name: &str) -> Option<&'a str> {
    cookies.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then(|| value.trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_the_port_of_an_authority() {
        assert_eq!(strip_port("checkout:8080"), "checkout");
        assert_eq!(strip_port("checkout"), "checkout");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("::1"), "::1");
    }

    #[test]
    fn finds_a_cookie_among_several() {
        assert_eq!(
            cookie_value("a=1; fulcrum-session=abc; b=2", "fulcrum-session"),
            Some("abc")
        );
        assert_eq!(cookie_value("a=1;b=\"q\"", "b"), Some("q"));
        assert_eq!(cookie_value("a=1", "b"), None);
        assert_eq!(cookie_value("", "b"), None);
    }
}
