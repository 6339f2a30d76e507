//! `fulcrum policy diff`, `history` and `rollback` against a running control plane.

use crate::support::{Served, fulcrum};

fn policy_yaml(failures: u32) -> String {
    format!("default:\n  outlier_detection:\n    consecutive_failures: {failures}\n")
}

#[test]
fn diff_of_the_served_policy_spelled_differently_is_empty_and_exits_zero() {
    let served = Served::start(&policy_yaml(3));
    let same = served.file(
        "same.json",
        r#"{"default": {"outlier_detection": {"consecutive_failures": 3, "base_ejection_time": "30000ms"}}}"#,
    );
    let run = served.fulcrum(&["policy", "diff", &same]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("is the policy served in snapshot"),
        "{run:?}"
    );
}

#[test]
fn diff_shows_each_changed_field_and_exits_one() {
    let served = Served::start(&policy_yaml(3));
    let edited = served.file(
        "edited.yaml",
        "default:\n  outlier_detection:\n    consecutive_failures: 4\nservices:\n  cart: {retry: 2}\n",
    );
    let run = served.fulcrum(&["policy", "diff", &edited]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.starts_with("--- served (snapshot "), "{run:?}");
    assert!(
        run.stdout
            .contains("~ default.outlier_detection.consecutive_failures: 3 -> 4\n"),
        "{run:?}"
    );
    assert!(run.stdout.contains("+ services.cart: {"), "{run:?}");

    let run = served.fulcrum(&["policy", "diff", "-o", "json", &edited]);
    assert_eq!(run.code, 1, "{run:?}");
    let report: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(
        report["changes"][0],
        serde_json::json!({
            "path": "default.outlier_detection.consecutive_failures",
            "served": 3,
            "local": 4
        })
    );
}

#[test]
fn diff_refuses_an_invalid_local_policy_exiting_two() {
    let served = Served::start(&policy_yaml(3));
    let invalid = served.file("invalid.yaml", "default: {retry: 9}\n");
    let run = served.fulcrum(&["policy", "diff", &invalid]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("default.retry"), "{run:?}");
    assert!(run.stderr.contains("fulcrum policy validate"), "{run:?}");
}

#[test]
fn history_and_rollback_restore_an_earlier_policy_as_a_new_served_version() {
    let served = Served::start(&policy_yaml(3));
    served.replace_policy(&policy_yaml(4), 2);

    let run = served.fulcrum(&["policy", "history"]);
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with("VERSION   ACCEPTED (UTC)"), "{run:?}");
    assert!(lines[1].starts_with("1 "), "{run:?}");
    assert!(
        lines[2].starts_with("2 ") && lines[2].ends_with("current"),
        "{run:?}"
    );
    assert!(lines[2].contains("file:"), "{run:?}");

    let run = served.fulcrum(&["policy", "rollback", "1"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .starts_with("policy version 1 is current again as version 3 (digest "),
        "{run:?}"
    );
    served.wait_for_versions(3);
    assert_eq!(
        served.served_policy()["default"]["outlier_detection"]["consecutive_failures"],
        3
    );

    let run = served.fulcrum(&["policy", "history", "-o", "json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let history: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    let versions: Vec<u64> = history
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|applied| applied["version"].as_u64())
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    assert_eq!(history[2]["rolled_back_from"], 1);
}

#[test]
fn rollback_to_a_version_not_kept_names_the_kept_ones_and_exits_two() {
    let served = Served::start(&policy_yaml(3));
    let run = served.fulcrum(&["policy", "rollback", "99"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("404"), "{run:?}");
    assert!(run.stderr.contains("available: [1]"), "{run:?}");
}

#[test]
fn the_admin_api_without_the_token_says_which_variable_to_set() {
    let served = Served::start(&policy_yaml(3));
    let urls = served.urls();
    let mut args: Vec<&str> = urls.iter().map(String::as_str).collect();
    args.extend(["policy", "history"]);
    let run = fulcrum(&args);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("FULCRUM_ADMIN_TOKEN"), "{run:?}");

    args.extend(["--token", "not-a-token-of-the-control-plane"]);
    let run = fulcrum(&args);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("not one of its --admin-token-file tokens"),
        "{run:?}"
    );
}

#[test]
fn an_unreachable_control_plane_is_an_error_naming_the_flag_to_check() {
    // A reserved port: no one else is handed it, and nothing listens there.
    let port = fulcrum_test_support::reserve_port().expect("a port");
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "default: {}\n").expect("write");
    let server = format!("http://127.0.0.1:{port}");
    let run = fulcrum(&[
        "--server",
        &server,
        "policy",
        "diff",
        policy.to_str().expect("utf-8"),
    ]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("cannot be reached"), "{run:?}");
    assert!(run.stderr.contains("--server"), "{run:?}");
}

#[test]
fn an_https_url_is_refused_with_the_reason() {
    let run = fulcrum(&["--admin", "https://127.0.0.1:18081", "policy", "history"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("plain http:// only"), "{run:?}");
    assert!(run.stderr.contains("--admin"), "{run:?}");
}
