//! `fulcrum policy`: validate a policy as the control plane would, diff it against the served
//! one, list the kept versions and roll back to one.
//!
//! `validate` and `diff` read files with [`document`], so a policy file and a ConfigMap
//! manifest are judged exactly as `--policy-file` and `--policy-configmap` would be;
//! `history` and `rollback` call the admin API (`fulcrum_policy::PolicyStore`'s history,
//! where a rollback is a new version, as in `helm rollback`).

mod diff;
mod document;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Subcommand;
use fulcrum_core::{Policy, PolicyError};
use fulcrum_policy::AppliedPolicy;
use serde::Serialize;

use crate::{
    Verdict,
    client::{ControlPlane, Endpoints},
    output::{Format, print_json, table},
};

/// `fulcrum policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files with the control plane's own parser and checks: every error with
    /// its field path; exit code 0 when all are valid, 1 when any is not.
    ///
    /// A file is a policy (JSON for `*.json`, YAML otherwise) or a Kubernetes manifest, whose
    /// ConfigMaps' `--key` is checked (JSON when the key ends in `.json`).
    Validate {
        /// Policy files or manifests.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The ConfigMap data key holding the policy, in a manifest.
        #[arg(long, default_value = document::DEFAULT_KEY)]
        key: String,
    },
    /// Show how a policy file differs from the policy the control plane serves (in
    /// `GET /v1/snapshot`), field by field; exit code 0 when equal, 1 when not.
    ///
    /// Compared as the filters see them, defaults filled in: spelling, key order and
    /// defaults written out or left out do not count.
    Diff {
        /// A policy file, or a manifest with one ConfigMap holding `--key`.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The ConfigMap data key holding the policy, in a manifest.
        #[arg(long, default_value = document::DEFAULT_KEY)]
        key: String,
    },
    /// List the kept policy versions, oldest first, the last current (admin API).
    History,
    /// Make a kept version current again, as a new version (admin API).
    Rollback {
        /// The kept version to restore (see `fulcrum policy history`).
        version: u64,
    },
    /// Print the policy's JSON Schema (draft 2020-12), as checked in at
    /// `docs/policy.schema.json`; editors use it to complete and check policy files.
    Schema,
}

impl PolicyCommand {
    /// Runs the command against `endpoints`, printing in `format`.
    pub fn run(self, endpoints: &Endpoints, format: Format) -> Result<Verdict> {
        match self {
            Self::Validate { files, key } => validate(&files, &key, format),
            Self::Diff { file, key } => diff_against_served(&file, &key, endpoints, format),
            Self::History => history(endpoints, format),
            Self::Rollback { version } => rollback(version, endpoints, format),
            Self::Schema => {
                print_json(&fulcrum_core::schema::policy_schema())?;
                Ok(Verdict::Yes)
            }
        }
    }
}

/// The verdict on one policy text, as `-o json` prints it.
#[derive(Debug, Serialize)]
struct Checked {
    /// Where the text was found.
    source: String,
    /// Whether the control plane would accept it.
    valid: bool,
    /// Every invalid field, with its dotted path.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<FieldError>,
    /// How many more invalid fields were found than `errors` lists (the control plane keeps
    /// the first `fulcrum_core::validate::MAX_VALIDATION_ERRORS`).
    #[serde(skip_serializing_if = "is_zero")]
    omitted_errors: usize,
    /// Why the text could not be parsed at all (syntax, unknown field, wrong type).
    #[serde(skip_serializing_if = "Option::is_none")]
    malformed: Option<Malformed>,
}

#[derive(Debug, Serialize)]
struct FieldError {
    path: String,
    message: String,
}

/// A parse error: where, when the parser knows, and what.
#[derive(Debug, Serialize)]
struct Malformed {
    line: Option<usize>,
    column: Option<usize>,
    /// The parser's message, naming the field and the location.
    message: String,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

fn check(text: &document::PolicyText) -> Checked {
    let (errors, omitted_errors, malformed) = match text.format.parse(&text.text) {
        Ok(_) => (Vec::new(), 0, None),
        Err(PolicyError::Invalid(invalid)) => (
            invalid
                .errors
                .into_iter()
                .map(|error| FieldError {
                    path: error.path,
                    message: error.message,
                })
                .collect(),
            invalid.omitted,
            None,
        ),
        Err(PolicyError::Json {
            line,
            column,
            source,
        }) => (
            Vec::new(),
            0,
            Some(Malformed {
                line: Some(line),
                column: Some(column),
                message: source.to_string(),
            }),
        ),
        Err(PolicyError::Yaml {
            line,
            column,
            source,
        }) => (
            Vec::new(),
            0,
            Some(Malformed {
                line,
                column,
                message: source.to_string(),
            }),
        ),
    };
    Checked {
        source: text.source.to_string(),
        valid: errors.is_empty() && malformed.is_none(),
        errors,
        omitted_errors,
        malformed,
    }
}

fn validate(files: &[PathBuf], key: &str, format: Format) -> Result<Verdict> {
    let mut checked = Vec::new();
    for file in files {
        checked.extend(document::read(file, key)?.iter().map(check));
    }
    match format {
        Format::Json => print_json(&checked)?,
        Format::Table => {
            for result in &checked {
                match (&result.malformed, result.valid) {
                    (Some(malformed), _) => {
                        println!("{}: malformed: {}", result.source, malformed.message)
                    }
                    (None, true) => println!("{}: valid", result.source),
                    (None, false) => {
                        println!("{}: invalid", result.source);
                        for error in &result.errors {
                            println!("  {}: {}", error.path, error.message);
                        }
                        if result.omitted_errors > 0 {
                            println!("  … and {} more invalid fields", result.omitted_errors);
                        }
                    }
                }
            }
        }
    }
    Ok(if checked.iter().all(|result| result.valid) {
        Verdict::Yes
    } else {
        Verdict::No
    })
}

/// The one valid policy in `file`.
fn local_policy(file: &std::path::Path, key: &str) -> Result<(String, Policy)> {
    let mut texts = document::read(file, key)?;
    if texts.len() != 1 {
        bail!(
            "{} holds {} policies (one per ConfigMap with key `{key}`); diff takes one",
            file.display(),
            texts.len()
        );
    }
    let text = texts.remove(0);
    match text.format.parse(&text.text) {
        Ok(policy) => Ok((text.source.to_string(), policy)),
        Err(error) => bail!(
            "{} is not a valid policy, so the control plane would refuse it (see `fulcrum policy validate`): {error}",
            text.source
        ),
    }
}

/// What `diff -o json` prints.
#[derive(Debug, Serialize)]
struct DiffReport {
    /// The snapshot version the served policy came with.
    snapshot_version: String,
    /// Where the local policy was read.
    local: String,
    /// Every field that differs, sorted by path.
    changes: Vec<diff::Change>,
}

fn diff_against_served(
    file: &std::path::Path,
    key: &str,
    endpoints: &Endpoints,
    format: Format,
) -> Result<Verdict> {
    let (source, local) = local_policy(file, key)?;
    let snapshot = ControlPlane::new(endpoints)?.snapshot()?;
    let Some(served) = snapshot.policy else {
        bail!(
            "the control plane at {} serves no policy (it runs without --policy-file or \
             --policy-configmap; the filters use the policy in their own configuration)",
            endpoints.server
        );
    };
    let report = DiffReport {
        snapshot_version: snapshot.version,
        local: source,
        changes: diff::changes(&served, &local),
    };
    match format {
        Format::Json => print_json(&report)?,
        Format::Table if report.changes.is_empty() => println!(
            "{} is the policy served in snapshot {}",
            report.local, report.snapshot_version
        ),
        Format::Table => {
            println!("--- served (snapshot {})", report.snapshot_version);
            println!("+++ {}", report.local);
            for change in &report.changes {
                println!("{}", diff::render(change));
            }
        }
    }
    Ok(if report.changes.is_empty() {
        Verdict::Yes
    } else {
        Verdict::No
    })
}

fn history(endpoints: &Endpoints, format: Format) -> Result<Verdict> {
    let history = ControlPlane::new(endpoints)?.policy_history()?;
    match format {
        Format::Json => print_json(&history)?,
        Format::Table if history.is_empty() => {
            println!("no policy accepted yet (or the control plane runs without a policy source)");
        }
        Format::Table => {
            let current = history.last().map(|applied| applied.version);
            let rows: Vec<[String; 5]> = history
                .iter()
                .map(|applied| {
                    let mut note = applied
                        .rolled_back_from
                        .map(|from| format!("rollback to {from}"))
                        .unwrap_or_default();
                    if Some(applied.version) == current {
                        note = if note.is_empty() {
                            "current".to_owned()
                        } else {
                            format!("current, {note}")
                        };
                    }
                    [
                        applied.version.to_string(),
                        accepted_at(applied),
                        applied.digest.clone(),
                        applied.origin.clone(),
                        note,
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    ["VERSION", "ACCEPTED (UTC)", "DIGEST", "ORIGIN", "NOTE"],
                    &rows
                )
            );
        }
    }
    Ok(Verdict::Yes)
}

/// When `applied` was accepted, as `2026-12-02 03:14:08`.
fn accepted_at(applied: &AppliedPolicy) -> String {
    i64::try_from(applied.accepted_at_unix_ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|at| at.strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| format!("{} ms after the epoch", applied.accepted_at_unix_ms))
}

fn rollback(version: u64, endpoints: &Endpoints, format: Format) -> Result<Verdict> {
    let applied = ControlPlane::new(endpoints)?.rollback(version)?;
    match format {
        Format::Json => print_json(&applied)?,
        Format::Table => println!(
            "policy version {version} is current again as version {} (digest {})",
            applied.version, applied.digest
        ),
    }
    Ok(Verdict::Yes)
}
