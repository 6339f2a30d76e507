//! A sample HTTP backend whose misbehaviour can be changed at run time.
//!
//! fulcrum's demo, end-to-end tests and comparison benchmarks need upstreams that fail the way
//! real ones do: slow, erroring, black-holed (accepts, never answers) and flapping. Each
//! backend serves any path on its traffic port and exposes its fault settings on an admin port
//! (`GET`/`PUT /fault`, `GET /stats`), so a test or the demo can flip a fault mid-run.
//!
//! Every response names the backend (`x-backend` header and JSON body) and says whether the
//! request still carried fulcrum's override header (`x-saw-override-header`), which Envoy must
//! strip before the request leaves it. It keeps the distributed-tracing headers
//! ([`TRACE_HEADERS`]) of its latest request, so a test can check that a proxy passed them
//! through unchanged ([`Backend::last_trace_headers`]).
//!
//! With the `grpc` feature, [`grpc`] adds a gRPC backend failing a fixed share of its calls
//! with `UNAVAILABLE`, and a client of it.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, task::JoinHandle};

#[cfg(feature = "grpc")]
pub mod grpc;

/// The header fulcrum's filter sets; a backend must never see it.
pub use fulcrum_core::OVERRIDE_HEADER;

/// The distributed-tracing headers a backend keeps from its latest request: W3C Trace Context,
/// Envoy's request id, and Zipkin's B3 (multi- and single-header).
pub const TRACE_HEADERS: [&str; 9] = [
    "traceparent",
    "tracestate",
    "x-request-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
];

/// How the backend misbehaves. The default is a healthy, fast backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fault {
    /// Added to every response, in milliseconds.
    pub latency_ms: u64,
    /// Fraction of requests (0.0..=1.0) answered with `error_status` instead of 200.
    pub error_rate: f64,
    /// Status of the injected errors (503 unless set).
    pub error_status: u16,
    /// Accept requests and never answer them (the client times out).
    pub blackhole: bool,
    /// When set, the backend alternates between healthy and failing every this many
    /// milliseconds (failing = `error_status` for every request and health check).
    pub flap_period_ms: Option<u64>,
    /// Make `/healthz` fail (503) while traffic is still served.
    pub fail_health_checks: bool,
}

impl Default for Fault {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            error_rate: 0.0,
            error_status: 503,
            blackhole: false,
            flap_period_ms: None,
            fail_health_checks: false,
        }
    }
}

impl Fault {
    /// Checks the ranges; the admin API answers 400 with this message.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!(
                "error_rate must be within 0.0..=1.0, got {}",
                self.error_rate
            ));
        }
        if !(100..=599).contains(&self.error_status) {
            return Err(format!(
                "error_status must be a status code 100..=599, got {}",
                self.error_status
            ));
        }
        if self.flap_period_ms == Some(0) {
            return Err("flap_period_ms must be at least 1 when set".to_owned());
        }
        Ok(())
    }
}

/// Counters a test reads through `GET /stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests received on the traffic port (health checks excluded).
    pub requests: u64,
    /// Requests answered with an injected error status.
    pub errors: u64,
    /// Requests held without an answer.
    pub blackholed: u64,
    /// Requests that arrived still carrying the override header (should stay 0).
    pub saw_override_header: u64,
}

#[derive(Debug)]
struct Shared {
    name: String,
    started: Instant,
    fault: Mutex<Fault>,
    requests: AtomicU64,
    errors: AtomicU64,
    blackholed: AtomicU64,
    saw_override_header: AtomicU64,
    /// The [`TRACE_HEADERS`] of the latest request, in that order (the first value of each).
    last_trace_headers: Mutex<Vec<(&'static str, String)>>,
    /// xorshift state for the error-rate coin; seeded from the name so runs are repeatable.
    coin: AtomicU64,
}

impl Shared {
    fn fault(&self) -> Fault {
        self.fault
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn stats(&self) -> Stats {
        Stats {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            blackholed: self.blackholed.load(Ordering::Relaxed),
            saw_override_header: self.saw_override_header.load(Ordering::Relaxed),
        }
    }

    /// A uniform number in [0, 1) from a shared xorshift64 sequence.
    fn flip(&self) -> f64 {
        let mut next = 0;
        let _ = self
            .coin
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |mut x| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                next = x;
                Some(x)
            });
        (next >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Whether a flapping backend is in its failing half-period now.
    fn flapping_down(&self, fault: &Fault) -> bool {
        fault.flap_period_ms.is_some_and(|period| {
            let elapsed = self.started.elapsed().as_millis() as u64;
            (elapsed / period) % 2 == 1
        })
    }
}

/// A running backend: its traffic and admin addresses. Dropping it stops both servers.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Backend {
    /// Serves on already-bound listeners (bind port 0 for a free one).
    pub fn spawn(name: &str, traffic: TcpListener, admin: TcpListener) -> std::io::Result<Self> {
        let seed = name.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
        }) | 1;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            started: Instant::now(),
            fault: Mutex::new(Fault::default()),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            blackholed: AtomicU64::new(0),
            saw_override_header: AtomicU64::new(0),
            last_trace_headers: Mutex::new(Vec::new()),
            coin: AtomicU64::new(seed),
        });
        let addr = traffic.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let traffic_app = Router::new()
            .route("/healthz", get(health))
            .fallback(serve)
            .with_state(shared.clone());
        let admin_app = Router::new()
            .route("/fault", get(get_fault).put(put_fault))
            .route("/stats", get(get_stats))
            .with_state(shared.clone());
        let tasks = vec![
            tokio::spawn(async move {
                let _ = axum::serve(traffic, traffic_app).await;
            }),
            tokio::spawn(async move {
                let _ = axum::serve(admin, admin_app).await;
            }),
        ];
        Ok(Self {
            name: name.to_owned(),
            addr,
            admin_addr,
            shared,
            tasks,
        })
    }

    /// Binds both ports on 127.0.0.1 (0 = any free port) and serves.
    pub async fn bind(name: &str, port: u16, admin_port: u16) -> std::io::Result<Self> {
        let traffic = TcpListener::bind(("127.0.0.1", port)).await?;
        let admin = TcpListener::bind(("127.0.0.1", admin_port)).await?;
        Self::spawn(name, traffic, admin)
    }

    /// Replaces the fault settings (what `PUT /fault` does).
    pub fn set_fault(&self, fault: Fault) -> Result<(), String> {
        fault.validate()?;
        *self
            .shared
            .fault
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = fault;
        Ok(())
    }

    /// The tracing headers ([`TRACE_HEADERS`]) the latest request on the traffic port carried,
    /// name and value, in [`TRACE_HEADERS`] order; a value that is not text is left out.
    pub fn last_trace_headers(&self) -> Vec<(&'static str, String)> {
        self.shared
            .last_trace_headers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Stops serving: the ports close and held (black-holed) requests are dropped.
    pub fn stop(self) {}
}

impl Drop for Backend {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn serve(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let trace_headers = TRACE_HEADERS
        .into_iter()
        .filter_map(|name| {
            let value = headers.get(name)?.to_str().ok()?;
            Some((name, value.to_owned()))
        })
        .collect();
    *shared
        .last_trace_headers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = trace_headers;
    if headers.contains_key(OVERRIDE_HEADER) {
        shared.saw_override_header.fetch_add(1, Ordering::Relaxed);
    }
    let fault = shared.fault();
    if fault.blackhole {
        shared.blackholed.fetch_add(1, Ordering::Relaxed);
        std::future::pending::<()>().await;
    }
    if fault.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(fault.latency_ms)).await;
    }
    let failing = shared.flapping_down(&fault)
        || (fault.error_rate > 0.0 && shared.flip() < fault.error_rate);
    let status = if failing {
        shared.errors.fetch_add(1, Ordering::Relaxed);
        StatusCode::from_u16(fault.error_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
    } else {
        StatusCode::OK
    };
    let body = Json(serde_json::json!({ "backend": shared.name, "status": status.as_u16() }));
    let mut response = (status, body).into_response();
    let response_headers = response.headers_mut();
    if let Ok(name) = HeaderValue::from_str(&shared.name) {
        response_headers.insert("x-backend", name);
    }
    let saw = if headers.contains_key(OVERRIDE_HEADER) {
        "true"
    } else {
        "false"
    };
    response_headers.insert("x-saw-override-header", HeaderValue::from_static(saw));
    response
}

async fn health(State(shared): State<Arc<Shared>>) -> StatusCode {
    let fault = shared.fault();
    if fault.blackhole {
        std::future::pending::<()>().await;
    }
    if fault.fail_health_checks || shared.flapping_down(&fault) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn get_fault(State(shared): State<Arc<Shared>>) -> Json<Fault> {
    Json(shared.fault())
}

async fn put_fault(State(shared): State<Arc<Shared>>, Json(fault): Json<Fault>) -> Response {
    match fault.validate() {
        Ok(()) => {
            *shared
                .fault
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = fault.clone();
            Json(fault).into_response()
        }
        Err(message) => (StatusCode::BAD_REQUEST, message).into_response(),
    }
}

async fn get_stats(State(shared): State<Arc<Shared>>) -> Json<Stats> {
    Json(shared.stats())
}
