//! Counting failures once per proxy: the record's counters, the breaker's events for counts
//! kept elsewhere, and two pickers standing for two workers counting into one record, as the
//! filter's compare-and-swap leaves it.

use std::{net::SocketAddr, time::Duration};

use proptest::prelude::*;

use crate::{
    BreakerState, Served, ServicePicker,
    breaker::{Breaker, Consecutive, Context, Event, Verdict},
    ejections::{EjectionRecord, FailureCounts, SharedEjection},
    policy::{LoadBalancer, OutlierDetection},
    service::Outcome,
    test_support::*,
};

/// The shared record in local memory, as a worker's writes leave it; counts the calls.
struct InMemory<'a> {
    record: &'a mut EjectionRecord,
    calls: usize,
}

impl<'a> InMemory<'a> {
    fn new(record: &'a mut EjectionRecord) -> Self {
        Self { record, calls: 0 }
    }
}

impl FailureCounts for InMemory<'_> {
    fn count(
        &mut self,
        address: SocketAddr,
        verdict: &Verdict,
        now: Duration,
    ) -> Option<Consecutive> {
        self.calls += 1;
        self.record
            .count_outcome(address, verdict, now)
            .map(|counted| counted.proxy)
    }
}

const GATEWAY_ERROR: Verdict = Verdict::RETRIED_ELSEWHERE;
const SUCCESS: Verdict = Verdict {
    failure: false,
    gateway_error: false,
    slow: false,
    slow_vs_peers: false,
    latency: Duration::ZERO,
};

fn consecutive(failures: u32, gateway_errors: u32) -> Consecutive {
    Consecutive {
        failures,
        gateway_errors,
    }
}

fn context(policy: &OutlierDetection, now: Duration) -> Context<'_> {
    Context {
        policy,
        now,
        may_eject: true,
        jitter_seed: 1,
    }
}

/// A round-robin service over three endpoints ejecting after `threshold` consecutive failures.
fn service(threshold: u32) -> crate::ServicePolicy {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(threshold);
    service
}

/// Completes a request to `endpoint` with `outcome`, counting into `record`; returns whether
/// it ejected the endpoint, and how many times the record was asked.
fn complete(
    picker: &mut ServicePicker,
    record: &mut EjectionRecord,
    endpoint: SocketAddr,
    outcome: Outcome,
    now: Duration,
) -> (bool, usize) {
    let mut counts = InMemory::new(record);
    let transitions = picker.complete_counted(endpoint, Served::ByPick, outcome, now, &mut counts);
    let calls = counts.calls;
    let ejected = transitions
        .iter()
        .any(|transition| matches!(transition.to, BreakerState::Open { .. }));
    if ejected {
        // As the filter shares an ejection: the record holds it and drops the counters.
        record.forget_count(endpoint);
    }
    (ejected, calls)
}

fn state_of(picker: &ServicePicker, address: SocketAddr) -> BreakerState {
    picker
        .endpoints()
        .find(|view| view.endpoint.address == address)
        .expect("the endpoint is in the picker")
        .breaker
}

#[test]
fn counting_grows_each_counter_on_its_kind_of_failure_and_a_success_drops_the_entry() {
    let mut record = EjectionRecord::default();
    let server_error = Verdict {
        failure: true,
        ..SUCCESS
    };
    let count = |record: &mut EjectionRecord, verdict: &Verdict| {
        record
            .count_outcome(addr(1), verdict, secs(1))
            .expect("room for a counter")
    };
    assert_eq!(count(&mut record, &GATEWAY_ERROR).proxy, consecutive(1, 1));
    assert_eq!(count(&mut record, &GATEWAY_ERROR).proxy, consecutive(2, 2));
    assert_eq!(
        count(&mut record, &server_error).proxy,
        consecutive(3, 0),
        "a failure that is no gateway error restarts the gateway errors"
    );
    let success = count(&mut record, &SUCCESS);
    assert_eq!(success.proxy, consecutive(0, 0));
    assert!(success.changed);
    assert!(
        record.counts().is_empty(),
        "a zero count is an entry that is gone"
    );
    assert!(
        !count(&mut record, &SUCCESS).changed,
        "a success with no count changes nothing"
    );
}

#[test]
fn a_record_full_of_counters_refuses_new_endpoints_and_cannot_tell_their_count() {
    let mut record = EjectionRecord::default();
    for i in 0..EjectionRecord::MAX_COUNTS as u32 {
        assert!(
            record
                .count_outcome(addr(i + 1), &GATEWAY_ERROR, secs(1))
                .is_some()
        );
    }
    let newcomer = addr(5_000);
    assert_eq!(
        record.count_outcome(newcomer, &GATEWAY_ERROR, secs(1)),
        None
    );
    assert_eq!(record.consecutive(newcomer), None);
    assert_eq!(record.consecutive(addr(1)), Some(consecutive(1, 1)));
    assert_eq!(
        EjectionRecord::decode(&record.encode()).map(|r| r.counts().len()),
        Ok(EjectionRecord::MAX_COUNTS)
    );
}

#[test]
fn pruning_drops_counters_last_counted_long_ago() {
    let mut record = EjectionRecord::default();
    record.count_outcome(addr(1), &GATEWAY_ERROR, secs(10));
    record.count_outcome(addr(2), &GATEWAY_ERROR, secs(500));
    record.record_ejection(SharedEjection {
        address: addr(3),
        until: secs(500),
        ejections: 1,
    });
    assert!(record.prune(secs(100)));
    assert_eq!(record.consecutive(addr(1)), Some(Consecutive::default()));
    assert_eq!(record.consecutive(addr(2)), Some(consecutive(1, 1)));
}

#[test]
fn a_closed_breaker_judges_the_proxys_count_instead_of_its_own() {
    let policy = strict_outlier_detection(3);
    let mut breaker = Breaker::new(secs(0));
    let first = breaker.on(
        Event::CompleteCounted {
            verdict: GATEWAY_ERROR,
            proxy: consecutive(2, 2),
        },
        &context(&policy, secs(1)),
    );
    assert_eq!(first, None, "two failures in the proxy, below three");
    assert_eq!(breaker.consecutive(), consecutive(2, 2));
    let third = breaker.on(
        Event::CompleteCounted {
            verdict: GATEWAY_ERROR,
            proxy: consecutive(3, 3),
        },
        &context(&policy, secs(2)),
    );
    assert_eq!(
        third.map(|change| change.to),
        Some(BreakerState::Open {
            until: secs(12),
            ejections: 1
        }),
        "the proxy's third failure ejects, though this breaker saw two"
    );
    assert_eq!(breaker.consecutive(), Consecutive::default());
}

#[test]
fn counts_learnt_elsewhere_are_taken_without_being_judged() {
    let policy = strict_outlier_detection(3);
    let mut breaker = Breaker::new(secs(0));
    let learnt = breaker.on(
        Event::CountedElsewhere(consecutive(5, 5)),
        &context(&policy, secs(1)),
    );
    assert_eq!(learnt, None);
    assert_eq!(breaker.state().name(), "closed");
    assert_eq!(breaker.consecutive(), consecutive(5, 5));
    breaker.on(
        Event::CountedElsewhere(Consecutive::default()),
        &context(&policy, secs(2)),
    );
    assert!(breaker.consecutive().is_zero(), "a success elsewhere");
}

#[test]
fn failures_on_two_workers_add_up_to_one_ejection_at_the_threshold() {
    let service = service(3);
    let (mut first, mut second) = (
        ServicePicker::new(&service, &endpoints(3)),
        ServicePicker::new(&service, &endpoints(3)),
    );
    let mut record = EjectionRecord::default();
    let dead = addr(2);
    let fail = |picker: &mut ServicePicker, record: &mut EjectionRecord, now| {
        complete(picker, record, dead, connect_failure(), now).0
    };
    assert!(!fail(&mut first, &mut record, secs(1)));
    assert!(!fail(&mut second, &mut record, secs(1)));
    assert!(
        fail(&mut first, &mut record, secs(1)),
        "the proxy's third failure, the first worker's second"
    );
    assert_eq!(state_of(&first, dead).name(), "open");
    assert_eq!(state_of(&second, dead).name(), "closed");
    assert!(
        record.counts().is_empty(),
        "the ejection restarts the count"
    );
}

#[test]
fn a_success_on_either_worker_resets_the_proxys_count() {
    let service = service(3);
    let (mut first, mut second) = (
        ServicePicker::new(&service, &endpoints(3)),
        ServicePicker::new(&service, &endpoints(3)),
    );
    let mut record = EjectionRecord::default();
    let flaky = addr(2);
    complete(&mut first, &mut record, flaky, connect_failure(), secs(1));
    complete(&mut second, &mut record, flaky, connect_failure(), secs(1));
    // The first worker believes the count is not zero (it counted one): its success resets it.
    let (_, asked) = complete(&mut first, &mut record, flaky, ok(ms(1)), secs(2));
    assert_eq!(asked, 1);
    assert_eq!(record.consecutive(flaky), Some(Consecutive::default()));
    complete(&mut first, &mut record, flaky, connect_failure(), secs(3));
    complete(&mut second, &mut record, flaky, connect_failure(), secs(3));
    // The second worker's success resets it too.
    complete(&mut second, &mut record, flaky, ok(ms(1)), secs(4));
    let (ejected, _) = complete(&mut first, &mut record, flaky, connect_failure(), secs(5));
    assert!(!ejected, "one failure since the last success");
    assert_eq!(record.consecutive(flaky), Some(consecutive(1, 1)));
}

#[test]
fn a_success_asks_nothing_while_the_worker_knows_of_no_failure() {
    let service = service(3);
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    let mut record = EjectionRecord::default();
    let mut rng = seeded();
    let mut counts = InMemory::new(&mut record);
    for _ in 0..30 {
        let pick = picker.pick(&Default::default(), secs(1), &mut rng).unwrap();
        picker.complete_counted(
            pick.endpoint,
            Served::ByPick,
            ok(ms(1)),
            secs(1),
            &mut counts,
        );
    }
    assert_eq!(counts.calls, 0);
}

#[test]
fn a_worker_learns_a_count_from_the_record_and_its_success_then_resets_it() {
    let service = service(3);
    let (mut first, mut second) = (
        ServicePicker::new(&service, &endpoints(3)),
        ServicePicker::new(&service, &endpoints(3)),
    );
    let mut record = EjectionRecord::default();
    let flaky = addr(2);
    complete(&mut first, &mut record, flaky, connect_failure(), secs(1));
    complete(&mut first, &mut record, flaky, connect_failure(), secs(1));
    // Before its tick, the second worker's success knows nothing to reset: the one tick of
    // staleness the module docs allow.
    let (_, asked) = complete(&mut second, &mut record, flaky, ok(ms(1)), secs(1));
    assert_eq!(asked, 0);
    assert_eq!(record.consecutive(flaky), Some(consecutive(2, 2)));
    // Its tick applies the record; its next success resets the count.
    assert!(second.apply_shared_ejections(&record, secs(2)).is_empty());
    let (_, asked) = complete(&mut second, &mut record, flaky, ok(ms(1)), secs(2));
    assert_eq!(asked, 1);
    assert_eq!(record.consecutive(flaky), Some(Consecutive::default()));
    // And the first worker, applying the record, learns the reset.
    first.apply_shared_ejections(&record, secs(3));
    let (_, asked) = complete(&mut first, &mut record, flaky, ok(ms(1)), secs(3));
    assert_eq!(asked, 0, "nothing left to reset");
}

#[test]
fn without_a_consecutive_rule_nothing_is_counted_in_the_record() {
    let mut service = service(0);
    service.outlier_detection.consecutive_gateway_errors = 0;
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    let mut record = EjectionRecord::default();
    let (_, asked) = complete(
        &mut picker,
        &mut record,
        addr(1),
        connect_failure(),
        secs(1),
    );
    assert_eq!(asked, 0);
}

#[test]
fn a_failure_on_an_open_endpoint_is_not_counted() {
    let service = service(2);
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    let mut record = EjectionRecord::default();
    fail_on(&mut picker, addr(1), connect_failure(), 2, secs(1));
    assert_eq!(state_of(&picker, addr(1)).name(), "open");
    let (_, asked) = complete(
        &mut picker,
        &mut record,
        addr(1),
        connect_failure(),
        secs(1),
    );
    assert_eq!(asked, 0, "a request admitted before the ejection");
}

proptest! {
    /// However failures on one endpoint interleave over any number of workers, the proxy
    /// ejects it at exactly the threshold's failure, once.
    #[test]
    fn interleaved_failures_eject_at_exactly_the_threshold(
        threshold in 1u32..8,
        workers in prop::collection::vec(0usize..4, 1..40),
    ) {
        let service = service(threshold);
        let mut pickers: Vec<ServicePicker> =
            (0..4).map(|_| ServicePicker::new(&service, &endpoints(3))).collect();
        let mut record = EjectionRecord::default();
        let dead = addr(2);
        let mut ejected_at = Vec::new();
        for (failure, worker) in workers.iter().enumerate() {
            // A worker whose breaker is open would not pick the endpoint.
            if state_of(&pickers[*worker], dead).is_ejected() {
                continue;
            }
            if complete(&mut pickers[*worker], &mut record, dead, connect_failure(), secs(1)).0 {
                ejected_at.push(failure + 1);
            }
        }
        let failures = workers.len();
        if failures >= threshold as usize {
            prop_assert_eq!(ejected_at.first().copied(), Some(threshold as usize));
        } else {
            prop_assert!(ejected_at.is_empty());
        }
    }
}

#[test]
fn a_picker_knows_of_failures_from_a_failure_or_the_record_until_a_success_or_the_ejection() {
    let service = service(3);
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    let mut record = EjectionRecord::default();
    assert!(!picker.knows_of_failures());
    complete(
        &mut picker,
        &mut record,
        addr(2),
        connect_failure(),
        secs(1),
    );
    assert!(picker.knows_of_failures());
    complete(&mut picker, &mut record, addr(2), ok(ms(1)), secs(1));
    assert!(!picker.knows_of_failures(), "reset by a success");
    record.count_outcome(addr(1), &GATEWAY_ERROR, secs(2));
    picker.apply_shared_ejections(&record, secs(2));
    assert!(picker.knows_of_failures(), "learnt from the record");
    let (ejected, _) = complete(
        &mut picker,
        &mut record,
        addr(1),
        connect_failure(),
        secs(3),
    );
    assert!(!ejected);
    complete(
        &mut picker,
        &mut record,
        addr(1),
        connect_failure(),
        secs(3),
    );
    assert_eq!(state_of(&picker, addr(1)).name(), "open");
    assert!(
        !picker.knows_of_failures(),
        "counters restart with the ejection"
    );
}
