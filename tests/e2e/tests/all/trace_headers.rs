//! Envoy's and the mesh's distributed tracing through the filter: the W3C Trace Context,
//! `x-request-id` and B3 headers a client sends reach the backend unchanged, on real Envoy
//! with the release filter picking the endpoint.

use fulcrum_e2e::{backends, envoy_with_static_endpoints};
use fulcrum_example_backend::TRACE_HEADERS;
use serde_json::json;

/// One value per [`TRACE_HEADERS`] entry, as a tracer in front of the proxy would send them.
const SENT: [(&str, &str); 9] = [
    (
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
    ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
    ("x-request-id", "7d7a5f4e-2f0b-4c55-9a1e-3b6f3f0b9a11"),
    ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
    ("x-b3-spanid", "e457b5a2e4d86bd1"),
    ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
    ("x-b3-sampled", "1"),
    ("x-b3-flags", "0"),
    (
        "b3",
        "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
    ),
];

#[tokio::test]
async fn trace_context_request_id_and_b3_headers_reach_the_backend_unchanged() {
    assert_eq!(SENT.map(|(name, _)| name), TRACE_HEADERS);
    let backends = backends(2).await.expect("backends");
    for algorithm in ["round_robin", "peak_ewma"] {
        let proxy =
            envoy_with_static_endpoints(&backends, json!({"load_balancer": {"type": algorithm}}))
                .await
                .expect("Envoy starts");
        for _ in 0..4 {
            let reply = proxy.send_with(&SENT).await;
            assert_eq!(
                reply.status,
                Some(200),
                "{reply:?}\n{}",
                proxy.envoy.log_tail(30)
            );
            let backend = backends
                .iter()
                .find(|backend| Some(&backend.name) == reply.backend.as_ref())
                .expect("a backend answered");
            let received = backend.last_trace_headers();
            let seen: Vec<(&str, &str)> = received
                .iter()
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            assert_eq!(seen, SENT, "{algorithm}: what {} received", backend.name);
        }
    }
}
