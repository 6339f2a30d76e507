//! The trace of one endpoint change, carried from the source that made it to every Envoy's
//! ACK of the version it produced: [`ChangeTrace`].
//!
//! The control plane's work on one change is spread over long-lived tasks (the pipeline's
//! stages, one task per xDS stream) connected by `watch` channels, so no `tracing` span is
//! in scope from one end to the other. Instead each stage's output carries the
//! OpenTelemetry [`SpanContext`] (trace id, span id, sampling flag) of the span that made it,
//! and the next stage's span names it as its parent. Only the context travels, never the
//! span: a span held in a channel would stay open (and unexported) until the next change
//! replaced it.
//!
//! Without an OpenTelemetry layer in the subscriber (OTLP export off) every context is
//! empty and parenting does nothing; the spans are still ordinary `tracing` spans.

use opentelemetry::{
    Context,
    trace::{SpanContext, TraceContextExt},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The OpenTelemetry context of the span that made a value, or none (not traced).
///
/// Two traces compare equal when they name the same span; a value's equality never depends
/// on it where the value is compared (snapshots compare by version).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChangeTrace(Option<SpanContext>);

impl ChangeTrace {
    /// No trace: values made outside any traced change (tests, benches, OTLP off).
    pub const NONE: ChangeTrace = ChangeTrace(None);

    /// The context of `span`. Starts the span's OpenTelemetry counterpart, so name its
    /// parent ([`ChangeTrace::adopt`]) first.
    pub fn of(span: &tracing::Span) -> Self {
        let context = span.context();
        let span_context = context.span().span_context().clone();
        Self(span_context.is_valid().then_some(span_context))
    }

    /// Whether a traced span made the value.
    pub fn is_traced(&self) -> bool {
        self.0.is_some()
    }

    /// Makes `span` a child of this trace's span: its trace id is this trace's. Call it on a
    /// new span, before it is entered or its own [`ChangeTrace::of`] is taken; does nothing
    /// when this trace is empty or the subscriber exports no spans.
    pub fn adopt(&self, span: &tracing::Span) {
        if let Some(parent) = &self.0 {
            // Fails only without an OpenTelemetry layer or on an already started span:
            // either way the span stays as it is, untraced or a root.
            let _ = span.set_parent(Context::new().with_remote_span_context(parent.clone()));
        }
    }

    /// Links `span` to this trace's span without parenting it: for work this change's version
    /// is part of, but another event caused (a new subscription answered with it).
    pub fn link(&self, span: &tracing::Span) {
        if let Some(linked) = &self.0 {
            span.add_link(linked.clone());
        }
    }
}
