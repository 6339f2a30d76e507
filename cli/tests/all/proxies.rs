//! `fulcrum proxies` against a running control plane whose snapshot two proxies poll.
//!
//! The polls are what a filter sends (`GET /v1/snapshot` naming its node and the version it
//! is at); the e2e suite runs the same through real Envoys.

use crate::support::{Served, fulcrum};

#[test]
fn proxies_lists_each_polling_proxy_current_or_behind_and_filters_by_state() {
    let served = Served::start("default: {retry: 1}\n");
    let current = served.snapshot_version();
    served.poll_as("sidecar~10.0.0.7~cart-1.shop", Some(&current));
    served.poll_as("sidecar~10.0.0.8~cart-2.shop", Some("an-older-version"));

    let run = served.fulcrum(&["proxies"]);
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines[0].contains(&format!("serves snapshot {}", &current[..12])),
        "{run:?}"
    );
    assert!(lines[1].starts_with("NODE"), "{run:?}");
    assert!(
        lines[2].starts_with("sidecar~10.0.0.7~cart-1.shop") && lines[2].contains(" current "),
        "{run:?}"
    );
    assert!(
        lines[3].starts_with("sidecar~10.0.0.8~cart-2.shop") && lines[3].contains(" behind "),
        "{run:?}"
    );

    let run = served.fulcrum(&["proxies", "--state", "behind", "-o", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let listed: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(listed["snapshot_version"], current.as_str());
    let proxies = listed["proxies"].as_array().expect("a list");
    assert_eq!(proxies.len(), 1, "{listed}");
    assert_eq!(proxies[0]["node_id"], "sidecar~10.0.0.8~cart-2.shop");
    assert_eq!(proxies[0]["version"], "an-older-version");
}

#[test]
fn proxies_wait_exits_zero_once_every_polling_proxy_is_current_and_one_when_some_stay_behind() {
    let served = Served::start("default: {retry: 1}\n");
    let current = served.snapshot_version();
    let node = "sidecar~10.0.0.7~cart-1.shop";
    let behind = served.keep_polling_as(node, "an-older-version");

    let run = served.fulcrum(&["proxies", "--wait", "1"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("1 proxies still behind"), "{run:?}");

    // The proxy catches up while the command waits.
    let waiting = served.fulcrum_in_background(&["proxies", "--wait", "20"]);
    std::thread::sleep(std::time::Duration::from_millis(700));
    drop(behind);
    let _current = served.keep_polling_as(node, &current);
    let run = waiting.finish();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains(" current "), "{run:?}");
}

#[test]
fn proxies_says_so_when_no_proxy_polled() {
    let served = Served::start("default: {retry: 1}\n");
    let run = served.fulcrum(&["proxies"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("no proxy has polled this replica"),
        "{run:?}"
    );
}

#[test]
fn proxies_names_the_server_flag_when_the_control_plane_is_unreachable() {
    let run = fulcrum(&[
        "proxies",
        "--server",
        "http://127.0.0.1:1",
        "--timeout",
        "2",
    ]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--server"), "{run:?}");
}
