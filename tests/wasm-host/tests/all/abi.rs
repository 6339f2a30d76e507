//! The host's ABI, checked with hand-written guests: each test names the Envoy behaviour it
//! pins down.

use fulcrum_wasm_host::{LogLevel, Outcome, Response};

use crate::test_support::{abi_guest, ms, vm_start_guest};

#[test]
fn header_maps_round_trip_through_guest_memory() -> anyhow::Result<()> {
    let plugin = abi_guest().start()?;
    let mut request = plugin
        .worker(0)
        .request()
        .header(":authority", "checkout")
        .header("X-In", "10.0.0.1:8080")
        .header("x-strip", "client value")
        .header("x-strip", "second copy")
        .send_headers()?;
    assert_eq!(
        request.request_header("x-out").as_deref(),
        Some("10.0.0.1:8080")
    );
    assert_eq!(request.request_header("x-strip"), None);
    request.respond(200).finish()?;
    // The guest copied the request headers, as serialized pairs, into the response headers.
    assert_eq!(
        request
            .actions()
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>(),
        ["proxy_on_request_headers", "proxy_on_response_headers"]
    );
    assert_eq!(
        request.response_header("x-in").as_deref(),
        Some("10.0.0.1:8080")
    );
    assert_eq!(
        request.response_header("x-out").as_deref(),
        Some("10.0.0.1:8080")
    );
    assert_eq!(
        request.response_header(":authority").as_deref(),
        Some("checkout")
    );
    Ok(())
}

#[test]
fn header_names_and_values_reach_the_guest_and_come_back_byte_for_byte() -> anyhow::Result<()> {
    let plugin = abi_guest().start()?;
    let mut request = plugin
        .worker(0)
        .request()
        .header_bytes("X-IN", b"\x80\xff\x00tail")
        .header_bytes(b"x-\xfe", b"\xc3")
        .header_bytes("x-strip", b"\xff")
        .header_bytes("X-Strip", b"again")
        .send_headers()?;
    // The guest read x-in through `proxy_get_header_map_value` and wrote it to x-out.
    assert_eq!(
        request.request_header_bytes("x-out").as_deref(),
        Some(&b"\x80\xff\x00tail"[..])
    );
    assert_eq!(
        request.request_header("x-out").as_deref(),
        Some("\u{fffd}\u{fffd}\u{0}tail")
    );
    assert_eq!(request.request_header_bytes("x-strip"), None);
    request.respond(200).finish()?;
    // The guest copied every pair (`proxy_get_header_map_pairs` / `set_header_map_pairs`).
    assert_eq!(
        request.response_header_bytes(b"X-\xfe").as_deref(),
        Some(&b"\xc3"[..])
    );
    Ok(())
}

#[test]
fn response_code_property_is_eight_little_endian_bytes_like_envoy() -> anyhow::Result<()> {
    let plugin = abi_guest().start()?;
    let mut request = plugin.worker(0).request().send_headers()?;
    request.respond(503).upstream("10.0.0.1:8080").finish()?;
    let (code, _) = plugin
        .shared_data("code")
        .expect("the guest stored response.code");
    assert_eq!(code, 503u64.to_le_bytes());
    Ok(())
}

#[test]
fn shared_data_is_shared_by_workers_and_a_stale_cas_is_a_mismatch() -> anyhow::Result<()> {
    let plugin = abi_guest().workers(2).start()?;
    assert_eq!(plugin.tick_all()?, 2);
    let (value, cas) = plugin.shared_data("k").expect("set by the ticks");
    assert_eq!(value, b"v1");
    assert_ne!(cas, 0);
    // Status 8 is CasMismatch: the guest's second write carried a version that never existed.
    assert_eq!(plugin.metric("cas_status")?, 8);
    Ok(())
}

#[test]
fn metrics_with_the_same_name_are_one_stat_across_workers() -> anyhow::Result<()> {
    let plugin = abi_guest().workers(3).start()?;
    plugin.tick_all()?;
    plugin.tick_all()?;
    assert_eq!(plugin.metric("ticks")?, 6);
    assert!(plugin.metric("no_such_metric").is_err());
    Ok(())
}

#[test]
fn http_call_to_an_unknown_cluster_is_a_bad_argument() -> anyhow::Result<()> {
    let plugin = abi_guest().start()?;
    plugin.tick_all()?;
    assert_eq!(plugin.metric("bad_cluster_status")?, 2);
    assert_eq!(
        plugin.http_calls().len(),
        1,
        "only the known cluster's call is dispatched"
    );
    Ok(())
}

#[test]
fn http_call_response_arrives_on_a_later_turn_not_during_the_dispatching_callback()
-> anyhow::Result<()> {
    let plugin = abi_guest().start()?;
    plugin.script_http_call("control-plane", Response::ok("snapshot v1"));
    plugin.tick_all()?;
    let calls = plugin.http_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].cluster, "control-plane");
    assert_eq!(calls[0].header(":path"), Some("/snap"));
    assert_eq!(calls[0].timeout, ms(1000));
    assert_eq!(
        plugin.shared_data("body"),
        None,
        "not delivered in the same turn"
    );

    assert_eq!(plugin.deliver_pending()?, 1);
    assert_eq!(
        plugin.shared_data("body").map(|(v, _)| v),
        Some(b"snapshot v1".to_vec())
    );
    assert_eq!(
        plugin.shared_data("status").map(|(v, _)| v),
        Some(b"200".to_vec())
    );
    Ok(())
}

#[test]
fn unanswered_http_call_times_out_with_envoys_504() -> anyhow::Result<()> {
    let plugin = abi_guest().start()?;
    plugin.tick_all()?;
    assert_eq!(
        plugin.deliver_pending()?,
        0,
        "nobody answered and the timeout has not passed"
    );
    plugin.advance_clock(ms(1000));
    assert_eq!(plugin.deliver_pending()?, 1);
    assert_eq!(
        plugin.shared_data("status").map(|(v, _)| v),
        Some(b"504".to_vec())
    );
    assert_eq!(
        plugin.shared_data("body").map(|(v, _)| v),
        Some(b"upstream request timeout".to_vec())
    );
    Ok(())
}

#[test]
fn refused_http_call_is_envoys_503_and_a_serving_closure_sees_the_call() -> anyhow::Result<()> {
    let plugin = abi_guest().start()?;
    plugin.serve_http_calls(|call| {
        assert_eq!(call.header(":authority"), Some("cp"));
        Outcome::Refused
    });
    plugin.tick_all()?;
    plugin.deliver_pending()?;
    assert_eq!(
        plugin.shared_data("status").map(|(v, _)| v),
        Some(b"503".to_vec())
    );
    Ok(())
}

#[test]
fn guest_logs_are_captured_with_their_level() -> anyhow::Result<()> {
    let plugin = abi_guest().workers(2).start()?;
    let logs = plugin.logs();
    assert_eq!(logs.len(), 2);
    assert!(
        logs.iter()
            .all(|l| l.level == LogLevel::Info && l.message == "configured")
    );
    assert_eq!((logs[0].worker, logs[1].worker), (0, 1));
    Ok(())
}

#[test]
fn an_unimplemented_host_call_traps_with_its_name() {
    let error = vm_start_guest(
        r#"(import "env" "proxy_grpc_call" (func $grpc (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))"#,
        "(drop (call $grpc (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))",
    )
    .start()
    .expect_err("an unimplemented host call must fail");
    let message = format!("{error:#}");
    assert!(message.contains("env.proxy_grpc_call"), "{message}");
    assert!(message.contains("proxy_on_vm_start"), "{message}");
}

#[test]
fn a_looping_guest_runs_out_of_fuel_instead_of_hanging() {
    let error = vm_start_guest("", "(loop $forever (br $forever))")
        .fuel_per_callback(1_000_000)
        .start()
        .expect_err("the loop must be stopped");
    let message = format!("{error:#}");
    assert!(message.contains("used up its fuel"), "{message}");
}

#[test]
fn a_refused_configuration_fails_start_with_the_guests_logs() {
    let wat = r#"(module
        (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (data (i32.const 0) "policy.retry: must be at most 5")
        (func (export "proxy_on_configure") (param i32 i32) (result i32)
          (drop (call $log (i32.const 4) (i32.const 0) (i32.const 31)))
          (i32.const 0)))"#;
    let error = fulcrum_wasm_host::Plugin::from_wat(wat)
        .and_then(|plugin| plugin.start())
        .expect_err("on_configure returned false");
    let message = format!("{error:#}");
    assert!(message.contains("refused its configuration"), "{message}");
    assert!(
        message.contains("policy.retry: must be at most 5"),
        "{message}"
    );
}
