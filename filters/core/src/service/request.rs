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

/// A request header a policy reads, for a data plane that counts unusable values per input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestHeader {
    /// The hash-on header ([`RequestNeeds::hash_header`]).
    HashHeader,
    /// `cookie`, for a hash-on or sticky cookie.
    Cookie,
    /// The rate limit's client key header ([`RequestNeeds::client_key_header`]).
    ClientKey,
}

/// Longest hash-key or client-key header value a data plane uses: 4 KiB. A longer one reads
/// as absent (the wasm filter counts it as invalid); the wasm filter caps the other names it
/// reads (service, authority, string properties) the same.
pub const MAX_VALUE_BYTES: usize = 4 << 10;

/// Longest `cookie` header a data plane parses: 8 KiB, the per-header limit of nginx
/// (`large_client_header_buffers`) and Apache (`LimitRequestFieldSize`), so a longer one would
/// not pass the usual web servers either. A longer header reads as no cookie: a sticky client
/// gets a new session, a hash cookie is generated afresh.
pub const MAX_COOKIE_BYTES: usize = 8 << 10;

impl RequestHeader {
    /// The longest value of this header a data plane uses; a longer one reads as absent, on
    /// both data planes alike.
    pub fn cap(self) -> usize {
        match self {
            Self::Cookie => MAX_COOKIE_BYTES,
            Self::HashHeader | Self::ClientKey => MAX_VALUE_BYTES,
        }
    }
}

/// The request attributes a policy reads, copied out of the request once, so that
/// [`RequestAttributes`] can borrow them: the one reading of a request both data planes
/// share (the wasm filter through proxy-wasm, the native module through Envoy's LB context).
#[derive(Debug, Default)]
pub struct RequestInputs {
    hash_header: Option<String>,
    cookies: Option<String>,
    hash_cookie_name: Option<String>,
    sticky_cookie_name: Option<String>,
    source_ip: Option<IpAddr>,
    client_key: Option<String>,
}

impl RequestInputs {
    /// Reads what `needs` asks and nothing else: `header(name, which)` answers a request
    /// header's value (`None` when absent or unusable), `source_ip()` the downstream IP,
    /// asked only when the policy hashes on it.
    pub fn read(
        needs: RequestNeeds<'_>,
        mut header: impl FnMut(&str, RequestHeader) -> Option<String>,
        source_ip: impl FnOnce() -> Option<IpAddr>,
    ) -> Self {
        let wants_cookies = needs.hash_cookie.is_some() || needs.sticky_cookie.is_some();
        Self {
            hash_header: needs
                .hash_header
                .and_then(|name| header(name, RequestHeader::HashHeader)),
            cookies: wants_cookies
                .then(|| header("cookie", RequestHeader::Cookie))
                .flatten(),
            hash_cookie_name: needs.hash_cookie.map(str::to_owned),
            sticky_cookie_name: needs.sticky_cookie.map(str::to_owned),
            source_ip: if needs.source_ip { source_ip() } else { None },
            client_key: needs
                .client_key_header
                .and_then(|name| header(name, RequestHeader::ClientKey)),
        }
    }

    /// The attributes for [`ServicePicker::pick`](crate::ServicePicker::pick), borrowed.
    pub fn attributes(&self) -> RequestAttributes<'_> {
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

/// The value of cookie `name` in a `Cookie` header (`a=1; b=2`), quotes removed.
pub fn cookie_value<'a>(cookies: &'a str, name: &str) -> Option<&'a str> {
    cookies.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then(|| value.trim_matches('"'))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_is_found_by_name_among_others_and_unquoted() {
        assert_eq!(
            cookie_value("a=1; fulcrum-session=abc; b=2", "fulcrum-session"),
            Some("abc")
        );
        assert_eq!(cookie_value("a=1;b=\"q\"", "b"), Some("q"));
        assert_eq!(cookie_value("a=1", "b"), None);
        assert_eq!(cookie_value("", "b"), None);
    }

    #[test]
    fn only_what_the_policy_needs_is_read() {
        let needs = RequestNeeds {
            sticky_cookie: Some("s"),
            ..RequestNeeds::default()
        };
        let mut asked = Vec::new();
        let inputs = RequestInputs::read(
            needs,
            |name, which| {
                asked.push((name.to_owned(), which));
                Some("a=1; s=\"tok\"".to_owned())
            },
            || panic!("the source IP is not needed"),
        );
        assert_eq!(asked, [("cookie".to_owned(), RequestHeader::Cookie)]);
        let attributes = inputs.attributes();
        assert_eq!(attributes.sticky_cookie, Some("tok"));
        assert_eq!(attributes.hash_cookie, None);
        assert_eq!(attributes.hash_header, None);
    }
}
