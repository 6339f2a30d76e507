//! Reading what the filter does not trust: every request header and every property.
//!
//! A client controls every byte of its request headers, and other filters can put anything in
//! the stream's properties. proxy-wasm 0.2.5's text getters (`hostcalls::get_map_value`,
//! `get_map`, `get_map_bytes`) `unwrap` a UTF-8 decoding, so one header byte that is not UTF-8
//! panics the VM, and on Envoy a panicked VM stays dead for its worker. This module therefore
//! reads headers only with `get_map_value_bytes` and properties with `get_property` (both
//! return raw bytes), and turns a value that is not UTF-8, longer than its cap or otherwise
//! unusable into "absent", counted in `fulcrum_request_input_invalid_total` with the input's
//! label. An absent input is not counted: the policy simply goes without it.
//!
//! The caps bound what the filter keeps and processes per request. They cannot bound the copy
//! the host makes into guest memory before the filter sees the length (ABI 0.2.1 has no call
//! that reports a value's size); Envoy's `max_request_headers_kb` (60 KiB by default) bounds
//! that, and the copy is freed when the callback returns.

use proxy_wasm::{hostcalls, types::MapType};

use crate::{config::DEFAULT_OVERRIDE_HEADER, metrics::Metrics};

/// Longest hash-key, client-key, service or authority header value, and longest string
/// property, the filter uses: 4 KiB, the core's cap, which the native module applies too. A
/// DNS name is at most 253 bytes and Istio cluster names stay far below this; anything longer
/// is not a name.
pub use fulcrum_core::service::MAX_VALUE_BYTES;

/// Longest `cookie` header the filter parses: the core's cap (8 KiB), which the native module
/// applies too.
pub use fulcrum_core::service::MAX_COOKIE_BYTES;

/// Longest node zone or region the filter takes: 253 bytes, a DNS name's limit; Kubernetes
/// label values (where Istio takes them from) are at most 63.
pub const MAX_LOCALITY_BYTES: usize = 253;

/// Longest node id or node cluster the filter sends to the control plane: 256 bytes. Istio's
/// node ids (`sidecar~IP~POD.NS~NS.svc.cluster.local`) stay far below; a longer value is cut
/// to this length (two nodes whose ids share their first 256 bytes then report as one).
pub const MAX_NODE_NAME_BYTES: usize = 256;

/// A request input the filter reads: the `input` label of
/// `fulcrum_request_input_invalid_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// `:authority`, when the service comes from it.
    Authority,
    /// The service header, when the service comes from `{"from": "header"}`.
    Service,
    /// `xds.cluster_name`, when the service comes from the route's cluster.
    RouteCluster,
    /// The header a consistent hash is computed on.
    HashHeader,
    /// The `cookie` header, for sticky sessions and cookie hashing.
    Cookie,
    /// The rate limit's client key header.
    ClientKey,
    /// `source.address`, for source-IP hashing.
    SourceAddress,
    /// `upstream.address`: the endpoint that served.
    UpstreamAddress,
    /// `upstream.request_attempt_count`: whether Envoy retried.
    UpstreamAttempts,
    /// `response.code`.
    ResponseCode,
    /// `response.flags`.
    ResponseFlags,
    /// `grpc-status`, in the response headers or trailers.
    GrpcStatus,
    /// `xds.node.locality.zone` (or `node.locality.zone`): the zone of the proxy's Envoy node,
    /// read once per configuration.
    NodeZone,
    /// `xds.node.locality.region` (or `node.locality.region`): the region of the proxy's Envoy
    /// node, read once per configuration.
    NodeRegion,
    /// `xds.node.id` (or `node.id`): the proxy's Envoy node id, read once per configuration
    /// and sent with every snapshot poll.
    NodeId,
    /// `xds.node.cluster` (or `node.cluster`): the proxy's Envoy node cluster, read once per
    /// configuration and sent with every snapshot poll.
    NodeCluster,
}

impl Input {
    /// Every input, in declaration order (so `input as usize` indexes it).
    pub const ALL: [Self; 16] = [
        Self::Authority,
        Self::Service,
        Self::RouteCluster,
        Self::HashHeader,
        Self::Cookie,
        Self::ClientKey,
        Self::SourceAddress,
        Self::UpstreamAddress,
        Self::UpstreamAttempts,
        Self::ResponseCode,
        Self::ResponseFlags,
        Self::GrpcStatus,
        Self::NodeZone,
        Self::NodeRegion,
        Self::NodeId,
        Self::NodeCluster,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Authority => "authority",
            Self::Service => "service",
            Self::RouteCluster => "route_cluster",
            Self::HashHeader => "hash_header",
            Self::Cookie => "cookie",
            Self::ClientKey => "client_key",
            Self::SourceAddress => "source_address",
            Self::UpstreamAddress => "upstream_address",
            Self::UpstreamAttempts => "upstream_attempts",
            Self::ResponseCode => "response_code",
            Self::ResponseFlags => "response_flags",
            Self::GrpcStatus => "grpc_status",
            Self::NodeZone => "node_zone",
            Self::NodeRegion => "node_region",
            Self::NodeId => "node_id",
            Self::NodeCluster => "node_cluster",
        }
    }

    /// The longest value of this input the filter uses.
    pub fn cap(self) -> usize {
        match self {
            Self::Cookie => MAX_COOKIE_BYTES,
            Self::NodeZone | Self::NodeRegion => MAX_LOCALITY_BYTES,
            Self::NodeId | Self::NodeCluster => MAX_NODE_NAME_BYTES,
            _ => MAX_VALUE_BYTES,
        }
    }
}

/// The request header `name` as text. `None` when absent, and also, counted, when it is not
/// UTF-8 or longer than `input`'s cap. A repeated header reads as its first value (Envoy's
/// `proxy_get_header_map_value`); the name matches case-insensitively.
pub fn request_header(name: &str, input: Input, metrics: &Metrics) -> Option<String> {
    let bytes = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()?;
    checked_text(bytes, input, metrics)
}

/// Whether the request carries header `name`, whatever its value: the value is probed as
/// bytes and never read (only Envoy's definite answer that the header is there counts).
pub fn has_request_header(name: &str) -> bool {
    matches!(
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name),
        Ok(Some(_))
    )
}

/// Whether the response is gRPC: its `content-type` is `application/grpc` or a subtype
/// (`application/grpc+proto`). Read as bytes, so a value that is not UTF-8 is simply not gRPC.
pub fn is_grpc_response() -> bool {
    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, "content-type")
        .ok()
        .flatten()
        .is_some_and(|value| fulcrum_core::service::is_grpc_content_type(&value))
}

/// The response's `:status`: three digits, 100 to 999 (Envoy's codecs refuse anything else
/// from an upstream). `None` when absent, and also, counted as an invalid `response_code`,
/// when it is not a three-digit code.
pub fn response_status(metrics: &Metrics) -> Option<u16> {
    let bytes = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
        .ok()
        .flatten()?;
    let status = fulcrum_core::service::parse_http_status(&bytes);
    if status.is_none() {
        metrics.input_invalid(Input::ResponseCode);
    }
    status
}

/// The `grpc-status` in `map` (the response headers of a trailers-only response, else the
/// trailers); `None` when absent. A value that is not a decimal code is counted and read as
/// `UNKNOWN` (2), a failure, as Envoy reads it.
pub fn grpc_status(map: MapType, metrics: &Metrics) -> Option<u64> {
    let bytes = hostcalls::get_map_value_bytes(map, "grpc-status")
        .ok()
        .flatten()?;
    let code = fulcrum_core::service::parse_grpc_status(&bytes);
    if code.is_none() {
        metrics.input_invalid(Input::GrpcStatus);
    }
    Some(code.unwrap_or(fulcrum_core::service::GRPC_UNKNOWN))
}

/// A string property as text, under the same rules as [`request_header`].
pub fn string_property(path: &[&str], input: Input, metrics: &Metrics) -> Option<String> {
    let bytes = hostcalls::get_property(path.to_vec()).ok().flatten()?;
    checked_text(bytes, input, metrics)
}

/// Where the proxy's Envoy node runs: its `locality`, which Istio sets from the labels
/// `topology.kubernetes.io/region` and `topology.kubernetes.io/zone` of the pod's node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeLocality {
    /// `locality.region`, when set, not empty and usable.
    pub region: Option<String>,
    /// `locality.zone`, when set, not empty and usable.
    pub zone: Option<String>,
}

/// The locality of the proxy's Envoy node: each field read at `xds.node.locality.<field>`,
/// the attribute current Envoy serves, else the older Wasm-only `node.locality.<field>`. A
/// field is `None` when unset or empty, and also, counted, when not UTF-8 or longer than
/// [`MAX_LOCALITY_BYTES`].
pub fn node_locality(metrics: &Metrics) -> NodeLocality {
    let field = |name: &str, input: Input| {
        let read = |path: &[&str]| hostcalls::get_property(path.to_vec()).ok().flatten();
        let bytes = read(&["xds", "node", "locality", name])
            .or_else(|| read(&["node", "locality", name]))?;
        checked_text(bytes, input, metrics).filter(|value| !value.is_empty())
    };
    NodeLocality {
        region: field("region", Input::NodeRegion),
        zone: field("zone", Input::NodeZone),
    }
}

/// Who the proxy is, as its Envoy node says: sent with every snapshot poll so the control
/// plane can list which proxy runs which version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    /// `node.id`, when set, not empty and usable.
    pub id: Option<String>,
    /// `node.cluster`, when set, not empty and usable.
    pub cluster: Option<String>,
}

impl NodeIdentity {
    /// The headers naming the node on a call to the control plane (`crate::report`): its id
    /// and cluster, each when known.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            (crate::report::NODE_ID_HEADER, self.id.as_deref()),
            (crate::report::NODE_CLUSTER_HEADER, self.cluster.as_deref()),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
    }
}

/// The id and cluster of the proxy's Envoy node, each read at `xds.node.<field>`, else at the
/// older `node.<field>`. A field is `None` when unset or empty, and also, counted, when it
/// holds a byte that is not printable ASCII (it goes into a request header); one longer than
/// [`MAX_NODE_NAME_BYTES`] is cut to that length.
pub fn node_identity(metrics: &Metrics) -> NodeIdentity {
    let field = |name: &str, input: Input| {
        let read = |path: &[&str]| hostcalls::get_property(path.to_vec()).ok().flatten();
        let bytes = read(&["xds", "node", name]).or_else(|| read(&["node", name]))?;
        if bytes.is_empty() {
            return None;
        }
        let value = header_text(&bytes, input.cap());
        if value.is_none() {
            metrics.input_invalid(input);
        }
        value
    };
    NodeIdentity {
        id: field("id", Input::NodeId),
        cluster: field("cluster", Input::NodeCluster),
    }
}

/// `bytes` cut to `cap` bytes, as text fit for a header value: `None` when any byte is not
/// printable ASCII (space to `~`), so no control character, line break or non-ASCII byte
/// ever reaches a header.
pub fn header_text(bytes: &[u8], cap: usize) -> Option<String> {
    if !bytes.iter().all(|byte| matches!(byte, b' '..=b'~')) {
        return None;
    }
    let kept = bytes.get(..cap).unwrap_or(bytes);
    // Printable ASCII is UTF-8.
    String::from_utf8(kept.to_vec()).ok()
}

/// A string property that `parse` must accept; one it refuses is unusable and counted.
pub fn parsed_property<T>(
    path: &[&str],
    input: Input,
    metrics: &Metrics,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Option<T> {
    let parsed = parse(&string_property(path, input, metrics)?);
    if parsed.is_none() {
        metrics.input_invalid(input);
    }
    parsed
}

/// An integer property: Envoy encodes them as 8 little-endian bytes; any other length is
/// counted and reads as absent.
pub fn int_property(path: &[&str], input: Input, metrics: &Metrics) -> Option<u64> {
    let bytes = hostcalls::get_property(path.to_vec()).ok().flatten()?;
    match <[u8; 8]>::try_from(bytes.as_slice()) {
        Ok(bytes) => Some(u64::from_le_bytes(bytes)),
        Err(_) => {
            metrics.input_invalid(input);
            None
        }
    }
}

fn checked_text(bytes: Vec<u8>, input: Input, metrics: &Metrics) -> Option<String> {
    let text = text(bytes, input.cap());
    if text.is_none() {
        metrics.input_invalid(input);
    }
    text
}

/// `bytes` as text when they are UTF-8 and at most `cap` long.
pub fn text(bytes: Vec<u8>, cap: usize) -> Option<String> {
    if bytes.len() > cap {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// Removes every client-sent copy of the override header, under the default name and under
/// the configured one when it differs, so no client can steer traffic whichever name the
/// cluster's `override_host` policy reads. Counts one `fulcrum_override_header_stripped_total`
/// when any copy was there.
///
/// The value is probed as bytes (never as text). Only Envoy's definite "no such header"
/// (`NotFound`, `Ok(None)`) skips the removal, which saves a host call on every honest
/// request; any other answer, an error included, removes every copy (Envoy's remove drops all
/// entries of the name, matched case-insensitively, as its get finds the first of them).
pub fn strip_override_headers(configured: &str, metrics: &Metrics) {
    let mut present = false;
    for name in override_header_names(configured) {
        let probe = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name);
        if !matches!(probe, Ok(None)) {
            present |= probe.is_ok();
            let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
        }
    }
    if present {
        metrics.override_header_stripped();
    }
}

/// The default override header name and `configured`, once each.
fn override_header_names(configured: &str) -> impl Iterator<Item = &str> {
    let other = (!configured.eq_ignore_ascii_case(DEFAULT_OVERRIDE_HEADER)).then_some(configured);
    std::iter::once(DEFAULT_OVERRIDE_HEADER).chain(other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_refused_when_not_utf8_or_longer_than_the_cap() {
        assert_eq!(text(b"checkout".to_vec(), 8).as_deref(), Some("checkout"));
        assert_eq!(text(b"checkout".to_vec(), 7), None);
        assert_eq!(text(vec![b'a', 0xff], 8), None);
        assert_eq!(text(vec![0xc3], 8), None, "a truncated sequence");
        assert_eq!(text("é".as_bytes().to_vec(), 2).as_deref(), Some("é"));
        assert_eq!(text(Vec::new(), 0).as_deref(), Some(""));
    }

    #[test]
    fn header_text_is_printable_ascii_cut_to_the_cap() {
        assert_eq!(
            header_text(b"sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local", 256).as_deref(),
            Some("sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local")
        );
        assert_eq!(header_text(b"abcdef", 4).as_deref(), Some("abcd"));
        assert_eq!(header_text(b"a b", 8).as_deref(), Some("a b"));
        for hostile in [
            &b"a\r\nx-injected: 1"[..],
            b"a\x00b",
            b"tab\there",
            b"\x7f",
            "é".as_bytes(),
            &[0xff, b'a'],
        ] {
            assert_eq!(header_text(hostile, 256), None, "{hostile:?}");
        }
    }

    #[test]
    fn cookies_get_the_larger_cap_the_node_locality_a_dns_name_s_and_node_names_256() {
        assert_eq!(Input::Cookie.cap(), 8192);
        assert_eq!(Input::NodeZone.cap(), 253);
        assert_eq!(Input::NodeRegion.cap(), 253);
        assert_eq!(Input::NodeId.cap(), 256);
        assert_eq!(Input::NodeCluster.cap(), 256);
        let special = [
            Input::Cookie,
            Input::NodeZone,
            Input::NodeRegion,
            Input::NodeId,
            Input::NodeCluster,
        ];
        for input in Input::ALL.into_iter().filter(|i| !special.contains(i)) {
            assert_eq!(input.cap(), 4096, "{input:?}");
        }
    }

    #[test]
    fn every_input_sits_at_its_own_index_with_a_distinct_label() {
        for (index, input) in Input::ALL.into_iter().enumerate() {
            assert_eq!(input as usize, index, "{input:?}");
        }
        let mut labels: Vec<&str> = Input::ALL.iter().map(|i| i.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Input::ALL.len());
    }

    #[test]
    fn override_header_is_stripped_under_the_default_and_the_configured_name() {
        let names = |configured| override_header_names(configured).collect::<Vec<_>>();
        assert_eq!(names("x-fulcrum-endpoint"), ["x-fulcrum-endpoint"]);
        assert_eq!(names("X-Fulcrum-Endpoint"), ["x-fulcrum-endpoint"]);
        assert_eq!(names("x-pick"), ["x-fulcrum-endpoint", "x-pick"]);
    }
}
