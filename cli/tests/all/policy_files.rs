//! `fulcrum policy validate` on files: the control plane's verdict, every error with its path,
//! and exit codes a CI job can use.

use crate::support::{fulcrum, repository};

fn temp_file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write");
    path.to_str().expect("utf-8 path").to_owned()
}

#[test]
fn validate_accepts_the_shipped_configmap_and_exits_zero() {
    let manifest = repository().join("istio/control-plane/policy-configmap.yaml");
    let run = fulcrum(&["policy", "validate", manifest.to_str().expect("utf-8")]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains("(ConfigMap fulcrum-system/fulcrum-policy, key policy.yaml): valid"),
        "{run:?}"
    );
}

#[test]
fn validate_lists_every_invalid_field_with_its_path_and_exits_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = temp_file(&dir, "good.json", r#"{"default": {"retry": 1}}"#);
    let bad = temp_file(
        &dir,
        "bad.yaml",
        "services:\n  checkout:\n    retry: 9\n    outlier_detection: {max_ejection_percent: 150}\n",
    );
    let run = fulcrum(&["policy", "validate", &good, &bad]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains(&format!("{good}: valid")), "{run:?}");
    assert!(run.stdout.contains(&format!("{bad}: invalid")), "{run:?}");
    assert!(
        run.stdout.contains(
            "  services.checkout.outlier_detection.max_ejection_percent: must be 0..=100, got 150"
        ),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("  services.checkout.retry: "),
        "{run:?}"
    );
}

#[test]
fn validate_reports_a_malformed_policy_with_its_location() {
    let dir = tempfile::tempdir().expect("tempdir");
    let typo = temp_file(&dir, "typo.yaml", "default:\n  retri: 1\n");
    let run = fulcrum(&["policy", "validate", &typo]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains(&format!("{typo}: malformed")),
        "{run:?}"
    );
    assert!(run.stdout.contains("unknown field `retri`"), "{run:?}");
    assert!(run.stdout.contains("line 2"), "{run:?}");

    let run = fulcrum(&["policy", "validate", "-o", "json", &typo]);
    assert_eq!(run.code, 1, "{run:?}");
    let results: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(results[0]["malformed"]["line"], 2, "{results}");
    assert_eq!(results[0]["malformed"]["column"], 3, "{results}");
}

#[test]
fn validate_as_json_gives_each_error_as_path_and_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = temp_file(&dir, "bad.json", r#"{"default": {"retry": 9}}"#);
    let run = fulcrum(&["policy", "validate", "-o", "json", &bad]);
    assert_eq!(run.code, 1, "{run:?}");
    let results: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(results[0]["source"], bad.as_str());
    assert_eq!(results[0]["valid"], false);
    assert_eq!(results[0]["errors"][0]["path"], "default.retry");
    assert!(
        results[0]["errors"][0]["message"]
            .as_str()
            .is_some_and(|message| message.contains("got 9")),
        "{results}"
    );
}

#[test]
fn validate_reads_the_configmap_key_named_by_key_as_json_when_it_ends_in_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = temp_file(
        &dir,
        "configmap.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: p, namespace: ns}\ndata:\n  \
         policy.json: '{\"default\": {\"retry\": 9}}'\n",
    );
    let run = fulcrum(&["policy", "validate", "--key", "policy.json", &manifest]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout
            .contains("(ConfigMap ns/p, key policy.json): invalid\n  default.retry:"),
        "{run:?}"
    );
}

#[test]
fn validate_exits_two_when_a_file_cannot_be_read() {
    let run = fulcrum(&["policy", "validate", "/nonexistent/policy.yaml"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("cannot read /nonexistent/policy.yaml"),
        "{run:?}"
    );
}

#[test]
fn validate_without_files_is_a_usage_error_exiting_two() {
    let run = fulcrum(&["policy", "validate"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("<FILE>"), "{run:?}");
}

#[test]
fn every_command_has_help() {
    for command in [
        &["--help"][..],
        &["policy", "--help"],
        &["policy", "validate", "--help"],
        &["policy", "diff", "--help"],
        &["policy", "history", "--help"],
        &["policy", "rollback", "--help"],
        &["policy", "schema", "--help"],
    ] {
        let run = fulcrum(command);
        assert_eq!(run.code, 0, "{command:?}: {run:?}");
        assert!(
            run.stdout.contains("Usage: fulcrum"),
            "{command:?}: {run:?}"
        );
    }
}
