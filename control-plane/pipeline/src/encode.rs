//! Each service's JSON, encoded once per change of that service, and the snapshot's body
//! made of them: the one copy of the mesh's JSON the control plane keeps.
//!
//! The stages pass services on as [`Arc`]s and keep an unchanged service's allocation
//! ([`crate::share_unchanged`]), so the [`Encoder`] tells an unchanged service by pointer and
//! reuses its bytes: a change costs the encoding of the services that changed, one hash over
//! the bytes ([`encoded_snapshot_version`], the same version a whole-map hash gives) and one
//! copy of them into the body, not a serialization of the mesh. Like go-control-plane's
//! cache, which versions and encodes per resource, but with the one snapshot version every
//! consumer of fulcrum shares.
//!
//! The encoder keeps each service's bytes as a slice of the body it last assembled, not an
//! allocation of their own: the body the filters are served ([`crate::publish`]) is then the
//! only copy of the mesh's JSON, where a copy per service beside it cost as much again (about
//! 60 bytes per endpoint). A version that did not change keeps its body.

use std::{collections::BTreeMap, ops::Range, sync::Arc};

use bytes::Bytes;
use fulcrum_core::{Policy, ServiceEndpoints, Snapshot, version::encoded_snapshot_version};
use fulcrum_sources::Services;

/// A versioned snapshot and its JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedSnapshot {
    /// The snapshot.
    pub snapshot: Arc<Snapshot>,
    /// The whole snapshot's JSON, byte for byte `serde_json::to_vec(&*self.snapshot)`,
    /// assembled from the services' encodings.
    pub body: Bytes,
    /// How many services this version encoded; the others' bytes were reused.
    pub encoded: usize,
}

/// Encodes snapshots, keeping each service's JSON while the service is the same [`Arc`].
///
/// Holds one encoding per current service, inside the last body it assembled, and nothing
/// of the services gone.
#[derive(Debug, Default)]
pub struct Encoder {
    encoded: BTreeMap<String, (Arc<ServiceEndpoints>, Bytes)>,
    /// The version and body of the last call.
    last: Option<(String, Bytes)>,
}

impl Encoder {
    /// The snapshot of `services` carrying `policy`, versioned by both
    /// ([`fulcrum_core::version::snapshot_version`]), encoding only the services that are
    /// not the ones of the previous call.
    pub fn encode(&mut self, services: &Services, policy: Option<Policy>) -> EncodedSnapshot {
        let mut previous = std::mem::take(&mut self.encoded);
        let mut encoded = 0;
        for (name, service) in services {
            let kept = previous.remove(name);
            let entry = match kept {
                Some(kept) if Arc::ptr_eq(&kept.0, service) => kept,
                kept => {
                    encoded += 1;
                    let json = encode_service(service);
                    // Equal content from a new allocation keeps the bytes inside the body.
                    match kept {
                        Some((_, kept)) if kept == json => (Arc::clone(service), kept),
                        _ => (Arc::clone(service), json),
                    }
                }
            };
            self.encoded.insert(name.clone(), entry);
        }
        let version = encoded_snapshot_version(
            self.encoded
                .iter()
                .map(|(name, (service, json))| (name.as_str(), &**service, json.as_ref())),
            policy.as_ref(),
        );
        let body = match self.last.take() {
            Some((last, body)) if last == version => body,
            _ => self.assemble(&version, policy.as_ref()),
        };
        self.last = Some((version.clone(), body.clone()));
        EncodedSnapshot {
            snapshot: Arc::new(Snapshot {
                version,
                services: services.clone(),
                policy,
            }),
            body,
            encoded,
        }
    }

    /// The snapshot's JSON from the services' encodings, whose bytes then become slices of
    /// it (releasing the allocations they were in).
    fn assemble(&mut self, version: &str, policy: Option<&Policy>) -> Bytes {
        // Strings and plain data: serialization cannot fail.
        let version = serde_json::to_vec(version).unwrap_or_default();
        let policy = policy.map(|policy| serde_json::to_vec(policy).unwrap_or_default());
        let services: usize = self
            .encoded
            .iter()
            .map(|(name, (_, json))| name.len() + json.len() + 4)
            .sum();
        let mut body =
            Vec::with_capacity(services + version.len() + policy.as_ref().map_or(0, Vec::len) + 40);
        let mut spans: Vec<Range<usize>> = Vec::with_capacity(self.encoded.len());
        body.extend_from_slice(b"{\"version\":");
        body.extend_from_slice(&version);
        body.extend_from_slice(b",\"services\":{");
        for (index, (name, (_, json))) in self.encoded.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            // A string: serialization cannot fail.
            serde_json::to_writer(&mut body, name).unwrap_or_default();
            body.push(b':');
            let start = body.len();
            body.extend_from_slice(json);
            spans.push(start..body.len());
        }
        body.push(b'}');
        if let Some(policy) = policy {
            body.extend_from_slice(b",\"policy\":");
            body.extend_from_slice(&policy);
        }
        body.push(b'}');
        // The estimate's slack, or the doubling when a name needed escapes, is not kept.
        body.shrink_to_fit();
        let body = Bytes::from(body);
        for ((_, json), span) in self.encoded.values_mut().zip(spans) {
            *json = body.slice(span);
        }
        body
    }
}

/// `service`'s JSON, in an allocation of its length until the next body takes it in.
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
                prop_assert_eq!(&incremental.snapshot, &full.snapshot);
                prop_assert_eq!(&incremental.body, &full.body);
                prop_assert_eq!(
                    &incremental.snapshot.version,
                    &snapshot_version(&services, policy.as_ref())
                );
                let whole = serde_json::to_vec(&*incremental.snapshot).expect("json");
                prop_assert_eq!(&incremental.body, &Bytes::from(whole));
                prop_assert!(encoder.holds_only_slices_of(&incremental.body));
            }
        }
    }

    impl Encoder {
        /// Whether every service's bytes this encoder keeps lie inside `body`.
        fn holds_only_slices_of(&self, body: &Bytes) -> bool {
            let range = body.as_ptr_range();
            self.encoded.values().all(|(_, json)| {
                json.is_empty() || {
                    let json = json.as_ptr_range();
                    range.start <= json.start && json.end <= range.end
                }
            })
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
            (first.encoded, again.encoded),
            (1, 1),
            "cart alone, the second time"
        );
        assert!(Arc::ptr_eq(&again.snapshot.services["shop"], &shop));
    }

    #[test]
    fn the_services_json_is_kept_inside_the_body_not_beside_it() {
        let mut encoder = Encoder::default();
        let first = encoder.encode(
            &Services::from([
                ("shop".to_owned(), service(&[1, 2], None)),
                ("cart".to_owned(), service(&[3], Some(true))),
            ]),
            None,
        );
        assert!(encoder.holds_only_slices_of(&first.body));
        let second = encoder.encode(
            &Services::from([
                (
                    "shop".to_owned(),
                    Arc::clone(&first.snapshot.services["shop"]),
                ),
                ("cart".to_owned(), service(&[3, 4], Some(true))),
            ]),
            None,
        );
        assert!(
            encoder.holds_only_slices_of(&second.body),
            "the unchanged service's bytes move into the new body, releasing the old one"
        );
    }

    #[test]
    fn an_unchanged_version_serves_the_same_body_even_from_new_allocations() {
        let mut encoder = Encoder::default();
        let first = encoder.encode(
            &Services::from([("shop".to_owned(), service(&[1, 2], None))]),
            None,
        );
        let again = encoder.encode(
            &Services::from([("shop".to_owned(), service(&[1, 2], None))]),
            None,
        );
        assert_eq!(again.snapshot.version, first.snapshot.version);
        assert_eq!(
            again.body.as_ptr(),
            first.body.as_ptr(),
            "not assembled again"
        );
        assert!(encoder.holds_only_slices_of(&first.body));
    }
}
