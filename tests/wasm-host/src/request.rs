//! One HTTP stream through the plugin, driven the way Envoy's filter chain drives it:
//! `proxy_on_context_create`, `proxy_on_request_headers` (and body), then for the upstream's
//! answer `proxy_on_response_headers` (and body), then `proxy_on_done`, `proxy_on_log` and
//! `proxy_on_delete` (the spec's order: log and delete follow a completed `on_done`).
//!
//! The test sets the properties Envoy would know by then (`upstream.address`,
//! `response.code`, `request.duration`, …); the guest reads them through
//! `proxy_get_property`.
//!
//! The route table is the demo's: every `:authority` host routes to the cluster of the same
//! name, so `xds.cluster_name` is the authority without its port unless the test names
//! another cluster ([`RequestBuilder::cluster`]) or no route at all
//! ([`RequestBuilder::without_route`]). A host that is not UTF-8 matches no route.
//!
//! Headers are bytes end to end: besides the `&str` methods, `header_bytes` sends any name and
//! value a client could (bytes that are not UTF-8, repeated names, upper case, 60 KiB values)
//! and the `*_bytes` readers show exactly what the filter left.

use std::time::Duration;

use crate::{
    abi::{Action, StreamType},
    context::{LocalResponse, StreamContext},
    headers::{self, HeaderMap},
    plugin::Plugin,
    property::{Property, path_key},
};

/// Where Envoy's downstream connection comes from unless the test says otherwise.
const DEFAULT_SOURCE_ADDRESS: &str = "127.0.0.1:40000";

/// A request before it reaches the filter.
#[derive(Debug)]
pub struct RequestBuilder<'p> {
    plugin: &'p Plugin,
    worker: usize,
    stream: StreamContext,
    /// Whether the route goes to the cluster named after the authority (see the module docs).
    route_by_authority: bool,
}

/// A request the filter has seen; respond to it with [`Request::respond`].
#[derive(Debug)]
pub struct Request<'p> {
    plugin: &'p Plugin,
    worker: usize,
    id: u32,
    started_at_nanos: u64,
    actions: Vec<(&'static str, Action)>,
    /// The stream's final state, kept after `proxy_on_delete` released it in the VM.
    ended: Option<StreamContext>,
}

/// The upstream's answer to a [`Request`].
#[derive(Debug)]
pub struct ResponseBuilder<'r, 'p> {
    request: &'r mut Request<'p>,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
    trailers: Option<HeaderMap>,
    latency: Duration,
    properties: Vec<(String, Property)>,
}

impl<'p> RequestBuilder<'p> {
    pub(crate) fn new(plugin: &'p Plugin, worker: usize) -> Self {
        let mut stream = StreamContext::default();
        stream.properties.insert(
            path_key("source.address"),
            Property::string(DEFAULT_SOURCE_ADDRESS).0,
        );
        Self {
            plugin,
            worker,
            stream,
            route_by_authority: true,
        }
    }

    /// Adds a request header (names are lower-cased, as in Envoy).
    pub fn header(self, name: &str, value: &str) -> Self {
        self.header_bytes(name, value)
    }

    /// Adds a request header with any bytes as name and value; adding a name again repeats
    /// it. Names are lower-cased (ASCII), as Envoy's codecs store them.
    pub fn header_bytes(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        headers::add(
            &mut self.stream.request_headers,
            name.as_ref(),
            value.as_ref(),
        );
        self
    }

    /// Sets a property the guest may read, by dotted path (`xds.cluster_name`).
    pub fn property(mut self, dotted_path: &str, value: Property) -> Self {
        self.stream
            .properties
            .insert(path_key(dotted_path), value.0);
        self
    }

    /// The route's upstream cluster (`xds.cluster_name`), instead of the one named after the
    /// authority.
    pub fn cluster(self, name: &str) -> Self {
        self.property("xds.cluster_name", Property::string(name))
    }

    /// No route matched the request: Envoy knows no cluster (`xds.cluster_name` is absent).
    pub fn without_route(mut self) -> Self {
        self.route_by_authority = false;
        self.stream.properties.remove(&path_key("xds.cluster_name"));
        self
    }

    /// The downstream address (`source.address`, default `127.0.0.1:40000`).
    pub fn source(self, address: &str) -> Self {
        self.property("source.address", Property::string(address))
    }

    /// Creates the stream context and runs `proxy_on_request_headers` (end of stream: no
    /// body follows unless [`Request::send_body`] is called with one).
    pub fn send_headers(self) -> anyhow::Result<Request<'p>> {
        self.send(true)
    }

    /// Like [`RequestBuilder::send_headers`], announcing that a body follows.
    pub fn send_headers_with_body(self) -> anyhow::Result<Request<'p>> {
        self.send(false)
    }

    fn send(mut self, end_of_stream: bool) -> anyhow::Result<Request<'p>> {
        let cluster_key = path_key("xds.cluster_name");
        if self.route_by_authority && !self.stream.properties.contains_key(&cluster_key) {
            let host = headers::first(&self.stream.request_headers, b":authority")
                .and_then(|authority| std::str::from_utf8(authority).ok())
                .map(host_of)
                .filter(|host| !host.is_empty());
            if let Some(host) = host {
                let cluster = Property::string(host).0;
                self.stream.properties.insert(cluster_key, cluster);
            }
        }
        let started_at_nanos = self.plugin.shared().clock.now_nanos();
        self.stream.properties.insert(
            path_key("request.time"),
            Property::timestamp_nanos(started_at_nanos).0,
        );
        let mut vm = self.plugin.vm(self.worker);
        let id = vm.create_stream(self.stream)?;
        let action = vm.on_request_headers(id, end_of_stream)?;
        drop(vm);
        Ok(Request {
            plugin: self.plugin,
            worker: self.worker,
            id,
            started_at_nanos,
            actions: vec![("proxy_on_request_headers", action)],
            ended: None,
        })
    }
}

/// The host of an `:authority`: without its `:port`, and an IPv6 literal without brackets.
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(authority, |(host, _)| host);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => authority,
    }
}

impl<'p> Request<'p> {
    /// The stream's context id in its worker.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The worker this request went to.
    pub fn worker(&self) -> usize {
        self.worker
    }

    fn read<T>(&self, read: impl FnOnce(&StreamContext) -> T) -> T {
        let vm = self.plugin.vm(self.worker);
        match (vm.stream(self.id), &self.ended) {
            (Some(live), _) => read(live),
            (None, Some(ended)) => read(ended),
            (None, None) => panic!("stream {} vanished from worker {}", self.id, self.worker),
        }
    }

    /// The request header `name` as the filter left it (what Envoy sends upstream); bytes
    /// that are not UTF-8 read as U+FFFD (see [`Request::request_header_bytes`]).
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.request_header_bytes(name)
            .map(|value| headers::lossy(&value))
    }

    /// The first value of request header `name` as the filter left it, byte for byte.
    pub fn request_header_bytes(&self, name: impl AsRef<[u8]>) -> Option<Vec<u8>> {
        self.read(|s| headers::first(&s.request_headers, name.as_ref()).map(<[u8]>::to_vec))
    }

    /// Every request header as the filter left it, as text (U+FFFD for bytes that are not
    /// UTF-8).
    pub fn request_headers(&self) -> Vec<(String, String)> {
        self.request_headers_bytes()
            .iter()
            .map(|(name, value)| (headers::lossy(name), headers::lossy(value)))
            .collect()
    }

    /// Every request header as the filter left it, byte for byte, in order.
    pub fn request_headers_bytes(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.read(|s| s.request_headers.clone())
    }

    /// The response header `name` as the filter left it (U+FFFD for bytes that are not UTF-8).
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.response_header_bytes(name)
            .map(|value| headers::lossy(&value))
    }

    /// The first value of response header `name` as the filter left it, byte for byte.
    pub fn response_header_bytes(&self, name: impl AsRef<[u8]>) -> Option<Vec<u8>> {
        self.read(|s| headers::first(&s.response_headers, name.as_ref()).map(<[u8]>::to_vec))
    }

    /// The action `proxy_on_request_headers` returned.
    pub fn request_headers_action(&self) -> Action {
        self.actions[0].1
    }

    /// Every callback's action so far, in order, named by callback.
    pub fn actions(&self) -> &[(&'static str, Action)] {
        &self.actions
    }

    /// The local reply the filter sent instead of going upstream, if any.
    pub fn local_response(&self) -> Option<LocalResponse> {
        self.read(|s| s.local_response.clone())
    }

    /// Whether the filter resumed the request (`proxy_continue_stream(HttpRequest)`) after
    /// pausing it.
    pub fn resumed(&self) -> bool {
        self.read(|s| s.continued.contains(&StreamType::Request))
    }

    /// Every stream the filter asked to close or reset (`proxy_close_stream`).
    pub fn closed(&self) -> Vec<StreamType> {
        self.read(|s| s.closed.clone())
    }

    /// A property the guest set on this stream (`proxy_set_property`) or the test provided.
    pub fn property(&self, dotted_path: &str) -> Option<Vec<u8>> {
        self.read(|s| s.properties.get(&path_key(dotted_path)).cloned())
    }

    /// Whether the stream ended (`proxy_on_delete` ran, or waits for `proxy_done`).
    pub fn is_ended(&self) -> bool {
        self.ended.is_some()
    }

    /// Sends a request body chunk through `proxy_on_request_body`.
    pub fn send_body(&mut self, body: &[u8], end_of_stream: bool) -> anyhow::Result<Action> {
        let mut vm = self.plugin.vm(self.worker);
        if let Some(stream) = vm.stream_mut(self.id) {
            stream.request_body = body.to_vec();
        }
        let action = vm.on_request_body(self.id, end_of_stream)?;
        self.actions.push(("proxy_on_request_body", action));
        Ok(action)
    }

    /// Starts the upstream's answer with `:status` `status`.
    pub fn respond(&mut self, status: u16) -> ResponseBuilder<'_, 'p> {
        ResponseBuilder {
            request: self,
            headers: vec![(b":status".to_vec(), status.to_string().into_bytes())],
            body: None,
            trailers: None,
            latency: Duration::ZERO,
            properties: vec![
                (
                    "response.code".to_string(),
                    Property::int(i64::from(status)),
                ),
                (
                    "response.code_details".to_string(),
                    Property::string("via_upstream"),
                ),
                ("response.flags".to_string(), Property::int(0)),
                (
                    "upstream.request_attempt_count".to_string(),
                    Property::int(1),
                ),
            ],
        }
    }

    /// Ends the stream without a response (the client went away): `proxy_on_done`,
    /// `proxy_on_log`, `proxy_on_delete`.
    pub fn reset(&mut self) -> anyhow::Result<()> {
        self.end()
    }

    fn end(&mut self) -> anyhow::Result<()> {
        let mut vm = self.plugin.vm(self.worker);
        let released = vm.end_stream(self.id)?;
        // Until `proxy_done` releases it, the live state stays readable in the VM; the copy
        // answers once it is gone.
        self.ended = released.or_else(|| vm.stream(self.id).cloned());
        Ok(())
    }
}

impl ResponseBuilder<'_, '_> {
    /// Adds a response header.
    pub fn header(self, name: &str, value: &str) -> Self {
        self.header_bytes(name, value)
    }

    /// Adds a response header with any bytes as name and value.
    pub fn header_bytes(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        headers::add(&mut self.headers, name.as_ref(), value.as_ref());
        self
    }

    /// The upstream host that answered: `upstream.address` (`ip:port`) and `upstream.port`.
    pub fn upstream(mut self, address: &str) -> Self {
        if let Some(port) = address
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<i64>().ok())
        {
            self.properties
                .push(("upstream.port".to_string(), Property::int(port)));
        }
        self.properties
            .push(("upstream.address".to_string(), Property::string(address)));
        self
    }

    /// How long the upstream took: the clock moves by `latency` before
    /// `proxy_on_response_headers`, and `request.duration` covers the whole request.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Envoy's `response.flags` bits (see [`crate::response_flags`]).
    pub fn flags(mut self, flags: u64) -> Self {
        self.properties.push((
            "response.flags".to_string(),
            Property::int(i64::try_from(flags).unwrap_or(i64::MAX)),
        ));
        self
    }

    /// `response.code_details` (default `via_upstream`).
    pub fn code_details(mut self, details: &str) -> Self {
        self.properties.push((
            "response.code_details".to_string(),
            Property::string(details),
        ));
        self
    }

    /// `upstream.request_attempt_count` (default 1).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.properties.push((
            "upstream.request_attempt_count".to_string(),
            Property::int(i64::from(attempts)),
        ));
        self
    }

    /// Any other property, by dotted path.
    pub fn property(mut self, dotted_path: &str, value: Property) -> Self {
        self.properties.push((dotted_path.to_string(), value));
        self
    }

    /// A response body, delivered through `proxy_on_response_body` after the headers.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Ends the response with a trailer (repeat for more): `proxy_on_response_trailers` runs
    /// after the headers and the body.
    pub fn trailer(self, name: &str, value: &str) -> Self {
        self.trailer_bytes(name, value)
    }

    /// [`trailer`](Self::trailer) with any bytes as name and value.
    pub fn trailer_bytes(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        headers::add(
            self.trailers.get_or_insert_with(Vec::new),
            name.as_ref(),
            value.as_ref(),
        );
        self
    }

    /// Runs `proxy_on_response_headers` (and `proxy_on_response_body`, then
    /// `proxy_on_response_trailers`), then ends the stream (`proxy_on_done`, `proxy_on_log`,
    /// `proxy_on_delete`). Returns the response headers action.
    pub fn finish(self) -> anyhow::Result<Action> {
        let request = self.request;
        let plugin = request.plugin;
        plugin.advance_clock(self.latency);
        let duration = plugin
            .shared()
            .clock
            .now_nanos()
            .saturating_sub(request.started_at_nanos);
        let mut vm = plugin.vm(request.worker);
        let stream = vm.stream_mut(request.id).ok_or_else(|| {
            anyhow::anyhow!("request {} already ended; respond only once", request.id)
        })?;
        stream.response_headers = self.headers;
        for (path, value) in self.properties {
            stream.properties.insert(path_key(&path), value.0);
        }
        stream.properties.insert(
            path_key("request.duration"),
            Property::duration(Duration::from_nanos(duration)).0,
        );
        let has_body = self.body.is_some();
        let has_trailers = self.trailers.is_some();
        let action = vm.on_response_headers(request.id, !has_body && !has_trailers)?;
        request.actions.push(("proxy_on_response_headers", action));
        if let Some(body) = self.body {
            if let Some(stream) = vm.stream_mut(request.id) {
                stream.response_body = body;
            }
            let body_action = vm.on_response_body(request.id, !has_trailers)?;
            request
                .actions
                .push(("proxy_on_response_body", body_action));
        }
        if let Some(trailers) = self.trailers {
            if let Some(stream) = vm.stream_mut(request.id) {
                stream.response_trailers = trailers;
            }
            let trailers_action = vm.on_response_trailers(request.id)?;
            request
                .actions
                .push(("proxy_on_response_trailers", trailers_action));
        }
        drop(vm);
        request.end()?;
        Ok(action)
    }
}
