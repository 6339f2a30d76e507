//! State that Envoy shares between the worker VMs of one plugin: shared data with CAS
//! versions, shared queues, metrics, the clock and the captured guest logs.
//!
//! Semantics follow proxy-wasm-cpp-host (`shared_data.cc`, `shared_queue.cc`) and Envoy's
//! stats handling in `source/extensions/common/wasm/context.cc`.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    abi::{LogLevel, MetricType, Status},
    http_call::{HttpCall, Responder},
};

/// One line the guest logged through `proxy_log` (or wrote to stderr, logged at `Error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The worker whose VM logged it.
    pub worker: usize,
    pub level: LogLevel,
    pub message: String,
}

/// A controllable clock in nanoseconds since the Unix epoch, read by
/// `proxy_get_current_time_nanoseconds` and WASI `clock_time_get` in every worker. It only
/// moves when the test moves it.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    now: Arc<AtomicU64>,
    /// Where it started: the monotonic clock reads the time since.
    start: u64,
}

/// The clock's start unless the test names another: 2025-01-01T00:00:00Z, a fixed point so
/// runs are reproducible.
pub(crate) const DEFAULT_CLOCK_START_NANOS: u64 = 1_735_689_600 * 1_000_000_000;

impl Clock {
    /// A clock at `start` nanoseconds since the Unix epoch.
    pub(crate) fn starting_at(start: u64) -> Self {
        Self {
            now: Arc::new(AtomicU64::new(start)),
            start,
        }
    }

    pub(crate) fn now_nanos(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    pub(crate) fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.now.fetch_add(nanos, Ordering::SeqCst);
    }

    /// The monotonic reading: nanoseconds since the clock's start.
    fn monotonic_nanos(&self) -> u64 {
        self.now_nanos() - self.start
    }
}

impl wasmtime_wasi::HostWallClock for Clock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_nanos())
    }
}

impl wasmtime_wasi::HostMonotonicClock for Clock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.monotonic_nanos()
    }
}

/// A metric as Envoy keeps it: one stat per name, whichever worker defined it.
#[derive(Debug)]
pub(crate) struct Metric {
    pub(crate) name: String,
    pub(crate) kind: MetricType,
    /// Counter or gauge value (a gauge is stored as the i64 it is, cast for reading).
    pub(crate) value: i64,
    /// Every value recorded into a histogram.
    pub(crate) samples: Vec<u64>,
}

/// A shared queue (`proxy_register_shared_queue`): its owner receives `proxy_on_queue_ready`.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) vm_id: String,
    pub(crate) name: String,
    pub(crate) owner_worker: usize,
    pub(crate) owner_context: u32,
    pub(crate) items: VecDeque<Vec<u8>>,
}

/// A queue-ready notification waiting for the next turn of the owner's event loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueReady {
    pub(crate) worker: usize,
    pub(crate) context: u32,
    pub(crate) queue_id: u32,
}

/// How many times the guests called `proxy_get_shared_data` and `proxy_set_shared_data`:
/// what shared state costs the guest in host calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedDataCalls {
    pub reads: u64,
    pub writes: u64,
}

/// The plugin-wide mutable state; see [`Shared::lock`].
#[derive(Debug, Default)]
pub(crate) struct SharedState {
    /// key → (value, cas). Envoy keys shared data by vm_id; all workers of a plugin share one.
    pub(crate) data: HashMap<String, (Vec<u8>, u32)>,
    /// Every worker's shared-data host calls so far (the test's own writes excluded).
    pub(crate) shared_data_calls: SharedDataCalls,
    /// The next CAS version; never 0, which means "no version" in the ABI.
    next_cas: u32,
    /// Queue id − 1 indexes this vector.
    pub(crate) queues: Vec<Queue>,
    pub(crate) queue_ready: Vec<QueueReady>,
    /// Metric id − 1 indexes this vector.
    pub(crate) metrics: Vec<Metric>,
    /// Name → index in `metrics`: a filter defines a metric per endpoint, and a scan of
    /// every name per definition made the 10,000-endpoint bench quadratic (Envoy's stats
    /// scope finds a name by hash too).
    metric_index: HashMap<String, usize>,
    pub(crate) logs: Vec<LogEntry>,
    /// Every http call any worker dispatched, in order.
    pub(crate) http_calls: Vec<HttpCall>,
}

impl SharedState {
    fn next_cas(&mut self) -> u32 {
        let cas = self.next_cas.max(1);
        self.next_cas = cas.wrapping_add(1).max(1);
        cas
    }

    /// `proxy_set_shared_data`: `cas` 0 writes unconditionally, any other value must equal the
    /// key's current version (a missing key accepts any cas, as in proxy-wasm-cpp-host).
    pub(crate) fn set_data(&mut self, key: &str, value: Vec<u8>, cas: u32) -> Status {
        let next = self.next_cas();
        match self.data.get_mut(key) {
            Some(entry) if cas != 0 && cas != entry.1 => Status::CasMismatch,
            Some(entry) => {
                *entry = (value, next);
                Status::Ok
            }
            None => {
                self.data.insert(key.to_string(), (value, next));
                Status::Ok
            }
        }
    }

    pub(crate) fn queue_id(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.queues
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
            .map(|index| crate::abi::len_u32(index + 1))
    }

    pub(crate) fn queue_mut(&mut self, id: u32) -> Option<&mut Queue> {
        let index = usize::try_from(id).ok()?.checked_sub(1)?;
        self.queues.get_mut(index)
    }

    pub(crate) fn metric_mut(&mut self, id: u32) -> Option<&mut Metric> {
        let index = usize::try_from(id).ok()?.checked_sub(1)?;
        self.metrics.get_mut(index)
    }

    /// `proxy_define_metric`: the same name gives the same id (Envoy's stats scope dedupes by
    /// name); redefining a name with another type is a `BadArgument`.
    pub(crate) fn define_metric(&mut self, kind: MetricType, name: &str) -> Result<u32, Status> {
        if let Some(&index) = self.metric_index.get(name) {
            return if self.metrics[index].kind == kind {
                Ok(crate::abi::len_u32(index + 1))
            } else {
                Err(Status::BadArgument)
            };
        }
        self.metric_index
            .insert(name.to_owned(), self.metrics.len());
        self.metrics.push(Metric {
            name: name.to_string(),
            kind,
            value: 0,
            samples: Vec::new(),
        });
        Ok(crate::abi::len_u32(self.metrics.len()))
    }
}

/// Everything the workers of one plugin share, cheap to clone into each worker's store.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    state: Arc<Mutex<SharedState>>,
    pub(crate) clock: Clock,
    pub(crate) responder: Responder,
}

impl Shared {
    /// The shared state of a plugin whose clock starts at `clock_start` (nanoseconds since
    /// the Unix epoch).
    pub(crate) fn new(clock_start: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(SharedState::default())),
            clock: Clock::starting_at(clock_start),
            responder: Responder::default(),
        }
    }

    /// Locks the shared state. A poisoned lock only means a test thread panicked while holding
    /// it; the data is still consistent (every update is a single assignment), so go on.
    pub(crate) fn lock(&self) -> MutexGuard<'_, SharedState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_zero_is_unconditional_and_a_stale_cas_is_refused() {
        let mut state = SharedState::default();
        assert_eq!(state.set_data("k", b"1".to_vec(), 0), Status::Ok);
        let first = state.data["k"].1;
        assert_ne!(first, 0);
        assert_eq!(state.set_data("k", b"2".to_vec(), first), Status::Ok);
        assert_eq!(
            state.set_data("k", b"3".to_vec(), first),
            Status::CasMismatch
        );
        assert_eq!(state.data["k"].0, b"2");
        assert_eq!(state.set_data("k", b"4".to_vec(), 0), Status::Ok);
        assert_eq!(state.data["k"].0, b"4");
    }
}
