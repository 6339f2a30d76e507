//! Stage 4, checked endpoints + policy → the published snapshot: attaches the current
//! policy and versions the result once, with [`fulcrum_core::version::snapshot_version`].
//!
//! This is where every published state gets the one version that Envoy (`version_info`), the
//! filters (`/v1/snapshot`), the registry, logs and metrics all carry. A policy change alone
//! makes a new version too; the xDS streams then send Envoy nothing, since no resource
//! changed.

use std::sync::Arc;

use fulcrum_core::{Snapshot, version::snapshot_version};
use fulcrum_policy::AppliedPolicy;
use fulcrum_sources::Services;
use tokio::sync::watch;

/// Runs the stage until `input` or `policy` closes, sending `output` every new snapshot.
pub async fn run(
    mut input: watch::Receiver<Option<Arc<Services>>>,
    mut policy: watch::Receiver<Option<Arc<AppliedPolicy>>>,
    output: watch::Sender<Option<Arc<Snapshot>>>,
) {
    loop {
        let endpoints = input.borrow_and_update().clone();
        let applied = policy.borrow_and_update().clone();
        if let Some(endpoints) = endpoints {
            let snapshot = attach(&endpoints, applied.as_deref());
            output.send_if_modified(|current| {
                if current
                    .as_ref()
                    .is_some_and(|current| current.version == snapshot.version)
                {
                    return false;
                }
                *current = Some(Arc::new(snapshot));
                true
            });
        }
        tokio::select! {
            changed = input.changed() => if changed.is_err() { return },
            changed = policy.changed() => if changed.is_err() { return },
        }
    }
}

/// The snapshot of `endpoints` carrying `policy`, versioned by both.
pub fn attach(endpoints: &Services, policy: Option<&AppliedPolicy>) -> Snapshot {
    let policy = policy.map(|applied| fulcrum_core::Policy::clone(&applied.policy));
    Snapshot {
        version: snapshot_version(endpoints, policy.as_ref()),
        services: endpoints.clone(),
        policy,
    }
}

#[cfg(test)]
mod tests {
    use fulcrum_core::{Endpoint, ServiceEndpoints};
    use fulcrum_policy::{PolicyFormat, PolicyStore};

    use super::*;

    fn policy_yaml(failures: u32) -> String {
        format!("default:\n  outlier_detection:\n    consecutive_failures: {failures}\n")
    }

    fn endpoints(port: u16) -> Services {
        let endpoints = vec![Endpoint::new(([127, 0, 0, 1], port).into())];
        Services::from([("shop".to_owned(), ServiceEndpoints { endpoints })])
    }

    #[test]
    fn the_snapshot_version_follows_the_endpoints_and_the_policy_content() {
        let store = PolicyStore::default();
        let without = attach(&endpoints(1), None);
        assert_eq!(without.policy, None);
        assert_eq!(without.version, snapshot_version(&endpoints(1), None));
        store
            .offer(&policy_yaml(3), PolicyFormat::Yaml, "t")
            .expect("valid");
        let first = attach(&endpoints(1), store.current().as_deref());
        store
            .offer(&policy_yaml(4), PolicyFormat::Yaml, "t")
            .expect("valid");
        let second = attach(&endpoints(1), store.current().as_deref());
        store.rollback(1).expect("kept");
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
