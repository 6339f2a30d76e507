//! The state of the world protocol for one stream: which responses a request or a new
//! snapshot calls for.
//!
//! Pure: no IO, no clock. Follows the xDS protocol spec and go-control-plane's
//! `server/sotw`: a request whose `response_nonce` is not the last one sent for its type is
//! stale and ignored; one with `error_detail` is a NACK (Envoy keeps its last accepted
//! version, and we do not resend the refused content until it changes); otherwise it is an
//! ACK of `version_info`. Clusters are always sent whole (SotW CDS is full state);
//! endpoints only for the names Envoy subscribed to and only when their version changed,
//! so a new cluster's endpoints go out after Envoy asks for them. A changed cluster (a new
//! protocol, say) is warmed anew by Envoy, which waits for its assignment: that assignment is
//! sent again right after the clusters, even when it did not change.

use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use crate::cache::{PerType, ResourceType, XdsSnapshot};
use crate::server::{
    MAX_NACK_MESSAGE_BYTES, RequestOutcome, bounded, held::Held, names::Names, sent_nonce,
    shared_name, wire::Push,
};

/// Which resources of one type Envoy asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Subscription {
    /// Every resource of the type (CDS, or an empty / `*` name list).
    Wildcard,
    /// Only these names (EDS): the snapshot's cluster map when they are its clusters, else
    /// the snapshot's shared allocations where it has them ([`Names`]).
    Names(Names),
}

impl Subscription {
    fn from_request(ty: ResourceType, names: &[String], snapshot: Option<&XdsSnapshot>) -> Self {
        if ty.is_wildcard() && (names.is_empty() || names.iter().any(|name| name == "*")) {
            Subscription::Wildcard
        } else {
            let mut names: Names = names
                .iter()
                .map(|name| shared_name(snapshot, ty, name))
                .collect();
            names.share(snapshot);
            Subscription::Names(names)
        }
    }

    /// Whether a request for `ty` naming `names` asks for exactly this subscription. Builds
    /// nothing: an ACK repeats its names, and a fleet of Envoys ACKs every push.
    fn is_asked_by(&self, ty: ResourceType, names: &[String]) -> bool {
        match self {
            Subscription::Wildcard => {
                ty.is_wildcard() && (names.is_empty() || names.iter().any(|name| name == "*"))
            }
            // Equal lengths and every name held: the same set unless `names` repeats one,
            // which only makes a kept subscription look changed (then rebuilt, still right).
            Subscription::Names(held) => {
                names.len() == held.len() && names.iter().all(|name| held.contains(name.as_str()))
            }
        }
    }

    fn contains(&self, name: &str) -> bool {
        match self {
            Subscription::Wildcard => true,
            Subscription::Names(names) => names.contains(name),
        }
    }
}

/// Progress of one resource type on the stream.
#[derive(Debug, Default)]
struct TypeState {
    /// `None` until Envoy's first request for the type. Replaced by each request changing
    /// it, never added to: a stream holds one request's names at most, bounded by the
    /// message size limit.
    subscription: Option<Subscription>,
    /// The nonce of the last response sent; only a request echoing it is current.
    nonce: Option<u64>,
    /// The version of the last response sent: the snapshot's allocation.
    sent_version: Option<Arc<str>>,
    /// Resource name → version, as last sent (once up to date, the snapshot's map itself).
    sent: Held,
}

impl TypeState {
    /// Whether the subscription in force covers `name`.
    fn covers(subscription: Option<&Subscription>) -> impl Fn(&str) -> bool + Copy + '_ {
        move |name| subscription.is_some_and(|subscription| subscription.contains(name))
    }
}

/// One SotW stream's state for every served type.
#[derive(Debug, Default)]
pub(crate) struct SotwState {
    next_nonce: u64,
    types: PerType<TypeState>,
}

impl SotwState {
    /// Handles one request: classifies it (ACK, NACK, stale) and returns the response it
    /// calls for, if any. `snapshot` is `None` before the cache's first snapshot.
    pub(crate) fn on_request(
        &mut self,
        ty: ResourceType,
        request: &DiscoveryRequest,
        snapshot: Option<&XdsSnapshot>,
    ) -> (RequestOutcome, Option<Push>) {
        let state = self.types.get_mut(ty);
        let outcome = if request.response_nonce.is_empty() {
            RequestOutcome::Initial
        } else if state.nonce.is_none() || state.nonce != sent_nonce(&request.response_nonce) {
            return (RequestOutcome::Stale, None);
        } else if let Some(error) = &request.error_detail {
            RequestOutcome::Nack {
                rejected_version: state.sent_version.as_deref().unwrap_or_default().to_owned(),
                nonce: request.response_nonce.clone(),
                code: error.code,
                message: bounded(&error.message, MAX_NACK_MESSAGE_BYTES),
            }
        } else {
            // Envoy echoes the version it accepted: the one sent with the nonce. Another
            // string, of any size, is the client's own and is not kept.
            RequestOutcome::Ack {
                version: state
                    .sent_version
                    .as_deref()
                    .filter(|sent| *sent == request.version_info)
                    .map(str::to_owned),
            }
        };
        let kept = state
            .subscription
            .as_ref()
            .is_some_and(|current| current.is_asked_by(ty, &request.resource_names));
        if kept && outcome != RequestOutcome::Initial {
            // An ACK or NACK keeping the subscription calls for nothing: a refused version is
            // not resent, and a snapshot published since the response it answers is sent by
            // `on_snapshot`, which the stream runs for every snapshot it has not handled.
            return (outcome, None);
        }
        let subscription = Subscription::from_request(ty, &request.resource_names, snapshot);
        let first = state.subscription.is_none();
        // Forget what was sent for names Envoy dropped, so a later subscription resends them
        // (what was sent counts under the subscription it was sent for).
        state
            .sent
            .list(TypeState::covers(state.subscription.as_ref()))
            .retain(|name, _| subscription.contains(name));
        state.subscription = Some(subscription);
        let response = snapshot.and_then(|snapshot| self.respond(ty, snapshot, first));
        (outcome, response)
    }

    /// The responses a new snapshot calls for, clusters first.
    pub(crate) fn on_snapshot(&mut self, snapshot: &XdsSnapshot) -> Vec<Push> {
        ResourceType::ALL
            .into_iter()
            .filter_map(|ty| self.respond(ty, snapshot, false))
            .collect()
    }

    /// A response for `ty` if Envoy subscribed and something it should hold differs from
    /// what was sent (or `force` for a type's first request).
    fn respond(&mut self, ty: ResourceType, snapshot: &XdsSnapshot, force: bool) -> Option<Push> {
        let state = self.types.get_mut(ty);
        let subscription = state.subscription.as_ref()?;
        let covers = TypeState::covers(Some(subscription));
        let available = snapshot.resources(ty);
        if !force && state.sent.is_whole(available) {
            return None;
        }
        let in_scope = available
            .values()
            .filter(|resource| subscription.contains(&resource.name));
        let sent = &state.sent;
        let resources: Vec<_> = if ty.is_wildcard() {
            // Full state: send everything whenever the set or any version differs.
            let current: Vec<_> = in_scope.collect();
            let unchanged = sent.names(covers).count() == current.len()
                && current.iter().all(|resource| {
                    sent.version(&resource.name, covers) == Some(&resource.version)
                });
            if unchanged && !force {
                state.sent.hold_whole(available);
                return None;
            }
            current
        } else {
            let changed: Vec<_> = in_scope
                .filter(|resource| sent.version(&resource.name, covers) != Some(&resource.version))
                .collect();
            if changed.is_empty() {
                state.sent.hold_whole(available);
                return None;
            }
            changed
        };
        let updated_clusters: Vec<Arc<str>> = if ty == ResourceType::Cluster {
            resources
                .iter()
                .filter(|resource| {
                    sent.version(&resource.name, covers)
                        .is_some_and(|sent| *sent != resource.version)
                })
                .map(|resource| Arc::clone(&resource.name))
                .collect()
        } else {
            Vec::new()
        };
        // Every covered resource now went out at its version (a name the snapshot lost is
        // forgotten: it would go out again if it came back).
        state.sent.hold_whole(available);
        self.next_nonce += 1;
        state.nonce = Some(self.next_nonce);
        state.sent_version = Some(Arc::clone(&snapshot.version));
        // Envoy warms a changed cluster anew and waits for its assignment, unchanged or not:
        // forget it was sent, so it goes out again right after this response.
        if !updated_clusters.is_empty() {
            let endpoints = self.types.get_mut(ResourceType::Endpoint);
            let sent = endpoints
                .sent
                .list(TypeState::covers(endpoints.subscription.as_ref()));
            for name in &updated_clusters {
                sent.remove(name);
            }
        }
        Some(Push {
            ty,
            version: Arc::clone(&snapshot.version),
            nonce: self.next_nonce.to_string(),
            resources: resources.into_iter().map(Arc::clone).collect(),
            removed: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::rpc::Status;

    use super::*;
    use crate::server::test_support::{
        assert_shares_the_snapshots_allocations, snapshot, snapshot_with_http2,
    };

    fn request(ty: ResourceType, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: ty.type_url().to_owned(),
            resource_names: names.iter().map(|name| (*name).to_owned()).collect(),
            version_info: version.to_owned(),
            response_nonce: nonce.to_owned(),
            ..Default::default()
        }
    }

    fn names(push: &Push) -> Vec<String> {
        let response = push.decoded_sotw();
        use envoy_types::pb::envoy::config::{
            cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment,
        };
        use prost::Message;
        response
            .resources
            .iter()
            .map(|any| match ResourceType::from_type_url(&any.type_url) {
                Some(ResourceType::Cluster) => {
                    Cluster::decode(any.value.as_slice()).expect("cluster").name
                }
                _ => {
                    ClusterLoadAssignment::decode(any.value.as_slice())
                        .expect("assignment")
                        .cluster_name
                }
            })
            .collect()
    }

    #[test]
    fn first_cluster_request_gets_every_cluster_and_no_endpoints_until_subscribed() {
        let snap = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let mut state = SotwState::default();
        let (outcome, response) = state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "", ""),
            Some(&snap),
        );
        assert_eq!(outcome, RequestOutcome::Initial);
        let response = response.expect("clusters");
        assert_eq!(names(&response), ["a", "b"]);
        assert_eq!(response.decoded_sotw().version_info, "v1");
        assert!(
            state.on_snapshot(&snap).is_empty(),
            "nothing new, no EDS subscription yet"
        );
        let (_, eds) = state.on_request(
            ResourceType::Endpoint,
            &request(ResourceType::Endpoint, &["a"], "", ""),
            Some(&snap),
        );
        assert_eq!(names(&eds.expect("endpoints of a")), ["a"]);
    }

    #[test]
    fn ack_of_the_last_nonce_records_the_version_and_sends_nothing() {
        let snap = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let mut state = SotwState::default();
        let (_, response) = state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "", ""),
            Some(&snap),
        );
        let nonce = response.expect("clusters").nonce;
        let (outcome, response) = state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "v1", &nonce),
            Some(&snap),
        );
        assert_eq!(
            outcome,
            RequestOutcome::Ack {
                version: Some("v1".to_owned())
            }
        );
        assert!(response.is_none());
    }

    #[test]
    fn nack_reports_the_detail_and_does_not_resend_the_refused_version() {
        let snap = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let mut state = SotwState::default();
        state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "", ""),
            Some(&snap),
        );
        let (_, response) = state.on_request(
            ResourceType::Endpoint,
            &request(ResourceType::Endpoint, &["a"], "", ""),
            Some(&snap),
        );
        let nonce = response.expect("endpoints").nonce;
        let mut nack = request(ResourceType::Endpoint, &["a"], "v0", &nonce);
        nack.error_detail = Some(Status {
            code: 3,
            message: "weight must be at least 1".to_owned(),
            details: vec![],
        });
        let (outcome, response) = state.on_request(ResourceType::Endpoint, &nack, Some(&snap));
        assert_eq!(
            outcome,
            RequestOutcome::Nack {
                rejected_version: "v1".to_owned(),
                nonce,
                code: 3,
                message: "weight must be at least 1".to_owned(),
            }
        );
        assert!(response.is_none());
    }

    #[test]
    fn an_ack_leaves_a_snapshot_published_meanwhile_to_on_snapshot() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let v2 = snapshot("v2", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:3")]);
        let mut state = SotwState::default();
        state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "", ""),
            Some(&v1),
        );
        let (_, eds) = state.on_request(
            ResourceType::Endpoint,
            &request(ResourceType::Endpoint, &["a", "b"], "", ""),
            Some(&v1),
        );
        let nonce = eds.expect("endpoints").nonce;
        let (outcome, response) = state.on_request(
            ResourceType::Endpoint,
            &request(ResourceType::Endpoint, &["b", "a"], "v1", &nonce),
            Some(&v2),
        );
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
    fn an_ack_naming_other_resources_is_answered_for_the_new_ones() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let mut state = SotwState::default();
        let (_, eds) = state.on_request(
            ResourceType::Endpoint,
            &request(ResourceType::Endpoint, &["a"], "", ""),
            Some(&v1),
        );
        let nonce = eds.expect("endpoints of a").nonce;
        let (_, response) = state.on_request(
            ResourceType::Endpoint,
            &request(ResourceType::Endpoint, &["a", "b"], "v1", &nonce),
            Some(&v1),
        );
        assert_eq!(names(&response.expect("endpoints of b")), ["b"]);
    }

    #[test]
    fn request_with_an_old_nonce_is_stale_and_ignored() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let v2 = snapshot("v2", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let mut state = SotwState::default();
        let (_, first) = state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "", ""),
            Some(&v1),
        );
        let old_nonce = first.expect("clusters").nonce;
        assert_eq!(state.on_snapshot(&v2).len(), 1);
        let (outcome, response) = state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "v1", &old_nonce),
            Some(&v2),
        );
        assert_eq!(outcome, RequestOutcome::Stale);
        assert!(response.is_none());
    }

    #[test]
    fn only_the_nonce_as_written_is_current_not_another_spelling_of_its_number() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let mut state = SotwState::default();
        let (_, first) = state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "", ""),
            Some(&v1),
        );
        let nonce = first.expect("clusters").nonce;
        for spelling in [
            format!("0{nonce}"),
            format!("+{nonce}"),
            format!("{nonce} "),
            "x".into(),
        ] {
            let (outcome, _) = state.on_request(
                ResourceType::Cluster,
                &request(ResourceType::Cluster, &[], "v1", &spelling),
                Some(&v1),
            );
            assert_eq!(outcome, RequestOutcome::Stale, "{spelling:?}");
        }
        let (outcome, _) = state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "v1", &nonce),
            Some(&v1),
        );
        assert_eq!(
            outcome,
            RequestOutcome::Ack {
                version: Some("v1".to_owned())
            }
        );
    }

    #[test]
    fn snapshot_change_resends_all_clusters_but_only_changed_endpoints() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let v2 = snapshot("v2", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:3")]);
        let mut state = SotwState::default();
        state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "", ""),
            Some(&v1),
        );
        state.on_request(
            ResourceType::Endpoint,
            &request(ResourceType::Endpoint, &["a", "b"], "", ""),
            Some(&v1),
        );
        let responses = state.on_snapshot(&v2);
        assert_eq!(responses.len(), 1, "cluster set unchanged: no CDS push");
        assert_eq!(responses[0].ty, ResourceType::Endpoint);
        assert_eq!(names(&responses[0]), ["b"]);
        let v3 = snapshot(
            "v3",
            &[
                ("a", "127.0.0.1:1"),
                ("b", "127.0.0.1:3"),
                ("c", "127.0.0.1:4"),
            ],
        );
        let responses = state.on_snapshot(&v3);
        assert_eq!(
            responses.len(),
            1,
            "c's endpoints wait for its subscription"
        );
        assert_eq!(names(&responses[0]), ["a", "b", "c"]);
    }

    #[test]
    fn a_changed_cluster_gets_its_unchanged_assignment_again_for_warming() {
        let v1 = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let v2 = snapshot_with_http2("v2", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")], &["a"]);
        let mut state = SotwState::default();
        state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "", ""),
            Some(&v1),
        );
        state.on_request(
            ResourceType::Endpoint,
            &request(ResourceType::Endpoint, &["a", "b"], "", ""),
            Some(&v1),
        );
        let responses = state.on_snapshot(&v2);
        assert_eq!(responses.len(), 2);
        assert_eq!(responses[0].ty, ResourceType::Cluster);
        assert_eq!(responses[1].ty, ResourceType::Endpoint);
        assert_eq!(
            names(&responses[1]),
            ["a"],
            "only the changed cluster's assignment"
        );
    }

    #[test]
    fn a_stream_remembers_what_it_sent_as_the_snapshots_map_and_names_as_its_allocations() {
        let snap = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let mut state = SotwState::default();
        for (ty, names) in [
            (ResourceType::Cluster, &[][..]),
            (ResourceType::Endpoint, &["a", "b", "not-served"][..]),
        ] {
            state.on_request(ty, &request(ty, names, "", ""), Some(&snap));
        }
        let held = |ty| state.types.get(ty);
        let Some(Subscription::Names(subscribed)) = &held(ResourceType::Endpoint).subscription
        else {
            panic!("EDS subscribes by name");
        };
        let clusters = &held(ResourceType::Cluster).sent;
        assert_shares_the_snapshots_allocations(&snap, ResourceType::Cluster, clusters, []);
        let endpoints = &held(ResourceType::Endpoint).sent;
        assert_shares_the_snapshots_allocations(
            &snap,
            ResourceType::Endpoint,
            endpoints,
            subscribed.iter(),
        );
        assert!(
            subscribed.contains("not-served"),
            "a name not served yet is kept"
        );
    }

    #[test]
    fn an_ack_naming_a_version_never_sent_reports_none_of_it() {
        let snap = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let mut state = SotwState::default();
        let (_, response) = state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "", ""),
            Some(&snap),
        );
        let nonce = response.expect("clusters").nonce;
        let made_up = "v".repeat(1 << 20);
        let (outcome, response) = state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], &made_up, &nonce),
            Some(&snap),
        );
        assert_eq!(outcome, RequestOutcome::Ack { version: None });
        assert!(response.is_none());
    }

    #[test]
    fn a_nack_reason_is_cut_to_a_bounded_length() {
        let snap = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let mut state = SotwState::default();
        let (_, response) = state.on_request(
            ResourceType::Cluster,
            &request(ResourceType::Cluster, &[], "", ""),
            Some(&snap),
        );
        let mut nack = request(
            ResourceType::Cluster,
            &[],
            "v0",
            &response.expect("clusters").nonce,
        );
        nack.error_detail = Some(Status {
            code: 3,
            message: "x".repeat(1 << 20),
            details: vec![],
        });
        let (outcome, _) = state.on_request(ResourceType::Cluster, &nack, Some(&snap));
        let RequestOutcome::Nack { message, .. } = outcome else {
            panic!("a NACK: {outcome:?}");
        };
        assert_eq!(message.len(), crate::server::MAX_NACK_MESSAGE_BYTES);
        assert!(
            message.starts_with("xxx") && message.ends_with('…'),
            "{message}"
        );
    }
}
