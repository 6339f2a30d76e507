//! The real filter against hostile request input: for every header and property it reads,
//! the ways a client (or a misbehaving peer) can send it — bytes 0x80..=0xFF, a repeated
//! header, an upper-case name, a 60 KiB value — must not trap, must never let a client's
//! override header reach the upstream, must be counted when unusable, and must leave the
//! filter picking for the requests that follow. Also the control plane's snapshot response
//! with a `:status` or body that is not UTF-8, and a reset snapshot call.

use fulcrum_core::OVERRIDE_HEADER;
use fulcrum_wasm_host::{Outcome, Plugin, Request, Response};

use crate::test_support::{filter, ms};

const ENDPOINTS: [&str; 3] = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"];
/// A value far above every cap, just under Envoy's default 60 KiB header limit per request.
const HUGE: usize = 60 << 10;

type Headers = Vec<(Vec<u8>, Vec<u8>)>;

fn invalid(input: &str) -> String {
    format!("fulcrum_request_input_invalid_total.input.{input}")
}

/// A plugin with the three static endpoints for service `checkout`, `extra` merged into the
/// configuration's top level and `policy` as the default policy.
fn plugin(extra: &str, policy: &str) -> Plugin {
    let endpoints: Vec<String> = ENDPOINTS
        .iter()
        .map(|address| format!(r#"{{"address": "{address}"}}"#))
        .collect();
    let config = format!(
        r#"{{{extra} "endpoints": {{"checkout": [{}]}}, "policy": {{"default": {policy}}}}}"#,
        endpoints.join(", ")
    );
    filter()
        .configure(config)
        .start()
        .expect("the filter starts")
}

fn round_robin() -> Plugin {
    plugin("", r#"{"load_balancer": {"type": "round_robin"}}"#)
}

/// The ways to send header `name`, with `valid` as its well-formed value: label, headers,
/// and whether the filter must count the input as invalid.
fn hostile_variants(name: &str, valid: &[u8]) -> Vec<(&'static str, Headers, bool)> {
    let header = |name: &[u8], value: &[u8]| (name.to_vec(), value.to_vec());
    let high_bytes: Vec<u8> = (0x80..=0xff).collect();
    vec![
        (
            "bytes 0x80..=0xff",
            vec![header(name.as_bytes(), &high_bytes)],
            true,
        ),
        (
            "a repeated header",
            vec![
                header(name.as_bytes(), valid),
                header(name.as_bytes(), b"\xff second"),
            ],
            false,
        ),
        (
            "an upper-case name",
            vec![header(name.to_ascii_uppercase().as_bytes(), valid)],
            false,
        ),
        (
            "a 60 KiB value",
            vec![header(name.as_bytes(), &vec![b'a'; HUGE])],
            true,
        ),
    ]
}

/// Sends a request for `checkout` (by `:authority`) with `headers` added, to worker 0.
fn send<'p>(plugin: &'p Plugin, headers: &Headers) -> anyhow::Result<Request<'p>> {
    let mut builder = plugin.worker(0).request().header(":authority", "checkout");
    for (name, value) in headers {
        builder = builder.header_bytes(name, value);
    }
    builder.send_headers()
}

/// Every entry named `name` (any case) the filter left in the request.
fn entries(request: &Request<'_>, name: &str) -> Vec<Vec<u8>> {
    request
        .request_headers_bytes()
        .into_iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, value)| value)
        .collect()
}

/// The filter's pick in `name`: exactly one entry, an endpoint of `checkout`.
fn pick_in(request: &Request<'_>, name: &str) -> anyhow::Result<String> {
    let values = entries(request, name);
    anyhow::ensure!(
        values.len() == 1,
        "expected the filter's one {name}, found {values:?}"
    );
    let pick = String::from_utf8(values[0].clone())?;
    anyhow::ensure!(
        pick.split(',').all(|address| ENDPOINTS.contains(&address)),
        "{name} is {pick:?}, not the filter's pick"
    );
    Ok(pick)
}

/// Sends an ordinary request and answers it: the filter must still pick.
fn ordinary_request_is_picked(plugin: &Plugin) -> anyhow::Result<String> {
    let mut request = send(plugin, &Vec::new())?;
    let pick = pick_in(&request, OVERRIDE_HEADER)
        .map_err(|error| error.context(format!("logs:\n{}", plugin.logs_text())))?;
    request.respond(200).upstream(&pick).finish()?;
    Ok(pick)
}

/// Runs every hostile variant of header `name` through `plugin`, answering each request, and
/// checks the filter kept picking. Returns how many variants were invalid input.
fn survives_every_variant(
    plugin: &Plugin,
    name: &str,
    valid: &[u8],
    check: impl Fn(&str, &Request<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut invalid = 0;
    for (label, headers, counted) in hostile_variants(name, valid) {
        let mut request = send(plugin, &headers)?;
        check(label, &request).map_err(|error| error.context(format!("with {label}")))?;
        request.respond(200).finish()?;
        invalid += u64::from(counted);
        ordinary_request_is_picked(plugin)?;
    }
    Ok(invalid)
}

#[test]
fn client_override_header_in_any_form_is_stripped_and_replaced_by_the_pick() -> anyhow::Result<()> {
    let plugin = round_robin();
    survives_every_variant(&plugin, OVERRIDE_HEADER, b"6.6.6.6:1", |_, request| {
        pick_in(request, OVERRIDE_HEADER).map(drop)
    })?;
    assert_eq!(plugin.metric("fulcrum_override_header_stripped_total")?, 4);
    Ok(())
}

#[test]
fn custom_override_header_and_the_default_name_are_both_stripped() -> anyhow::Result<()> {
    let plugin = plugin(
        r#""override_header": "x-pick","#,
        r#"{"load_balancer": {"type": "round_robin"}}"#,
    );
    for (label, mut headers, _) in hostile_variants("x-pick", b"6.6.6.6:1") {
        headers.extend(
            hostile_variants(OVERRIDE_HEADER, b"6.6.6.6:2")
                .into_iter()
                .flat_map(|v| v.1),
        );
        let mut request = send(&plugin, &headers)?;
        let pick = pick_in(&request, "x-pick").map_err(|e| e.context(label))?;
        assert_eq!(
            entries(&request, OVERRIDE_HEADER),
            Vec::<Vec<u8>>::new(),
            "{label}"
        );
        request.respond(200).upstream(&pick).finish()?;
    }
    assert_eq!(plugin.metric("fulcrum_override_header_stripped_total")?, 4);
    Ok(())
}

/// The sticky session token from a `Set-Cookie: fulcrum-session=<token>; …`.
fn session_token(set_cookie: &str) -> anyhow::Result<String> {
    set_cookie
        .strip_prefix("fulcrum-session=")
        .and_then(|rest| rest.split(';').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("not a session cookie: {set_cookie}"))
}

/// A sticky plugin and one session: the token and the endpoint it names.
fn sticky_session() -> anyhow::Result<(Plugin, String, String)> {
    let plugin = plugin(
        "",
        r#"{"load_balancer": {"type": "sticky", "fallback": {"type": "round_robin"}}}"#,
    );
    let mut request = send(&plugin, &Vec::new())?;
    let endpoint = pick_in(&request, OVERRIDE_HEADER)?;
    request.respond(200).upstream(&endpoint).finish()?;
    let set_cookie = request
        .response_header("set-cookie")
        .ok_or_else(|| anyhow::anyhow!("no session cookie"))?;
    Ok((plugin, session_token(&set_cookie)?, endpoint))
}

#[test]
fn sticky_cookie_in_any_form_never_traps_and_unusable_ones_are_counted() -> anyhow::Result<()> {
    let (plugin, token, endpoint) = sticky_session()?;
    let valid = format!("fulcrum-session={token}");
    let invalid_count = survives_every_variant(&plugin, "cookie", valid.as_bytes(), |label, r| {
        let pick = pick_in(r, OVERRIDE_HEADER)?;
        if matches!(label, "a repeated header" | "an upper-case name") {
            anyhow::ensure!(
                pick == endpoint,
                "session not followed: {pick} != {endpoint}"
            );
        }
        Ok(())
    })?;
    assert_eq!(plugin.metric(&invalid("cookie"))?, invalid_count);
    Ok(())
}

#[test]
fn cookie_header_of_8_kib_is_used_and_one_byte_more_is_ignored_and_counted() -> anyhow::Result<()> {
    let (plugin, token, endpoint) = sticky_session()?;
    let cookie = |len: usize| {
        let mut cookie = format!("fulcrum-session={token}; pad=").into_bytes();
        cookie.resize(len, b'p');
        vec![(b"cookie".to_vec(), cookie)]
    };
    let mut at_cap = send(&plugin, &cookie(8 << 10))?;
    assert_eq!(pick_in(&at_cap, OVERRIDE_HEADER)?, endpoint);
    at_cap.respond(200).upstream(&endpoint).finish()?;
    assert_eq!(at_cap.response_header("set-cookie"), None, "session kept");
    assert_eq!(plugin.metric(&invalid("cookie"))?, 0);

    let mut over = send(&plugin, &cookie((8 << 10) + 1))?;
    let pick = pick_in(&over, OVERRIDE_HEADER)?;
    over.respond(200).upstream(&pick).finish()?;
    assert!(
        over.response_header("set-cookie").is_some(),
        "an ignored cookie starts a new session"
    );
    assert_eq!(plugin.metric(&invalid("cookie"))?, 1);
    Ok(())
}

#[test]
fn hash_cookie_in_any_form_never_traps_and_unusable_ones_get_a_new_cookie() -> anyhow::Result<()> {
    let plugin = plugin(
        "",
        r#"{"load_balancer": {"type": "ring_hash", "hash_on": {"cookie": {"name": "user"}}}}"#,
    );
    let mut first = send(&plugin, &vec![(b"cookie".to_vec(), b"user=alice".to_vec())])?;
    let alice = pick_in(&first, OVERRIDE_HEADER)?;
    first.respond(200).upstream(&alice).finish()?;
    let invalid_count = survives_every_variant(&plugin, "cookie", b"user=alice", |label, r| {
        let pick = pick_in(r, OVERRIDE_HEADER)?;
        if matches!(label, "a repeated header" | "an upper-case name") {
            anyhow::ensure!(pick == alice, "hash key not read: {pick} != {alice}");
        }
        Ok(())
    })?;
    assert_eq!(plugin.metric(&invalid("cookie"))?, invalid_count);
    Ok(())
}

#[test]
fn hash_header_in_any_form_never_traps_and_the_first_value_is_the_key() -> anyhow::Result<()> {
    let plugin = plugin(
        "",
        r#"{"load_balancer": {"type": "ring_hash", "hash_on": {"header": "x-user"}}}"#,
    );
    let mut first = send(&plugin, &vec![(b"x-user".to_vec(), b"alice".to_vec())])?;
    let alice = pick_in(&first, OVERRIDE_HEADER)?;
    first.respond(200).upstream(&alice).finish()?;
    let invalid_count = survives_every_variant(&plugin, "x-user", b"alice", |label, r| {
        let pick = pick_in(r, OVERRIDE_HEADER)?;
        if matches!(label, "a repeated header" | "an upper-case name") {
            anyhow::ensure!(pick == alice, "hash key not read: {pick} != {alice}");
        }
        Ok(())
    })?;
    assert_eq!(plugin.metric(&invalid("hash_header"))?, invalid_count);
    Ok(())
}

#[test]
fn client_key_in_any_form_never_traps_and_unusable_ones_share_the_service_bucket()
-> anyhow::Result<()> {
    let plugin = plugin(
        "",
        r#"{"load_balancer": {"type": "round_robin"},
            "rate_limit": {"requests_per_second": 1000, "burst": 1000, "client_key_header": "x-api-key"}}"#,
    );
    let invalid_count = survives_every_variant(&plugin, "x-api-key", b"alice", |_, r| {
        pick_in(r, OVERRIDE_HEADER).map(drop)
    })?;
    assert_eq!(plugin.metric(&invalid("client_key"))?, invalid_count);
    Ok(())
}

#[test]
fn unusable_client_key_is_limited_with_the_keyless_requests() -> anyhow::Result<()> {
    let plugin = plugin(
        "",
        r#"{"load_balancer": {"type": "round_robin"},
            "rate_limit": {"requests_per_second": 1, "burst": 1, "client_key_header": "x-api-key"}}"#,
    );
    let key = |value: &[u8]| vec![(b"x-api-key".to_vec(), value.to_vec())];
    let mut keyless = send(&plugin, &Vec::new())?;
    pick_in(&keyless, OVERRIDE_HEADER)?;
    keyless.respond(200).finish()?;
    // The service bucket is empty now; a key that is not UTF-8 is no key at all.
    let mut unusable = send(&plugin, &key(b"\xffalice"))?;
    assert_eq!(
        unusable.local_response().map(|reply| reply.status),
        Some(429)
    );
    assert_eq!(entries(&unusable, OVERRIDE_HEADER), Vec::<Vec<u8>>::new());
    unusable.reset()?;
    // A usable key does not lift the service limit either: every keyed request also takes
    // a token from the service bucket.
    let mut limited = send(&plugin, &key(b"alice"))?;
    assert_eq!(
        limited.local_response().map(|reply| reply.status),
        Some(429)
    );
    limited.reset()?;
    plugin.advance_clock(std::time::Duration::from_secs(1));
    let mut alice = send(&plugin, &key(b"alice"))?;
    pick_in(&alice, OVERRIDE_HEADER)?;
    alice.respond(200).finish()?;
    assert_eq!(plugin.metric(&invalid("client_key"))?, 1);
    Ok(())
}

/// Checks a service source: every variant of `name` never traps and strips the override
/// header; unusable names fail open (`no_service`), counted under `label`.
fn service_source_survives(plugin: &Plugin, name: &str, label: &str) -> anyhow::Result<()> {
    let mut unusable = 0;
    for (variant, mut headers, counted) in hostile_variants(name, b"checkout") {
        headers.push((OVERRIDE_HEADER.as_bytes().to_vec(), b"6.6.6.6:1".to_vec()));
        // Envoy routed the request for checkout to its cluster, whatever the client sent.
        let mut builder = plugin.worker(0).request().cluster("checkout");
        for (name, value) in &headers {
            builder = builder.header_bytes(name, value);
        }
        let mut request = builder.send_headers()?;
        if counted {
            assert_eq!(
                entries(&request, OVERRIDE_HEADER),
                Vec::<Vec<u8>>::new(),
                "{variant}"
            );
            unusable += 1;
        } else {
            pick_in(&request, OVERRIDE_HEADER).map_err(|e| e.context(variant))?;
        }
        request.respond(200).finish()?;
    }
    assert_eq!(plugin.metric(&invalid(label))?, unusable);
    assert_eq!(
        plugin.metric("fulcrum_fail_open_total.reason.no_service")?,
        unusable
    );
    assert_eq!(plugin.metric("fulcrum_override_header_stripped_total")?, 4);
    Ok(())
}

#[test]
fn authority_in_any_form_never_traps_and_an_unusable_one_fails_open() -> anyhow::Result<()> {
    let plugin = plugin(
        r#""service": {"from": "authority"},"#,
        r#"{"load_balancer": {"type": "round_robin"}}"#,
    );
    service_source_survives(&plugin, ":authority", "authority")?;
    let mut request = plugin
        .worker(0)
        .request()
        .header(":authority", "checkout:8080")
        .send_headers()?;
    pick_in(&request, OVERRIDE_HEADER)?;
    request.respond(200).finish()?;
    Ok(())
}

#[test]
fn service_header_in_any_form_never_traps_and_an_unusable_one_fails_open() -> anyhow::Result<()> {
    let plugin = plugin(
        r#""service": {"from": "header", "name": "x-service"},"#,
        r#"{"load_balancer": {"type": "round_robin"}}"#,
    );
    service_source_survives(&plugin, "x-service", "service")?;
    let mut request = plugin
        .worker(0)
        .request()
        .header("x-service", "checkout")
        .cluster("checkout")
        .send_headers()?;
    pick_in(&request, OVERRIDE_HEADER)?;
    request.respond(200).finish()?;
    Ok(())
}

#[test]
fn route_cluster_property_that_is_not_utf8_or_too_long_fails_open_and_is_counted()
-> anyhow::Result<()> {
    use fulcrum_wasm_host::Property;
    let plugin = plugin(
        r#""service": {"from": "route_cluster"},"#,
        r#"{"load_balancer": {"type": "round_robin"}}"#,
    );
    for cluster in [vec![0xc3, 0x28], vec![b'c'; HUGE]] {
        let mut request = plugin
            .worker(0)
            .request()
            .header(OVERRIDE_HEADER, "6.6.6.6:1")
            .property("xds.cluster_name", Property::bytes(cluster))
            .send_headers()?;
        assert_eq!(entries(&request, OVERRIDE_HEADER), Vec::<Vec<u8>>::new());
        request.respond(200).finish()?;
    }
    assert_eq!(plugin.metric(&invalid("route_cluster"))?, 2);
    let mut request = plugin
        .worker(0)
        .request()
        .cluster("checkout")
        .send_headers()?;
    pick_in(&request, OVERRIDE_HEADER)?;
    request.respond(200).finish()?;
    Ok(())
}

#[test]
fn source_address_that_is_not_an_address_is_counted_and_hashed_at_random() -> anyhow::Result<()> {
    use fulcrum_wasm_host::Property;
    let plugin = plugin("", r#"{"load_balancer": {"type": "maglev"}}"#);
    for source in [
        b"\xff\xfe:80".to_vec(),
        b"/var/run/envoy.sock".to_vec(),
        vec![b'1'; HUGE],
    ] {
        let mut request = plugin
            .worker(0)
            .request()
            .header(":authority", "checkout")
            .property("source.address", Property::bytes(source))
            .send_headers()?;
        pick_in(&request, OVERRIDE_HEADER)?;
        request.respond(200).finish()?;
    }
    assert_eq!(plugin.metric(&invalid("source_address"))?, 3);
    ordinary_request_is_picked(&plugin)?;
    Ok(())
}

#[test]
fn response_properties_of_the_wrong_shape_are_counted_and_never_trap() -> anyhow::Result<()> {
    use fulcrum_wasm_host::Property;
    let plugin = round_robin();
    // A failure reads the response flags (a success from the pick does not need them).
    let mut request = send(&plugin, &Vec::new())?;
    request
        .respond(503)
        .property("response.flags", Property::bytes(vec![0xff; 3]))
        .property(
            "upstream.address",
            Property::bytes(b"\xff10.0.0.1:8080".to_vec()),
        )
        .finish()?;
    let mut request = send(&plugin, &Vec::new())?;
    request
        .respond(200)
        .property("upstream.address", Property::string("not an address"))
        .finish()?;
    // `response.code` is read only for a stream that ends without response headers (the
    // status of one that has them is its `:status`).
    let mut request = plugin
        .worker(0)
        .request()
        .header(":authority", "checkout")
        .property("response.code", Property::bytes(b"\xc8\x00".to_vec()))
        .send_headers()?;
    request.reset()?;
    assert_eq!(plugin.metric(&invalid("response_code"))?, 1);
    assert_eq!(plugin.metric(&invalid("response_flags"))?, 1);
    assert_eq!(plugin.metric(&invalid("upstream_address"))?, 2);
    ordinary_request_is_picked(&plugin)?;
    Ok(())
}

const CONTROL_PLANE: &str = "fulcrum_control_plane";

/// One poll: the next snapshot call is answered with `outcome`, delivered and applied.
fn poll(plugin: &Plugin, outcome: impl Into<Outcome>) -> anyhow::Result<()> {
    plugin.script_http_call(CONTROL_PLANE, outcome);
    plugin.advance_clock(ms(1_000));
    plugin.tick_all()?; // the lease winner dispatches the call
    plugin.tick_all()?; // delivered; a new snapshot is published and applied
    Ok(())
}

#[test]
fn snapshot_response_that_is_not_utf8_or_was_reset_keeps_the_last_good_snapshot()
-> anyhow::Result<()> {
    let plugin = filter()
        .configure(
            r#"{"control_plane": {"cluster": "fulcrum_control_plane", "poll_interval": "1s"}, "only_services": ["*"],
                "policy": {"default": {"load_balancer": {"type": "round_robin"}}}}"#,
        )
        .cluster(CONTROL_PLANE)
        .start()?;
    let good = r#"{"version": "v1", "services": {"checkout": {"endpoints": [
        {"address": "10.0.0.1:8080"}, {"address": "10.0.0.2:8080"}]}}}"#;
    poll(&plugin, Response::ok(good))?;
    assert_eq!(plugin.metric("fulcrum_snapshot_updates_total")?, 1);

    poll(
        &plugin,
        Response::raw_status(b"\xff\x802".to_vec()).body(good),
    )?;
    poll(&plugin, Response::raw_status(vec![b'2'; HUGE]))?;
    assert_eq!(plugin.metric("fulcrum_snapshot_fetch_failures_total")?, 2);
    assert!(
        plugin.logged(fulcrum_wasm_host::LogLevel::Warn, r#"status "\xff\x802""#),
        "the status is logged escaped:\n{}",
        plugin.logs_text()
    );

    poll(&plugin, Response::ok(b"{\"version\": \"\xff\"}".to_vec()))?;
    poll(&plugin, Response::ok(vec![0xfe; 4096]))?;
    assert_eq!(plugin.metric("fulcrum_snapshot_rejected_total")?, 2);

    // A reset call has no response at all: Envoy refuses header reads then.
    poll(&plugin, Outcome::Reset)?;
    assert_eq!(plugin.metric("fulcrum_snapshot_fetch_failures_total")?, 3);
    assert!(plugin.logged(fulcrum_wasm_host::LogLevel::Warn, "no response (reset)"));

    assert_eq!(plugin.metric("fulcrum_snapshot_updates_total")?, 1);
    ordinary_request_is_picked(&plugin)?;
    Ok(())
}
