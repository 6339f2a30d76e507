//! The native module (`libfulcrum_native.so`) as the cluster's load-balancing policy on real
//! Envoy 1.40 with two workers: the wasm filter's scenarios, with hosts chosen directly.
//! Needs `FULCRUM_NATIVE_MODULE` (`cargo xtask test` builds and sets it).

use std::{collections::BTreeMap, time::Duration};

use fulcrum_e2e::{
    Reply, SERVICE, backends, connect_failures, connections_per_worker, count_by_backend,
    dead_address,
    native::{
        Clusters, NativeProxy, RETRY_A_CONNECT_FAILURE, Retries, Upstream, bootstrap, cds_file,
        cluster, dead_endpoint_policy, over_http2, round_robin_ejecting_after,
    },
};
use fulcrum_example_backend::{
    Backend, Fault,
    grpc::{self, GrpcBackend},
};
use fulcrum_test_support::eventually;
use serde_json::{Value, json};

const WORKERS: u32 = 2;

fn upstreams(backends: &[Backend]) -> Vec<Upstream> {
    backends.iter().map(|b| Upstream::at(b.addr)).collect()
}

async fn proxy(backends: &[Backend], policy: Value, retries: Option<Retries>) -> NativeProxy {
    NativeProxy::with_upstreams(&upstreams(backends), policy, retries, WORKERS)
        .await
        .expect("Envoy starts with the native module")
}

/// `n` backends, the one at `index` answering with `fault`.
async fn backends_with_fault(n: usize, index: usize, fault: Fault) -> Vec<Backend> {
    let backends = backends(n).await.expect("backends start");
    backends[index].set_fault(fault).expect("the fault is set");
    backends
}

fn all_ok(replies: &[Reply]) -> bool {
    replies.iter().all(|reply| reply.status == Some(200))
}

#[tokio::test]
async fn native_module_loads_with_a_matching_abi_version() {
    let backends = backends(2).await.unwrap();
    let proxy = proxy(&backends, json!({}), None).await;

    assert!(all_ok(&proxy.send(4).await));
    let log = proxy.envoy.log_tail(400);
    assert!(
        log.contains("Dynamic module ABI version v0.2.0 matched."),
        "Envoy must report the module's ABI version as its own:\n{log}"
    );
    assert!(
        log.contains("fulcrum_native: balancing cluster shop"),
        "{log}"
    );
    assert_eq!(
        proxy
            .counter("fulcrum_native_fail_open_total")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        proxy
            .counter("fulcrum_native_unobserved_total")
            .await
            .unwrap(),
        0,
        "the outcome filter follows every request"
    );
}

#[tokio::test]
async fn weighted_round_robin_spreads_exactly_by_weight_across_both_workers() {
    let backends = backends(3).await.unwrap();
    let weighted: Vec<Upstream> = backends
        .iter()
        .zip([1, 2, 3])
        .map(|(b, weight)| Upstream {
            weight,
            ..Upstream::at(b.addr)
        })
        .collect();
    let proxy = NativeProxy::with_upstreams(
        &weighted,
        json!({"load_balancer": {"type": "weighted_round_robin"}}),
        None,
        WORKERS,
    )
    .await
    .unwrap();

    // Concurrent connections: Envoy spreads them over its workers, which share one picker.
    let mut replies = Vec::new();
    for _ in 0..6 {
        let batch = futures_join(&proxy, 10).await;
        replies.extend(batch);
    }

    let counts = count_by_backend(&replies);
    assert_eq!(counts.get("b1"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("b2"), Some(&20), "{counts:?}");
    assert_eq!(counts.get("b3"), Some(&30), "{counts:?}");
}

/// `n` requests in flight at once, each on a connection of its own.
async fn futures_join(proxy: &NativeProxy, n: usize) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(n);
    let mut pending = Vec::with_capacity(n);
    for _ in 0..n {
        pending.push(proxy.send_with(&[("connection", "close")]));
    }
    for request in pending {
        replies.push(request.await);
    }
    replies
}

#[tokio::test]
async fn a_dead_endpoint_costs_at_most_its_threshold_and_retries_land_elsewhere() {
    let live = backends(2).await.unwrap();
    let dead = dead_address().await.unwrap();
    let mut members = upstreams(&live);
    members.push(Upstream::at(dead));
    let proxy = NativeProxy::with_upstreams(
        &members,
        dead_endpoint_policy(),
        Some(RETRY_A_CONNECT_FAILURE),
        WORKERS,
    )
    .await
    .unwrap();

    let replies = proxy.send(60).await;

    assert!(
        all_ok(&replies),
        "every request retried onto a live endpoint: {replies:?}"
    );
    let connect_failures = connect_failures(&proxy.envoy).await.unwrap();
    assert!(
        (1..=3).contains(&connect_failures),
        "the dead endpoint is ejected after 3 failures, got {connect_failures}"
    );
}

#[tokio::test]
async fn a_slow_endpoint_is_avoided_by_peak_ewma() {
    let backends = backends_with_fault(
        3,
        0,
        Fault {
            latency_ms: 150,
            ..Fault::default()
        },
    )
    .await;
    let proxy = proxy(
        &backends,
        json!({"load_balancer": {"type": "peak_ewma"}}),
        None,
    )
    .await;

    let replies = proxy.send(60).await;

    assert!(all_ok(&replies));
    let counts = count_by_backend(&replies);
    let slow = counts.get("b1").copied().unwrap_or(0);
    assert!(
        slow <= 6,
        "the slow endpoint gets little traffic: {counts:?}"
    );
}

#[tokio::test]
async fn an_erroring_endpoint_is_ejected_then_readmitted_once_it_recovers() {
    let backends = backends_with_fault(
        3,
        1,
        Fault {
            error_rate: 1.0,
            ..Fault::default()
        },
    )
    .await;
    let proxy = proxy(
        &backends,
        json!({
            "load_balancer": {"type": "round_robin"},
            "outlier_detection": {
                "consecutive_failures": 3,
                "base_ejection_time": "1s",
                "ejection_jitter_percent": 0,
                "max_ejection_percent": 50
            }
        }),
        None,
    )
    .await;

    let replies = proxy.send(30).await;
    let errors = replies.iter().filter(|r| r.status == Some(503)).count();
    assert_eq!(
        errors,
        3,
        "three failures eject the endpoint: {:?}",
        count_by_backend(&replies)
    );
    assert_eq!(backends[1].stats().errors, 3);
    let b2 = backends[1].addr;
    assert_eq!(
        proxy.endpoint_metric("ejections_total", b2).await.unwrap(),
        1
    );
    assert_eq!(proxy.endpoint_metric("circuit_open", b2).await.unwrap(), 1);
    let prometheus = proxy.envoy.admin_get("/stats/prometheus").await.unwrap();
    let series = format!(
        "envoy_dynamicmodulescustom_fulcrum_native_endpoint_ejections_total{{cluster=\"{SERVICE}\",endpoint=\"{b2}\"}} 1"
    );
    assert!(
        prometheus.lines().any(|line| line == series),
        "the alert rules' series name, labelled by cluster and endpoint: {series} in\n{prometheus}"
    );
    assert!(
        prometheus.contains(&format!(
            "envoy_dynamicmodulescustom_fulcrum_native_fail_open_total{{cluster=\"{SERVICE}\"}} 0"
        )),
        "a cluster's counters exist at 0 before their first count"
    );

    backends[1].set_fault(Fault::default()).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let readmitted = eventually(
        Duration::from_secs(5),
        "the recovered endpoint to serve",
        || async {
            let replies = proxy.send(9).await;
            let counts = count_by_backend(&replies);
            (all_ok(&replies) && counts.get("b2").copied().unwrap_or(0) >= 2).then_some(counts)
        },
    )
    .await;
    assert!(
        readmitted.is_ok(),
        "the recovered endpoint serves again after its ejection"
    );
    let closed = eventually(
        Duration::from_secs(5),
        "the recovered endpoint's circuit to close",
        || async {
            proxy.send(9).await;
            (proxy.endpoint_metric("circuit_open", b2).await.ok() == Some(0)).then_some(())
        },
    )
    .await;
    assert!(
        closed.is_ok(),
        "its circuit gauge is back to 0 once it closes"
    );
    assert_eq!(
        proxy.endpoint_metric("ejections_total", b2).await.unwrap(),
        1,
        "one ejection"
    );
}

/// A client that gives up before the response (its connection closes, Envoy's `DC`) says
/// nothing about the endpoint: the outcome filter reads Envoy's response flags at the
/// stream's end, and only an upstream's reset or timeout there is a failure, as for the wasm
/// filter. Counting it as a reset would eject a healthy but slow endpoint whenever impatient
/// clients cancel.
#[tokio::test]
async fn clients_that_give_up_before_the_response_do_not_eject_a_slow_endpoint() {
    let backends = backends_with_fault(
        2,
        1,
        Fault {
            latency_ms: 400,
            ..Fault::default()
        },
    )
    .await;
    let proxy = proxy(
        &backends,
        round_robin_ejecting_after("consecutive_failures", 2),
        None,
    )
    .await;
    let listener = proxy.envoy.ingress_address().await.unwrap();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();

    let mut gave_up = 0;
    for _ in 0..10 {
        if impatient
            .get(format!("http://{listener}/"))
            .send()
            .await
            .is_err()
        {
            gave_up += 1;
        }
    }
    // Envoy ends each abandoned stream as its connection closes.
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert!(
        gave_up >= 4,
        "the slow endpoint kept its turns, each abandoned by the client: {gave_up} of 10 \
         (one ejected by the cancels would have had none after the second)"
    );
    let slow = backends[1].addr;
    assert_eq!(
        proxy
            .endpoint_metric("ejections_total", slow)
            .await
            .unwrap(),
        0,
        "{gave_up} cancelled requests are no failure of the endpoint"
    );
    let replies = proxy.send(4).await;
    assert_eq!(
        count_by_backend(&replies).get("b2"),
        Some(&2),
        "the slow endpoint keeps its share: {replies:?}"
    );
}

#[tokio::test]
async fn a_hanging_endpoint_times_out_and_is_ejected() {
    let backends = backends_with_fault(
        3,
        2,
        Fault {
            blackhole: true,
            ..Fault::default()
        },
    )
    .await;
    let proxy = proxy(
        &backends,
        round_robin_ejecting_after("consecutive_gateway_errors", 2),
        None,
    )
    .await;

    let replies = proxy.send(24).await;

    let timeouts = replies.iter().filter(|r| r.status == Some(504)).count();
    assert_eq!(
        timeouts, 2,
        "two route timeouts eject the endpoint: {replies:?}"
    );
    assert_eq!(replies.iter().filter(|r| r.status == Some(200)).count(), 22);
}

/// With 5xx statuses not counted, only Envoy's `UT` flag makes a route timeout's local 504 a
/// failure: the module reads the flag (attribute `ResponseFlags`) as the wasm filter reads
/// `response.flags`.
#[tokio::test]
async fn a_route_timeout_is_judged_by_envoys_flag_when_statuses_do_not_count() {
    let backends = backends_with_fault(
        3,
        2,
        Fault {
            blackhole: true,
            ..Fault::default()
        },
    )
    .await;
    let proxy = proxy(
        &backends,
        {
            let mut policy = round_robin_ejecting_after("consecutive_failures", 2);
            policy["failure_kinds"] = json!({"server_errors": false, "gateway_errors": false, "connect_failure": false, "reset": false, "timeout": true});
            policy
        },
        None,
    )
    .await;

    let replies = proxy.send(24).await;

    let timeouts = replies.iter().filter(|r| r.status == Some(504)).count();
    assert_eq!(
        timeouts, 2,
        "two timeouts, known by their flag, eject the endpoint: {replies:?}"
    );
    assert_eq!(
        proxy
            .endpoint_metric("ejections_total", backends[2].addr)
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn consistent_hashing_by_header_keeps_each_key_on_one_endpoint() {
    let backends = backends(4).await.unwrap();
    let proxy = proxy(
        &backends,
        json!({"load_balancer": {"type": "ring_hash", "hash_on": {"header": "x-user"}}}),
        None,
    )
    .await;

    let mut homes: BTreeMap<String, String> = BTreeMap::new();
    for round in 0..3 {
        for user in 0..20 {
            let key = format!("user-{user}");
            let reply = proxy.send_with(&[("x-user", &key)]).await;
            let backend = reply.backend.expect("served by a backend");
            let home = homes.entry(key.clone()).or_insert_with(|| backend.clone());
            assert_eq!(*home, backend, "round {round}: {key} moved");
        }
    }
    let used: std::collections::BTreeSet<_> = homes.values().collect();
    assert!(used.len() >= 3, "20 keys spread over the ring: {homes:?}");
}

/// What a client controls reaches the module as bytes: the hash header, the cookie and the
/// outcome filter's own stream header, each not UTF-8, repeated and 32 KiB long. None crashes
/// Envoy, fails a request or steers another request's pick, a client's stream header never
/// stands for the filter's (every pick is observed, 90 copies too), and the keys still hash
/// home.
#[tokio::test]
async fn hostile_header_bytes_neither_crash_the_module_nor_steer() {
    let backends = backends(3).await.unwrap();
    let proxy = proxy(
        &backends,
        json!({"load_balancer": {"type": "ring_hash", "hash_on": {"header": "x-user"}}}),
        None,
    )
    .await;
    let high: Vec<u8> = (0x80..=0xFF).collect();
    // Envoy answers 431 itself for 60 KiB (its default limit is 60 KiB for all headers).
    let huge = vec![b'7'; 32 << 10];
    for header in ["x-user", "cookie", fulcrum_core::NATIVE_STREAM_HEADER] {
        for value in [&high[..], &huge[..], b"18446744073709551615", b"-1"] {
            let reply = proxy.send_raw(&[(header, value)]).await;
            assert_eq!(reply.status, Some(200), "{header}: {reply:?}");
            let reply = proxy
                .send_raw(&[(header, b"1"), (header, value), (header, b"2")])
                .await;
            assert_eq!(reply.status, Some(200), "{header} repeated: {reply:?}");
        }
    }
    // More copies of the stream header than `choose_host` lists on its stack (64), under
    // Envoy's default limit of 100 headers, one of them a well-formed id: the filter's own,
    // appended last, is still the one read.
    let copies: Vec<(&str, &[u8])> = (0..90)
        .map(|i| {
            let value: &[u8] = if i == 45 { b"00000000000000ff" } else { b"1" };
            (fulcrum_core::NATIVE_STREAM_HEADER, value)
        })
        .collect();
    let reply = proxy.send_raw(&copies).await;
    assert_eq!(reply.status, Some(200), "90 stream headers: {reply:?}");

    let mut homes: BTreeMap<String, String> = BTreeMap::new();
    for _ in 0..2 {
        for user in 0..10 {
            let key = format!("user-{user}");
            let reply = proxy.send_with(&[("x-user", &key)]).await;
            let backend = reply.backend.expect("served by a backend");
            assert_eq!(
                homes.entry(key.clone()).or_insert(backend.clone()),
                &backend
            );
        }
    }
    assert_eq!(
        proxy
            .counter("fulcrum_native_fail_open_total")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        proxy
            .counter("fulcrum_native_unobserved_total")
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn a_sticky_session_returns_to_its_endpoint() {
    let backends = backends(3).await.unwrap();
    let proxy = proxy(
        &backends,
        json!({"load_balancer": {"type": "sticky", "cookie": "fulcrum-session", "fallback": {"type": "round_robin"}}}),
        None,
    )
    .await;

    // The first request has no session: the response sets its cookie.
    let first = reqwest_with_cookie(&proxy, None).await;
    let (backend, cookie) = (first.0.expect("served"), first.1.expect("a session cookie"));
    for _ in 0..6 {
        let (again, _) = reqwest_with_cookie(&proxy, Some(&cookie)).await;
        assert_eq!(again.as_deref(), Some(backend.as_str()));
    }
}

/// One request with an optional `Cookie`; the backend and the `Set-Cookie` pair.
async fn reqwest_with_cookie(
    proxy: &NativeProxy,
    cookie: Option<&str>,
) -> (Option<String>, Option<String>) {
    let address = proxy.envoy.ingress_address().await.unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut request = client.get(format!("http://{address}/"));
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let response = request.send().await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let set_cookie = header("set-cookie")
        .and_then(|value| value.split(';').next().map(str::trim).map(str::to_owned));
    (header("x-backend"), set_cookie)
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let backends = backends(2).await.unwrap();
    let proxy = proxy(
        &backends,
        json!({"rate_limit": {"requests_per_second": 1, "burst": 3}}),
        None,
    )
    .await;

    let address = proxy.envoy.ingress_address().await.unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let response = client
            .get(format!("http://{address}/"))
            .send()
            .await
            .unwrap();
        if response.status().as_u16() == 429 {
            retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }
        statuses.push(response.status().as_u16());
    }

    assert_eq!(&statuses[..3], [200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(
        proxy
            .counter("fulcrum_native_rate_limited_total")
            .await
            .unwrap()
            >= 1
    );
}

#[tokio::test]
async fn an_invalid_policy_is_refused_naming_the_field() {
    let backends = backends(1).await.unwrap();
    let refused =
        NativeProxy::with_upstreams(&upstreams(&backends), json!({"retry": 9}), None, WORKERS)
            .await;

    let error = format!("{:#}", refused.expect_err("Envoy refuses the cluster"));
    assert!(
        error.contains("lb_policy_config is invalid: retry"),
        "the log names the field: {error}"
    );
}

#[tokio::test]
async fn a_cluster_update_with_an_invalid_policy_is_refused_and_the_last_good_one_stays() {
    let backends = backends(2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cds = dir.path().join("cds.json");
    let write = |policy: Value, version: &str| {
        let mut file = cds_file(&[cluster(&upstreams(&backends), &policy)]);
        file["version_info"] = json!(version);
        let staged = dir.path().join("cds.json.new");
        std::fs::write(&staged, file.to_string()).unwrap();
        // A rename, so Envoy's watch sees the whole file at once.
        std::fs::rename(&staged, &cds).unwrap();
    };
    write(json!({"load_balancer": {"type": "round_robin"}}), "1");
    let proxy = NativeProxy::start(&bootstrap(Clusters::File(&cds), None), WORKERS)
        .await
        .unwrap();
    let served = eventually(
        Duration::from_secs(10),
        "the first cluster to serve",
        || async {
            let replies = proxy.send(4).await;
            all_ok(&replies).then_some(())
        },
    )
    .await;
    assert!(served.is_ok(), "the first cluster serves");

    write(
        json!({"load_balancer": {"type": "round_robin"}, "retry": 9}),
        "2",
    );
    let rejected = eventually(
        Duration::from_secs(10),
        "the update's rejection",
        || async {
            let rejected = proxy
                .envoy
                .stat("cluster_manager.cds.update_rejected")
                .await
                .ok()
                .flatten()
                .unwrap_or(0);
            (rejected >= 1).then_some(())
        },
    )
    .await;
    assert!(rejected.is_ok(), "Envoy rejects the update");

    let replies = proxy.send(10).await;
    assert!(all_ok(&replies), "the last good cluster still serves");
    let counts = count_by_backend(&replies);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [5, 5],
        "{counts:?}"
    );
}

#[tokio::test]
async fn the_endpoint_selector_reads_tags_from_the_endpoints_metadata() {
    let backends = backends(3).await.unwrap();
    let members: Vec<Upstream> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| Upstream {
            tags: if i == 0 {
                vec!["stable"]
            } else {
                vec!["canary", "gpu"]
            },
            ..Upstream::at(b.addr)
        })
        .collect();
    let proxy = NativeProxy::with_upstreams(
        &members,
        json!({"load_balancer": {"type": "round_robin"}, "endpoint_selector": {"tags": ["canary"]}}),
        None,
        WORKERS,
    )
    .await
    .unwrap();

    let counts = count_by_backend(&proxy.send(20).await);

    assert_eq!(counts.get("b1"), None, "{counts:?}");
    assert_eq!(counts.get("b2"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("b3"), Some(&10), "{counts:?}");
}

#[tokio::test]
async fn an_ejection_judged_on_one_worker_holds_on_the_other() {
    let backends = backends_with_fault(
        3,
        1,
        Fault {
            error_rate: 1.0,
            ..Fault::default()
        },
    )
    .await;
    let proxy = proxy(
        &backends,
        round_robin_ejecting_after("consecutive_failures", 3),
        None,
    )
    .await;

    // A connection per request: the kernel spreads them over both workers.
    let mut replies = Vec::new();
    for _ in 0..40 {
        replies.push(proxy.send_with(&[("connection", "close")]).await);
    }

    let per_worker = connections_per_worker(&proxy.envoy).await.unwrap();
    assert!(
        per_worker.len() == 2 && per_worker.iter().all(|c| *c > 0),
        "both workers served: {per_worker:?}"
    );
    let errors = replies.iter().filter(|r| r.status == Some(503)).count();
    assert_eq!(
        errors, 3,
        "the proxy pays one threshold of failures, whichever worker saw them"
    );
}

#[tokio::test]
async fn a_flapping_endpoint_is_ejected_in_its_failing_phases() {
    let backends = backends_with_fault(
        3,
        0,
        Fault {
            flap_period_ms: Some(400),
            ..Fault::default()
        },
    )
    .await;
    // Ejections (100 ms, growing with each re-ejection but capped at 200 ms) stay shorter
    // than half a flap period, so whatever phase the flapper is in when Envoy is up, a probe
    // reaches each of its healthy phases.
    let proxy = proxy(
        &backends,
        json!({
            "load_balancer": {"type": "round_robin"},
            "outlier_detection": {
                "consecutive_failures": 2,
                "base_ejection_time": "100ms",
                "max_ejection_time": "200ms",
                "ejection_jitter_percent": 0,
                "max_ejection_percent": 50
            }
        }),
        None,
    )
    .await;

    let mut replies = Vec::new();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) && replies.len() < 3000 {
        replies.push(proxy.send_with(&[]).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let errors = replies.iter().filter(|r| r.status == Some(503)).count();
    let flapper = backends[0].stats();
    assert!(
        flapper.requests > flapper.errors,
        "the flapper serves in its healthy phases: {flapper:?}"
    );
    assert!(
        errors * 10 < replies.len(),
        "ejections keep failures under 10% of {} requests: {errors} errors",
        replies.len()
    );
}

#[tokio::test]
async fn a_grpc_endpoint_failing_unavailable_is_ejected_by_its_grpc_status() {
    let mut backends = Vec::new();
    for (index, unavailable_percent) in [0, 0, 100].into_iter().enumerate() {
        let name = format!("g{}", index + 1);
        backends.push(
            GrpcBackend::start(&name, unavailable_percent)
                .await
                .unwrap(),
        );
    }
    let members: Vec<Upstream> = backends.iter().map(|b| Upstream::at(b.addr)).collect();
    let policy = round_robin_ejecting_after("consecutive_failures", 3);
    let clusters = [over_http2(cluster(&members, &policy))];
    let proxy = NativeProxy::start(&bootstrap(Clusters::Static(&clusters), None), WORKERS)
        .await
        .unwrap();
    let listener = proxy.envoy.ingress_address().await.unwrap();
    let mut client = grpc::client(listener).await.unwrap();

    let mut codes = Vec::new();
    for _ in 0..30 {
        codes.push(grpc::check(&mut client).await);
    }

    let unavailable = codes
        .iter()
        .filter(|(_, code)| *code == tonic::Code::Unavailable)
        .count();
    assert_eq!(
        unavailable, 3,
        "three UNAVAILABLE calls (503 by their grpc-status) eject the endpoint: {codes:?}"
    );
    assert_eq!(backends[2].calls(), 3);
    assert!(
        codes
            .iter()
            .filter(|(_, code)| *code != tonic::Code::Unavailable)
            .all(|(_, code)| *code == tonic::Code::Ok),
        "{codes:?}"
    );
}

#[tokio::test]
async fn hashing_on_the_source_ip_keeps_one_client_on_one_endpoint() {
    let backends = backends(4).await.unwrap();
    let proxy = proxy(
        &backends,
        json!({"load_balancer": {"type": "ring_hash", "hash_on": "source_ip"}}),
        None,
    )
    .await;

    // New connections (new source ports, both workers), one source IP: one endpoint.
    let mut replies = Vec::new();
    for _ in 0..20 {
        replies.push(proxy.send_with(&[("connection", "close")]).await);
    }

    let counts = count_by_backend(&replies);
    assert_eq!(
        counts.len(),
        1,
        "127.0.0.1 hashes to one endpoint: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 20);
}
