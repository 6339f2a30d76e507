//! Runs the sources and turns their updates into snapshots, folding bursts with a debounce.
//!
//! After the first update of a burst the pipeline waits `quiet` for more; every further
//! update restarts that wait, but never beyond `max_delay` after the burst's first update,
//! so a source that churns without pause still gets its changes out. Nothing is emitted
//! until every source has published once (a snapshot missing a source would remove its
//! clusters), and a snapshot whose version equals the last one is not emitted again.

use std::{sync::Arc, time::Duration};

use fulcrum_core::Snapshot;
use tokio::{sync::mpsc, time::Instant};
use tracing::{debug, info};

use crate::{Services, Source, SourceSink, SourceUpdate, merge};

/// Updates buffered between the sources and the pipeline.
const UPDATE_QUEUE: usize = 64;

/// How updates are folded. Defaults: 50 ms quiet period, at most 500 ms of delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debounce {
    /// Wait this long after the latest update for another one.
    pub quiet: Duration,
    /// Never hold a burst's first update longer than this.
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Self::new(Duration::from_millis(50))
    }
}

impl Debounce {
    /// A debounce of `quiet` with `max_delay` ten times as long.
    pub fn new(quiet: Duration) -> Self {
        Self {
            quiet,
            max_delay: quiet * 10,
        }
    }
}

/// Starts every source on the current tokio runtime and calls `on_snapshot` with each new
/// merged snapshot. Returns when every source has stopped.
pub async fn run(
    sources: Vec<Box<dyn Source>>,
    debounce: Debounce,
    mut on_snapshot: impl FnMut(Snapshot) + Send,
) {
    let (sender, mut updates) = mpsc::channel(UPDATE_QUEUE);
    let names: Vec<String> = sources.iter().map(|source| source.name()).collect();
    for (index, source) in sources.into_iter().enumerate() {
        tokio::spawn(source.run(SourceSink::new(index, sender.clone())));
    }
    drop(sender);
    let mut latest: Vec<Option<Arc<Services>>> = vec![None; names.len()];
    let mut last_version: Option<String> = None;
    while let Some(first) = updates.recv().await {
        let burst_start = Instant::now();
        apply(&mut latest, first);
        let mut open = true;
        let mut folded = 1_u32;
        let mut deadline = burst_start + debounce.quiet;
        while open {
            tokio::select! {
                update = updates.recv() => match update {
                    Some(update) => {
                        apply(&mut latest, update);
                        folded += 1;
                        deadline = (Instant::now() + debounce.quiet).min(burst_start + debounce.max_delay);
                    }
                    None => open = false,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let Some(states) = latest
            .iter()
            .zip(&names)
            .map(|(state, name)| state.as_deref().map(|state| (name.as_str(), state)))
            .collect::<Option<Vec<_>>>()
        else {
            debug!(folded, "waiting for every source's first state");
            continue;
        };
        let snapshot = merge(states);
        if last_version.as_deref() == Some(snapshot.version.as_str()) {
            debug!(folded, version = %snapshot.version, "sources changed nothing");
            continue;
        }
        info!(
            folded,
            version = %snapshot.version,
            services = snapshot.services.len(),
            "new snapshot"
        );
        last_version = Some(snapshot.version.clone());
        on_snapshot(snapshot);
    }
}

/// Records the latest state of the update's source.
fn apply(latest: &mut [Option<Arc<Services>>], update: SourceUpdate) {
    debug_assert!(
        update.source < latest.len(),
        "update from an unknown source index"
    );
    if let Some(slot) = latest.get_mut(update.source) {
        *slot = Some(update.services);
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Mutex};

    use fulcrum_core::{Endpoint, ServiceEndpoints};

    use super::*;
    use crate::SourceFuture;

    /// A source whose states a test feeds in at chosen (paused-clock) times; it stays open
    /// for a further 10 s so the pipeline's timing, not the source's end, decides emission.
    struct ScriptedSource {
        name: &'static str,
        script: Vec<(Duration, Services)>,
    }

    impl Source for ScriptedSource {
        fn name(&self) -> String {
            self.name.to_owned()
        }
        fn run(self: Box<Self>, sink: SourceSink) -> SourceFuture {
            Box::pin(async move {
                for (after, services) in self.script {
                    tokio::time::sleep(after).await;
                    if sink.publish(services).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            })
        }
    }

    fn one(service: &str, port: u16) -> Services {
        let endpoints = vec![Endpoint::new(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            port,
        )))];
        BTreeMap::from([(service.to_owned(), ServiceEndpoints { endpoints })])
    }

    async fn collect(
        sources: Vec<Box<dyn Source>>,
        debounce: Debounce,
    ) -> Vec<(Duration, Snapshot)> {
        let start = Instant::now();
        let emitted = Mutex::new(Vec::new());
        run(sources, debounce, |snapshot| {
            emitted
                .lock()
                .expect("lock")
                .push((start.elapsed(), snapshot));
        })
        .await;
        emitted.into_inner().expect("lock")
    }

    fn ports(snapshot: &Snapshot, service: &str) -> Vec<u16> {
        snapshot.services[service]
            .endpoints
            .iter()
            .map(|e| e.address.port())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn updates_folded_until_quiet_then_emitted_once() {
        let source = ScriptedSource {
            name: "file",
            script: vec![
                (Duration::ZERO, one("a", 1)),
                (Duration::from_millis(30), one("a", 2)),
                (Duration::from_millis(30), one("a", 3)),
            ],
        };
        let emitted = collect(
            vec![Box::new(source)],
            Debounce::new(Duration::from_millis(50)),
        )
        .await;
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0].0, Duration::from_millis(110));
        assert_eq!(ports(&emitted[0].1, "a"), [3]);
    }

    #[tokio::test(start_paused = true)]
    async fn continuous_churn_is_emitted_after_max_delay() {
        let script = (0..30)
            .map(|port| (Duration::from_millis(30), one("a", port + 1)))
            .collect();
        let source = ScriptedSource {
            name: "file",
            script,
        };
        let debounce = Debounce {
            quiet: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
        };
        let emitted = collect(vec![Box::new(source)], debounce).await;
        // An update every 30 ms. The first, at 30 ms, is held at most 200 ms: out at 230 ms
        // with the update of 210 ms (port 7); the next burst starts at 240 ms.
        assert_eq!(emitted[0].0, Duration::from_millis(230));
        assert_eq!(ports(&emitted[0].1, "a"), [7]);
        assert_eq!(emitted[1].0, Duration::from_millis(440));
        assert!(
            emitted.len() >= 3,
            "churn keeps producing snapshots: {}",
            emitted.len()
        );
        assert_eq!(ports(&emitted.last().expect("some").1, "a"), [30]);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_emitted_before_every_source_published() {
        let fast = ScriptedSource {
            name: "file",
            script: vec![(Duration::ZERO, one("a", 1))],
        };
        let slow = ScriptedSource {
            name: "registry",
            script: vec![(Duration::from_secs(5), one("b", 2))],
        };
        let emitted = collect(vec![Box::new(fast), Box::new(slow)], Debounce::default()).await;
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0].0, Duration::from_millis(5050));
        assert_eq!(emitted[0].1.services.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_content_is_not_emitted_again() {
        let source = ScriptedSource {
            name: "file",
            script: vec![
                (Duration::ZERO, one("a", 1)),
                (Duration::from_secs(1), one("a", 1)),
            ],
        };
        let emitted = collect(vec![Box::new(source)], Debounce::default()).await;
        assert_eq!(emitted.len(), 1);
    }
}
