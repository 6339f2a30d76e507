//! The incremental (delta) protocol for one stream: which responses a request or a new
//! snapshot calls for.
//!
//! Pure: no IO, no clock. Follows the xDS delta protocol and go-control-plane's
//! `server/delta`: the stream tracks, per type, what Envoy subscribed to (CDS is wildcard
//! unless Envoy names resources) and the version of every resource Envoy holds (seeded from
//! `initial_resource_versions` on reconnect). A response carries only the resources whose
//! version differs and the names that disappeared. A NACK (`error_detail` with the nonce)
//! is reported and the refused content is not resent until it changes. A changed cluster is
//! warmed anew by Envoy, which waits for its assignment: that assignment is sent again right
//! after the clusters, even when it did not change.

use std::{collections::VecDeque, sync::Arc};

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use crate::cache::{PerType, ResourceType, XdsSnapshot};
use crate::server::{
    MAX_NACK_MESSAGE_BYTES, RequestOutcome, bounded, held::Held, names::Names, sent_nonce,
    shared_name, wire::Push,
};

/// How many sent nonces per type are remembered to attribute ACKs/NACKs to a version.
const REMEMBERED_NONCES: usize = 16;

/// Names of one type a stream may hold subscribed to that the current snapshot does not
/// serve.
///
/// Subscriptions add up over a delta stream's requests, so without a bound a client could
/// send 4 MiB requests of made-up names for ever. A name the snapshot serves costs a stream
/// no string (it shares the snapshot's, [`shared_name`]) and there are only as many as the
/// snapshot holds; a name it does not serve is the client's own string, and those are
/// capped. Envoy holds few: it subscribes to the assignments of the clusters this control
/// plane sent, so a name it holds is unserved only for a moment (a cluster removed, until
/// Envoy drops it). Envoys reach a replica through its Service once it is ready, which it is
/// once it has a snapshot, so even a reconnecting Envoy's subscriptions are served. 4,096
/// is far above that moment's need; a stream past it is ended and Envoy reconnects.
pub(crate) const MAX_UNSERVED_NAMES: usize = 4096;
/// Bytes of the names of one type a stream may hold subscribed to that the current snapshot
/// does not serve: [`MAX_UNSERVED_NAMES`] of 128 bytes, above a Kubernetes service's
/// cluster name, so that a few long names cannot hold more.
pub(crate) const MAX_UNSERVED_NAME_BYTES: usize = MAX_UNSERVED_NAMES * 128;

/// A delta stream subscribed to more names the snapshot does not serve than it may hold:
/// the stream is ended with `RESOURCE_EXHAUSTED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this stream is subscribed to {names} {type_name} resource names ({bytes} bytes) this control \
     plane does not serve; a stream may hold at most {MAX_UNSERVED_NAMES} such names of a type \
     totalling {MAX_UNSERVED_NAME_BYTES} bytes: subscribe only to resources this control plane \
     sent, and unsubscribe from removed ones"
)]
pub(crate) struct TooManyNames {
    /// `cds` or `eds`.
    type_name: &'static str,
    /// Unserved names held, the request's included.
    names: usize,
    /// Their length in bytes.
    bytes: usize,
}

/// Progress of one resource type on the stream.
#[derive(Debug, Default)]
struct TypeState {
    /// Whether Envoy asked for this type at all.
    active: bool,
    /// Envoy wants every resource of the type.
    wildcard: bool,
    /// Names Envoy subscribed to explicitly: the snapshot's cluster map when they are its
    /// clusters, else the snapshot's shared allocations where it has them ([`Names`]); of those
    /// it does not serve, at most [`MAX_UNSERVED_NAMES`].
    names: Names,
    /// Name → version Envoy holds (as far as we sent or it told us): once up to date, the
    /// snapshot's map itself. What it told us (`initial_resource_versions`) is read from the
    /// type's first request only, and what the snapshot does not serve leaves with the first
    /// response: at most one request's worth is the client's own.
    known: Held,
    /// Recent (nonce, system version) pairs, oldest first; the versions are the snapshots'
    /// allocations.
    sent: VecDeque<(u64, Arc<str>)>,
    /// Whether any response went out for the type (the first one is sent even if empty,
    /// so Envoy's initialization can finish).
    responded: bool,
}

impl TypeState {
    /// Whether the subscription in force covers `name`.
    fn wants(wildcard: bool, names: &Names) -> impl Fn(&str) -> bool + Copy + '_ {
        move |name| wildcard || names.contains(name)
    }
}

/// One delta stream's state for every served type.
#[derive(Debug, Default)]
pub(crate) struct DeltaState {
    next_nonce: u64,
    types: PerType<TypeState>,
}

impl DeltaState {
    /// Handles one request: classifies it (ACK, NACK, initial or subscription change) and
    /// returns the response it calls for, if any; an error if the stream would then hold
    /// more names `snapshot` does not serve than it may (the stream must end).
    pub(crate) fn on_request(
        &mut self,
        ty: ResourceType,
        request: &DeltaDiscoveryRequest,
        snapshot: Option<&XdsSnapshot>,
    ) -> Result<(RequestOutcome, Option<Push>), TooManyNames> {
        let state = self.types.get_mut(ty);
        let first = !state.active;
        let outcome = if request.response_nonce.is_empty() {
            RequestOutcome::Initial
        } else {
            let version = state
                .sent
                .iter()
                .find(|(nonce, _)| Some(*nonce) == sent_nonce(&request.response_nonce))
                .map(|(_, version)| version.to_string());
            match (&request.error_detail, version) {
                (_, None) => RequestOutcome::Stale,
                (Some(error), Some(version)) => RequestOutcome::Nack {
                    rejected_version: version,
                    nonce: request.response_nonce.clone(),
                    code: error.code,
                    message: bounded(&error.message, MAX_NACK_MESSAGE_BYTES),
                },
                (None, Some(version)) => RequestOutcome::Ack {
                    version: Some(version),
                },
            }
        };
        let keeps_subscription = request.resource_names_subscribe.is_empty()
            && request.resource_names_unsubscribe.is_empty();
        if !first && keeps_subscription && outcome != RequestOutcome::Initial {
            // An ACK or NACK changing no subscription calls for nothing: a refused version is
            // not resent, and a snapshot published since the response it answers is sent by
            // `on_snapshot`, which the stream runs for every snapshot it has not handled.
            return Ok((outcome, None));
        }
        // What Envoy holds counts under the subscription in force: list it before that changes.
        state
            .known
            .list(TypeState::wants(state.wildcard, &state.names));
        if first {
            state.active = true;
            *state.known.list(|_| true) = request
                .initial_resource_versions
                .iter()
                .map(|(name, version)| {
                    (shared_name(snapshot, ty, name), Arc::from(version.as_str()))
                })
                .collect();
            // Legacy wildcard: a first CDS request naming nothing wants everything.
            state.wildcard = ty.is_wildcard() && request.resource_names_subscribe.is_empty();
        }
        let mut adds_unserved = false;
        for name in &request.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else {
                let name = shared_name(snapshot, ty, name);
                adds_unserved |= !is_served(snapshot, ty, &name);
                state.names.insert(name);
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.names.remove(name.as_str());
            }
        }
        state.names.share(snapshot);
        if adds_unserved {
            // Only a request adding an unserved name can take the stream over the bound.
            check_unserved(ty, &state.names, snapshot)?;
        }
        // Envoy drops what it unsubscribed from; forget it so a new subscription resends.
        let wants = TypeState::wants(state.wildcard, &state.names);
        state.known.list(wants).retain(|name, _| wants(name));
        let response = snapshot.and_then(|snapshot| self.respond(ty, snapshot));
        Ok((outcome, response))
    }

    /// The responses a new snapshot calls for, clusters first.
    pub(crate) fn on_snapshot(&mut self, snapshot: &XdsSnapshot) -> Vec<Push> {
        ResourceType::ALL
            .into_iter()
            .filter_map(|ty| self.respond(ty, snapshot))
            .collect()
    }

    fn respond(&mut self, ty: ResourceType, snapshot: &XdsSnapshot) -> Option<Push> {
        let state = self.types.get_mut(ty);
        if !state.active {
            return None;
        }
        let available = snapshot.resources(ty);
        if state.responded && state.known.is_whole(available) {
            return None;
        }
        let wants = TypeState::wants(state.wildcard, &state.names);
        let known = &state.known;
        let changed: Vec<_> = available
            .values()
            .filter(|resource| wants(&resource.name))
            .filter(|resource| known.version(&resource.name, wants) != Some(&resource.version))
            .cloned()
            .collect();
        let removed: Vec<Arc<str>> = known
            .names(wants)
            .filter(|name| !available.contains_key(&***name))
            .cloned()
            .collect();
        if changed.is_empty() && removed.is_empty() && state.responded {
            state.known.hold_whole(available);
            return None;
        }
        let updated_clusters: Vec<Arc<str>> = if ty == ResourceType::Cluster {
            changed
                .iter()
                .filter(|resource| known.version(&resource.name, wants).is_some())
                .map(|resource| Arc::clone(&resource.name))
                .collect()
        } else {
            Vec::new()
        };
        // Envoy now holds every wanted resource at its version, and none of the removed.
        state.known.hold_whole(available);
        self.next_nonce += 1;
        let nonce = self.next_nonce;
        if state.sent.len() == REMEMBERED_NONCES {
            state.sent.pop_front();
        }
        state.sent.push_back((nonce, Arc::clone(&snapshot.version)));
        state.responded = true;
        // Envoy warms a changed cluster anew and waits for its assignment, unchanged or not:
        // forget Envoy holds it, so it goes out again right after this response.
        if !updated_clusters.is_empty() {
            let endpoints = self.types.get_mut(ResourceType::Endpoint);
            let known = endpoints
                .known
                .list(TypeState::wants(endpoints.wildcard, &endpoints.names));
            for name in &updated_clusters {
                known.remove(name);
            }
        }
        Some(Push {
            ty,
            version: Arc::clone(&snapshot.version),
            nonce: nonce.to_string(),
            resources: changed,
            removed: removed.iter().map(|name| name.to_string()).collect(),
        })
    }
}

/// Whether `snapshot` holds a resource of type `ty` named `name`.
fn is_served(snapshot: Option<&XdsSnapshot>, ty: ResourceType, name: &str) -> bool {
    snapshot.is_some_and(|snapshot| snapshot.resources(ty).contains_key(name))
}

/// An error if `names` holds more names `snapshot` does not serve than a stream may.
fn check_unserved(
    ty: ResourceType,
    names: &Names,
    snapshot: Option<&XdsSnapshot>,
) -> Result<(), TooManyNames> {
    let (count, bytes) = names
        .iter()
        .filter(|name| !is_served(snapshot, ty, name))
        .fold((0, 0), |(count, bytes), name| {
            (count + 1, bytes + name.len())
        });
    if count > MAX_UNSERVED_NAMES || bytes > MAX_UNSERVED_NAME_BYTES {
        return Err(TooManyNames {
            type_name: ty.short_name(),
            names: count,
            bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::google::rpc::Status;

    use super::*;
    use crate::server::test_support::{
        assert_shares_the_snapshots_allocations, snapshot, snapshot_with_http2,
    };

    fn subscribe(ty: ResourceType, names: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: ty.type_url().to_owned(),
            resource_names_subscribe: names.iter().map(|name| (*name).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn reply(ty: ResourceType, nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: ty.type_url().to_owned(),
            response_nonce: nonce.to_owned(),
            ..Default::default()
        }
    }

    /// A stream that subscribed as Envoy does, CDS wildcard then EDS for `endpoints`, both
    /// answered from `snapshot` (the answers not kept).
    fn subscribed(snapshot: &XdsSnapshot, endpoints: &[&str]) -> DeltaState {
        let mut state = DeltaState::default();
        for (ty, names) in [
            (ResourceType::Cluster, &[][..]),
            (ResourceType::Endpoint, endpoints),
        ] {
            state
                .on_request(ty, &subscribe(ty, names), Some(snapshot))
                .expect("within the subscription limits");
        }
        state
    }

    fn names(push: &Push) -> Vec<String> {
        push.decoded_delta()
            .resources
            .into_iter()
            .map(|resource| resource.name)
            .collect()
    }

    #[test]
    fn wildcard_cds_then_named_eds_send_only_what_is_missing() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let mut state = DeltaState::default();
        let (outcome, cds) = state
            .on_request(
                ResourceType::Cluster,
                &subscribe(ResourceType::Cluster, &[]),
                Some(&v1),
            )
            .expect("within the subscription limits");
        assert_eq!(outcome, RequestOutcome::Initial);
        assert_eq!(names(&cds.expect("clusters")), ["a", "b"]);
        let (_, eds) = state
            .on_request(
                ResourceType::Endpoint,
                &subscribe(ResourceType::Endpoint, &["a"]),
                Some(&v1),
            )
            .expect("within the subscription limits");
        assert_eq!(names(&eds.expect("endpoints")), ["a"]);
    }

    #[test]
    fn change_in_one_service_sends_only_its_endpoints() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let v2 = snapshot("v2", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:3")]);
        let mut state = subscribed(&v1, &["a", "b"]);
        let responses = state.on_snapshot(&v2);
        assert_eq!(responses.len(), 1);
        assert_eq!(responses[0].ty, ResourceType::Endpoint);
        assert_eq!(names(&responses[0]), ["b"]);
    }

    #[test]
    fn a_changed_cluster_gets_its_unchanged_assignment_again_for_warming() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let v2 = snapshot_with_http2("v2", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")], &["a"]);
        let mut state = subscribed(&v1, &["a", "b"]);
        let responses = state.on_snapshot(&v2);
        assert_eq!(responses.len(), 2);
        assert_eq!(names(&responses[0]), ["a"], "the changed cluster");
        assert_eq!(responses[1].ty, ResourceType::Endpoint);
        assert_eq!(names(&responses[1]), ["a"], "its assignment, again");
    }

    #[test]
    fn an_ack_leaves_a_snapshot_published_meanwhile_to_on_snapshot() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let v2 = snapshot("v2", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:3")]);
        let mut state = DeltaState::default();
        state
            .on_request(
                ResourceType::Cluster,
                &subscribe(ResourceType::Cluster, &[]),
                Some(&v1),
            )
            .expect("within the subscription limits");
        let (_, eds) = state
            .on_request(
                ResourceType::Endpoint,
                &subscribe(ResourceType::Endpoint, &["a", "b"]),
                Some(&v1),
            )
            .expect("within the subscription limits");
        let nonce = eds.expect("endpoints").nonce;
        let (outcome, response) = state
            .on_request(
                ResourceType::Endpoint,
                &reply(ResourceType::Endpoint, &nonce),
                Some(&v2),
            )
            .expect("within the subscription limits");
        assert_eq!(
            outcome,
            RequestOutcome::Ack {
                version: Some("v1".to_owned())
            }
        );
        assert!(response.is_none(), "the ACK itself calls for nothing");
        let responses = state.on_snapshot(&v2);
        assert_eq!(responses.len(), 1);
        assert_eq!(names(&responses[0]), ["b"], "v2's change, sent once");
    }

    #[test]
    fn removed_service_is_listed_as_removed() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let v2 = snapshot("v2", &[("a", "127.0.0.1:1")]);
        let mut state = DeltaState::default();
        state
            .on_request(
                ResourceType::Cluster,
                &subscribe(ResourceType::Cluster, &[]),
                Some(&v1),
            )
            .expect("within the subscription limits");
        let responses = state.on_snapshot(&v2);
        assert_eq!(responses.len(), 1);
        assert!(responses[0].resources.is_empty());
        assert_eq!(responses[0].decoded_delta().removed_resources, ["b"]);
    }

    #[test]
    fn reconnect_with_initial_versions_resends_nothing_it_already_has() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let mut first = DeltaState::default();
        let (_, cds) = first
            .on_request(
                ResourceType::Cluster,
                &subscribe(ResourceType::Cluster, &[]),
                Some(&v1),
            )
            .expect("within the subscription limits");
        let held = cds.expect("clusters").resources[0].version.to_string();
        let mut reconnected = DeltaState::default();
        let mut request = subscribe(ResourceType::Cluster, &[]);
        request.initial_resource_versions = HashMap::from([("a".to_owned(), held)]);
        let (_, response) = reconnected
            .on_request(ResourceType::Cluster, &request, Some(&v1))
            .expect("within the subscription limits");
        assert!(
            response
                .expect("first response is always sent")
                .resources
                .is_empty()
        );
        assert!(reconnected.on_snapshot(&v1).is_empty());
    }

    #[test]
    fn ack_and_nack_are_attributed_to_the_version_of_their_nonce() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let mut state = DeltaState::default();
        let (_, cds) = state
            .on_request(
                ResourceType::Cluster,
                &subscribe(ResourceType::Cluster, &[]),
                Some(&v1),
            )
            .expect("within the subscription limits");
        let nonce = cds.expect("clusters").nonce;
        let (outcome, response) = state
            .on_request(
                ResourceType::Cluster,
                &reply(ResourceType::Cluster, &nonce),
                Some(&v1),
            )
            .expect("within the subscription limits");
        assert_eq!(
            outcome,
            RequestOutcome::Ack {
                version: Some("v1".to_owned())
            }
        );
        assert!(response.is_none());
        let (_, eds) = state
            .on_request(
                ResourceType::Endpoint,
                &subscribe(ResourceType::Endpoint, &["a"]),
                Some(&v1),
            )
            .expect("within the subscription limits");
        let nonce = eds.expect("endpoints").nonce;
        let mut nack = reply(ResourceType::Endpoint, &nonce);
        nack.error_detail = Some(Status {
            code: 3,
            message: "bad weight".to_owned(),
            details: vec![],
        });
        let (outcome, response) = state
            .on_request(ResourceType::Endpoint, &nack, Some(&v1))
            .expect("within the subscription limits");
        assert_eq!(
            outcome,
            RequestOutcome::Nack {
                rejected_version: "v1".to_owned(),
                nonce,
                code: 3,
                message: "bad weight".to_owned()
            }
        );
        assert!(response.is_none(), "refused content is not resent");
        let (outcome, _) = state
            .on_request(
                ResourceType::Endpoint,
                &reply(ResourceType::Endpoint, "unknown"),
                Some(&v1),
            )
            .expect("within the subscription limits");
        assert_eq!(outcome, RequestOutcome::Stale);
    }

    #[test]
    fn a_stream_remembers_what_envoy_holds_as_the_snapshots_map_and_names_as_its_allocations() {
        let snap = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let state = subscribed(&snap, &["a", "b", "not-served"]);
        for ty in ResourceType::ALL {
            let held = state.types.get(ty);
            assert_shares_the_snapshots_allocations(&snap, ty, &held.known, held.names.iter());
        }
        let subscribed = &state.types.get(ResourceType::Endpoint).names;
        assert!(
            subscribed.contains("not-served"),
            "a name not served yet is kept"
        );
    }

    fn made_up(count: usize, prefix: &str) -> Vec<String> {
        (0..count)
            .map(|index| format!("{prefix}-{index}"))
            .collect()
    }

    fn subscribe_owned(names: Vec<String>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: ResourceType::Endpoint.type_url().to_owned(),
            resource_names_subscribe: names,
            ..Default::default()
        }
    }

    #[test]
    fn names_the_snapshot_does_not_serve_are_held_up_to_the_limit_and_then_refused() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let mut state = subscribed(&v1, &[]);
        for batch in 0..4 {
            let names = made_up(MAX_UNSERVED_NAMES / 4, &format!("made-up-{batch}"));
            state
                .on_request(ResourceType::Endpoint, &subscribe_owned(names), Some(&v1))
                .expect("up to the limit, names are held");
        }
        let refused = state
            .on_request(
                ResourceType::Endpoint,
                &subscribe_owned(made_up(1, "one-more")),
                Some(&v1),
            )
            .expect_err("one name over the limit");
        assert_eq!(refused.names, MAX_UNSERVED_NAMES + 1);
        let message = refused.to_string();
        assert!(
            message.contains(&MAX_UNSERVED_NAMES.to_string()) && message.contains("eds"),
            "names the limit and the type: {message}"
        );
    }

    #[test]
    fn names_the_snapshot_serves_do_not_count_toward_the_limit() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let mut state = subscribed(&v1, &["a", "b"]);
        let (_, response) = state
            .on_request(
                ResourceType::Endpoint,
                &subscribe_owned(made_up(MAX_UNSERVED_NAMES, "made-up")),
                Some(&v1),
            )
            .expect("two served names and the limit of unserved ones");
        assert!(response.is_none(), "nothing new to send");
        assert_eq!(
            state.types.get(ResourceType::Endpoint).names.len(),
            MAX_UNSERVED_NAMES + 2
        );
    }

    #[test]
    fn unsubscribing_makes_room_for_other_names() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let mut state = subscribed(&v1, &[]);
        let names = made_up(MAX_UNSERVED_NAMES, "made-up");
        let dropped = names[0].clone();
        state
            .on_request(ResourceType::Endpoint, &subscribe_owned(names), Some(&v1))
            .expect("the limit");
        let mut swap = subscribe_owned(made_up(1, "other"));
        swap.resource_names_unsubscribe = vec![dropped];
        state
            .on_request(ResourceType::Endpoint, &swap, Some(&v1))
            .expect("one name for another stays at the limit");
    }

    #[test]
    fn long_unserved_names_are_refused_beyond_the_byte_limit() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let mut state = subscribed(&v1, &[]);
        let long = |index: usize| format!("{index:08}{}", "x".repeat(64 * 1024 - 8));
        let fitting = MAX_UNSERVED_NAME_BYTES / (64 * 1024);
        state
            .on_request(
                ResourceType::Endpoint,
                &subscribe_owned((0..fitting).map(long).collect()),
                Some(&v1),
            )
            .expect("exactly the byte limit");
        let refused = state
            .on_request(
                ResourceType::Endpoint,
                &subscribe_owned(vec![long(fitting)]),
                Some(&v1),
            )
            .expect_err("one long name more");
        assert_eq!(refused.bytes, MAX_UNSERVED_NAME_BYTES + 64 * 1024);
    }

    #[test]
    fn before_the_first_snapshot_every_name_counts_toward_the_limit() {
        let mut state = DeltaState::default();
        let refused = state
            .on_request(
                ResourceType::Endpoint,
                &subscribe_owned(made_up(MAX_UNSERVED_NAMES + 1, "early")),
                None,
            )
            .expect_err("nothing is served yet");
        assert_eq!(refused.names, MAX_UNSERVED_NAMES + 1);
    }

    #[test]
    fn a_nack_reason_is_cut_to_a_bounded_length() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let mut state = DeltaState::default();
        let (_, cds) = state
            .on_request(
                ResourceType::Cluster,
                &subscribe(ResourceType::Cluster, &[]),
                Some(&v1),
            )
            .expect("within the subscription limits");
        let mut nack = reply(ResourceType::Cluster, &cds.expect("clusters").nonce);
        nack.error_detail = Some(Status {
            code: 3,
            message: "é".repeat(512 * 1024),
            details: vec![],
        });
        let (outcome, _) = state
            .on_request(ResourceType::Cluster, &nack, Some(&v1))
            .expect("within the subscription limits");
        let RequestOutcome::Nack { message, .. } = outcome else {
            panic!("a NACK: {outcome:?}");
        };
        assert!(message.len() <= crate::server::MAX_NACK_MESSAGE_BYTES);
        assert!(message.ends_with('…'), "marked as cut: {message}");
    }
}
