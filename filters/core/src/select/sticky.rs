//! Sticky-session tokens: an opaque cookie value naming an endpoint without revealing its IP.
//!
//! The token is 16 lower-case hex digits of a keyed hash of the address; the balancer keeps a
//! sorted index token → endpoint, rebuilt with the endpoint set. Envoy's `stateful_session`
//! stores the address itself (base64); a hash keeps internal addresses private and makes a
//! forged cookie useless beyond naming an endpoint that exists.

use crate::rng::mix64;

/// The token for an endpoint with this address hash.
pub fn token(address_hash: u64) -> u64 {
    mix64(address_hash ^ 0x243F_6A88_85A3_08D3)
}

/// Formats a token as the cookie value.
pub fn format_token(token: u64) -> String {
    format!("{token:016x}")
}

/// Parses a cookie value; `None` unless it is exactly 16 hex digits.
pub fn parse_token(value: &str) -> Option<u64> {
    if value.len() != 16 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(value, 16).ok()
}

/// The `Set-Cookie` header value for `name=value`, `Path=/`, `HttpOnly`, and `Max-Age` when a
/// TTL is configured.
pub fn set_cookie(name: &str, value: &str, ttl: Option<std::time::Duration>) -> String {
    match ttl {
        Some(ttl) => format!(
            "{name}={value}; Path=/; HttpOnly; Max-Age={}",
            ttl.as_secs()
        ),
        None => format!("{name}={value}; Path=/; HttpOnly"),
    }
}
