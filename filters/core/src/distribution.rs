//! Snapshot distribution: a poll answer that is either a whole snapshot or a delta against
//! a version the filter already holds, read service by service so that only the services
//! whose content changed are parsed.
//!
//! Versions are hashes of content ([`crate::version`]), equal in every control-plane
//! replica, so "the delta from version V" means the same whichever replica answers, and a
//! replica that does not know V simply sends everything.
//!
//! **The protocol** (`GET /v1/snapshot`, `docs/control-plane.md`):
//! - The filter asks with `If-None-Match: "<V>"` (the version it holds) and
//!   `Accept: application/vnd.fulcrum.snapshot-delta.v1+json, application/json`.
//! - The control plane answers `304` when V is current. When V is one of the versions it
//!   published recently, it answers a **delta** ([`DELTA_MEDIA_TYPE`]):
//!   `{"version": W, "base": V, "services": {added or changed}, "removed": [names],
//!   "policy": P}`, the policy only when it changed. Otherwise (V unknown, too old, absent or
//!   garbage) it answers the **whole** snapshot, which has no `base`.
//! - An old control plane ignores the `Accept` and answers whole snapshots as JSON; an old
//!   filter does not ask for deltas and gets the whole snapshot byte for byte as before. A
//!   filter tells the two answers apart by `base` alone ([`Answer::base`]).
//!
//! A service's JSON is the same in both answers (the control plane serializes
//! [`ServiceEndpoints`] the same way), and its [`content_hash`] is what a filter compares to
//! know whether a service changed, whichever answer brought it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{Policy, ServiceEndpoints, Snapshot, receive::ReceiveError, version::content_version};

/// The media type of a delta answer (and of a whole snapshot served to a client asking for
/// deltas), which a filter names in `Accept` to ask for deltas.
pub const DELTA_MEDIA_TYPE: &str = "application/vnd.fulcrum.snapshot-delta.v1+json";

/// The `Accept` of a filter that takes deltas: a delta when the control plane can, else the
/// whole snapshot as JSON (all a control plane older than deltas serves).
pub const DELTA_ACCEPT: &str = "application/vnd.fulcrum.snapshot-delta.v1+json, application/json";

/// The longest snapshot version a filter takes, in bytes. A version is kept in shared data,
/// copied by every VM on every tick, sent back in `If-None-Match` and logged; the control
/// plane's are 16 hex digits.
pub const MAX_VERSION_BYTES: usize = 128;

/// Whether `version` is one a filter takes: at most [`MAX_VERSION_BYTES`] of printable ASCII.
pub fn is_valid_version(version: &[u8]) -> bool {
    version.len() <= MAX_VERSION_BYTES && version.iter().all(|byte| (b' '..=b'~').contains(byte))
}

/// The content hash of one service's (or the policy's) JSON as the control plane sent it:
/// 16 hex digits of SHA-256, as versions are.
pub fn content_hash(json: &[u8]) -> String {
    content_version(&[json])
}

/// A poll answer with its services and policy still as raw JSON, borrowed from the body.
#[derive(Debug, Deserialize)]
pub struct Answer<'a> {
    /// The version the answer brings the filter to; valid ([`is_valid_version`]).
    #[serde(deserialize_with = "valid_version")]
    pub version: String,
    /// The version this answer is a delta against; `None`: a whole snapshot, which replaces
    /// every service.
    #[serde(default)]
    pub base: Option<String>,
    /// Every service (whole snapshot) or the services added or changed since `base` (delta).
    #[serde(default, borrow)]
    pub services: BTreeMap<String, &'a RawValue>,
    /// Services gone since `base` (deltas only).
    #[serde(default)]
    pub removed: BTreeSet<String>,
    /// The policy; in a delta only when it changed. `None` (absent or `null`) keeps the
    /// policy in force.
    #[serde(default, borrow)]
    pub policy: Option<&'a RawValue>,
}

impl Answer<'_> {
    /// The policy's JSON, unless absent or `null`.
    pub fn policy_json(&self) -> Option<&[u8]> {
        self.policy
            .map(|raw| raw.get().as_bytes())
            .filter(|json| *json != b"null")
    }
}

/// Reads a poll answer's structure without parsing any service: fails only for a body that
/// is not a JSON object with a valid string `version` ([`is_valid_version`]; fields it does
/// not know are ignored, as in [`crate::receive`]).
pub fn parse_answer(body: &[u8]) -> Result<Answer<'_>, ReceiveError> {
    serde_json::from_slice(body).map_err(|source| ReceiveError::Malformed {
        line: source.line(),
        column: source.column(),
        source,
    })
}

/// Deserializes a version, refusing one [`is_valid_version`] refuses before copying it.
fn valid_version<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct Version;
    impl serde::de::Visitor<'_> for Version {
        type Value = String;

        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                formatter,
                "a version of at most {MAX_VERSION_BYTES} bytes of printable ASCII"
            )
        }

        fn visit_str<E: serde::de::Error>(self, version: &str) -> Result<String, E> {
            if is_valid_version(version.as_bytes()) {
                Ok(version.to_owned())
            } else {
                Err(E::invalid_value(
                    serde::de::Unexpected::Other("version"),
                    &self,
                ))
            }
        }
    }
    deserializer.deserialize_str(Version)
}

/// A delta answer, as the control plane serializes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delta<'a> {
    /// The current version.
    pub version: &'a str,
    /// The version the delta applies to.
    pub base: &'a str,
    /// Services added or whose endpoints changed.
    pub services: BTreeMap<&'a str, &'a ServiceEndpoints>,
    /// Services gone.
    pub removed: Vec<&'a str>,
    /// The policy, when it changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<&'a Policy>,
}

/// The delta from `base` to `current`. A service counts as changed when its JSON would
/// differ (its endpoints; the protocol is not in the filters' JSON). A policy that went
/// away is not sent: a snapshot without one keeps the policy in force anyway.
pub fn delta<'a>(base: &'a Snapshot, current: &'a Snapshot) -> Delta<'a> {
    let services = current
        .services
        .iter()
        .filter(|(name, service)| {
            base.services.get(name.as_str()).is_none_or(|before| {
                // A service the snapshots share is unchanged without a look inside.
                !Arc::ptr_eq(before, service) && before.endpoints != service.endpoints
            })
        })
        .map(|(name, service)| (name.as_str(), &**service))
        .collect();
    let removed = base
        .services
        .keys()
        .filter(|name| !current.services.contains_key(name.as_str()))
        .map(String::as_str)
        .collect();
    let policy = current
        .policy
        .as_ref()
        .filter(|_| base.policy != current.policy);
    Delta {
        version: &current.version,
        base: &base.version,
        services,
        removed,
        policy,
    }
}
