//! Stage 4, checked endpoints + policy → the published snapshot: attaches the current
//! policy and versions the result once, with [`fulcrum_core::version::snapshot_version`]
//! (computed from each service's JSON, encoded once per change of the service by
//! [`crate::encode`], which also assembles the snapshot's body from them).
//!
//! This is where every published state gets the one version that Envoy (`version_info`), the
//! filters (`/v1/snapshot`), the registry, logs and metrics all carry. A policy change alone
//! makes a new version too; the xDS streams then send Envoy nothing, since no resource
//! changed.
//!
//! When a policy source is configured (`require_policy`), nothing is published until it has
//! accepted a policy: a snapshot without one would make every filter fall back to its own
//! plugin configuration, mesh-wide, while the source is merely slow or its text invalid. The
//! control plane stays unready (`/readyz`) meanwhile, and the filters keep what they have.

use std::sync::Arc;

use fulcrum_core::Snapshot;
use fulcrum_policy::AppliedPolicy;
use fulcrum_sources::Services;
use fulcrum_xds::ChangeTrace;
use tokio::sync::watch;
use tracing::{info_span, warn};

use crate::{
    change::Traced,
    encode::{EncodedSnapshot, Encoder},
};

/// Runs the stage until `input` or `policy` closes, sending `output` every new snapshot;
/// with `require_policy`, only once a policy is accepted.
pub async fn run(
    mut input: watch::Receiver<Option<Traced<Services>>>,
    mut policy: watch::Receiver<Option<Arc<AppliedPolicy>>>,
    output: watch::Sender<Option<Traced<EncodedSnapshot>>>,
    require_policy: bool,
) {
    let mut waiting_logged = false;
    let mut encoder = Encoder::default();
    // Whether the policy alone changed since the last pass: the root of a trace of its own.
    let mut policy_changed = false;
    loop {
        let endpoints = input.borrow_and_update().clone();
        let applied = policy.borrow_and_update().clone();
        if require_policy && applied.is_none() {
            if endpoints.is_some() && !waiting_logged {
                warn!(
                    "endpoints are ready but no policy is accepted yet: publishing nothing until the policy source yields a valid policy"
                );
                waiting_logged = true;
            }
        } else if let Some(endpoints) = endpoints {
            let trace = match (policy_changed, &applied) {
                (true, Some(applied)) => ChangeTrace::of(&info_span!(
                    parent: None,
                    "policy_change",
                    policy_version = applied.version,
                    policy_digest = %applied.digest,
                    origin = %applied.origin,
                )),
                _ => endpoints.trace.clone(),
            };
            let span = info_span!(
                parent: None,
                "version",
                version = tracing::field::Empty,
                services_encoded = tracing::field::Empty,
            );
            trace.adopt(&span);
            let policy = applied
                .as_deref()
                .map(|applied| fulcrum_core::Policy::clone(&applied.policy));
            let snapshot = encoder.encode(&endpoints, policy);
            span.record("version", snapshot.snapshot.version.as_str());
            span.record("services_encoded", snapshot.encoded);
            drop(span);
            output.send_if_modified(|current| {
                if current
                    .as_ref()
                    .is_some_and(|current| current.snapshot.version == snapshot.snapshot.version)
                {
                    return false;
                }
                *current = Some(Traced::new(Arc::new(snapshot), trace));
                true
            });
        }
        policy_changed = tokio::select! {
            changed = input.changed() => if changed.is_err() { return } else { false },
            changed = policy.changed() => if changed.is_err() { return } else { true },
        };
    }
}

/// The snapshot of `endpoints` carrying `policy`, versioned by both (what the stage
/// publishes for them, encoded from scratch).
pub fn attach(endpoints: &Services, policy: Option<&AppliedPolicy>) -> Snapshot {
    let policy = policy.map(|applied| fulcrum_core::Policy::clone(&applied.policy));
    Arc::unwrap_or_clone(Encoder::default().encode(endpoints, policy).snapshot)
}

#[cfg(test)]
mod tests {
    use fulcrum_core::{Endpoint, ServiceEndpoints, version::snapshot_version};
    use fulcrum_policy::{PolicyFormat, PolicyStore};

    use super::*;

    fn policy_yaml(failures: u32) -> String {
        format!("default:\n  outlier_detection:\n    consecutive_failures: {failures}\n")
    }

    fn endpoints(port: u16) -> Services {
        let endpoints = vec![Endpoint::new(([127, 0, 0, 1], port).into())];
        Services::from([(
            "shop".to_owned(),
            Arc::new(ServiceEndpoints {
                endpoints,
                protocol: None,
            }),
        )])
    }

    #[tokio::test]
    async fn with_a_policy_source_nothing_is_published_before_a_policy_is_accepted() {
        let store = PolicyStore::default();
        let (_endpoints, input) = watch::channel(Some(Traced::untraced(Arc::new(endpoints(1)))));
        let (output, mut published) = watch::channel(None);
        let stage = tokio::spawn(run(input, store.subscribe(), output, true));
        tokio::task::yield_now().await;
        assert!(
            published.borrow_and_update().is_none(),
            "no snapshot without the policy"
        );
        store
            .offer(&policy_yaml(3), PolicyFormat::Yaml, "t")
            .await
            .expect("valid");
        published.changed().await.expect("published");
        let snapshot = published.borrow().clone().expect("a snapshot");
        assert!(snapshot.snapshot.policy.is_some());
        stage.abort();
    }

    #[tokio::test]
    async fn without_a_policy_source_endpoints_are_published_alone() {
        let (_endpoints, input) = watch::channel(Some(Traced::untraced(Arc::new(endpoints(1)))));
        let (_policy, policy) = watch::channel(None);
        let (output, mut published) = watch::channel(None);
        let stage = tokio::spawn(run(input, policy, output, false));
        published.changed().await.expect("published");
        assert_eq!(
            published
                .borrow()
                .as_ref()
                .expect("a snapshot")
                .snapshot
                .policy,
            None
        );
        stage.abort();
    }

    #[tokio::test]
    async fn the_snapshot_version_follows_the_endpoints_and_the_policy_content() {
        let store = PolicyStore::default();
        let without = attach(&endpoints(1), None);
        assert_eq!(without.policy, None);
        assert_eq!(without.version, snapshot_version(&endpoints(1), None));
        store
            .offer(&policy_yaml(3), PolicyFormat::Yaml, "t")
            .await
            .expect("valid");
        let first = attach(&endpoints(1), store.current().as_deref());
        store
            .offer(&policy_yaml(4), PolicyFormat::Yaml, "t")
            .await
            .expect("valid");
        let second = attach(&endpoints(1), store.current().as_deref());
        store.rollback(1).await.expect("kept");
        let rolled_back = attach(&endpoints(1), store.current().as_deref());
        assert_ne!(first.version, second.version);
        assert_eq!(first.version, rolled_back.version);
        assert_eq!(first.policy, rolled_back.policy);
        assert_ne!(
            attach(&endpoints(2), store.current().as_deref()).version,
            first.version,
            "one version covers the endpoints and the policy"
        );
    }
}
