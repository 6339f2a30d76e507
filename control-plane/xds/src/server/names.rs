//! The names a stream subscribed to (EDS, and CDS when Envoy names clusters), for SotW and
//! delta alike.
//!
//! Envoy subscribes to the assignment of every cluster it holds, so a stream's names are
//! almost always exactly the current snapshot's cluster names. Then the stream keeps the
//! snapshot's cluster map (an [`Arc`]) in their place: every such stream shares it, where each
//! kept a B-tree of its own (1.8-3.4 KiB a stream at 100 clusters; a mesh's Envoys times its
//! clusters in all). The cluster map changes only when a cluster does, which is when Envoy
//! subscribes anew. Other names (part of the mesh, names not served yet) are listed.

use std::{collections::BTreeSet, sync::Arc};

use crate::cache::{Resources, XdsSnapshot};

/// A set of subscribed names.
#[derive(Debug, Default, Clone)]
pub(crate) struct Names {
    /// Every name of this map (a snapshot's clusters) is subscribed.
    clusters: Option<Arc<Resources>>,
    /// The names subscribed besides those: none of them is one of `clusters`' names.
    listed: BTreeSet<Arc<str>>,
}

impl Names {
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.clusters
            .as_ref()
            .is_some_and(|clusters| clusters.contains_key(name))
            || self.listed.contains(name)
    }

    pub(crate) fn len(&self) -> usize {
        self.clusters.as_ref().map_or(0, |clusters| clusters.len()) + self.listed.len()
    }

    /// The names, those of the shared map first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        let shared = self
            .clusters
            .as_ref()
            .map(|clusters| clusters.values().map(|resource| &resource.name));
        shared.into_iter().flatten().chain(&self.listed)
    }

    pub(crate) fn insert(&mut self, name: Arc<str>) {
        if !self
            .clusters
            .as_ref()
            .is_some_and(|clusters| clusters.contains_key(&*name))
        {
            self.listed.insert(name);
        }
    }

    pub(crate) fn remove(&mut self, name: &str) {
        if let Some(clusters) = self
            .clusters
            .take_if(|clusters| clusters.contains_key(name))
        {
            self.listed
                .extend(clusters.values().map(|resource| Arc::clone(&resource.name)));
        }
        self.listed.remove(name);
    }

    /// Keeps the snapshot's cluster map in place of the names when they are exactly its
    /// names. To call once a request's changes are applied.
    pub(crate) fn share(&mut self, snapshot: Option<&XdsSnapshot>) {
        let Some(clusters) = snapshot.map(|snapshot| &snapshot.clusters) else {
            return;
        };
        let shared = self
            .clusters
            .as_ref()
            .is_some_and(|held| Arc::ptr_eq(held, clusters));
        if !shared
            && self.len() == clusters.len()
            && self.iter().all(|name| clusters.contains_key(&**name))
        {
            self.clusters = Some(Arc::clone(clusters));
            self.listed = BTreeSet::new();
        }
    }
}

/// Equal as sets, whichever way each holds its names.
impl PartialEq for Names {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|name| other.contains(name))
    }
}

impl Eq for Names {}

impl FromIterator<Arc<str>> for Names {
    fn from_iter<I: IntoIterator<Item = Arc<str>>>(names: I) -> Self {
        Self {
            clusters: None,
            listed: names.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::test_support::snapshot;

    fn names(of: &Names) -> Vec<&str> {
        let mut names: Vec<&str> = of.iter().map(|name| &**name).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn names_that_are_exactly_the_snapshots_clusters_are_its_map_and_stay_the_same_set() {
        let snap = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        let mut subscribed: Names = [Arc::from("b"), Arc::from("a")].into_iter().collect();
        subscribed.share(Some(&snap));
        assert!(
            subscribed
                .clusters
                .as_ref()
                .is_some_and(|held| Arc::ptr_eq(held, &snap.clusters))
        );
        assert!(subscribed.listed.is_empty());
        assert_eq!(names(&subscribed), ["a", "b"]);
        assert_eq!(subscribed.len(), 2);
        assert!(subscribed.contains("a") && !subscribed.contains("c"));

        subscribed.insert(Arc::from("a"));
        subscribed.insert(Arc::from("c"));
        assert_eq!(names(&subscribed), ["a", "b", "c"], "no name twice");
        assert_eq!(subscribed.len(), 3);
        subscribed.remove("a");
        assert_eq!(names(&subscribed), ["b", "c"]);
        assert!(subscribed.clusters.is_none(), "listed once one is removed");
        subscribed.remove("c");
        subscribed.insert(Arc::from("a"));
        subscribed.share(Some(&snap));
        assert!(subscribed.clusters.is_some() && subscribed.listed.is_empty());
    }

    #[test]
    fn part_of_the_snapshots_clusters_or_names_it_does_not_serve_stay_listed() {
        let snap = snapshot("v1", &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]);
        for set in [&["a"][..], &["a", "b", "not-served"][..]] {
            let mut subscribed: Names = set.iter().map(|name| Arc::from(*name)).collect();
            subscribed.share(Some(&snap));
            assert!(subscribed.clusters.is_none(), "{set:?}");
            assert_eq!(names(&subscribed), set);
        }
    }
}
