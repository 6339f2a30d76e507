//! What passes between the stages: a stage's latest state with the trace of the change that
//! made it ([`Traced`]), so one change is one trace from the source to every Envoy's ACK.
//!
//! A change starts a trace where it enters the flow: `endpoint_change` when the sources'
//! merge changes (stage 1), `health_transition` when a check flips an endpoint (stage 3),
//! `policy_change` when the policy alone changes (stage 4). Each later stage's span is a child
//! of that root (`validate`, `version`, `publish`); the xDS cache carries the `publish` span's
//! context to the streams, whose `xds_push` and `xds_ack` spans continue the same trace
//! (`fulcrum_xds::trace`). The stages pass the context, not the span, so every span ends (and
//! is exported) when its stage's work does.

use std::{ops::Deref, sync::Arc};

use fulcrum_xds::ChangeTrace;

/// A stage's state and the change that made it. Equality is the state's alone: a state
/// equal to the last one sent is not sent again, whichever change produced it.
#[derive(Debug)]
pub struct Traced<T> {
    /// The state.
    pub value: Arc<T>,
    /// The change that made it (the root span of its trace).
    pub trace: ChangeTrace,
}

impl<T> Traced<T> {
    /// `value`, made by the change `trace`.
    pub fn new(value: Arc<T>, trace: ChangeTrace) -> Self {
        Self { value, trace }
    }

    /// `value`, outside any traced change.
    pub fn untraced(value: Arc<T>) -> Self {
        Self::new(value, ChangeTrace::NONE)
    }
}

impl<T> Clone for Traced<T> {
    fn clone(&self) -> Self {
        Self {
            value: Arc::clone(&self.value),
            trace: self.trace.clone(),
        }
    }
}

impl<T: PartialEq> PartialEq for Traced<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T> Deref for Traced<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}
