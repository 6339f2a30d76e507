//! `proxy_http_call` (`dispatch_http_call`): what the guest sent, how the test answers it, and
//! when the answer arrives.
//!
//! As in Envoy, a call is validated when dispatched (known cluster; `:method`, `:path` and
//! `:authority` present, else `BadArgument`) and its answer reaches
//! `proxy_on_http_call_response` on a later turn of the worker's event loop, never inside the
//! dispatching callback. Envoy's async client turns a timeout into a 504 and a refused or
//! unhealthy upstream into a 503 local reply; a reset gives no headers at all.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

/// One call the guest dispatched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    /// The worker whose VM dispatched it.
    pub worker: usize,
    /// The upstream cluster name passed to `dispatch_http_call`.
    pub cluster: String,
    /// Header names and values as the guest sent them.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(Vec<u8>, Vec<u8>)>,
    pub timeout: Duration,
}

impl HttpCall {
    /// The first value of header `name` (case-insensitive), when it is UTF-8; see
    /// [`HttpCall::header_bytes`] for any value.
    pub fn header(&self, name: &str) -> Option<&str> {
        std::str::from_utf8(self.header_bytes(name)?).ok()
    }

    /// The first value of header `name` (case-insensitive), as bytes.
    pub fn header_bytes(&self, name: impl AsRef<[u8]>) -> Option<&[u8]> {
        crate::headers::first(&self.headers, name.as_ref())
    }
}

/// A response from the called cluster. Headers are bytes, so a test can answer with anything
/// a misbehaving upstream could.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Response {
    /// A response with `:status` `status` and no body.
    pub fn status(status: u16) -> Self {
        Self::raw_status(status.to_string())
    }

    /// A response whose `:status` is exactly `status`, e.g. bytes that are not a number or not
    /// UTF-8 (Envoy's codecs refuse those, but the guest must not rely on it).
    pub fn raw_status(status: impl Into<Vec<u8>>) -> Self {
        Self {
            headers: vec![(b":status".to_vec(), status.into())],
            body: Vec::new(),
            trailers: Vec::new(),
        }
    }

    /// A 200 with `body`.
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Self::status(200).body(body)
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn header(self, name: &str, value: &str) -> Self {
        self.header_bytes(name, value)
    }

    /// Adds a header with any bytes as name and value.
    pub fn header_bytes(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        crate::headers::add(&mut self.headers, name.as_ref(), value.as_ref());
        self
    }
}

/// How a call ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The cluster answered.
    Respond(Response),
    /// The call's timeout fired: Envoy answers `504` with body `upstream request timeout`.
    Timeout,
    /// No healthy upstream / connection refused: Envoy answers `503`.
    Refused,
    /// The stream was reset: no headers, no body; `proxy_get_status` says `BrokenConnection`.
    Reset,
}

impl From<Response> for Outcome {
    fn from(response: Response) -> Self {
        Self::Respond(response)
    }
}

impl Outcome {
    /// What the guest sees: `None` for a reset (no response at all).
    pub(crate) fn into_response(self) -> Option<Response> {
        match self {
            Self::Respond(response) => Some(response),
            Self::Timeout => Some(local_reply(504, "upstream request timeout")),
            Self::Refused => Some(local_reply(503, "no healthy upstream")),
            Self::Reset => None,
        }
    }
}

fn local_reply(status: u16, body: &str) -> Response {
    Response::status(status)
        .header("content-length", &body.len().to_string())
        .header("content-type", "text/plain")
        .body(body)
}

type Serve = Box<dyn FnMut(&HttpCall) -> Option<Outcome> + Send>;

/// Answers dispatched calls: scripted outcomes per cluster first (in order), then the serving
/// closure; a call nobody answers stays pending until its timeout passes on the clock.
#[derive(Clone, Default)]
pub(crate) struct Responder {
    inner: Arc<Mutex<ResponderState>>,
}

#[derive(Default)]
struct ResponderState {
    scripted: HashMap<String, VecDeque<Outcome>>,
    serve: Option<Serve>,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder").finish_non_exhaustive()
    }
}

impl Responder {
    pub(crate) fn script(&self, cluster: &str, outcome: Outcome) {
        self.lock()
            .scripted
            .entry(cluster.to_string())
            .or_default()
            .push_back(outcome);
    }

    pub(crate) fn serve(&self, serve: Serve) {
        self.lock().serve = Some(serve);
    }

    /// The outcome for `call`, if the test has one. The closure runs without the lock held so
    /// it may use the plugin's own methods.
    pub(crate) fn answer(&self, call: &HttpCall) -> Option<Outcome> {
        let mut serve = {
            let mut state = self.lock();
            if let Some(outcome) = state
                .scripted
                .get_mut(&call.cluster)
                .and_then(VecDeque::pop_front)
            {
                return Some(outcome);
            }
            state.serve.take()?
        };
        let outcome = serve(call);
        let mut state = self.lock();
        if state.serve.is_none() {
            state.serve = Some(serve);
        }
        outcome
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ResponderState> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
