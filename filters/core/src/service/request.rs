//! What a request brings to the picker and what it gets back: the attributes the filter
//! extracted ([`RequestAttributes`]) as the policy asked ([`RequestNeeds`]), and either a
//! [`Pick`] or a [`Rejection`].

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::RetryTargets;
use crate::policy::OnNoEndpoint;

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
