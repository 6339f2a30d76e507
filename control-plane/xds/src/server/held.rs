//! What a stream's Envoy holds of one resource type, name → version, as far as the stream
//! knows: what a SotW stream sent, what a delta stream sent or was told.
//!
//! After a response, and whenever a snapshot changes nothing the stream covers, an Envoy holds
//! exactly the resources of the current snapshot its subscription covers. The stream then keeps
//! the snapshot's map (an [`Arc`]) instead of a copy of its names and versions: every stream up
//! to date shares it, so a fleet of Envoys costs nothing per resource per Envoy where each
//! stream held a B-tree of 32-byte entries (7 KiB a stream at 100 clusters; a mesh's Envoys
//! times its clusters in all). A stream lists its entries only between a change of what it
//! covers and its next response: before its first one, when its subscription changes, and when
//! a changed cluster's assignment must go out again.

use std::{collections::BTreeMap, sync::Arc};

use crate::cache::Resources;

/// Name → version of what an Envoy holds of one type.
///
/// Which names count is decided by the caller's `covers`, the stream's subscription: a map
/// held whole stands for its resources that the subscription in force when it was taken
/// covers, so a caller lists ([`list`](Self::list)) before it changes the subscription.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// The resources of this map that the subscription covers, each at its version.
    whole: Option<Arc<Resources>>,
    /// When `whole` is `None`: these names at these versions.
    listed: BTreeMap<Arc<str>, Arc<str>>,
}

impl Held {
    /// The version held of `name`, if any.
    pub(crate) fn version(&self, name: &str, covers: impl Fn(&str) -> bool) -> Option<&Arc<str>> {
        match &self.whole {
            Some(resources) => resources
                .get(name)
                .filter(|_| covers(name))
                .map(|resource| &resource.version),
            None => self.listed.get(name),
        }
    }

    /// Whether `resources` is the map held whole: then nothing it holds differs from it.
    pub(crate) fn is_whole(&self, resources: &Arc<Resources>) -> bool {
        self.whole
            .as_ref()
            .is_some_and(|whole| Arc::ptr_eq(whole, resources))
    }

    /// The names held, in order.
    pub(crate) fn names<'a>(
        &'a self,
        covers: impl Fn(&str) -> bool + 'a,
    ) -> impl Iterator<Item = &'a Arc<str>> + 'a {
        let whole = self.whole.as_ref().map(move |resources| {
            resources
                .values()
                .map(|resource| &resource.name)
                .filter(move |name| covers(name))
        });
        whole.into_iter().flatten().chain(self.listed.keys())
    }

    /// The entries as a list of their own, `covers` being the subscription they were taken
    /// under: to call before the subscription changes, or to forget or add an entry.
    pub(crate) fn list(
        &mut self,
        covers: impl Fn(&str) -> bool,
    ) -> &mut BTreeMap<Arc<str>, Arc<str>> {
        if let Some(resources) = self.whole.take() {
            self.listed = packed(
                resources
                    .values()
                    .filter(|resource| covers(&resource.name))
                    .map(|resource| (Arc::clone(&resource.name), Arc::clone(&resource.version))),
            );
        }
        &mut self.listed
    }

    /// The Envoy now holds every resource of `resources` the subscription covers, at its
    /// version, and nothing else of the type.
    pub(crate) fn hold_whole(&mut self, resources: &Arc<Resources>) {
        self.whole = Some(Arc::clone(resources));
        self.listed = BTreeMap::new();
    }
}

/// Entries listed at once: from names in order, a B-tree's nodes come out full, 35-38 bytes
/// an entry, where inserting them one by one left the nodes half full, 64-65 bytes an entry
/// (100 and 1,000 names). Later changes are inserted one by one: they are few.
fn packed(entries: impl Iterator<Item = (Arc<str>, Arc<str>)>) -> BTreeMap<Arc<str>, Arc<str>> {
    entries.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::test_support::snapshot;

    fn entries(held: &Held, covers: impl Fn(&str) -> bool + Copy) -> Vec<(String, String)> {
        held.names(covers)
            .map(|name| {
                let version = held
                    .version(name, covers)
                    .expect("a held name has a version");
                (name.to_string(), version.to_string())
            })
            .collect()
    }

    #[test]
    fn a_map_held_whole_stands_for_the_covered_resources_and_lists_to_the_same_entries() {
        let snap = snapshot(
            "v1",
            &[
                ("a", "127.0.0.1:1"),
                ("b", "127.0.0.1:2"),
                ("c", "127.0.0.1:3"),
            ],
        );
        let covers = |name: &str| name != "b";
        let mut held = Held::default();
        held.hold_whole(&snap.endpoints);
        assert!(held.is_whole(&snap.endpoints));
        let whole = entries(&held, covers);
        assert_eq!(
            whole
                .iter()
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(held.version("b", covers), None, "not covered");
        assert_eq!(
            held.version("a", covers).map(|version| version.to_string()),
            Some(snap.endpoints["a"].version.to_string())
        );
        held.list(covers).remove("c");
        assert!(!held.is_whole(&snap.endpoints));
        assert_eq!(entries(&held, covers), whole[..1]);
    }

    #[test]
    fn a_listed_entry_shares_the_snapshots_name_and_version() {
        let snap = snapshot("v1", &[("a", "127.0.0.1:1")]);
        let mut held = Held::default();
        held.hold_whole(&snap.clusters);
        let listed = held.list(|_| true);
        let (name, version) = listed.iter().next().expect("one entry");
        assert!(Arc::ptr_eq(name, &snap.clusters["a"].name));
        assert!(Arc::ptr_eq(version, &snap.clusters["a"].version));
    }
}
