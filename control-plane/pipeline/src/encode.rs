//! Each service's JSON, encoded once per change of that service and shared by everything
//! that needs it: the snapshot version, the filters' snapshot body and the deltas.
//!
//! The stages pass services on as [`Arc`]s and keep an unchanged service's allocation
//! ([`crate::share_unchanged`]), so the [`Encoder`] tells an unchanged service by pointer and
//! reuses its bytes: a change costs the encoding of the services that changed, one hash over
//! the bytes ([`encoded_snapshot_version`], the same version a whole-map hash gives) and one
//! copy of them into the body, not a serialization of the mesh. Like go-control-plane's
//! cache, which versions and encodes per resource, but with the one snapshot version every
//! consumer of fulcrum shares.

use std::{collections::BTreeMap, sync::Arc};

use bytes::Bytes;
use fulcrum_core::{Policy, ServiceEndpoints, Snapshot, version::encoded_snapshot_version};
use fulcrum_sources::Services;

/// A versioned snapshot with each service's JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedSnapshot {
    /// The snapshot.
    pub snapshot: Arc<Snapshot>,
    /// Each service's JSON (`serde_json` of its [`ServiceEndpoints`]), by name: the same
    /// keys as the snapshot's services.
    json: BTreeMap<String, Bytes>,
}

impl EncodedSnapshot {
    /// The whole snapshot's JSON, byte for byte `serde_json::to_vec(&*self.snapshot)`, from
    /// the services' encodings.
    pub fn body(&self) -> Bytes {
        // Strings and plain data: serialization cannot fail.
        let version = serde_json::to_vec(&self.snapshot.version).unwrap_or_default();
        let policy = self
            .snapshot
            .policy
            .as_ref()
            .map(|policy| serde_json::to_vec(policy).unwrap_or_default());
        let services: usize = self
            .json
            .iter()
            .map(|(name, json)| name.len() + json.len() + 4)
            .sum();
        let mut body =
            Vec::with_capacity(services + version.len() + policy.as_ref().map_or(0, Vec::len) + 40);
        body.extend_from_slice(b"{\"version\":");
        body.extend_from_slice(&version);
        body.extend_from_slice(b",\"services\":{");
        for (index, (name, json)) in self.json.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            // A string: serialization cannot fail.
            serde_json::to_writer(&mut body, name).unwrap_or_default();
            body.push(b':');
            body.extend_from_slice(json);
        }
        body.push(b'}');
        if let Some(policy) = policy {
            body.extend_from_slice(b",\"policy\":");
            body.extend_from_slice(&policy);
        }
        body.push(b'}');
        Bytes::from(body)
    }
}

/// Encodes snapshots, keeping each service's JSON while the service is the same [`Arc`].
///
/// Holds one encoding per current service (what the current snapshot shares), nothing of
/// the services gone.
#[derive(Debug, Default)]
pub struct Encoder {
    encoded: BTreeMap<String, (Arc<ServiceEndpoints>, Bytes)>,
}

impl Encoder {
    /// The snapshot of `services` carrying `policy`, versioned by both
    /// ([`fulcrum_core::version::snapshot_version`]), encoding only the services that are
    /// not the ones of the previous call.
    pub fn encode(&mut self, services: &Services, policy: Option<Policy>) -> EncodedSnapshot {
        let mut previous = std::mem::take(&mut self.encoded);
        for (name, service) in services {
            let encoded = match previous.remove(name) {
                Some(kept) if Arc::ptr_eq(&kept.0, service) => kept,
                _ => (Arc::clone(service), encode_service(service)),
            };
            self.encoded.insert(name.clone(), encoded);
        }
        let version = encoded_snapshot_version(
            self.encoded
                .iter()
                .map(|(name, (service, json))| (name.as_str(), &**service, json.as_ref())),
            policy.as_ref(),
        );
        EncodedSnapshot {
            snapshot: Arc::new(Snapshot {
                version,
                services: services.clone(),
                policy,
            }),
            json: self
                .encoded
                .iter()
                .map(|(name, (_, json))| (name.clone(), json.clone()))
                .collect(),
        }
    }
}

/// `service`'s JSON, in an allocation of its length: it is kept while the service is
/// unchanged, and the spare capacity `serde_json`'s doubling leaves (up to half) would be
/// kept with it.
fn encode_service(service: &ServiceEndpoints) -> Bytes {
    // Plain structs over ordered collections: serialization cannot fail.
    let mut json = serde_json::to_vec(service).unwrap_or_default();
    json.shrink_to_fit();
    Bytes::from(json)
}

#[cfg(test)]
mod tests {
    use fulcrum_core::{Endpoint, UpstreamProtocol, version::snapshot_version};
    use proptest::prelude::*;

    use super::*;

    /// A service of endpoints at `ports`, with a protocol when `http2` says.
    fn service(ports: &[u16], http2: Option<bool>) -> Arc<ServiceEndpoints> {
        Arc::new(ServiceEndpoints {
            endpoints: ports
                .iter()
                .map(|port| Endpoint::new(([10, 0, 0, 1], *port).into()))
                .collect(),
            protocol: http2.map(|http2| {
                if http2 {
                    UpstreamProtocol::Http2
                } else {
                    UpstreamProtocol::Http1
                }
            }),
        })
    }

    /// One step of a sequence: set service `name` (`None`: remove it), keeping the others'
    /// `Arc`s as the stages do; `policy` says whether a policy rides along.
    #[derive(Debug, Clone)]
    struct Step {
        name: String,
        ports: Option<Vec<u16>>,
        http2: Option<bool>,
        policy: bool,
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            (
                "[ab\"é]{0,2}",
                prop::option::of(prop::collection::vec(1_u16..20, 0..4)),
                prop::option::of(any::<bool>()),
                any::<bool>(),
            )
                .prop_map(|(name, ports, http2, policy)| Step {
                    name,
                    ports,
                    http2,
                    policy,
                }),
            1..20,
        )
    }

    proptest! {
        #[test]
        fn for_any_sequence_of_changes_the_incremental_encoding_equals_a_full_one(steps in steps()) {
            let mut encoder = Encoder::default();
            let mut services = Services::new();
            for step in steps {
                match &step.ports {
                    Some(ports) => {
                        services.insert(step.name.clone(), service(ports, step.http2));
                    }
                    None => {
                        services.remove(&step.name);
                    }
                }
                let policy = step.policy.then(Policy::default);
                let incremental = encoder.encode(&services, policy.clone());
                let full = Encoder::default().encode(&services, policy.clone());
                prop_assert_eq!(&incremental, &full);
                prop_assert_eq!(
                    &incremental.snapshot.version,
                    &snapshot_version(&services, policy.as_ref())
                );
                let whole = serde_json::to_vec(&*incremental.snapshot).expect("json");
                prop_assert_eq!(incremental.body(), Bytes::from(whole));
            }
        }
    }

    #[test]
    fn an_unchanged_service_is_not_encoded_again() {
        let mut encoder = Encoder::default();
        let shop = service(&[1, 2], None);
        let first = encoder.encode(
            &Services::from([("shop".to_owned(), Arc::clone(&shop))]),
            None,
        );
        let again = encoder.encode(
            &Services::from([
                ("shop".to_owned(), Arc::clone(&shop)),
                ("cart".to_owned(), service(&[3], None)),
            ]),
            None,
        );
        assert_eq!(
            first.json["shop"].as_ptr(),
            again.json["shop"].as_ptr(),
            "the same bytes, shared"
        );
        assert!(Arc::ptr_eq(&again.snapshot.services["shop"], &shop));
    }
}
