//! Policy texts and waits shared by the scenarios.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use fulcrum_policy::{AppliedPolicy, PolicyStore};

/// Bounds every wait; the kube-rs watcher's first backoff after an error is about a second.
pub const WAIT: Duration = Duration::from_secs(15);

/// A valid YAML policy; `failures` tells versions apart.
pub fn valid_yaml(failures: u32) -> String {
    format!("default:\n  outlier_detection:\n    consecutive_failures: {failures}\n")
}

/// A YAML policy with two out-of-range fields.
pub const INVALID_YAML: &str = "services:\n  checkout:\n    outlier_detection:\n      max_ejection_percent: 150\n      half_open_max_probes: 0\n";

/// The `consecutive_failures` of a policy made by [`valid_yaml`].
pub fn failures(applied: &AppliedPolicy) -> u32 {
    applied
        .policy
        .default
        .outlier_detection
        .consecutive_failures
}

/// Waits until the current policy satisfies `wanted`.
pub async fn until_current(
    store: &PolicyStore,
    what: &str,
    wanted: impl Fn(&AppliedPolicy) -> bool,
) -> Arc<AppliedPolicy> {
    let mut current = store.subscribe();
    let found = tokio::time::timeout(
        WAIT,
        current.wait_for(|applied| applied.as_deref().is_some_and(&wanted)),
    )
    .await
    .unwrap_or_else(|_| panic!("no current policy with {what} within {WAIT:?}"))
    .expect("the store outlives the wait");
    found.clone().expect("checked by the predicate")
}

/// Waits until `rejected` reaches `count`.
pub async fn until_rejected(store: &PolicyStore, count: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while store.metrics().rejected.get() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} rejections within {WAIT:?}, expected {count}",
            store.metrics().rejected.get()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Log lines captured from a `tracing` subscriber.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Awaits `future` with every event at INFO and above captured, without ANSI colours.
    pub async fn capture<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        use tracing::instrument::WithSubscriber;
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(self.clone())
            .finish();
        future.with_subscriber(subscriber).await
    }

    /// The captured text.
    pub fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
