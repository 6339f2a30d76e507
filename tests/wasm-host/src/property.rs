//! Property values as Envoy serializes them for `proxy_get_property`, and property paths.
//!
//! Envoy encodes CEL values this way (`source/extensions/common/wasm/context.cc`,
//! `serializeValue`): integers and unsigned integers as 8 little-endian bytes, strings and
//! bytes raw, durations and timestamps as i64 nanoseconds, booleans as one byte.

use std::time::Duration;

/// A property value in Envoy's wire encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property(pub(crate) Vec<u8>);

impl Property {
    /// A string (`upstream.address`, `response.code_details`, `xds.cluster_name`).
    pub fn string(value: &str) -> Self {
        Self(value.as_bytes().to_vec())
    }

    /// An int or uint (`response.code`, `upstream.port`, `response.flags`).
    pub fn int(value: i64) -> Self {
        Self(value.to_le_bytes().to_vec())
    }

    /// A duration (`request.duration`), in nanoseconds.
    pub fn duration(value: Duration) -> Self {
        Self::int(i64::try_from(value.as_nanos()).unwrap_or(i64::MAX))
    }

    /// A timestamp (`request.time`), in nanoseconds since the Unix epoch.
    pub fn timestamp_nanos(nanos: u64) -> Self {
        Self::int(i64::try_from(nanos).unwrap_or(i64::MAX))
    }

    /// Raw bytes.
    pub fn bytes(value: impl Into<Vec<u8>>) -> Self {
        Self(value.into())
    }

    /// The encoded bytes the guest receives.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Envoy's legacy `response.flags` bits (`envoy/stream_info/stream_info.h`), for
/// [`crate::ResponseBuilder::flags`].
pub mod response_flags {
    /// `UF`: upstream connection failure.
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
    /// `UT`: upstream request timeout.
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
    /// `UR`: upstream remote reset.
    pub const UPSTREAM_REMOTE_RESET: u64 = 0x10;
    /// `UH`: no healthy upstream.
    pub const NO_HEALTHY_UPSTREAM: u64 = 0x2;
    /// `DC`: the downstream connection terminated.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 0x4000;
    /// `SI`: the stream idled past Envoy's stream idle timeout.
    pub const STREAM_IDLE_TIMEOUT: u64 = 0x10000;
}

/// The path key for a dotted name: `upstream.address` → `upstream\0address`, the
/// NUL-separated segments `proxy_get_property` receives.
pub(crate) fn path_key(dotted: &str) -> Vec<u8> {
    dotted.replace('.', "\0").into_bytes()
}
