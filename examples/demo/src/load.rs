//! A bounded closed-loop HTTP load generator that records which backend answered.
//!
//! `concurrency` tasks each send one request at a time through Envoy until the deadline or
//! the request budget is reached; every response is attributed to the backend named in its
//! `x-backend` header (Envoy's own local replies have none and count as `envoy`). Samples are
//! drained by the reporter once per window.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;

/// Who answered a request that got no `x-backend` header.
pub const NO_BACKEND: &str = "envoy";

/// One finished request.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The backend named by `x-backend`, or [`NO_BACKEND`].
    pub backend: String,
    /// `None` when the request failed without a response (timeout, connection error).
    pub status: Option<u16>,
    pub latency: Duration,
}

impl Sample {
    pub fn ok(&self) -> bool {
        self.status == Some(200)
    }
}

/// What the load generator shares with the reporter.
#[derive(Debug, Default)]
pub struct Recorder {
    samples: Mutex<Vec<Sample>>,
    sent: AtomicU64,
}

impl Recorder {
    /// Takes the samples recorded since the last call.
    pub fn drain(&self) -> Vec<Sample> {
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn record(&self, sample: Sample) {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sample);
    }
}

/// The load's shape. Both bounds hold: it stops at `duration` or `max_requests`.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Envoy's listener.
    pub target: SocketAddr,
    /// Host the requests are for (the service name).
    pub host: String,
    pub concurrency: usize,
    pub per_request_timeout: Duration,
    pub duration: Duration,
    pub max_requests: u64,
}

/// Runs the load to completion, recording into `recorder`.
pub async fn run(config: LoadConfig, recorder: Arc<Recorder>) -> Result<()> {
    let client = reqwest::Client::builder()
        .resolve(&config.host, config.target)
        .timeout(config.per_request_timeout)
        .pool_max_idle_per_host(config.concurrency)
        .build()?;
    let url = format!("http://{}:{}/", config.host, config.target.port());
    let deadline = Instant::now() + config.duration;
    let mut tasks = Vec::new();
    for _ in 0..config.concurrency {
        let (client, url, recorder) = (client.clone(), url.clone(), recorder.clone());
        let max_requests = config.max_requests;
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline
                && recorder.sent.fetch_add(1, Ordering::Relaxed) < max_requests
            {
                let started = Instant::now();
                let sample = match client.get(&url).send().await {
                    Ok(response) => {
                        let backend = response
                            .headers()
                            .get("x-backend")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or(NO_BACKEND)
                            .to_owned();
                        let status = response.status().as_u16();
                        let _ = response.bytes().await;
                        Sample {
                            backend,
                            status: Some(status),
                            latency: started.elapsed(),
                        }
                    }
                    Err(_) => Sample {
                        backend: NO_BACKEND.to_owned(),
                        status: None,
                        latency: started.elapsed(),
                    },
                };
                recorder.record(sample);
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(())
}

/// Aggregates of a set of samples for one backend.
#[derive(Debug, Default, Clone)]
pub struct BackendStats {
    pub requests: u64,
    pub errors: u64,
    latencies_us: Vec<u64>,
}

impl BackendStats {
    pub fn add(&mut self, sample: &Sample) {
        self.requests += 1;
        if !sample.ok() {
            self.errors += 1;
        }
        self.latencies_us.push(sample.latency.as_micros() as u64);
    }

    /// The `q` quantile (0.0..=1.0) of latency, in milliseconds.
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        self.latencies_us.sort_unstable();
        let index = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        self.latencies_us[index] as f64 / 1000.0
    }
}

/// Per-backend and overall aggregates of a set of samples.
#[derive(Debug, Default, Clone)]
pub struct Window {
    pub backends: BTreeMap<String, BackendStats>,
    pub all: BackendStats,
}

impl Window {
    pub fn add(&mut self, samples: &[Sample]) {
        for sample in samples {
            self.backends
                .entry(sample.backend.clone())
                .or_default()
                .add(sample);
            self.all.add(sample);
        }
    }

    /// Share of all requests that `backend` answered, in percent.
    pub fn share(&self, backend: &str) -> f64 {
        let requests = self.backends.get(backend).map_or(0, |b| b.requests);
        if self.all.requests == 0 {
            0.0
        } else {
            100.0 * requests as f64 / self.all.requests as f64
        }
    }

    /// Successful requests in percent.
    pub fn success_rate(&self) -> f64 {
        if self.all.requests == 0 {
            100.0
        } else {
            100.0 * (self.all.requests - self.all.errors) as f64 / self.all.requests as f64
        }
    }
}
