//! The one versioning function of everything the control plane publishes.
//!
//! A version is a short hex hash of content, so equal content has equal versions in every
//! replica and across restarts, and a consumer that already holds a version can skip the
//! body. The control plane versions each published state once ([`snapshot_version`]: the
//! endpoints and the policy together) and the same string reaches Envoy (`version_info`),
//! the filters (`/v1/snapshot`'s `version` and `ETag`), logs and metrics; the xDS cache
//! versions each resource with [`content_version`] so unchanged resources are not re-sent.

use std::{borrow::Borrow, collections::BTreeMap};

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
    finish(hasher)
}

fn finish(hasher: Sha256) -> String {
    hasher.finalize()[..VERSION_BYTES]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The version of a snapshot holding `services` and `policy`: what the control plane
/// publishes to Envoy and the filters alike.
pub fn snapshot_version<S: Borrow<ServiceEndpoints>>(
    services: &BTreeMap<String, S>,
    policy: Option<&Policy>,
) -> String {
    // Plain structs over ordered collections: serialization cannot fail and is canonical.
    let encoded: Vec<(&str, &ServiceEndpoints, Vec<u8>)> = services
        .iter()
        .map(|(name, service)| {
            let service = service.borrow();
            let json = serde_json::to_vec(service).unwrap_or_default();
            (name.as_str(), service, json)
        })
        .collect();
    encoded_snapshot_version(
        encoded
            .iter()
            .map(|(name, service, json)| (*name, *service, json.as_slice())),
        policy,
    )
}

/// [`snapshot_version`] from each service's JSON as already encoded (`serde_json::to_vec`
/// of the service, as the filters get it), in name order: the same string, without
/// encoding any service again. The control plane keeps each service's encoding across
/// snapshots, so a change costs the encoding of the services that changed plus one hash
/// over the bytes.
pub fn encoded_snapshot_version<'a, I>(services: I, policy: Option<&Policy>) -> String
where
    I: Iterator<Item = (&'a str, &'a ServiceEndpoints, &'a [u8])> + Clone,
{
    debug_assert!(
        services
            .clone()
            .zip(services.clone().skip(1))
            .all(|((a, _, _), (b, _, _))| a < b),
        "services must come in name order, each once"
    );
    // The bytes `serde_json::to_vec` gives for the whole map, `{"name":{..},..}`, fed to
    // the hash piece by piece: names quoted as JSON strings (cannot fail).
    let keys: Vec<Vec<u8>> = services
        .clone()
        .map(|(name, _, _)| serde_json::to_vec(name).unwrap_or_default())
        .collect();
    let length = 2
        + services
            .clone()
            .zip(&keys)
            .map(|((_, _, json), key)| key.len() + 1 + json.len())
            .sum::<usize>()
        + keys.len().saturating_sub(1);
    let mut hasher = Sha256::new();
    hasher.update((length as u64).to_le_bytes());
    hasher.update(b"{");
    for (index, ((_, _, json), key)) in services.clone().zip(&keys).enumerate() {
        if index > 0 {
            hasher.update(b",");
        }
        hasher.update(key);
        hasher.update(b":");
        hasher.update(json);
    }
    hasher.update(b"}");
    let policy = policy
        .map(|policy| serde_json::to_vec(policy).unwrap_or_default())
        .unwrap_or_default();
    hasher.update((policy.len() as u64).to_le_bytes());
    hasher.update(&policy);
    let protocols = protocols_key(services.map(|(name, service, _)| (name, service)));
    if !protocols.is_empty() {
        // The version of a mesh whose sources name no protocol is what it was before
        // protocols existed, so replicas of both releases agree during an upgrade.
        hasher.update((protocols.len() as u64).to_le_bytes());
        hasher.update(&protocols);
    }
    finish(hasher)
}

/// The JSON `[[name, protocol], ..]` of every service whose protocol a source named (empty
/// when none did): the part of the published state the filters' JSON leaves out (see
/// [`ServiceEndpoints::protocol`]).
fn protocols_key<'a>(services: impl Iterator<Item = (&'a str, &'a ServiceEndpoints)>) -> Vec<u8> {
    let named: Vec<(&str, &str)> = services
        .filter_map(|(name, service)| Some((name, service.protocol?.as_str())))
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

    /// The version as it was defined before services were encoded one by one: one hash of
    /// the whole map's JSON, the policy's and the protocols'.
    fn whole_json_version(
        services: &BTreeMap<String, ServiceEndpoints>,
        policy: Option<&Policy>,
    ) -> String {
        let json = serde_json::to_vec(services).expect("json");
        let policy = policy
            .map(|policy| serde_json::to_vec(policy).expect("json"))
            .unwrap_or_default();
        let protocols = protocols_key(services.iter().map(|(name, s)| (name.as_str(), s)));
        if protocols.is_empty() {
            content_version(&[&json, &policy])
        } else {
            content_version(&[&json, &policy, &protocols])
        }
    }

    proptest::proptest! {
        #[test]
        fn the_version_from_encoded_services_is_the_version_of_the_whole_json(
            services in proptest::collection::btree_map(
                "[a-z\\\"é\\-]{0,6}",
                (proptest::collection::vec(1_u16..40, 0..5), proptest::option::of(proptest::bool::ANY)),
                0..6,
            ),
            with_policy in proptest::bool::ANY,
        ) {
            let services: BTreeMap<String, ServiceEndpoints> = services
                .into_iter()
                .map(|(name, (ports, http2))| {
                    let endpoints = ports
                        .into_iter()
                        .map(|port| Endpoint::new(([10, 0, 0, 1], port).into()))
                        .collect();
                    let protocol = http2.map(|http2| {
                        if http2 { crate::UpstreamProtocol::Http2 } else { crate::UpstreamProtocol::Http1 }
                    });
                    (name, ServiceEndpoints { endpoints, protocol })
                })
                .collect();
            let policy = with_policy.then(Policy::default);
            proptest::prop_assert_eq!(
                snapshot_version(&services, policy.as_ref()),
                whole_json_version(&services, policy.as_ref())
            );
        }
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
