//! Sharing ejections between the workers of one proxy: the record's encoding against hostile
//! bytes, the breaker's events for an ejection judged elsewhere and its end, and two pickers
//! standing for two workers.

use std::{net::SocketAddr, time::Duration};

use proptest::prelude::*;

use crate::{
    BreakerState, ServicePicker, Transition,
    breaker::{Breaker, Context, Event, Verdict},
    ejections::{DecodeError, EjectionRecord, SharedEjection, rules_fingerprint},
    policy::{LoadBalancer, OutlierDetection},
    test_support::*,
};

fn ejection(i: u32, until: Duration, ejections: u32) -> SharedEjection {
    SharedEjection {
        address: addr(i),
        until,
        ejections,
    }
}

/// The record a worker writes after these transitions of its own breakers, as the filter
/// writes it.
fn record_of(transitions: &[Transition], now: Duration) -> EjectionRecord {
    let mut record = EjectionRecord::default();
    for transition in transitions {
        match transition.to {
            BreakerState::Open { until, ejections } => {
                record.record_ejection(SharedEjection {
                    address: transition.endpoint,
                    until,
                    ejections,
                });
            }
            BreakerState::Closed { .. } => {
                record.record_restored(transition.endpoint, now);
            }
            BreakerState::HalfOpen { .. } => {}
        }
    }
    record
}

fn state_of(picker: &ServicePicker, address: SocketAddr) -> BreakerState {
    picker
        .endpoints()
        .find(|view| view.endpoint.address == address)
        .expect("the endpoint is in the picker")
        .breaker
}

fn context(policy: &OutlierDetection, now: Duration, may_eject: bool) -> Context<'_> {
    Context {
        policy,
        now,
        may_eject,
        jitter_seed: 1,
    }
}

#[test]
fn a_record_reads_back_as_written() {
    let mut record = EjectionRecord::default();
    record.record_ejection(ejection(2, secs(20), 1));
    record.record_ejection(SharedEjection {
        address: "[::1]:9000".parse().unwrap(),
        until: secs(30),
        ejections: 3,
    });
    record.record_ejection(ejection(1, secs(40), 2));
    record.count_outcome(addr(3), &Verdict::RETRIED_ELSEWHERE, secs(5));
    assert_eq!(EjectionRecord::decode(&record.encode()), Ok(record.clone()));
    assert_eq!(record.entries()[0].address, addr(1), "sorted by address");
    assert_eq!(record.encode().len(), 13 + 2 * 19 + 31 + 23);
}

#[test]
fn recording_an_ejection_twice_keeps_the_later_deadline_and_the_larger_count() {
    let mut record = EjectionRecord::default();
    assert!(record.record_ejection(ejection(1, secs(20), 2)));
    assert!(record.record_ejection(ejection(1, secs(15), 3)));
    assert!(!record.record_ejection(ejection(1, secs(10), 1)));
    assert_eq!(record.entries(), [ejection(1, secs(20), 3)]);
}

#[test]
fn an_ejection_is_removed_only_once_it_has_expired() {
    let mut record = EjectionRecord::default();
    record.record_ejection(ejection(1, secs(20), 1));
    assert!(
        !record.record_restored(addr(1), secs(19)),
        "a worker closing an older ejection leaves a newer one running"
    );
    assert!(record.record_restored(addr(1), secs(20)));
    assert!(record.entries().is_empty());
}

#[test]
fn a_full_record_refuses_new_endpoints_but_updates_known_ones() {
    let mut record = EjectionRecord::default();
    for i in 0..EjectionRecord::MAX_ENTRIES as u32 {
        assert!(record.record_ejection(ejection(i + 1, secs(20), 1)));
    }
    assert!(record.is_full());
    assert!(!record.record_ejection(ejection(5_000, secs(20), 1)));
    assert!(record.record_ejection(ejection(1, secs(30), 2)));
    assert_eq!(
        EjectionRecord::decode(&record.encode()).map(|r| r.entries().len()),
        Ok(EjectionRecord::MAX_ENTRIES)
    );
}

#[test]
fn pruning_drops_ejections_expired_long_ago() {
    let mut record = EjectionRecord::default();
    record.record_ejection(ejection(1, secs(10), 1));
    record.record_ejection(ejection(2, secs(500), 1));
    assert!(record.prune(secs(100)));
    assert_eq!(record.entries(), [ejection(2, secs(500), 1)]);
}

/// The header of a record of version 2 under rules 7 with `count` ejections.
fn header(count: u16) -> Vec<u8> {
    let mut bytes = vec![2];
    bytes.extend_from_slice(&7u64.to_le_bytes());
    bytes.extend_from_slice(&count.to_le_bytes());
    bytes
}

/// An encoded counter of `10.0.0.1:8080` with these counts.
fn counter(failures: u32, gateway_errors: u32) -> Vec<u8> {
    let mut bytes = vec![4, 10, 0, 0, 1];
    bytes.extend_from_slice(&8080u16.to_le_bytes());
    bytes.extend_from_slice(&failures.to_le_bytes());
    bytes.extend_from_slice(&gateway_errors.to_le_bytes());
    bytes.extend_from_slice(&5u64.to_le_bytes());
    bytes
}

#[test]
fn bytes_the_filter_would_not_write_are_refused_with_the_reason() {
    let with = |count: u16, tail: &[u8]| [header(count), tail.to_vec()].concat();
    let no_counts = 0u16.to_le_bytes();
    assert_eq!(EjectionRecord::decode(&[]), Err(DecodeError::Truncated));
    assert_eq!(
        EjectionRecord::decode(&header(0)[..10]),
        Err(DecodeError::Truncated)
    );
    assert_eq!(
        EjectionRecord::decode(&header(0)),
        Err(DecodeError::Truncated),
        "the counters' count is missing"
    );
    assert_eq!(
        EjectionRecord::decode(&[3, 0, 0]),
        Err(DecodeError::UnknownVersion(3))
    );
    assert_eq!(
        EjectionRecord::decode(&header(0xffff)),
        Err(DecodeError::TooManyEntries(65_535))
    );
    assert_eq!(
        EjectionRecord::decode(&with(0, &[0xff, 0xff])),
        Err(DecodeError::TooManyCounts(65_535))
    );
    assert_eq!(
        EjectionRecord::decode(&with(1, &[5])),
        Err(DecodeError::BadFamily(5))
    );
    assert_eq!(
        EjectionRecord::decode(&with(0, &[1, 0, 9])),
        Err(DecodeError::BadFamily(9)),
        "a counter's address is checked like an ejection's"
    );
    assert_eq!(
        EjectionRecord::decode(&with(0, &[no_counts[0], no_counts[1], 9])),
        Err(DecodeError::TrailingBytes(1))
    );
    assert_eq!(
        EjectionRecord::decode(&with(0, &no_counts)).map(|record| record.rules()),
        Ok(7)
    );
    assert_eq!(
        EjectionRecord::decode(&with(0, &[&[1, 0][..], &counter(0, 0)].concat())),
        Err(DecodeError::ZeroCount)
    );
    assert_eq!(
        EjectionRecord::decode(&with(
            0,
            &[&[2, 0][..], &counter(1, 0), &counter(2, 0)].concat()
        )),
        Err(DecodeError::Unsorted),
        "counters are unique"
    );
    let mut twice = EjectionRecord::new(7);
    twice.record_ejection(ejection(1, secs(1), 1));
    let valid = twice.encode();
    assert_eq!(
        EjectionRecord::decode(&valid[..valid.len() - 1]),
        Err(DecodeError::Truncated)
    );
    let mut bytes = valid;
    let entry = bytes[11..bytes.len() - 2].to_vec();
    bytes.truncate(bytes.len() - 2);
    bytes[9] = 2;
    bytes.extend_from_slice(&entry);
    bytes.extend_from_slice(&no_counts);
    assert_eq!(EjectionRecord::decode(&bytes), Err(DecodeError::Unsorted));
}

#[test]
fn a_record_of_version_one_is_refused() {
    // What a filter of the previous version wrote: an ejection record without counters.
    let mut bytes = vec![1];
    bytes.extend_from_slice(&7u64.to_le_bytes());
    bytes.extend_from_slice(&0u16.to_le_bytes());
    assert_eq!(
        EjectionRecord::decode(&bytes),
        Err(DecodeError::UnknownVersion(1))
    );
}

#[test]
fn the_rules_fingerprint_follows_the_ejection_rules_only() {
    let strict = strict_outlier_detection(5);
    let kinds = crate::policy::FailureKinds::default();
    let base = rules_fingerprint(&strict, &kinds);
    assert_eq!(base, rules_fingerprint(&strict.clone(), &kinds.clone()));
    assert_ne!(
        base,
        rules_fingerprint(&strict_outlier_detection(6), &kinds)
    );
    let kinds_without_timeouts = crate::policy::FailureKinds {
        timeout: false,
        ..kinds
    };
    assert_ne!(base, rules_fingerprint(&strict, &kinds_without_timeouts));
}

fn any_address() -> impl Strategy<Value = SocketAddr> {
    (any::<[u8; 16]>(), any::<bool>(), any::<u16>()).prop_map(|(ip, v4, port)| {
        let ip: std::net::IpAddr = if v4 {
            std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).into()
        } else {
            std::net::Ipv6Addr::from(ip).into()
        };
        SocketAddr::new(ip, port)
    })
}

fn any_ejection() -> impl Strategy<Value = SharedEjection> {
    (any_address(), any::<u64>(), any::<u32>()).prop_map(|(address, until, ejections)| {
        SharedEjection {
            address,
            until: Duration::from_nanos(until),
            ejections,
        }
    })
}

/// Outcomes counted into a record: an address (from a few, so runs build up), whether it
/// failed, whether as a gateway error, and when.
fn any_counted() -> impl Strategy<Value = (SocketAddr, Verdict, Duration)> {
    (
        prop::sample::select(vec![addr(1), addr(2), "[::1]:80".parse().unwrap()]),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(address, failure, gateway_error, at)| {
            let verdict = Verdict {
                failure: failure || gateway_error,
                gateway_error,
                ..Verdict::default()
            };
            (address, verdict, Duration::from_nanos(at))
        })
}

/// A record of `rules` holding `ejections` and the counters `outcomes` leave.
fn record_with(
    rules: u64,
    ejections: Vec<SharedEjection>,
    outcomes: Vec<(SocketAddr, Verdict, Duration)>,
) -> EjectionRecord {
    let mut record = EjectionRecord::new(rules);
    for entry in ejections {
        record.record_ejection(entry);
    }
    for (address, verdict, at) in outcomes {
        record.count_outcome(address, &verdict, at);
    }
    record
}

proptest! {
    #[test]
    fn any_record_reads_back_as_written(
        rules in any::<u64>(),
        entries in prop::collection::vec(any_ejection(), 0..64),
        outcomes in prop::collection::vec(any_counted(), 0..32),
    ) {
        let record = record_with(rules, entries, outcomes);
        prop_assert_eq!(EjectionRecord::decode(&record.encode()), Ok(record));
    }

    #[test]
    fn hostile_counters_never_panic_and_what_decodes_is_canonical(
        counts in any::<u16>(),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        // A valid header and no ejections, so the bytes reach the counters.
        let bytes = [header(0), counts.to_le_bytes().to_vec(), body].concat();
        if let Ok(record) = EjectionRecord::decode(&bytes) {
            prop_assert!(record.counts().len() <= EjectionRecord::MAX_COUNTS);
            prop_assert!(record.counts().iter().all(|count| !count.consecutive.is_zero()));
            prop_assert_eq!(record.encode(), bytes);
        }
    }

    #[test]
    fn hostile_bytes_never_panic_and_what_decodes_is_canonical(
        bytes in prop::collection::vec(any::<u8>(), 0..512)
    ) {
        if let Ok(record) = EjectionRecord::decode(&bytes) {
            prop_assert!(record.entries().len() <= EjectionRecord::MAX_ENTRIES);
            prop_assert_eq!(record.encode(), bytes);
        }
    }

    #[test]
    fn a_record_with_a_byte_changed_never_panics_and_what_decodes_is_canonical(
        entries in prop::collection::vec(any_ejection(), 1..8),
        outcomes in prop::collection::vec(any_counted(), 0..8),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let record = record_with(7, entries, outcomes);
        let mut bytes = record.encode();
        let at = at.index(bytes.len());
        bytes[at] = byte;
        if let Ok(decoded) = EjectionRecord::decode(&bytes) {
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }

    #[test]
    fn a_valid_prefix_with_garbage_appended_is_refused(
        entries in prop::collection::vec(any_ejection(), 0..8),
        outcomes in prop::collection::vec(any_counted(), 0..8),
        garbage in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let record = record_with(0, entries, outcomes);
        let mut bytes = record.encode();
        bytes.extend_from_slice(&garbage);
        prop_assert!(EjectionRecord::decode(&bytes).is_err());
    }
}

#[test]
fn an_ejection_judged_elsewhere_opens_a_closed_breaker_until_its_deadline() {
    let policy = strict_outlier_detection(5);
    let mut breaker = Breaker::new(secs(0));
    let change = breaker.on(
        Event::EjectedElsewhere {
            until: secs(12),
            ejections: 2,
        },
        &context(&policy, secs(2), true),
    );
    let open = BreakerState::Open {
        until: secs(12),
        ejections: 2,
    };
    assert_eq!(change.map(|c| c.to), Some(open));
    assert!(!breaker.admits(&policy, secs(11)));
    assert!(breaker.admits(&policy, secs(12)));
}

#[test]
fn an_ejection_judged_elsewhere_is_refused_past_max_ejection_percent() {
    let policy = strict_outlier_detection(5);
    let mut breaker = Breaker::new(secs(0));
    let adopt = Event::EjectedElsewhere {
        until: secs(12),
        ejections: 1,
    };
    assert_eq!(breaker.on(adopt, &context(&policy, secs(2), false)), None);
    assert_eq!(breaker.state().name(), "closed");
}

#[test]
fn an_expired_ejection_judged_elsewhere_changes_nothing() {
    let policy = strict_outlier_detection(5);
    let mut breaker = Breaker::new(secs(0));
    let stale = Event::EjectedElsewhere {
        until: secs(2),
        ejections: 1,
    };
    assert_eq!(breaker.on(stale, &context(&policy, secs(2), true)), None);
}

#[test]
fn an_open_breaker_keeps_the_later_of_two_deadlines_and_the_larger_count() {
    let policy = strict_outlier_detection(1);
    let mut breaker = Breaker::new(secs(0));
    breaker.on(
        Event::EjectedElsewhere {
            until: secs(20),
            ejections: 1,
        },
        &context(&policy, secs(1), true),
    );
    breaker.on(
        Event::EjectedElsewhere {
            until: secs(15),
            ejections: 4,
        },
        &context(&policy, secs(2), true),
    );
    assert_eq!(
        breaker.state(),
        BreakerState::Open {
            until: secs(20),
            ejections: 1
        },
        "an earlier deadline is news of nothing"
    );
    breaker.on(
        Event::EjectedElsewhere {
            until: secs(30),
            ejections: 2,
        },
        &context(&policy, secs(3), true),
    );
    assert_eq!(
        breaker.state(),
        BreakerState::Open {
            until: secs(30),
            ejections: 2
        }
    );
}

#[test]
fn the_end_of_an_ejection_elsewhere_closes_an_expired_one_but_not_one_still_running() {
    let policy = strict_outlier_detection(5);
    let mut breaker = Breaker::new(secs(0));
    breaker.on(
        Event::EjectedElsewhere {
            until: secs(10),
            ejections: 1,
        },
        &context(&policy, secs(0), true),
    );
    assert_eq!(
        breaker.on(Event::RestoredElsewhere, &context(&policy, secs(9), true)),
        None
    );
    let change = breaker.on(Event::RestoredElsewhere, &context(&policy, secs(10), true));
    assert_eq!(
        change.map(|c| c.to),
        Some(BreakerState::Closed {
            ejections: 1,
            since: secs(10)
        })
    );
}

#[test]
fn the_end_of_an_ejection_elsewhere_closes_a_half_open_breaker() {
    let policy = strict_outlier_detection(5);
    let mut breaker = Breaker::new(secs(0));
    breaker.on(
        Event::EjectedElsewhere {
            until: secs(10),
            ejections: 1,
        },
        &context(&policy, secs(0), true),
    );
    breaker.on(Event::Admit, &context(&policy, secs(11), true));
    assert_eq!(breaker.state().name(), "half_open");
    breaker.on(Event::RestoredElsewhere, &context(&policy, secs(11), true));
    assert_eq!(breaker.state().name(), "closed");
}

#[test]
fn a_second_worker_avoids_an_endpoint_the_first_ejected_without_failing_on_it() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(5);
    let mut first = ServicePicker::new(&service, &endpoints(3));
    let mut second = ServicePicker::new(&service, &endpoints(3));
    let transitions = fail_on(&mut first, addr(2), connect_failure(), 5, secs(1));
    let record = record_of(&transitions, secs(1));
    let adopted = second.apply_shared_ejections(&record, secs(1));
    assert_eq!(adopted.len(), 1);
    assert_eq!(adopted[0].to, state_of(&first, addr(2)));
    let mut rng = seeded();
    for _ in 0..30 {
        assert_ne!(
            pick_and_complete(&mut second, ok(ms(1)), secs(2), &mut rng),
            addr(2)
        );
    }
    assert!(
        second.apply_shared_ejections(&record, secs(2)).is_empty(),
        "applying the same record again changes nothing"
    );
}

#[test]
fn a_shared_ejection_ending_beyond_max_ejection_time_is_corrupt_and_ignored() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(5);
    let now = secs(100);
    let longest = service.outlier_detection.max_ejection_time;
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    let mut record = EjectionRecord::default();
    record.record_ejection(SharedEjection {
        address: addr(1),
        until: now + longest + ms(1),
        ejections: 1,
    });
    record.record_ejection(SharedEjection {
        address: addr(2),
        until: Duration::MAX,
        ejections: u32::MAX,
    });
    assert!(picker.apply_shared_ejections(&record, now).is_empty());
    assert_eq!(state_of(&picker, addr(1)).name(), "closed");
    assert_eq!(state_of(&picker, addr(2)).name(), "closed");
    // Up to the cap, an ejection elsewhere is adopted as it is.
    record.record_ejection(ejection(3, now + longest, 1));
    let adopted = picker.apply_shared_ejections(&record, now);
    assert_eq!(adopted.len(), 1);
    assert_eq!(
        state_of(&picker, addr(3)),
        BreakerState::Open {
            until: now + longest,
            ejections: 1
        }
    );
}

#[test]
fn the_end_of_an_ejection_reaches_the_second_worker_when_the_first_closes_it() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(5);
    service.outlier_detection.half_open_max_probes = 1;
    let mut first = ServicePicker::new(&service, &endpoints(3));
    let mut second = ServicePicker::new(&service, &endpoints(3));
    let ejected = fail_on(&mut first, addr(2), connect_failure(), 5, secs(1));
    let mut record = record_of(&ejected, secs(1));
    second.apply_shared_ejections(&record, secs(1));
    // The ejection (10 s) expires; the first worker's probe succeeds and closes it there.
    let mut rng = seeded();
    let mut closed = Vec::new();
    for _ in 0..3 {
        let pick = first.pick(&Default::default(), secs(12), &mut rng).unwrap();
        closed.extend(
            first
                .complete(pick.endpoint, crate::Served::ByPick, ok(ms(1)), secs(12))
                .iter()
                .copied(),
        );
    }
    assert_eq!(state_of(&first, addr(2)).name(), "closed");
    for transition in &closed {
        if transition.to.name() == "closed" {
            record.record_restored(transition.endpoint, secs(12));
        }
    }
    assert!(record.entries().is_empty());
    let restored = second.apply_shared_ejections(&record, secs(12));
    assert_eq!(restored.len(), 1);
    assert_eq!(
        state_of(&second, addr(2)),
        BreakerState::Closed {
            ejections: 1,
            since: secs(12)
        }
    );
}

#[test]
fn a_worker_keeps_its_own_running_ejection_that_the_record_lacks() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(5);
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    fail_on(&mut picker, addr(2), connect_failure(), 5, secs(1));
    assert!(
        picker
            .apply_shared_ejections(&EjectionRecord::default(), secs(2))
            .is_empty()
    );
    assert_eq!(state_of(&picker, addr(2)).name(), "open");
}

#[test]
fn shared_ejections_respect_max_ejection_percent() {
    let mut service = policy(LoadBalancer::RoundRobin {});
    service.outlier_detection = strict_outlier_detection(5);
    service.outlier_detection.max_ejection_percent = 34;
    let mut picker = ServicePicker::new(&service, &endpoints(3));
    let mut record = EjectionRecord::default();
    for i in 1..=3 {
        record.record_ejection(ejection(i, secs(20), 1));
    }
    let adopted = picker.apply_shared_ejections(&record, secs(1));
    assert_eq!(adopted.len(), 1, "34 % of 3 endpoints is one ejection");
    let open = picker
        .endpoints()
        .filter(|view| view.breaker.is_ejected())
        .count();
    assert_eq!(open, 1);
}
