//! [`KubeSource`]: watchers and reflector stores for Services and EndpointSlices (and Pods,
//! for the labels [`Mapping::pod_labels`] allows, and Nodes, for their region when
//! [`Mapping::node_regions`]), consumed into the full service set after every change.
//!
//! What the mapping leaves out ([`crate::left_out`]) is logged at warn level, each entry
//! with its object and field, when the set changes (not on every event), and counted in
//! `fulcrum_kube_left_out{reason}` ([`KubeSourceMetrics`]).
//!
//! Pods are stored stripped to their name, namespace and allowed labels, Nodes to their name
//! and region label: a pod's or node's spec and status are most of its size. Services and
//! EndpointSlices are stored without their `managedFields` and annotations, which the mapping
//! never reads and which are often most of their size (every field manager's record, a
//! `kubectl apply`'s copy of the whole object). Pods and Nodes are not waited for: clusters
//! are published once Services and EndpointSlices are listed, so a control plane without the
//! RBAC for them loses labels or regions, never endpoints.

use std::{fmt::Debug, time::Duration};

use fulcrum_sources::{Services, Source, SourceFuture, SourceSink};
use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::{LeftOut, Mapping, Reason, mapping::NODE_REGION_LABEL};

/// How often the source checks whether the pipeline stopped listening while no event comes.
const SINK_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The most entries left out logged one by one when they change; the metric counts all.
const LOGGED: usize = 100;

/// Labels naming why entries were left out.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LeftOutLabels {
    /// A [`Reason`]'s name: `address`, `address_type`, `port`, `too_many_endpoints`,
    /// `over_budget`.
    pub reason: &'static str,
}

/// What the Kubernetes source leaves out; shared by its clones.
#[derive(Debug, Clone, Default)]
pub struct KubeSourceMetrics {
    /// `fulcrum_kube_left_out{reason}`: entries of Services and EndpointSlices (addresses,
    /// slices, Services) the latest mapping left out; every reason has a series, 0 included.
    /// Above 0, a controller (or whoever writes those objects) publishes what Envoy must not
    /// be sent to; the warn log names each object and field.
    pub left_out: Family<LeftOutLabels, Gauge>,
}

impl KubeSourceMetrics {
    /// Registers every metric under the `fulcrum_kube` prefix.
    pub fn register(&self, registry: &mut Registry) {
        registry.sub_registry_with_prefix("fulcrum_kube").register(
            "left_out",
            "Entries of Services and EndpointSlices the latest mapping left out, by reason",
            self.left_out.clone(),
        );
    }

    /// Sets the gauges from the latest mapping.
    fn observe(&self, left_out: &[LeftOut]) {
        for reason in Reason::ALL {
            let count = left_out
                .iter()
                .filter(|entry| entry.reason == reason)
                .count();
            self.left_out
                .get_or_create(&LeftOutLabels {
                    reason: reason.as_str(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}

/// What to watch and how to map it. Defaults: every namespace, no label selector, the default
/// [`Mapping`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeOptions {
    /// Namespaces to watch; empty watches the whole cluster (needs a ClusterRole).
    pub namespaces: Vec<String>,
    /// A label selector (`app=checkout,tier!=batch`) applied to Services and EndpointSlices
    /// alike: the EndpointSlice controller copies a Service's labels onto its slices.
    pub label_selector: Option<String>,
    /// How objects become clusters.
    pub mapping: Mapping,
}

/// Why the Kubernetes source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// No client configuration was found or it was unusable.
    #[error(
        "cannot configure a Kubernetes client: {0} (run in a pod with a service account, or set KUBECONFIG)"
    )]
    Client(#[source] kube::Error),
}

/// Endpoints from Kubernetes EndpointSlices; see the [crate docs](crate).
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    options: KubeOptions,
    metrics: KubeSourceMetrics,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// A source using `client` (tests point it at a fake API server).
    pub fn new(client: Client, options: KubeOptions) -> Self {
        Self {
            client,
            options,
            metrics: KubeSourceMetrics::default(),
        }
    }

    /// What the source counts (register it before running the source).
    pub fn metrics(&self) -> &KubeSourceMetrics {
        &self.metrics
    }

    /// A source with the client configuration found in the environment: the in-cluster
    /// service account, else the kubeconfig.
    pub async fn from_environment(options: KubeOptions) -> Result<Self, KubeSourceError> {
        let client = Client::try_default()
            .await
            .map_err(KubeSourceError::Client)?;
        Ok(Self::new(client, options))
    }

    fn watcher_config(&self) -> watcher::Config {
        let config = watcher::Config::default();
        match &self.options.label_selector {
            Some(selector) => config.labels(selector),
            None => config,
        }
    }

    /// `Api`s for every watched scope: each namespace, or the whole cluster.
    fn apis<K>(&self) -> Vec<(String, Api<K>)>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        if self.options.namespaces.is_empty() {
            return vec![("*".to_owned(), Api::all(self.client.clone()))];
        }
        self.options
            .namespaces
            .iter()
            .map(|namespace| {
                (
                    namespace.clone(),
                    Api::namespaced(self.client.clone(), namespace),
                )
            })
            .collect()
    }

    async fn watch(self, sink: SourceSink) {
        let name = self.name();
        let config = self.watcher_config();
        let mut labels = Vec::new();
        let mut streams = Vec::new();
        let mut service_stores = Vec::new();
        let mut slice_stores = Vec::new();
        for (namespace, api) in self.apis::<Service>() {
            let (store, stream) =
                reflect(api, config.clone(), streams.len(), strip_unread_metadata);
            labels.push(format!("services in {namespace}"));
            streams.push(stream);
            service_stores.push(store);
        }
        for (namespace, api) in self.apis::<EndpointSlice>() {
            let (store, stream) =
                reflect(api, config.clone(), streams.len(), strip_unread_metadata);
            labels.push(format!("endpointslices in {namespace}"));
            streams.push(stream);
            slice_stores.push(store);
        }
        // Pods only add labels: the clusters are published without waiting for them (a
        // control plane missing the RBAC for pods still serves endpoints, warning).
        let required = streams.len();
        let mut pod_stores = Vec::new();
        if !self.options.mapping.pod_labels.is_empty() {
            // Pods carry their own labels, not the Services': no label selector.
            for (namespace, api) in self.apis::<Pod>() {
                let allowed = self.options.mapping.pod_labels.clone();
                let (store, stream) = reflect(
                    api,
                    watcher::Config::default(),
                    streams.len(),
                    move |pod: &mut Pod| strip_pod(pod, &allowed),
                );
                labels.push(format!("pods in {namespace}"));
                streams.push(stream);
                pod_stores.push(store);
            }
        }
        let mut node_stores = Vec::new();
        if self.options.mapping.node_regions {
            // Nodes are cluster-scoped and carry their own labels: all of them, no selector.
            let (store, stream) = reflect(
                Api::<Node>::all(self.client.clone()),
                watcher::Config::default(),
                streams.len(),
                strip_node,
            );
            labels.push("nodes".to_owned());
            streams.push(stream);
            node_stores.push(store);
        }
        let mut events = futures::stream::select_all(streams);
        let mut listed = vec![false; labels.len()];
        let mut published: Option<Services> = None;
        let mut reported: Vec<LeftOut> = Vec::new();
        let mut sink_check = tokio::time::interval(SINK_CHECK_INTERVAL);
        loop {
            let (index, progress) = tokio::select! {
                next = events.next() => match next {
                    Some(next) => next,
                    None => return,
                },
                _ = sink_check.tick() => {
                    if sink.is_closed() {
                        return;
                    }
                    continue;
                }
            };
            let watched = labels.get(index).map_or("", String::as_str);
            match progress {
                Progress::Buffered => continue,
                Progress::Failed(error) => {
                    log_watch_error(&name, watched, &error);
                    continue;
                }
                Progress::Listed => {
                    info!(source = %name, watched, "listed");
                    if let Some(flag) = listed.get_mut(index) {
                        *flag = true;
                    }
                }
                Progress::Changed => {}
            }
            if !listed[..required].iter().all(|listed| *listed) {
                continue;
            }
            let mapped = self.options.mapping.map(
                &states(&service_stores),
                &states(&slice_stores),
                &states(&pod_stores),
                &states(&node_stores),
            );
            self.metrics.observe(&mapped.left_out);
            if mapped.left_out != reported {
                log_left_out(&name, &mapped.left_out);
                reported.clone_from(&mapped.left_out);
            }
            let services = mapped.published_after(published.as_ref());
            if published.as_ref() == Some(&services) {
                debug!(source = %name, watched, "change left the clusters as they were");
                continue;
            }
            info!(source = %name, clusters = services.len(), "publishing");
            if sink.publish(services.clone()).await.is_err() {
                return;
            }
            published = Some(services);
        }
    }
}

impl Source for KubeSource {
    fn name(&self) -> String {
        let namespaces = if self.options.namespaces.is_empty() {
            "*".to_owned()
        } else {
            self.options.namespaces.join(",")
        };
        match &self.options.label_selector {
            Some(selector) => format!("kubernetes:{namespaces}:{selector}"),
            None => format!("kubernetes:{namespaces}"),
        }
    }

    fn run(self: Box<Self>, sink: SourceSink) -> SourceFuture {
        Box::pin(self.watch(sink))
    }
}

/// What one watcher event means to the consumer.
#[derive(Debug)]
enum Progress {
    /// A (re)list started or delivered an object; the store changes only when it is done.
    Buffered,
    /// A (re)list finished; the store now holds exactly the listed objects.
    Listed,
    /// An object was added, modified or deleted.
    Changed,
    /// The watcher failed; it retries after a backoff (and relists after `410 Gone`).
    Failed(watcher::Error),
}

impl<K> From<Result<watcher::Event<K>, watcher::Error>> for Progress {
    fn from(event: Result<watcher::Event<K>, watcher::Error>) -> Self {
        match event {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Self::Buffered,
            Ok(watcher::Event::InitDone) => Self::Listed,
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Self::Changed,
            Err(error) => Self::Failed(error),
        }
    }
}

/// A watcher on `api` feeding a reflector store, its events tagged with `index`, every object
/// passed through `modify` before it is stored.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    index: usize,
    modify: impl FnMut(&mut K) + Send + 'static,
) -> (Store<K>, BoxStream<'static, (usize, Progress)>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).modify(modify))
        .default_backoff()
        .map(move |event| (index, Progress::from(event)))
        .boxed();
    (reader, stream)
}

/// A Service or EndpointSlice as the store keeps it: without the metadata the mapping never
/// reads (`managedFields`, annotations).
fn strip_unread_metadata<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

/// A pod as the store keeps it: name, namespace and the allowed labels only.
fn strip_pod(pod: &mut Pod, allowed: &std::collections::BTreeSet<String>) {
    let meta = &mut pod.metadata;
    *pod = Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: meta.name.take(),
            namespace: meta.namespace.take(),
            uid: meta.uid.take(),
            resource_version: meta.resource_version.take(),
            labels: meta.labels.take().map(|mut labels| {
                labels.retain(|key, _| allowed.contains(key));
                labels
            }),
            ..Default::default()
        },
        ..Pod::default()
    };
}

/// A node as the store keeps it: its name and region label only.
fn strip_node(node: &mut Node) {
    let meta = &mut node.metadata;
    *node = Node {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: meta.name.take(),
            uid: meta.uid.take(),
            resource_version: meta.resource_version.take(),
            labels: meta.labels.take().map(|mut labels| {
                labels.retain(|key, _| key == NODE_REGION_LABEL);
                labels
            }),
            ..Default::default()
        },
        ..Node::default()
    };
}

fn states<K>(stores: &[Store<K>]) -> Vec<std::sync::Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    stores.iter().flat_map(Store::state).collect()
}

/// Logs what the mapping now leaves out, the first [`LOGGED`] entries one by one.
fn log_left_out(source: &str, left_out: &[LeftOut]) {
    if left_out.is_empty() {
        info!(source, "nothing is left out of the clusters any more");
        return;
    }
    for entry in left_out.iter().take(LOGGED) {
        warn!(
            source,
            reason = entry.reason.as_str(),
            "left out of the clusters: {entry}"
        );
    }
    if left_out.len() > LOGGED {
        warn!(
            source,
            logged = LOGGED,
            total = left_out.len(),
            "more entries left out of the clusters than logged; fulcrum_kube_left_out counts them all"
        );
    }
}

fn log_watch_error(source: &str, watched: &str, error: &watcher::Error) {
    match error {
        watcher::Error::WatchError(status) if status.code == 410 => info!(
            source,
            watched,
            reason = %status.reason,
            "watch expired (410 Gone); relisting"
        ),
        error => warn!(source, watched, %error, "watch failed; retrying after a backoff"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};

    use super::*;

    #[test]
    fn a_stored_slice_keeps_what_the_mapping_reads_and_drops_managed_fields_and_annotations() {
        let labels = BTreeMap::from([(
            crate::mapping::SERVICE_NAME_LABEL.to_owned(),
            "checkout".to_owned(),
        )]);
        let mut slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some("checkout-a".into()),
                namespace: Some("shop".into()),
                uid: Some("u-1".into()),
                resource_version: Some("7".into()),
                labels: Some(labels.clone()),
                annotations: Some(BTreeMap::from([(
                    "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
                    "x".repeat(10_000),
                )])),
                managed_fields: Some(vec![ManagedFieldsEntry {
                    manager: Some("endpointslice-controller".into()),
                    ..ManagedFieldsEntry::default()
                }]),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: Vec::new(),
            ports: None,
        };
        let expected = EndpointSlice {
            metadata: ObjectMeta {
                annotations: None,
                managed_fields: None,
                ..slice.metadata.clone()
            },
            ..slice.clone()
        };

        strip_unread_metadata(&mut slice);

        assert_eq!(slice, expected);
        assert_eq!(slice.metadata.labels, Some(labels));
    }
}
