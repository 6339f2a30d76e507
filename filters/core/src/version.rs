//! The one versioning function of everything the control plane publishes.
//!
//! A version is a short hex hash of content, so equal content has equal versions in every
//! replica and across restarts, and a consumer that already holds a version can skip the
//! body. The control plane versions each published state once ([`snapshot_version`]: the
//! endpoints and the policy together) and the same string reaches Envoy (`version_info`),
//! the filters (`/v1/snapshot`'s `version` and `ETag`), logs and metrics; the xDS cache
//! versions each resource with [`content_version`] so unchanged resources are not re-sent.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::{Policy, ServiceEndpoints};

/// Hex digits in a version: 64 bits of SHA-256, so two different states collide with
/// negligible probability however many a mesh goes through.
const VERSION_BYTES: usize = 8;

/// A version of `parts` taken together: each part is length-prefixed, so `["ab", "c"]` and
/// `["a", "bc"]` differ.
pub fn content_version(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize()[..VERSION_BYTES]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The version of a snapshot holding `services` and `policy`: what the control plane
/// publishes to Envoy and the filters alike.
pub fn snapshot_version(
    services: &BTreeMap<String, ServiceEndpoints>,
    policy: Option<&Policy>,
) -> String {
    // Plain structs over ordered collections: serialization cannot fail and is canonical.
    let services = serde_json::to_vec(services).unwrap_or_default();
    let policy = policy
        .map(|policy| serde_json::to_vec(policy).unwrap_or_default())
        .unwrap_or_default();
    content_version(&[&services, &policy])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Endpoint;

    fn services(port: u16) -> BTreeMap<String, ServiceEndpoints> {
        let endpoints = vec![Endpoint::new(([127, 0, 0, 1], port).into())];
        BTreeMap::from([("shop".to_owned(), ServiceEndpoints { endpoints })])
    }

    #[test]
    fn equal_content_has_equal_versions_and_any_change_a_new_one() {
        let policy = Policy::default();
        assert_eq!(
            snapshot_version(&services(1), None),
            snapshot_version(&services(1), None)
        );
        assert_ne!(
            snapshot_version(&services(1), None),
            snapshot_version(&services(2), None)
        );
        assert_ne!(
            snapshot_version(&services(1), None),
            snapshot_version(&services(1), Some(&policy)),
            "a policy is part of the published state"
        );
    }

    #[test]
    fn parts_are_delimited() {
        assert_ne!(
            content_version(&[b"ab", b"c"]),
            content_version(&[b"a", b"bc"])
        );
        assert_eq!(content_version(&[b"x"]).len(), 2 * VERSION_BYTES);
    }
}
