//! An in-process fake Kubernetes API server speaking the real list/watch protocol, for tests
//! of anything that watches Kubernetes objects with kube-rs (no cluster runs here).
//!
//! It serves any namespaced resource whose objects a test [`apply`](FakeApiServer::apply)s,
//! at the real paths (`/api/v1/namespaces/{ns}/services`,
//! `/apis/discovery.k8s.io/v1/endpointslices`, ...), with the semantics kube-rs's watcher
//! relies on, as the API server (over etcd) has them:
//!
//! - one global `resourceVersion` counter; every change gets the next one;
//! - `LIST` returns a `<Kind>List` whose `metadata.resourceVersion` is the current version;
//! - `WATCH` (`?watch=true&resourceVersion=R`) replays every change after `R`, then streams
//!   new ones as newline-delimited `{"type": ..., "object": ...}` JSON; a watch from a version
//!   older than the last [`compact`](FakeApiServer::compact)ion gets one `ERROR` event with a
//!   `410 Gone` (`Expired`) Status, which makes kube-rs relist;
//! - `BOOKMARK` events go only to watches that sent `allowWatchBookmarks=true`;
//! - `labelSelector` (`k=v`, `k!=v`, `k`, `!k`, comma-separated) and `fieldSelector`
//!   (`metadata.name=`, `metadata.namespace=`) filter lists and watches.
//!
//! Writes follow the API server's optimistic concurrency, which a controller that owns an object
//! relies on:
//!
//! - `GET` of one object (`.../{plural}/{name}`) returns it, or `404 NotFound`;
//! - `POST` to a collection creates the object, or answers `409 AlreadyExists`;
//! - `PUT` to an object replaces it when the body's `metadata.resourceVersion` is the stored
//!   one (or absent), and answers `409 Conflict` otherwise, or `404 NotFound` if there is none.
//!
//! A created or replaced object gets the next resource version and is announced to watches.
//! [`refuse_writes`](FakeApiServer::refuse_writes) makes every write fail with `503`, as
//! during an API server outage, while reads go on.
//!
//! Every request is recorded ([`requests`](FakeApiServer::requests)) so a test can check what
//! the client asked for: how many lists, from which version a watch resumed, which writes.
//! Pagination (`limit`/`continue`) is not implemented: a list returns every object at once,
//! which the API server may do too.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State as AxumState},
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, Status, WatchEvent};
use kube::Resource;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// Watch deliveries buffered per open watch before it is cut off as too slow.
const WATCH_BUFFER: usize = 1024;

/// A fake API server on `127.0.0.1`, stopped when dropped.
#[derive(Debug)]
pub struct FakeApiServer {
    state: Arc<Mutex<ServerState>>,
    address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The HTTP method: `GET` for lists, watches and reads; `POST` and `PUT` for writes.
    pub method: String,
    /// The object's name, for a request to one object (a read or a replace).
    pub name: Option<String>,
    /// `<apiVersion>/<plural>`, e.g. `discovery.k8s.io/v1/endpointslices` or `v1/services`.
    pub resource: String,
    /// The namespace in the path, if any.
    pub namespace: Option<String>,
    /// A watch (`watch=true`) rather than a list.
    pub watch: bool,
    /// The `resourceVersion` parameter.
    pub resource_version: Option<String>,
    /// Whether the client allowed bookmarks.
    pub allow_bookmarks: bool,
    /// The `labelSelector` parameter.
    pub label_selector: Option<String>,
    /// The `fieldSelector` parameter.
    pub field_selector: Option<String>,
}

#[derive(Debug)]
struct ServerState {
    resource_version: u64,
    /// Watches from a version older than this get `410 Gone`.
    oldest_watchable: u64,
    objects: BTreeMap<ObjectKey, Value>,
    kinds: HashMap<String, Kind>,
    history: Vec<Arc<Change>>,
    requests: Vec<RecordedRequest>,
    deliveries: broadcast::Sender<Delivery>,
    /// Every write answers `503` while set.
    refuse_writes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    resource: String,
    namespace: String,
    name: String,
}

/// A resource's kind, e.g. `EndpointSlice`.
type Kind = String;

#[derive(Debug)]
struct Change {
    resource_version: u64,
    resource: String,
    namespace: String,
    event: WatchEvent<Value>,
}

#[derive(Debug, Clone)]
enum Delivery {
    Change(Arc<Change>),
    Bookmark(u64),
    Expire { oldest_watchable: u64 },
    Close,
}

/// The resource key of `K`: `<apiVersion>/<plural>`.
fn resource_of<K: Resource<DynamicType = ()>>() -> String {
    format!("{}/{}", K::api_version(&()), K::plural(&()))
}

impl FakeApiServer {
    /// Starts a server on an ephemeral port of `127.0.0.1`.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server to 127.0.0.1");
        let address = listener.local_addr().expect("listener address");
        let (deliveries, _) = broadcast::channel(WATCH_BUFFER);
        let state = Arc::new(Mutex::new(ServerState {
            resource_version: 1,
            oldest_watchable: 1,
            objects: BTreeMap::new(),
            kinds: HashMap::new(),
            history: Vec::new(),
            requests: Vec::new(),
            deliveries,
            refuse_writes: false,
        }));
        let router = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            state,
            address,
            task,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A real kube-rs client pointed at this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("the server's URL is a URI"));
        kube::Client::try_from(config).expect("a client for the fake API server")
    }

    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes `K` listable before any object of it exists (an empty list has its kind).
    pub fn serve<K: Resource<DynamicType = ()>>(&self) {
        self.lock()
            .kinds
            .insert(resource_of::<K>(), K::kind(&()).into_owned());
    }

    /// Creates or replaces `object` (by namespace and name) and announces it to watches as
    /// `ADDED` or `MODIFIED`. Returns the change's resource version.
    pub fn apply<K: Resource<DynamicType = ()> + Serialize>(&self, object: &K) -> u64 {
        self.store(object, true)
    }

    /// Creates or replaces `object` without telling anyone: the change is in lists but in
    /// no watch and no replayable history, as if its event had been compacted away before a
    /// disconnected client could see it. Follow with [`expire_watches`](Self::expire_watches).
    pub fn apply_unannounced<K: Resource<DynamicType = ()> + Serialize>(&self, object: &K) -> u64 {
        self.store(object, false)
    }

    fn store<K: Resource<DynamicType = ()> + Serialize>(&self, object: &K, announce: bool) -> u64 {
        self.serve::<K>();
        let value = serde_json::to_value(object).expect("k8s-openapi objects serialize");
        let meta = object.meta();
        let key = ObjectKey {
            resource: resource_of::<K>(),
            namespace: meta
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            name: meta.name.clone().expect("an applied object has a name"),
        };
        let mut state = self.lock();
        state.write(key, value, announce);
        state.resource_version
    }

    /// Deletes an object and announces it as `DELETED`; returns the change's version, or
    /// `None` if there was no such object.
    pub fn delete<K: Resource<DynamicType = ()>>(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<u64> {
        let key = ObjectKey {
            resource: resource_of::<K>(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let mut state = self.lock();
        let mut value = state.objects.remove(&key)?;
        state.resource_version += 1;
        let version = state.resource_version;
        value["metadata"]["resourceVersion"] = Value::String(version.to_string());
        state.record(key, version, WatchEvent::Deleted(value));
        Some(version)
    }

    /// Sends a `BOOKMARK` at the current resource version to every watch that allows them.
    pub fn bookmark(&self) -> u64 {
        let state = self.lock();
        let _ = state
            .deliveries
            .send(Delivery::Bookmark(state.resource_version));
        state.resource_version
    }

    /// Forgets the change history: watches from any older version now get `410 Gone`.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.oldest_watchable = state.resource_version;
        state.history.clear();
    }

    /// Compacts, then ends every open watch with an `ERROR` event carrying `410 Gone`.
    pub fn expire_watches(&self) {
        self.compact();
        let state = self.lock();
        let _ = state.deliveries.send(Delivery::Expire {
            oldest_watchable: state.oldest_watchable,
        });
    }

    /// Ends every open watch normally, as the API server does at a watch's timeout.
    pub fn close_watches(&self) {
        let _ = self.lock().deliveries.send(Delivery::Close);
    }

    /// Makes every write (`POST`, `PUT`) fail with `503 ServiceUnavailable` while `refuse`
    /// holds, as during an API server or etcd outage; reads and watches go on.
    pub fn refuse_writes(&self, refuse: bool) {
        self.lock().refuse_writes = refuse;
    }

    /// The stored object `namespace/name` of resource `K`, as a client would read it.
    pub fn get<K: Resource<DynamicType = ()> + DeserializeOwned>(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<K> {
        let key = ObjectKey {
            resource: resource_of::<K>(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let value = self.lock().objects.get(&key).cloned()?;
        Some(serde_json::from_value(value).expect("a stored object reads back as its type"))
    }

    /// The writes (`POST`, `PUT`) of resource `K` answered so far, in order.
    pub fn writes<K: Resource<DynamicType = ()>>(&self) -> Vec<RecordedRequest> {
        let resource = resource_of::<K>();
        self.requests()
            .into_iter()
            .filter(|request| request.method != "GET" && request.resource == resource)
            .collect()
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.lock().resource_version
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// How many lists of resource `K` were answered.
    pub fn list_count<K: Resource<DynamicType = ()>>(&self) -> usize {
        let resource = resource_of::<K>();
        self.requests()
            .iter()
            .filter(|request| {
                request.method == "GET"
                    && request.name.is_none()
                    && !request.watch
                    && request.resource == resource
            })
            .count()
    }

    /// The watches of resource `K`, in order.
    pub fn watches<K: Resource<DynamicType = ()>>(&self) -> Vec<RecordedRequest> {
        let resource = resource_of::<K>();
        self.requests()
            .into_iter()
            .filter(|request| request.watch && request.resource == resource)
            .collect()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ServerState {
    /// Stores `value` under `key` with the next resource version and, if `announce`, tells
    /// watches and the replayable history.
    fn write(&mut self, key: ObjectKey, mut value: Value, announce: bool) -> Value {
        self.resource_version += 1;
        let version = self.resource_version;
        value["metadata"]["namespace"] = Value::String(key.namespace.clone());
        value["metadata"]["name"] = Value::String(key.name.clone());
        value["metadata"]["resourceVersion"] = Value::String(version.to_string());
        if value["metadata"]["uid"].is_null() {
            value["metadata"]["uid"] = Value::String(format!("uid-{}-{}", key.namespace, key.name));
        }
        let existed = self.objects.insert(key.clone(), value.clone()).is_some();
        if announce {
            let event = if existed {
                WatchEvent::Modified(value.clone())
            } else {
                WatchEvent::Added(value.clone())
            };
            self.record(key, version, event);
        }
        value
    }

    fn record(&mut self, key: ObjectKey, resource_version: u64, event: WatchEvent<Value>) {
        let change = Arc::new(Change {
            resource_version,
            resource: key.resource,
            namespace: key.namespace,
            event,
        });
        self.history.push(change.clone());
        let _ = self.deliveries.send(Delivery::Change(change));
    }
}

/// What a request addressed and filtered on.
#[derive(Debug, Clone)]
struct Scope {
    resource: String,
    api_version: String,
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl Scope {
    fn matches(&self, namespace: &str, object: &Value) -> bool {
        if self
            .namespace
            .as_deref()
            .is_some_and(|wanted| wanted != namespace)
        {
            return false;
        }
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|requirement| match requirement {
            LabelRequirement::Equals(key, value) => label(key) == Some(value),
            LabelRequirement::NotEquals(key, value) => label(key) != Some(value),
            LabelRequirement::Exists(key) => label(key).is_some(),
            LabelRequirement::Absent(key) => label(key).is_none(),
        });
        let fields_match = self.fields.iter().all(|(field, value)| {
            let actual = match field.as_str() {
                "metadata.name" => object["metadata"]["name"].as_str(),
                "metadata.namespace" => Some(namespace),
                _ => None,
            };
            actual == Some(value.as_str())
        });
        labels_match && fields_match
    }
}

fn parse_labels(selector: &str) -> Vec<LabelRequirement> {
    selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .map(|term| {
            if let Some((key, value)) = term.split_once("!=") {
                LabelRequirement::NotEquals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                LabelRequirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some(key) = term.strip_prefix('!') {
                LabelRequirement::Absent(key.trim().to_owned())
            } else {
                LabelRequirement::Exists(term.to_owned())
            }
        })
        .collect()
}

fn parse_fields(selector: &str) -> Vec<(String, String)> {
    selector
        .split(',')
        .filter_map(|term| term.split_once('='))
        .map(|(field, value)| {
            (
                field.trim().trim_end_matches('=').to_owned(),
                value.trim().to_owned(),
            )
        })
        .collect()
}

/// What a request's path names.
struct Target {
    api_version: String,
    namespace: Option<String>,
    plural: String,
    /// Set for a request to one object.
    name: Option<String>,
}

/// The target of `/api/v1/...` or `/apis/<group>/<version>/...`.
fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ((*version).to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let target = |namespace: Option<&str>, plural: &str, name: Option<&str>| Target {
        api_version: api_version.clone(),
        namespace: namespace.map(str::to_owned),
        plural: plural.to_owned(),
        name: name.map(str::to_owned),
    };
    match rest {
        [plural] => Some(target(None, plural, None)),
        ["namespaces", namespace, plural] => Some(target(Some(namespace), plural, None)),
        ["namespaces", namespace, plural, name] => {
            Some(target(Some(namespace), plural, Some(name)))
        }
        _ => None,
    }
}

async fn handle(
    AxumState(state): AxumState<Arc<Mutex<ServerState>>>,
    method: Method,
    uri: Uri,
    Query(params): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(target) = parse_path(uri.path()) else {
        return status_response(StatusCode::NOT_FOUND, "NotFound", "no such path");
    };
    let resource = format!("{}/{}", target.api_version, target.plural);
    let watch = params.get("watch").is_some_and(|w| w == "true" || w == "1");
    let request = RecordedRequest {
        method: method.to_string(),
        name: target.name.clone(),
        resource: resource.clone(),
        namespace: target.namespace.clone(),
        watch,
        resource_version: params.get("resourceVersion").cloned(),
        allow_bookmarks: params
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true"),
        label_selector: params.get("labelSelector").cloned(),
        field_selector: params.get("fieldSelector").cloned(),
    };
    let scope = Scope {
        resource,
        api_version: target.api_version.clone(),
        namespace: target.namespace.clone(),
        labels: request
            .label_selector
            .as_deref()
            .map(parse_labels)
            .unwrap_or_default(),
        fields: request
            .field_selector
            .as_deref()
            .map(parse_fields)
            .unwrap_or_default(),
    };
    let mut guard = state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    guard.requests.push(request.clone());
    match (method, target.name) {
        (Method::GET, None) if watch => start_watch(&guard, scope, &request),
        (Method::GET, None) => list(&guard, &scope),
        (Method::GET, Some(name)) => read(&guard, &scope, &name),
        (Method::POST, None) => create(&mut guard, &scope, &body),
        (Method::PUT, Some(name)) => replace(&mut guard, &scope, &name, &body),
        _ => status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the fake API server lists, watches, reads, creates and replaces",
        ),
    }
}

fn key_of(scope: &Scope, name: &str) -> ObjectKey {
    ObjectKey {
        resource: scope.resource.clone(),
        namespace: scope
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        name: name.to_owned(),
    }
}

fn not_found(scope: &Scope, name: &str) -> Response {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", scope.resource),
    )
}

fn read(state: &ServerState, scope: &Scope, name: &str) -> Response {
    match state.objects.get(&key_of(scope, name)) {
        Some(object) => (StatusCode::OK, axum::Json(object.clone())).into_response(),
        None => not_found(scope, name),
    }
}

/// The object in a write's body, and its name, or the `400` to answer.
fn object_of(body: &[u8]) -> Result<(Value, String), Box<Response>> {
    let object: Value = serde_json::from_slice(body).map_err(|problem| {
        Box::new(status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &problem.to_string(),
        ))
    })?;
    let name = object["metadata"]["name"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| {
            Box::new(status_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name: Required value",
            ))
        })?;
    Ok((object, name))
}

fn refused_write() -> Response {
    status_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        "writes are refused (the test made the API server unavailable)",
    )
}

fn create(state: &mut ServerState, scope: &Scope, body: &[u8]) -> Response {
    if state.refuse_writes {
        return refused_write();
    }
    let (object, name) = match object_of(body) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    let key = key_of(scope, &name);
    if state.objects.contains_key(&key) {
        return status_response(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", scope.resource),
        );
    }
    let stored = state.write(key, object, true);
    (StatusCode::CREATED, axum::Json(stored)).into_response()
}

fn replace(state: &mut ServerState, scope: &Scope, name: &str, body: &[u8]) -> Response {
    if state.refuse_writes {
        return refused_write();
    }
    let (object, body_name) = match object_of(body) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    if body_name != name {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the name in the body does not match the name in the URL",
        );
    }
    let key = key_of(scope, name);
    let Some(stored) = state.objects.get(&key) else {
        return not_found(scope, name);
    };
    if let Some(expected) = object["metadata"]["resourceVersion"].as_str()
        && stored["metadata"]["resourceVersion"].as_str() != Some(expected)
    {
        return status_response(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                scope.resource
            ),
        );
    }
    let stored = state.write(key, object, true);
    (StatusCode::OK, axum::Json(stored)).into_response()
}

fn list(state: &ServerState, scope: &Scope) -> Response {
    let items: Vec<&Value> = state
        .objects
        .iter()
        .filter(|(key, object)| {
            key.resource == scope.resource && scope.matches(&key.namespace, object)
        })
        .map(|(_, object)| object)
        .collect();
    let kind = state
        .kinds
        .get(&scope.resource)
        .map_or_else(|| "List".to_owned(), |kind| format!("{kind}List"));
    let body = serde_json::json!({
        "apiVersion": scope.api_version,
        "kind": kind,
        "metadata": ListMeta {
            resource_version: Some(state.resource_version.to_string()),
            ..ListMeta::default()
        },
        "items": items,
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

fn start_watch(state: &ServerState, scope: Scope, request: &RecordedRequest) -> Response {
    let (lines, body) = mpsc::channel::<Result<String, Infallible>>(WATCH_BUFFER);
    let from = request
        .resource_version
        .as_deref()
        .and_then(|version| version.parse::<u64>().ok())
        .filter(|version| *version != 0);
    let kind = state.kinds.get(&scope.resource).cloned();
    match from {
        Some(from) if from < state.oldest_watchable => {
            let _ = lines.try_send(Ok(gone_line(from, state.oldest_watchable)));
        }
        _ => {
            let from = from.unwrap_or(state.resource_version);
            let replay: Vec<Arc<Change>> = state
                .history
                .iter()
                .filter(|change| change.resource_version > from)
                .cloned()
                .collect();
            let deliveries = state.deliveries.subscribe();
            let bookmarks = request.allow_bookmarks;
            tokio::spawn(stream_watch(
                scope, kind, bookmarks, replay, deliveries, lines,
            ));
        }
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(ReceiverStream::new(body)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn stream_watch(
    scope: Scope,
    kind: Option<Kind>,
    bookmarks: bool,
    replay: Vec<Arc<Change>>,
    mut deliveries: broadcast::Receiver<Delivery>,
    lines: mpsc::Sender<Result<String, Infallible>>,
) {
    let relevant = |change: &Change| {
        change.resource == scope.resource
            && match &change.event {
                WatchEvent::Added(object)
                | WatchEvent::Modified(object)
                | WatchEvent::Deleted(object) => scope.matches(&change.namespace, object),
                _ => false,
            }
    };
    for change in replay.iter().filter(|change| relevant(change)) {
        if lines.send(Ok(event_line(&change.event))).await.is_err() {
            return;
        }
    }
    loop {
        let line = match deliveries.recv().await {
            Ok(Delivery::Change(change)) if relevant(&change) => event_line(&change.event),
            Ok(Delivery::Change(_)) => continue,
            Ok(Delivery::Bookmark(version)) if bookmarks => {
                bookmark_line(&scope, kind.as_ref(), version)
            }
            Ok(Delivery::Bookmark(_)) => continue,
            Ok(Delivery::Expire { oldest_watchable }) => {
                let _ = lines
                    .send(Ok(gone_line(oldest_watchable - 1, oldest_watchable)))
                    .await;
                return;
            }
            Ok(Delivery::Close) | Err(_) => return,
        };
        if lines.send(Ok(line)).await.is_err() {
            return;
        }
    }
}

fn event_line(event: &WatchEvent<Value>) -> String {
    let mut line = serde_json::to_string(event).unwrap_or_default();
    line.push('\n');
    line
}

/// A bookmark as the API server sends it: the kind and only the resource version.
fn bookmark_line(scope: &Scope, kind: Option<&Kind>, version: u64) -> String {
    let line = serde_json::json!({
        "type": "BOOKMARK",
        "object": {
            "apiVersion": scope.api_version,
            "kind": kind.map_or("", String::as_str),
            "metadata": { "resourceVersion": version.to_string() },
        },
    });
    format!("{line}\n")
}

/// The `ERROR` event the API server sends for a watch from a compacted version.
fn gone_line(requested: u64, oldest: u64) -> String {
    event_line(&WatchEvent::ErrorStatus(Status {
        code: Some(410),
        message: Some(format!("too old resource version: {requested} ({oldest})")),
        reason: Some("Expired".to_owned()),
        status: Some("Failure".to_owned()),
        ..Status::default()
    }))
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response {
    let status = Status {
        code: Some(i32::from(code.as_u16())),
        message: Some(message.to_owned()),
        reason: Some(reason.to_owned()),
        status: Some("Failure".to_owned()),
        ..Status::default()
    };
    (code, axum::Json(status)).into_response()
}

/// Builders of the Kubernetes objects the source reads, as the controllers write them.
pub mod objects {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{
            core::v1::{ObjectReference, Service, ServicePort, ServiceSpec},
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    /// The label the EndpointSlice controller puts on a slice naming its Service. Stated
    /// here as Kubernetes defines it, not taken from the source under test.
    pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

    /// A ClusterIP Service with TCP ports `(name, port)`; an empty name leaves the port unnamed.
    pub fn service(namespace: &str, name: &str, ports: &[(&str, i32)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(
                    ports
                        .iter()
                        .map(|(port_name, port)| ServicePort {
                            name: (!port_name.is_empty()).then(|| (*port_name).to_owned()),
                            port: *port,
                            protocol: Some("TCP".to_owned()),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    /// An IPv4 EndpointSlice of `service` with TCP ports `(name, target port)`, labelled as
    /// the EndpointSlice controller labels it.
    pub fn endpoint_slice(
        namespace: &str,
        name: &str,
        service: &str,
        ports: &[(&str, i32)],
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".to_owned(),
            endpoints,
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([
                    (SERVICE_NAME_LABEL.to_owned(), service.to_owned()),
                    (
                        "endpointslice.kubernetes.io/managed-by".to_owned(),
                        "endpointslice-controller.k8s.io".to_owned(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            ports: Some(
                ports
                    .iter()
                    .map(|(port_name, port)| EndpointPort {
                        name: Some((*port_name).to_owned()),
                        port: Some(*port),
                        protocol: Some("TCP".to_owned()),
                        app_protocol: None,
                    })
                    .collect(),
            ),
        }
    }

    /// An endpoint with explicit conditions, backed by pod `pod-<ip>`.
    pub fn endpoint(ip: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addresses: vec![ip.to_owned()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(serving),
                terminating: Some(terminating),
            }),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".to_owned()),
                name: Some(format!("pod-{ip}")),
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        }
    }

    /// A ready, serving, not terminating endpoint.
    pub fn ready(ip: &str) -> Endpoint {
        endpoint(ip, true, true, false)
    }

    /// Sets labels on an object's metadata.
    pub fn with_labels(mut meta: ObjectMeta, labels: &[(&str, &str)]) -> ObjectMeta {
        let map = meta.labels.get_or_insert_with(BTreeMap::new);
        for (key, value) in labels {
            map.insert((*key).to_owned(), (*value).to_owned());
        }
        meta
    }

    /// Adds `count` labels `example.com/label-NNNN` whose values are `value_len` bytes: an
    /// object whose labels, copied into every endpoint, make its services large.
    pub fn with_many_labels(meta: ObjectMeta, count: usize, value_len: usize) -> ObjectMeta {
        let labels: Vec<(String, String)> = (0..count)
            .map(|index| {
                (
                    format!("example.com/label-{index:04}"),
                    "x".repeat(value_len),
                )
            })
            .collect();
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        with_labels(meta, &labels)
    }
}
