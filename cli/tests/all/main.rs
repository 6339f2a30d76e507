//! The `fulcrum` binary as an operator runs it: against policy files and manifests, and
//! against a real control plane (in-process, on loopback) serving a policy file, with an
//! admin token, and polled (and answered with endpoint diagnostics) as filters do; and the checked-in JSON Schema against the
//! types and every policy in the repository.

mod endpoints;
mod policy_files;
mod policy_served;
mod proxies;
mod schema;
mod support;
