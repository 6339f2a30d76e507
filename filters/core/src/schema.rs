//! The policy's JSON Schema (feature `schema`), derived from the policy types themselves.
//!
//! Editors (VS Code and others through yaml-language-server) and CI linters complete and
//! check a policy against it before the control plane sees it. Derived with `schemars` from
//! the same types and serde attributes the control plane parses with, so the field names,
//! tags, defaults and descriptions (the doc comments) cannot drift from the code; durations
//! are strings matching [`crate::duration::PATTERN`]. Ranges and cross-field rules live in
//! [`Policy::validate`](crate::Policy::validate) and are stated in the descriptions only: a
//! policy the schema accepts can still be refused. The reverse holds in one place only: the
//! schema refuses whitespace around a duration. The filter never enables this feature, so
//! the wasm does not carry schemars. `docs/policy.schema.json` is this schema, checked in and
//! kept equal by a test of the `fulcrum` CLI, whose `fulcrum policy schema` prints it.

use schemars::{Schema, generate::SchemaSettings};

use crate::Policy;

/// Where the checked-in schema is published, its `$id`.
pub const SCHEMA_ID: &str =
    "https://raw.githubusercontent.com/fulcrum-lb/fulcrum/main/docs/policy.schema.json";

/// The JSON Schema (draft 2020-12) of a policy document as the control plane reads it: what
/// `Policy::from_json` and `Policy::from_yaml` accept before range validation.
pub fn policy_schema() -> Schema {
    let mut schema = SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<Policy>();
    schema.insert("$id".to_owned(), SCHEMA_ID.into());
    schema.insert("title".to_owned(), "fulcrum balancing policy".into());
    schema
}
