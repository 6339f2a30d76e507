//! Why this pick ([`PickExplanation`]): the endpoint, the algorithm, how it chose, how many of
//! the service's endpoints were candidates and why the others were not, what the endpoint was
//! compared with, and the retry targets, rendered as one bounded line.
//!
//! An operator asking "why did this request go there?" gets the answer from the picker's own
//! state at the moment of the pick, not from a model of it: the exclusions are worked out by
//! the same function that narrows a pick's candidates (`eligible.rs`), and the rival and the
//! estimates are what the algorithm compared. It is computed only when asked
//! ([`ServicePicker::pick_explained`]), so a pick that is not explained costs nothing more.
//!
//! The rendered line names addresses, counts and fixed words only, never anything from the
//! request, and is never longer than [`MAX_EXPLANATION_BYTES`].

use std::{
    fmt::{self, Write as _},
    net::SocketAddr,
    time::Duration,
};

use super::{Pick, RetryTargets, ServicePicker};
use crate::breaker::BreakerState;

/// The longest rendered explanation, in bytes: fields that would pass it are left out, from
/// the first that does not fit on, and the line ends with [`TRUNCATED`] instead. An IPv4
/// explanation with five retry targets takes about 300.
pub const MAX_EXPLANATION_BYTES: usize = 512;

/// What ends an explanation cut at [`MAX_EXPLANATION_BYTES`].
pub const TRUNCATED: &str = "; truncated";

/// How the endpoint of a pick was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChosenBy {
    /// The request's sticky-session cookie named it.
    Session,
    /// The fallback algorithm of a sticky policy chose it, and a new session starts there.
    NewSession,
    /// The service's algorithm chose it among the candidates.
    Algorithm,
}

impl ChosenBy {
    /// The word the rendered explanation uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::NewSession => "new_session",
            Self::Algorithm => "algorithm",
        }
    }
}

/// The service's endpoints at a pick, each counted once: as a candidate or by the first
/// reason, in this order, that it was not one. Their sum is the number of endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exclusions {
    /// The admissible candidates the algorithm chose among (see [`ServicePicker::pick`]).
    pub candidates: usize,
    /// Unhealthy in the endpoint set (failing checks, not ready).
    pub unhealthy: usize,
    /// Draining: they finish their sticky sessions and get nothing new.
    pub draining: usize,
    /// Not matched by the policy's `endpoint_selector` (tags, capabilities, metadata).
    pub unselected: usize,
    /// Not admitted by their breaker (open, or half-open with its probes taken).
    pub ejected: usize,
    /// Admissible, but in another locality tier than the candidates: a less preferred one,
    /// or one whose traffic failed over because too few of its members were admissible
    /// (`min_healthy_percent`).
    pub other_tier: usize,
    /// Whether the panic threshold applied: too few endpoints were admissible, so ejections
    /// were ignored and every endpoint of the best tier was a candidate.
    pub panic: bool,
}

impl Exclusions {
    /// Every endpoint counted: candidates and excluded.
    pub fn total(&self) -> usize {
        self.candidates.saturating_add(self.excluded())
    }

    /// The endpoints that were not candidates.
    pub fn excluded(&self) -> usize {
        [
            self.draining,
            self.unselected,
            self.ejected,
            self.other_tier,
        ]
        .into_iter()
        .fold(self.unhealthy, usize::saturating_add)
    }

    /// Each reason with its count, in order.
    fn reasons(&self) -> [(&'static str, usize); 5] {
        [
            ("unhealthy", self.unhealthy),
            ("draining", self.draining),
            ("unselected", self.unselected),
            ("ejected", self.ejected),
            ("other_tier", self.other_tier),
        ]
    }
}

/// One endpoint as the algorithm saw it at the pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExplainedEndpoint {
    pub address: SocketAddr,
    /// Its latency estimate (the one the latency-aware algorithms compare), `None` before its
    /// first answer.
    pub estimate: Option<Duration>,
    /// Its requests in flight, this one not counted.
    pub inflight: u32,
    /// Its breaker, before this request (a request to an open breaker is its probe).
    pub breaker: BreakerState,
}

/// Why a pick went where it did. Its `Display` is the one-line form, at most
/// [`MAX_EXPLANATION_BYTES`] long, e.g.
/// `endpoint=10.0.0.3:8080; algorithm=peak_ewma; via=algorithm; candidates=3 of 5;
/// excluded=unhealthy:1,ejected:1; panic=no; compared_with=10.0.0.1:8080;
/// estimate_ms=2.100/5.300; inflight=0/2; breaker=closed/closed; retry=10.0.0.1:8080`
/// (the rival's figures after the `/`; without a rival, those of the pick alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickExplanation {
    /// The endpoint picked.
    pub endpoint: ExplainedEndpoint,
    /// The algorithm that picks new requests (`sticky`'s fallback for `sticky`), as the
    /// policy names it.
    pub algorithm: &'static str,
    pub chosen_by: ChosenBy,
    /// The service's endpoints by why they were candidates or not.
    pub endpoints: Exclusions,
    /// The candidate the pick was compared with and won against: the power-of-two-choices
    /// algorithms (`peak_ewma`, `health_score`, `least_request` with equal weights) only.
    pub rival: Option<ExplainedEndpoint>,
    /// Where Envoy retries, best first.
    pub retry_targets: RetryTargets,
}

/// The algorithm's answer as far as an explanation needs it: crate-private, from the pick.
#[derive(Debug, Clone, Copy)]
pub(super) struct Picked {
    pub slot: usize,
    pub rival: Option<usize>,
    pub chosen_by: ChosenBy,
}

impl ServicePicker {
    /// The service's endpoints at `now` by why they are candidates or not, as a pick would
    /// find them: what a rejected pick (`no_endpoints`, `all_ejected`) was short of.
    /// O(endpoints), and it allocates: only when asked.
    pub fn exclusions(&self, now: Duration) -> Exclusions {
        self.eligible.exclusions(&self.slots, &self.policy, now)
    }

    /// The explanation of `picked`, made at `now` before the pick counts itself on the
    /// endpoint: what the algorithm saw.
    pub(super) fn explain(&self, pick: &Pick, picked: Picked, now: Duration) -> PickExplanation {
        let level = self.slots.level();
        let seen = |slot: usize| {
            let slot = &self.slots[slot];
            ExplainedEndpoint {
                address: slot.endpoint.address,
                estimate: slot
                    .stats
                    .ewma
                    .estimate_nanos(now, &self.latency_estimate, level)
                    // `as` saturates (and reads NaN as 0): never a panic.
                    .map(|nanos| Duration::from_nanos(nanos as u64)),
                inflight: slot.stats.inflight,
                breaker: slot.stats.breaker.state(),
            }
        };
        PickExplanation {
            endpoint: seen(picked.slot),
            algorithm: self.policy.load_balancer.algorithm().name(),
            chosen_by: picked.chosen_by,
            endpoints: self.exclusions(now),
            rival: picked.rival.map(seen),
            retry_targets: pick.retry_targets,
        }
    }
}

impl fmt::Display for PickExplanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = Bounded::new(f);
        line.put(format_args!("endpoint={}", self.endpoint.address))?;
        line.put(format_args!("; algorithm={}", self.algorithm))?;
        line.put(format_args!("; via={}", self.chosen_by.name()))?;
        line.put(format_args!("; {}", self.endpoints))?;
        let picked = &self.endpoint;
        match &self.rival {
            Some(rival) => {
                line.put(format_args!("; compared_with={}", rival.address))?;
                line.put(format_args!(
                    "; estimate_ms={}/{}",
                    Millis(picked.estimate),
                    Millis(rival.estimate)
                ))?;
                line.put(format_args!(
                    "; inflight={}/{}",
                    picked.inflight, rival.inflight
                ))?;
                line.put(format_args!(
                    "; breaker={}/{}",
                    picked.breaker.name(),
                    rival.breaker.name()
                ))?;
            }
            None => {
                line.put(format_args!("; estimate_ms={}", Millis(picked.estimate)))?;
                line.put(format_args!("; inflight={}", picked.inflight))?;
                line.put(format_args!("; breaker={}", picked.breaker.name()))?;
            }
        }
        line.put(format_args!("; retry="))?;
        let targets = self.retry_targets.as_slice();
        if targets.is_empty() {
            line.put(format_args!("none"))?;
        }
        for (index, target) in targets.iter().enumerate() {
            let separator = if index == 0 { "" } else { "," };
            line.put(format_args!("{separator}{target}"))?;
        }
        line.finish()
    }
}

/// `candidates=3 of 5; excluded=unhealthy:1,ejected:1; panic=no`: at most about 240 bytes
/// (every count `usize::MAX`).
impl fmt::Display for Exclusions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "candidates={} of {}; excluded=",
            self.candidates,
            self.total()
        )?;
        if self.excluded() == 0 {
            f.write_str("none")?;
        }
        let mut separator = "";
        for (reason, count) in self.reasons() {
            if count > 0 {
                write!(f, "{separator}{reason}:{count}")?;
                separator = ",";
            }
        }
        let panic = if self.panic { "yes" } else { "no" };
        write!(f, "; panic={panic}")
    }
}

/// An estimate in milliseconds with three decimals, `-` when there is none.
struct Millis(Option<Duration>);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(estimate) => {
                let micros = estimate.as_micros();
                write!(f, "{}.{:03}", micros / 1000, micros % 1000)
            }
            None => f.write_str("-"),
        }
    }
}

/// A writer that takes whole pieces while they fit in [`MAX_EXPLANATION_BYTES`] with room
/// for [`TRUNCATED`], and none after the first that does not.
struct Bounded<'a, 'f> {
    out: &'a mut fmt::Formatter<'f>,
    written: usize,
    cut: bool,
}

impl<'a, 'f> Bounded<'a, 'f> {
    fn new(out: &'a mut fmt::Formatter<'f>) -> Self {
        Self {
            out,
            written: 0,
            cut: false,
        }
    }

    /// Writes `piece` whole if it fits, else nothing from now on.
    fn put(&mut self, piece: fmt::Arguments<'_>) -> fmt::Result {
        if self.cut {
            return Ok(());
        }
        let len = measure(piece);
        if self.written + len > MAX_EXPLANATION_BYTES - TRUNCATED.len() {
            self.cut = true;
            return Ok(());
        }
        self.written += len;
        self.out.write_fmt(piece)
    }

    /// Ends the line with [`TRUNCATED`] if a piece was left out.
    fn finish(self) -> fmt::Result {
        if self.cut {
            self.out.write_str(TRUNCATED)?;
        }
        Ok(())
    }
}

/// The length of `piece` once formatted, counted without allocating.
fn measure(piece: fmt::Arguments<'_>) -> usize {
    struct Count(usize);
    impl fmt::Write for Count {
        fn write_str(&mut self, text: &str) -> fmt::Result {
            self.0 += text.len();
            Ok(())
        }
    }
    let mut count = Count(0);
    // Counting never fails.
    let _ = count.write_fmt(piece);
    count.0
}
