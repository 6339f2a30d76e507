//! What each snapshot poll tells the control plane about the proxy, so its `GET /v1/proxies`
//! can list which proxy runs which snapshot version (issue #17: see what every proxy runs).
//!
//! Beside `If-None-Match` (the version the proxy's shared snapshot is at), a poll carries:
//!
//! - `x-fulcrum-node-id` and `x-fulcrum-node-cluster`: the Envoy node's id and cluster, read
//!   once per configuration ([`crate::input::node_identity`]), printable ASCII only, at most
//!   [`crate::input::MAX_NODE_NAME_BYTES`] each; left out when the node has none.
//! - `x-fulcrum-rejected`: the last snapshot the proxy refused, in whole or in part, as
//!   `<reason> <version>` (the version left out when unknown), at most
//!   [`MAX_REJECTED_BYTES`]. Any VM of the proxy may refuse (a publisher refusing an answer,
//!   every VM refusing a version over the table budget), while only the VM holding the poll
//!   lease polls, so the rejection goes through shared data (`fulcrum/<root_id>/rejected`,
//!   [`crate::sync::SharedKeys::record_rejection`]), read once per poll.
//!
//! The number of worker VMs is not sent: no property names Envoy's concurrency, and the VMs
//! could only count themselves through shared data that cannot forget a VM that went away
//! (shared data cannot delete a key, a reloaded VM registers anew), which would report a
//! number that is not the proxy's.
//!
//! A control plane older than this ignores the headers; a control plane that knows them
//! treats them as untrusted input.

use crate::input::header_text;

/// The header naming the proxy's Envoy node id.
pub const NODE_ID_HEADER: &str = "x-fulcrum-node-id";
/// The header naming the proxy's Envoy node cluster.
pub const NODE_CLUSTER_HEADER: &str = "x-fulcrum-node-cluster";
/// The header naming the last snapshot the proxy refused and why.
pub const REJECTED_HEADER: &str = "x-fulcrum-rejected";

/// Longest version named in `x-fulcrum-rejected`: longer ones are cut.
pub const MAX_REJECTED_VERSION_BYTES: usize = 128;

/// Longest `x-fulcrum-rejected` value: the longest reason, a space, the longest version.
pub const MAX_REJECTED_BYTES: usize = 32 + 1 + MAX_REJECTED_VERSION_BYTES;

/// Why the proxy refused a snapshot (or part of one); each has its own Envoy counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionReason {
    /// The answer exceeded `control_plane.max_snapshot_bytes`
    /// (`fulcrum_snapshot_rejected_total`).
    TooLarge,
    /// The answer was not a snapshot (`fulcrum_snapshot_rejected_total`).
    Malformed,
    /// A service of the snapshot was invalid and left out
    /// (`fulcrum_snapshot_services_skipped_total`).
    ServiceInvalid,
    /// The snapshot's policy was invalid; the one in force stays
    /// (`fulcrum_snapshot_policy_rejected_total`).
    PolicyInvalid,
    /// The snapshot's tables exceed `max_table_bytes`; the VMs keep the last version
    /// (`fulcrum_snapshot_over_table_budget_total`).
    OverTableBudget,
}

impl RejectionReason {
    /// The reason's code in `x-fulcrum-rejected`: lowercase letters and `_`.
    pub fn code(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::ServiceInvalid => "service_invalid",
            Self::PolicyInvalid => "policy_invalid",
            Self::OverTableBudget => "over_table_budget",
        }
    }
}

/// The `x-fulcrum-rejected` value of a rejection of `version` (as the control plane named
/// it): `<code> <version>`, the version cut to [`MAX_REJECTED_VERSION_BYTES`] and left out
/// when unknown or not printable ASCII.
pub fn rejected_value(reason: RejectionReason, version: Option<&[u8]>) -> String {
    match version.and_then(|version| header_text(version, MAX_REJECTED_VERSION_BYTES)) {
        Some(version) if !version.is_empty() => format!("{} {version}", reason.code()),
        _ => reason.code().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejection_reads_as_its_code_and_the_version_refused() {
        assert_eq!(
            rejected_value(RejectionReason::OverTableBudget, Some(b"7f3a")),
            "over_table_budget 7f3a"
        );
        assert_eq!(
            rejected_value(RejectionReason::Malformed, None),
            "malformed"
        );
        assert_eq!(
            rejected_value(RejectionReason::TooLarge, Some(b"v\r\n1")),
            "too_large",
            "a version that is not printable is left out"
        );
        let long = vec![b'v'; 1000];
        let value = rejected_value(RejectionReason::ServiceInvalid, Some(&long));
        assert_eq!(
            value.len(),
            "service_invalid ".len() + MAX_REJECTED_VERSION_BYTES
        );
    }

    #[test]
    fn every_code_fits_the_header_bound() {
        for reason in [
            RejectionReason::TooLarge,
            RejectionReason::Malformed,
            RejectionReason::ServiceInvalid,
            RejectionReason::PolicyInvalid,
            RejectionReason::OverTableBudget,
        ] {
            let code = reason.code();
            assert!(code.len() <= 32, "{code}");
            assert!(code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
    }
}
