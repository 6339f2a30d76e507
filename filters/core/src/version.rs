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
    let protocols = protocols_key(services);
    // Plain structs over ordered collections: serialization cannot fail and is canonical.
    let services = serde_json::to_vec(services).unwrap_or_default();
    let policy = policy
        .map(|policy| serde_json::to_vec(policy).unwrap_or_default())
        .unwrap_or_default();
    if protocols.is_empty() {
        // The version of a mesh whose sources name no protocol is what it was before
        // protocols existed, so replicas of both releases agree during an upgrade.
        content_version(&[&services, &policy])
    } else {
        content_version(&[&services, &policy, &protocols])
    }
}

/// The JSON `[[name, protocol], ..]` of every service whose protocol a source named (empty
/// when none did): the part of the published state the filters' JSON leaves out (see
/// [`ServiceEndpoints::protocol`]).
fn protocols_key(services: &BTreeMap<String, ServiceEndpoints>) -> Vec<u8> {
    let named: Vec<(&str, &str)> = services
        .iter()
        .filter_map(|(name, service)| Some((name.as_str(), service.protocol?.as_str())))
        .collect();
    if named.is_empty() {
        return Vec::new();
    }
    // Strings in a list: serialization cannot fail, and quoting keeps names unambiguous.
    serde_json::to_vec(&named).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Endpoint;

    fn services(port: u16) -> BTreeMap<String, ServiceEndpoints> {
        let endpoints = vec![Endpoint::new(([127, 0, 0, 1], port).into())];
        BTreeMap::from([(
            "shop".to_owned(),
            ServiceEndpoints {
                endpoints,
                protocol: None,
            },
        )])
    }

    #[test]
    fn a_protocol_change_alone_is_a_new_version_and_no_protocol_keeps_the_old_one() {
        let mut http2 = services(1);
        let shop = http2.get_mut("shop").expect("shop");
        shop.protocol = Some(crate::UpstreamProtocol::Http2);
        assert_ne!(
            snapshot_version(&services(1), None),
            snapshot_version(&http2, None),
            "the protocol shapes Envoy's cluster, so it is part of the published state"
        );
        let services = serde_json::to_vec(&services(1)).expect("json");
        assert_eq!(
            snapshot_version(&self::services(1), None),
            content_version(&[&services, b""]),
            "without protocols the version is computed as before they existed"
        );
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
