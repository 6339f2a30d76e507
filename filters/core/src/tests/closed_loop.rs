//! A closed-loop load driver for scenario tests: a fixed number of requests in flight, the next
//! one picked the moment one completes, on a simulated clock, as wrk drives Envoy.

use std::{cmp::Reverse, collections::BinaryHeap, net::SocketAddr, time::Duration};

use crate::{ServicePicker, rng::SplitMix64, test_support::ok};

/// Keeps `concurrency` requests in flight on `picker` (each pick drawn with `rng`) while
/// `on_pick(endpoint, now)` answers `true`, each answered successfully after
/// `answer(endpoint, now)`; completions are fed back in the order they end.
pub(super) fn drive(
    picker: &mut ServicePicker,
    concurrency: usize,
    rng: &mut SplitMix64,
    mut answer: impl FnMut(SocketAddr, Duration) -> Duration,
    mut on_pick: impl FnMut(SocketAddr, Duration) -> bool,
) {
    // Completions in flight, earliest first: (when, sequence, endpoint, latency).
    let mut inflight = BinaryHeap::new();
    let mut now = Duration::ZERO;
    let mut sequence = 0u64;
    loop {
        while inflight.len() >= concurrency {
            let Some(Reverse((at, _, endpoint, latency))) = inflight.pop() else {
                break;
            };
            now = at;
            picker.complete(endpoint, crate::Served::ByPick, ok(latency), now);
        }
        let pick = picker
            .pick(&Default::default(), now, rng)
            .expect("admissible");
        if !on_pick(pick.endpoint, now) {
            return;
        }
        sequence += 1;
        let latency = answer(pick.endpoint, now);
        inflight.push(Reverse((now + latency, sequence, pick.endpoint, latency)));
    }
}
