//! The proxy-wasm ABI 0.2.1 vocabulary: status codes, enums passed across the boundary and the
//! wire formats of header maps and property paths.
//!
//! Values follow the spec (`proxy-wasm/spec`, `abi-versions/v0.2.1`) and the numbering of
//! proxy-wasm-cpp-host's `WasmResult`, which Envoy uses.

/// A `proxy_status_t` returned by every host call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    /// Envoy's status after an http call was reset (no response at all).
    BrokenConnection = 11,
}

impl Status {
    /// The i32 the guest receives.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// What a guest callback asked the host to do with the stream (`proxy_action_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Continue processing (0).
    Continue,
    /// Stop iteration until the guest calls `proxy_continue_stream` (1).
    Pause,
}

impl Action {
    pub(crate) fn from_guest(value: i32) -> anyhow::Result<Self> {
        match value {
            0 => Ok(Self::Continue),
            1 => Ok(Self::Pause),
            other => anyhow::bail!("the guest returned {other}, which is not a proxy_action_t"),
        }
    }
}

/// Log levels (`proxy_log_level_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub(crate) fn from_guest(value: i32) -> Option<Self> {
        Some(match value {
            0 => Self::Trace,
            1 => Self::Debug,
            2 => Self::Info,
            3 => Self::Warn,
            4 => Self::Error,
            5 => Self::Critical,
            _ => return None,
        })
    }
}

/// Header maps (`proxy_map_type_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    HttpCallResponseHeaders,
    HttpCallResponseTrailers,
}

impl MapType {
    pub(crate) fn from_guest(value: i32) -> Option<Self> {
        Some(match value {
            0 => Self::RequestHeaders,
            1 => Self::RequestTrailers,
            2 => Self::ResponseHeaders,
            3 => Self::ResponseTrailers,
            6 => Self::HttpCallResponseHeaders,
            7 => Self::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// Buffers (`proxy_buffer_type_t`) this host serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    RequestBody,
    ResponseBody,
    HttpCallResponseBody,
    VmConfiguration,
    PluginConfiguration,
}

impl BufferType {
    pub(crate) fn from_guest(value: i32) -> Option<Self> {
        Some(match value {
            0 => Self::RequestBody,
            1 => Self::ResponseBody,
            4 => Self::HttpCallResponseBody,
            6 => Self::VmConfiguration,
            7 => Self::PluginConfiguration,
            _ => return None,
        })
    }
}

/// Stream directions (`proxy_stream_type_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamType {
    Request,
    Response,
    Downstream,
    Upstream,
}

impl StreamType {
    pub(crate) fn from_guest(value: i32) -> Option<Self> {
        Some(match value {
            0 => Self::Request,
            1 => Self::Response,
            2 => Self::Downstream,
            3 => Self::Upstream,
            _ => return None,
        })
    }
}

/// Metric kinds (`proxy_metric_type_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

impl MetricType {
    pub(crate) fn from_guest(value: i32) -> Option<Self> {
        Some(match value {
            0 => Self::Counter,
            1 => Self::Gauge,
            2 => Self::Histogram,
            _ => return None,
        })
    }
}

/// Serializes header pairs the way proxy-wasm does: a u32 count, then a (name length, value
/// length) u32 pair per entry, then each name and value followed by a NUL byte; all
/// little-endian. Names and values are bytes: the format carries their lengths.
pub(crate) fn encode_map(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let payload: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut bytes = Vec::with_capacity(4 + pairs.len() * 8 + payload);
    bytes.extend_from_slice(&len_u32(pairs.len()).to_le_bytes());
    for (name, value) in pairs {
        bytes.extend_from_slice(&len_u32(name.len()).to_le_bytes());
        bytes.extend_from_slice(&len_u32(value.len()).to_le_bytes());
    }
    for (name, value) in pairs {
        bytes.extend_from_slice(name);
        bytes.push(0);
        bytes.extend_from_slice(value);
        bytes.push(0);
    }
    bytes
}

/// Parses the format of [`encode_map`]; `None` when the bytes are truncated. Names and values
/// may be any bytes, as in Envoy. An empty slice is an empty map (the SDK sends one for
/// `vec![]`).
pub(crate) fn decode_map(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let read_u32 = |at: usize| -> Option<usize> {
        let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(raw)).ok()
    };
    let count = read_u32(0)?;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut pairs = Vec::with_capacity(count.min(1024));
    for index in 0..count {
        let name_len = read_u32(4 + index * 8)?;
        let value_len = read_u32(8 + index * 8)?;
        let name = bytes.get(data..data.checked_add(name_len)?)?;
        data += name_len + 1;
        let value = bytes.get(data..data.checked_add(value_len)?)?;
        data += value_len + 1;
        pairs.push((name.to_vec(), value.to_vec()));
    }
    Some(pairs)
}

/// Converts a length to the ABI's u32 (wasm32 `size_t`); lengths come from guest memory or
/// host data far below 4 GiB.
pub(crate) fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_encoding_round_trips_and_matches_the_sdk_layout() {
        let pairs = vec![
            (b":authority".to_vec(), b"checkout".to_vec()),
            (b"x-empty".to_vec(), Vec::new()),
        ];
        let bytes = encode_map(&pairs);
        assert_eq!(&bytes[..4], &2u32.to_le_bytes());
        assert_eq!(&bytes[4..8], &10u32.to_le_bytes());
        assert_eq!(&bytes[20..31], b":authority\0");
        assert_eq!(decode_map(&bytes), Some(pairs));
    }

    #[test]
    fn map_encoding_carries_any_bytes_including_nul() {
        let pairs = vec![(b"x-\xff".to_vec(), b"\x80\x00\xfe".to_vec())];
        assert_eq!(decode_map(&encode_map(&pairs)), Some(pairs));
    }

    #[test]
    fn truncated_map_is_rejected() {
        let bytes = encode_map(&[(b"a".to_vec(), b"b".to_vec())]);
        assert_eq!(decode_map(&bytes[..bytes.len() - 2]), None);
    }
}
