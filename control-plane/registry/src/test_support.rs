//! Shared fixtures for the unit tests.

use crate::{admission::Limits, model::InstanceSpec, view::Record};

/// Limits explicitly allowing loopback addresses, where the tests' instances live.
pub fn loopback() -> Limits {
    Limits::allowing(vec!["127.0.0.0/8".parse().expect("range")])
}

/// A minimal valid spec of `service` at 127.0.0.1:`port`.
pub fn spec(service: &str, id: &str, port: u16) -> InstanceSpec {
    InstanceSpec {
        name: service.into(),
        id: id.into(),
        address: "127.0.0.1".into(),
        port: u32::from(port),
        ..InstanceSpec::default()
    }
}

/// A record of `spec` owned by `alice`.
pub fn record(spec: InstanceSpec) -> Record {
    Record {
        registration: spec.validate().expect("valid spec"),
        owner: "alice".into(),
        registered_at_unix_ms: 1,
        lease: 0,
        mod_revision: 0,
    }
}
