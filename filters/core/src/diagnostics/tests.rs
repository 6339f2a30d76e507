//! The per-endpoint view a picker gives, the blobs and reports it travels in, and the
//! aggregate over workers: named as specifications, with a controlled clock.

use proptest::prelude::*;

use super::*;
use crate::{
    ServicePicker,
    breaker::EjectionReason,
    ejections::{EjectionRecord, SharedEjection},
    policy::{FailureRate, LoadBalancer, OutlierDetection},
    test_support::*,
};

fn picker(outlier_detection: OutlierDetection, n: u32) -> ServicePicker {
    let mut policy = policy(LoadBalancer::RoundRobin {});
    policy.outlier_detection = outlier_detection;
    ServicePicker::new(&policy, &endpoints(n))
}

fn view(diagnosed: &[EndpointDiagnostics], i: u32) -> &EndpointDiagnostics {
    diagnosed
        .iter()
        .find(|endpoint| endpoint.address == addr(i))
        .expect("the endpoint is diagnosed")
}

#[test]
fn an_endpoint_ejected_for_consecutive_failures_shows_its_reason_and_time_until_readmission() {
    let mut picker = picker(strict_outlier_detection(3), 3);
    fail_on(&mut picker, addr(2), status(503), 3, secs(100));
    let diagnosed = picker.diagnose(secs(104));
    assert_eq!(diagnosed[0].address, addr(2), "not closed first");
    let ejected = view(&diagnosed, 2);
    assert_eq!(ejected.breaker, BreakerKind::Open);
    assert_eq!(ejected.reason.as_deref(), Some("consecutive_failures"));
    assert_eq!(ejected.ejections, 1);
    assert_eq!(ejected.readmit_in_ms, Some(6_000));
    let closed = view(&diagnosed, 1);
    assert_eq!(closed.breaker, BreakerKind::Closed);
    assert_eq!((closed.reason.clone(), closed.readmit_in_ms), (None, None));
}

#[test]
fn a_gateway_error_run_names_the_gateway_rule_and_a_failed_probe_names_the_probe() {
    let mut outlier_detection = strict_outlier_detection(0);
    outlier_detection.consecutive_gateway_errors = 2;
    let mut picker = picker(outlier_detection, 2);
    fail_on(&mut picker, addr(1), status(502), 2, secs(0));
    assert_eq!(
        picker.diagnose(secs(1))[0].reason.as_deref(),
        Some("consecutive_gateway_errors")
    );
    // The ejection ends at 10 s; the probe fails.
    let mut rng = seeded();
    let mut probed = false;
    for _ in 0..4 {
        let pick = picker
            .pick(&Default::default(), secs(11), &mut rng)
            .expect("admissible");
        let outcome = if pick.endpoint == addr(1) {
            probed = true;
            status(502)
        } else {
            ok(ms(5))
        };
        picker.complete(pick.endpoint, crate::Served::ByPick, outcome, secs(11));
    }
    assert!(probed, "the expired ejection admits a probe");
    let ejected = view(&picker.diagnose(secs(11)), 1).clone();
    assert_eq!(ejected.reason.as_deref(), Some("probe_failed"));
    assert_eq!(ejected.ejections, 2);
}

#[test]
fn a_failure_rate_ejection_names_the_rate_rule() {
    let mut outlier_detection = strict_outlier_detection(0);
    outlier_detection.failure_rate = Some(FailureRate {
        threshold_percent: 50,
        minimum_requests: 4,
    });
    let mut picker = picker(outlier_detection, 2);
    for outcome in [status(500), ok(ms(1)), status(500), status(500)] {
        picker.complete(addr(1), crate::Served::ByPick, outcome, secs(1));
    }
    let ejected = view(&picker.diagnose(secs(1)), 1).clone();
    assert_eq!(ejected.reason.as_deref(), Some("failure_rate"));
}

#[test]
fn an_ejection_shared_by_another_worker_says_so_and_closing_forgets_the_reason() {
    let mut picker = picker(strict_outlier_detection(3), 2);
    let mut record = EjectionRecord::new(0);
    record.record_ejection(SharedEjection {
        address: addr(1),
        until: secs(30),
        ejections: 1,
    });
    picker.apply_shared_ejections(&record, secs(20));
    let shared = view(&picker.diagnose(secs(20)), 1).clone();
    assert_eq!(shared.breaker, BreakerKind::Open);
    assert_eq!(shared.reason.as_deref(), Some("shared"));
    assert_eq!(shared.readmit_in_ms, Some(10_000));

    picker.apply_shared_ejections(&EjectionRecord::new(0), secs(31));
    let restored = view(&picker.diagnose(secs(31)), 1).clone();
    assert_eq!(
        (restored.breaker, restored.reason),
        (BreakerKind::Closed, None)
    );
}

#[test]
fn picks_are_counted_per_endpoint_and_restart_with_each_diagnosis() {
    let mut picker = picker(strict_outlier_detection(3), 2);
    let mut rng = seeded();
    for _ in 0..4 {
        pick_and_complete(&mut picker, ok(ms(5)), secs(1), &mut rng);
    }
    let first = picker.diagnose(secs(1));
    assert_eq!(view(&first, 1).picks + view(&first, 2).picks, 4);
    assert_eq!(view(&first, 1).picks, 2, "round robin shares evenly");
    assert_eq!(view(&first, 1).window_requests, 2);
    assert!(view(&first, 1).latency_ms.is_some());
    let second = picker.diagnose(secs(2));
    assert_eq!(view(&second, 1).picks, 0);
}

#[test]
fn every_reason_code_reads_back_as_its_reason() {
    for reason in EjectionReason::ALL {
        let code = reason.code();
        assert!(code.len() <= MAX_REASON_BYTES);
        assert_eq!(EjectionReason::from_code(code), Some(reason));
    }
}

fn diagnosed(n: u32) -> Vec<EndpointDiagnostics> {
    let mut picker = picker(strict_outlier_detection(1), n);
    fail_on(&mut picker, addr(n), status(503), 1, secs(0));
    picker.diagnose(secs(1))
}

#[test]
fn a_worker_blob_parses_back_into_its_diagnostics() {
    let endpoints = diagnosed(3);
    let blob = encode_worker(2, Some("v7"), &endpoints, MAX_WORKER_BYTES);
    let worker: WorkerDiagnostics = serde_json::from_slice(&blob).expect("a blob parses");
    assert_eq!(
        worker,
        WorkerDiagnostics {
            worker: 2,
            version: Some("v7".to_owned()),
            endpoints,
            omitted: 0,
        }
    );
}

#[test]
fn a_blob_over_its_bound_keeps_the_ejected_endpoints_and_counts_the_rest() {
    let endpoints = diagnosed(2_000);
    let blob = encode_worker(0, Some("v1"), &endpoints, 4_096);
    assert!(blob.len() <= 4_096, "{}", blob.len());
    let worker: WorkerDiagnostics = serde_json::from_slice(&blob).expect("a blob parses");
    assert_eq!(
        worker.endpoints[0].address,
        addr(2_000),
        "the ejected one first"
    );
    assert_eq!(
        worker.endpoints.len() + worker.omitted as usize,
        2_000,
        "every endpoint kept or counted"
    );
}

#[test]
fn a_composed_report_parses_and_aggregates_over_workers() {
    let mut one = picker(strict_outlier_detection(1), 2);
    let mut two = picker(strict_outlier_detection(1), 2);
    fail_on(&mut one, addr(2), status(503), 1, secs(0));
    let mut rng = seeded();
    for _ in 0..3 {
        pick_and_complete(&mut two, ok(ms(4)), secs(1), &mut rng);
    }
    let blobs = [
        encode_worker(0, Some("v1"), &one.diagnose(secs(1)), MAX_WORKER_BYTES),
        encode_worker(1, Some("v1"), &two.diagnose(secs(1)), MAX_WORKER_BYTES),
    ];
    let body = compose_report("checkout", 7, blobs.iter().map(Vec::as_slice));
    let report = DiagnosticsReport::parse(&body).expect("a composed report is valid");
    assert_eq!((report.service.as_str(), report.request), ("checkout", 7));
    let aggregate = aggregate(&report.workers);
    assert_eq!(aggregate.len(), 2);
    let second = &aggregate[1];
    assert_eq!(second.address, addr(2));
    assert_eq!((second.workers, second.open_on), (2, 1));
    assert_eq!(second.state(), "partly_open");
    assert_eq!(second.reasons, ["consecutive_failures"]);
    assert_eq!(second.readmit_in_ms, Some(9_000));
    assert_eq!(aggregate[0].state(), "closed");
    assert_eq!(aggregate[0].picks + second.picks, 3);
    assert!((aggregate[0].pick_share + second.pick_share - 1.0).abs() < 1e-9);
}

#[test]
fn a_report_with_a_field_out_of_bounds_is_refused_naming_the_field() {
    let valid = || {
        let blob = encode_worker(0, Some("v1"), &diagnosed(2), MAX_WORKER_BYTES);
        DiagnosticsReport {
            service: "checkout".to_owned(),
            request: 1,
            workers: vec![serde_json::from_slice(&blob).expect("a blob parses")],
        }
    };
    let refused = |report: DiagnosticsReport| {
        let body = serde_json::to_vec(&report).expect("serializes");
        DiagnosticsReport::parse(&body)
            .map(|_| ())
            .map_err(|e| e.label())
    };
    assert_eq!(refused(valid()), Ok(()));
    let mut report = valid();
    report.service = "a b".to_owned();
    assert_eq!(refused(report), Err("service"));
    let mut report = valid();
    report.workers[0].endpoints[0].reason = Some("Bad-Code".to_owned());
    assert_eq!(refused(report), Err("reason"));
    let mut report = valid();
    report.workers[0].endpoints[0].latency_ms = Some(-1.0);
    assert_eq!(refused(report), Err("latency_ms"));
    let mut report = valid();
    report.workers[0].endpoints[0].readmit_in_ms = Some(MAX_MILLIS + 1);
    assert_eq!(refused(report), Err("readmit_in_ms"));
    let mut report = valid();
    report.workers.push(report.workers[0].clone());
    assert_eq!(refused(report), Err("worker"), "a slot twice");
    let mut report = valid();
    report.workers[0].version = Some("v\u{7f}".to_owned());
    assert_eq!(refused(report), Err("version"));
    assert_eq!(
        DiagnosticsReport::parse(b"{\"service\":1}").map_err(|e| e.label()),
        Err("malformed")
    );
    assert_eq!(
        DiagnosticsReport::parse(&vec![b' '; MAX_REPORT_BYTES + 1]).map_err(|e| e.label()),
        Err("too_large")
    );
}

proptest! {
    #[test]
    fn a_blob_never_exceeds_its_bound_and_always_parses(
        n in 1u32..300,
        max_bytes in 1_024usize..8_192,
        version_len in 0usize..400,
    ) {
        let version = "v".repeat(version_len);
        let endpoints = diagnosed(n);
        let blob = encode_worker(31, Some(&version), &endpoints, max_bytes);
        prop_assert!(blob.len() <= max_bytes);
        let worker: WorkerDiagnostics = serde_json::from_slice(&blob).expect("parses");
        prop_assert_eq!(worker.endpoints.len() + worker.omitted as usize, n as usize);
        prop_assert_eq!(worker.version.is_some(), version_len <= MAX_VERSION_BYTES);
    }

    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = DiagnosticsReport::parse(&bytes);
    }
}
