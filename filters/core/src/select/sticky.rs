//! Sticky sessions: the layer in front of the policy's algorithm (`Sessions`), and its tokens,
//! an opaque cookie value naming an endpoint without revealing its IP.
//!
//! The token is 16 lower-case hex digits of SipHash-2-4 of the endpoint's `IP:port`, keyed
//! with a 128-bit session key the operator configures ([`SessionKeys`]): without the key a
//! client can neither forge a token for an endpoint of its choice nor recover an address from
//! a token. `Sessions` keeps a sorted index token → endpoint over every configured key, so
//! keys rotate without breaking sessions: the first key signs new cookies, the others are still
//! accepted (add the new key first, drop the old one once the cookie TTL has passed). Envoy's
//! `stateful_session` stores the address itself (base64); a keyed hash keeps internal
//! addresses private and a forged cookie useless.
//!
//! With no key configured a fixed, public key is used: tokens still hide nothing from someone
//! who guesses candidate addresses, and the filter warns about it.

use std::{
    hash::Hasher,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use siphasher::sip::SipHasher24;

use super::Slot;
use crate::{
    endpoint::Health,
    policy::{EndpointSelector, Sticky},
    service::RequestNeeds,
};

/// The sticky-session layer of a service: the cookie, the keys, and which endpoint each
/// token names. Rebuilt with the endpoint set and when the keys change.
#[derive(Debug, Clone)]
pub(crate) struct Sessions {
    cookie: String,
    ttl: Option<Duration>,
    keys: SessionKeys,
    /// Token → slot for the healthy and draining selected endpoints, sorted by token.
    index: Vec<(u64, u32)>,
}

impl Sessions {
    /// Sessions under `config`, signed with the public default key until
    /// [`set_keys`](Self::set_keys); empty until [`rebuild`](Self::rebuild).
    pub fn new(config: &Sticky) -> Self {
        Self {
            cookie: config.cookie.clone(),
            ttl: config.ttl,
            keys: SessionKeys::default(),
            index: Vec::new(),
        }
    }

    /// Records the cookie the filter must extract.
    pub fn needs<'a>(&'a self, needs: &mut RequestNeeds<'a>) {
        needs.sticky_cookie = Some(&self.cookie);
    }

    /// Makes and checks tokens with `keys` from now on.
    pub fn set_keys(&mut self, keys: &SessionKeys, slots: &[Slot], selector: &EndpointSelector) {
        if self.keys != *keys {
            self.keys = keys.clone();
            self.rebuild(slots, selector);
        }
    }

    /// Indexes the endpoints a session may stay on: selected and not unhealthy (draining
    /// endpoints keep their sessions and get no new ones).
    pub fn rebuild(&mut self, slots: &[Slot], selector: &EndpointSelector) {
        self.index = slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| {
                slot.endpoint.health != Health::Unhealthy && selector.matches(&slot.endpoint)
            })
            .flat_map(|(index, slot)| {
                self.keys
                    .tokens(slot.endpoint.address)
                    .map(move |token| (token, index as u32))
            })
            .collect();
        self.index.sort_unstable();
    }

    /// The slot a request's session cookie names, if any.
    pub fn lookup(&self, cookie: Option<&str>) -> Option<usize> {
        let token = parse_token(cookie?)?;
        let position = self
            .index
            .binary_search_by_key(&token, |&(token, _)| token)
            .ok()?;
        Some(self.index[position].1 as usize)
    }

    /// The `Set-Cookie` value starting a session on `address`.
    pub fn set_cookie(&self, address: &SocketAddr) -> String {
        set_cookie(
            &self.cookie,
            &format_token(self.keys.token(address)),
            self.ttl,
        )
    }
}

/// One session key: 16 bytes, written as 32 hex digits in configuration.
pub type SessionKey = [u8; 16];

/// The keys sticky tokens are made and checked with: the first signs, every one verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKeys {
    keys: Vec<SessionKey>,
}

impl Default for SessionKeys {
    /// The fixed public key used when none is configured.
    fn default() -> Self {
        Self {
            keys: vec![*b"fulcrum-sticky-0"],
        }
    }
}

impl SessionKeys {
    /// Keys in order of preference; an empty list means the public default.
    pub fn new(keys: Vec<SessionKey>) -> Self {
        if keys.is_empty() {
            Self::default()
        } else {
            Self { keys }
        }
    }

    /// Whether these are the public default key (no secret configured).
    pub fn is_public_default(&self) -> bool {
        *self == Self::default()
    }

    /// Parses one key from 32 hex digits.
    pub fn parse_key(text: &str) -> Option<SessionKey> {
        if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut key = [0u8; 16];
        for (index, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * index..2 * index + 2], 16).ok()?;
        }
        Some(key)
    }

    /// The token new cookies carry for `address` (first key).
    pub fn token(&self, address: &SocketAddr) -> u64 {
        // Never empty (see `new` and `default`); the public key stands in all the same.
        let key = self.keys.first().unwrap_or(b"fulcrum-sticky-0");
        keyed_token(key, address)
    }

    /// The tokens every key makes for `address`, first key first.
    pub fn tokens(&self, address: SocketAddr) -> impl Iterator<Item = u64> + '_ {
        self.keys.iter().map(move |key| keyed_token(key, &address))
    }
}

fn keyed_token(key: &SessionKey, address: &SocketAddr) -> u64 {
    let mut hasher = SipHasher24::new_with_key(key);
    match address.ip() {
        IpAddr::V4(ip) => hasher.write(&ip.octets()),
        IpAddr::V6(ip) => hasher.write(&ip.octets()),
    }
    hasher.write(&address.port().to_be_bytes());
    hasher.finish()
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
pub fn set_cookie(name: &str, value: &str, ttl: Option<Duration>) -> String {
    match ttl {
        Some(ttl) => format!(
            "{name}={value}; Path=/; HttpOnly; Max-Age={}",
            ttl.as_secs()
        ),
        None => format!("{name}={value}; Path=/; HttpOnly"),
    }
}
