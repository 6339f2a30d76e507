//! The control plane's `tracing` spans exported over OTLP (gRPC), when configured: one trace
//! per change, from the source that made it to every Envoy's ACK of its version
//! (`fulcrum_pipeline::change`, `fulcrum_xds::trace`).
//!
//! Off by default. [`OtlpConfig::resolve`] turns it on from `--otlp-endpoint` or the standard
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`, naming the service
//! `OTEL_SERVICE_NAME` (default `fulcrum-control-plane`) and the instance after the replica.
//! The SDK's batch processor (OpenTelemetry's `BatchSpanProcessor`, `OTEL_BSP_*` tune it)
//! queues ended spans, at most 2048 by default, and exports them from its own thread: a span
//! costs the data path a non-blocking queue push, and a collector that is down or slow only
//! fills that queue, whose overflow the SDK drops (and logs once, with the total at shutdown).
//! Exported and failed spans are counted in `fulcrum_otlp_spans_exported_total` and
//! `fulcrum_otlp_spans_failed_total`; a failing collector is logged when exports start and stop
//! failing, not per batch. [`Otlp::shutdown`] flushes what is queued, bounded by
//! [`SHUTDOWN_TIMEOUT`].
//!
//! Only fulcrum's own spans at `info` and above are exported ([`Otlp::layer`]): never the
//! gRPC and HTTP client's, whose spans the export itself would make.

use std::{
    sync::{
        Arc, LazyLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter},
};
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use tracing::{Level, Subscriber, info, warn};
use tracing_subscriber::{Layer, filter::filter_fn, registry::LookupSpan};

/// The service name when `OTEL_SERVICE_NAME` names none.
pub const DEFAULT_SERVICE_NAME: &str = "fulcrum-control-plane";

/// How long [`Otlp::shutdown`] waits for the last spans to be exported.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one export may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where spans go and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector.observability:4317`.
    pub endpoint: String,
    /// `service.name` of every span.
    pub service_name: String,
    /// `service.instance.id` of every span: the replica's name.
    pub instance: String,
}

impl OtlpConfig {
    /// The configuration `flag` (`--otlp-endpoint`) and the environment (`env`, e.g.
    /// `std::env::var`) ask for: the flag, else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` (export off) when none is set or all are empty.
    pub fn resolve(
        flag: Option<&str>,
        instance: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Option<Self> {
        let set = |value: Option<String>| value.filter(|value| !value.trim().is_empty());
        let endpoint = set(flag.map(str::to_owned))
            .or_else(|| set(env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")))
            .or_else(|| set(env("OTEL_EXPORTER_OTLP_ENDPOINT")))?;
        Some(Self {
            endpoint: endpoint.trim().to_owned(),
            service_name: set(env("OTEL_SERVICE_NAME"))
                .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned()),
            instance: instance.to_owned(),
        })
    }
}

/// Why OTLP export could not start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The exporter refused the endpoint.
    #[error(
        "cannot export spans to {endpoint}: give --otlp-endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT) \
         as an http:// or https:// URL of a collector's OTLP/gRPC port, e.g. http://127.0.0.1:4317"
    )]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
        /// What the exporter said.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The OTLP export counters, process-wide (the exporter outlives no control plane but is
/// set up before one starts).
#[derive(Debug, Clone, Default)]
pub struct OtlpMetrics {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans in batches that failed to export (collector down, refused, timed out).
    pub failed: Counter,
}

static METRICS: LazyLock<OtlpMetrics> = LazyLock::new(OtlpMetrics::default);

impl OtlpMetrics {
    /// The process's counters.
    pub fn global() -> &'static OtlpMetrics {
        &METRICS
    }

    /// Registers `fulcrum_otlp_spans_exported_total` and `fulcrum_otlp_spans_failed_total`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("fulcrum_otlp");
        registry.register(
            "spans_exported",
            "Spans exported to the OTLP collector",
            self.exported.clone(),
        );
        registry.register(
            "spans_failed",
            "Spans whose export to the OTLP collector failed (the spans are dropped)",
            self.failed.clone(),
        );
    }
}

/// A running OTLP export. Dropping it without [`Otlp::shutdown`] loses the queued spans.
#[derive(Debug)]
pub struct Otlp {
    provider: SdkTracerProvider,
}

impl Otlp {
    /// Starts exporting to `config.endpoint`, counting into `metrics`. Call it within the
    /// tokio runtime the control plane runs on: the gRPC client's connection lives there.
    /// Nothing is sent until a span ends; an unreachable collector is not an error here.
    pub fn start(config: &OtlpConfig, metrics: OtlpMetrics) -> Result<Self, OtlpError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|source| OtlpError::Endpoint {
                endpoint: config.endpoint.clone(),
                source,
            })?;
        let exporter = CountingExporter {
            inner: exporter,
            metrics,
            endpoint: config.endpoint.clone(),
            failing: Arc::new(AtomicBool::new(false)),
        };
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attributes([
                KeyValue::new("service.instance.id", config.instance.clone()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .with_resource(resource)
            .build();
        info!(endpoint = %config.endpoint, service = %config.service_name, "exporting spans over OTLP");
        Ok(Self { provider })
    }

    /// The layer that hands fulcrum's spans (targets `fulcrum*`, `info` and above) to the
    /// exporter; add it to the subscriber beside the log output.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: Subscriber + Send + Sync + for<'span> LookupSpan<'span>,
    {
        let tracer = self.provider.tracer("fulcrum-control-plane");
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(filter_fn(|metadata| {
                metadata.target().starts_with("fulcrum") && *metadata.level() <= Level::INFO
            }))
    }

    /// Exports every span ended so far, waiting (off the async threads) for the collector.
    pub async fn flush(&self) -> OTelSdkResult {
        let provider = self.provider.clone();
        tokio::task::spawn_blocking(move || provider.force_flush())
            .await
            .unwrap_or_else(|error| {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    error.to_string(),
                ))
            })
    }

    /// Exports what is queued (within [`SHUTDOWN_TIMEOUT`]) and stops the exporter.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let result =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
                .await;
        match result {
            Ok(Ok(())) => info!("OTLP export flushed and stopped"),
            Ok(Err(error)) => warn!(%error, "OTLP export stopped without flushing every span"),
            Err(error) => warn!(%error, "OTLP export did not stop cleanly"),
        }
    }
}

/// The OTLP exporter, counting what it exports and logging when exports start and stop
/// failing.
#[derive(Debug)]
struct CountingExporter {
    inner: opentelemetry_otlp::SpanExporter,
    metrics: OtlpMetrics,
    endpoint: String,
    /// Whether the last export failed: only changes are logged.
    failing: Arc<AtomicBool>,
}

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                self.metrics.exported.inc_by(spans);
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!(endpoint = %self.endpoint, "OTLP export works again");
                }
            }
            Err(error) => {
                self.metrics.failed.inc_by(spans);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(
                        endpoint = %self.endpoint,
                        %error,
                        spans,
                        "OTLP export failed: spans are dropped until the collector answers \
                         (counted in fulcrum_otlp_spans_failed_total)"
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn export_is_off_unless_the_flag_or_the_standard_environment_names_an_endpoint() {
        assert_eq!(OtlpConfig::resolve(None, "r1", env(&[])), None);
        assert_eq!(
            OtlpConfig::resolve(Some(" "), "r1", env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])),
            None,
            "empty values are unset"
        );
        assert_eq!(
            OtlpConfig::resolve(None, "r1", env(&[("OTEL_SERVICE_NAME", "cp")])),
            None,
            "a service name alone does not turn export on"
        );
    }

    #[test]
    fn the_flag_wins_over_the_traces_endpoint_which_wins_over_the_generic_one() {
        let both = [
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
        ];
        let endpoint =
            |flag, vars| OtlpConfig::resolve(flag, "r1", env(vars)).map(|config| config.endpoint);
        assert_eq!(
            endpoint(Some("http://flag:4317"), &both).as_deref(),
            Some("http://flag:4317")
        );
        assert_eq!(endpoint(None, &both).as_deref(), Some("http://traces:4317"));
        assert_eq!(
            endpoint(None, &both[1..]).as_deref(),
            Some("http://generic:4317")
        );
    }

    #[test]
    fn the_service_is_named_by_otel_service_name_and_the_instance_by_the_replica() {
        let config = OtlpConfig::resolve(Some("http://c:4317"), "cp-0", env(&[])).expect("on");
        assert_eq!(config.service_name, DEFAULT_SERVICE_NAME);
        assert_eq!(config.instance, "cp-0");
        let named = OtlpConfig::resolve(
            Some("http://c:4317"),
            "cp-0",
            env(&[("OTEL_SERVICE_NAME", "mesh-control-plane")]),
        )
        .expect("on");
        assert_eq!(named.service_name, "mesh-control-plane");
    }

    #[tokio::test]
    async fn an_endpoint_that_is_not_a_url_is_refused_with_how_to_fix_it() {
        let config = OtlpConfig {
            endpoint: "not a url".to_owned(),
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            instance: "r1".to_owned(),
        };
        let error = Otlp::start(&config, OtlpMetrics::default()).expect_err("not a URL");
        assert!(error.to_string().contains("--otlp-endpoint"), "{error}");
    }
}
