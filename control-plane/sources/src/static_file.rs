//! The static file source: services and endpoints from a YAML file, reloaded on change.
//!
//! The local default source. The file uses the snapshot's own field names:
//!
//! ```yaml
//! services:
//!   checkout:
//!     endpoints:
//!       - address: 127.0.0.1:8081
//!         weight: 2
//!         zone: zone-a
//!         tags: [canary]
//!         metadata: { version: v2 }
//!         health: healthy        # healthy | draining | unhealthy
//!   payments:
//!     protocol: grpc             # http (the default) | http2 | grpc
//!     endpoints:
//!       - address: 127.0.0.1:9090
//! ```
//!
//! A service's optional `protocol` is what Envoy speaks to its endpoints: `grpc` and `http2`
//! make its cluster HTTP/2 (h2c, prior knowledge), `http` or no `protocol` HTTP/1.1. It is the
//! one field the snapshot does not have: the filters never see it, only the cluster does.
//!
//! The file is polled: read and hashed every interval (500 ms by default; an endpoints file
//! is small), which works the same on every filesystem, whatever its timestamp resolution,
//! and for editors that replace the file instead of writing it. A new content is taken only
//! when two polls in a row read it: a file rewritten in place is empty or half-written for a
//! moment, and one read at that moment would publish a mesh missing services (every one of
//! them, for an empty file) until the next poll. So a change applies one poll interval
//! later. A file that cannot be read or parsed is reported with its path and the reason, and
//! the last good state stays; [`StaticFileMetrics`] counts it and says while it lasts, for an
//! alert.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use fulcrum_core::{Endpoint, ServiceEndpoints, UpstreamProtocol};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::{error, info};

use crate::{Services, Source, SourceFuture, SourceSink};

/// Why a static file was refused.
#[derive(Debug, thiserror::Error)]
pub enum StaticFileError {
    /// The file could not be read.
    #[error("cannot read endpoints file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid endpoints YAML.
    #[error(
        "endpoints file {path} is invalid: {source} (expected `services: {{NAME: {{endpoints: [{{address: IP:PORT, ...}}]}}}}`)"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// The YAML error, with its line and column.
        #[source]
        source: serde_norway::Error,
    },
    /// A service lists one address twice.
    #[error(
        "endpoints file {path}: service `{service}` lists {address} twice; list each endpoint once"
    )]
    DuplicateAddress {
        /// The file.
        path: PathBuf,
        /// The service.
        service: String,
        /// The repeated address.
        address: std::net::SocketAddr,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticFile {
    #[serde(default)]
    services: BTreeMap<String, FileService>,
}

/// One service of the file: the snapshot's fields, plus the protocol.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    endpoints: Vec<Endpoint>,
    #[serde(default)]
    protocol: Option<FileProtocol>,
}

/// The values of a service's `protocol`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum FileProtocol {
    Http,
    Http2,
    Grpc,
}

impl From<FileProtocol> for UpstreamProtocol {
    fn from(protocol: FileProtocol) -> Self {
        match protocol {
            FileProtocol::Http => UpstreamProtocol::Http1,
            FileProtocol::Http2 | FileProtocol::Grpc => UpstreamProtocol::Http2,
        }
    }
}

/// Parses the YAML text of an endpoints file; `path` only names it in errors.
/// Endpoints come out sorted by address. A file whose aliases expand it past
/// [`fulcrum_core::yaml::expansion_budget`] is refused before it is built.
pub fn parse_static_file(path: &Path, text: &str) -> Result<Services, StaticFileError> {
    let file: StaticFile =
        fulcrum_core::yaml::from_str(text).map_err(|source| StaticFileError::Parse {
            path: path.to_owned(),
            source,
        })?;
    let mut services = Services::new();
    for (
        service,
        FileService {
            mut endpoints,
            protocol,
        },
    ) in file.services
    {
        endpoints.sort_by_key(|endpoint| endpoint.address);
        if let Some(pair) = endpoints
            .windows(2)
            .find(|pair| pair[0].address == pair[1].address)
        {
            return Err(StaticFileError::DuplicateAddress {
                path: path.to_owned(),
                service,
                address: pair[0].address,
            });
        }
        let protocol = protocol.map(UpstreamProtocol::from);
        services.insert(
            service,
            Arc::new(ServiceEndpoints {
                endpoints,
                protocol,
            }),
        );
    }
    Ok(services)
}

/// Watches one YAML endpoints file.
#[derive(Debug, Clone)]
pub struct StaticFileSource {
    path: PathBuf,
    poll_interval: Duration,
    metrics: StaticFileMetrics,
}

/// What the static file source did with the contents it read; shared by its clones.
#[derive(Debug, Clone, Default)]
pub struct StaticFileMetrics {
    /// Contents taken and published.
    pub loaded: Counter,
    /// Contents refused (unreadable or invalid); the last good state stayed.
    pub refused: Counter,
    /// 1 while the file's current content is refused (the last good state is served), else 0.
    pub refusing: Gauge,
}

impl StaticFileMetrics {
    /// Registers every metric under the `fulcrum_static_file` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let file = registry.sub_registry_with_prefix("fulcrum_static_file");
        file.register(
            "loaded",
            "Contents of the endpoints file taken and published",
            self.loaded.clone(),
        );
        file.register(
            "refused",
            "Contents of the endpoints file refused as unreadable or invalid; the last good endpoints stayed",
            self.refused.clone(),
        );
        file.register(
            "refusing",
            "1 while the endpoints file's current content is refused and the last good endpoints are served, else 0",
            self.refusing.clone(),
        );
    }
}

impl StaticFileSource {
    /// A source for `path`, checked for changes every 500 ms.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            poll_interval: Duration::from_millis(500),
            metrics: StaticFileMetrics::default(),
        }
    }

    /// What the source counts (register it before running the source).
    pub fn metrics(&self) -> &StaticFileMetrics {
        &self.metrics
    }

    /// Checks for changes every `interval` instead.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }
}

/// What the poller last looked at: content hashes, to skip unchanged files and to take a new
/// content only once it reads the same twice.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    /// The content last taken (published or refused).
    hash: Option<[u8; 32]>,
    /// A different content read once, waiting for a second read to confirm it.
    pending: Option<[u8; 32]>,
}

impl Source for StaticFileSource {
    fn name(&self) -> String {
        format!("static-file:{}", self.path.display())
    }

    fn run(self: Box<Self>, sink: SourceSink) -> SourceFuture {
        Box::pin(async move {
            let mut seen = Seen::default();
            let mut ticker = tokio::time::interval(self.poll_interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if sink.is_closed() {
                    return;
                }
                let Some(services) = self.poll(&mut seen).await else {
                    continue;
                };
                if sink.publish(services).await.is_err() {
                    return;
                }
            }
        })
    }
}

impl StaticFileSource {
    /// Reads the file; `Some` with its services when the content changed, read the same as at
    /// the previous poll, and parsed; `None` otherwise (errors are logged once per distinct
    /// content).
    async fn poll(&self, seen: &mut Seen) -> Option<Services> {
        let read = tokio::fs::read(&self.path)
            .await
            .map_err(|source| StaticFileError::Read {
                path: self.path.clone(),
                source,
            });
        let hash: [u8; 32] = match &read {
            Ok(bytes) => Sha256::digest(bytes).into(),
            Err(_) => [0; 32],
        };
        if seen.hash == Some(hash) {
            seen.pending = None;
            return None;
        }
        if seen.pending != Some(hash) {
            // Read once: maybe a write in progress. Taken if the next poll reads it again.
            seen.pending = Some(hash);
            return None;
        }
        seen.pending = None;
        seen.hash = Some(hash);
        let parsed =
            read.and_then(|bytes| parse_static_file(&self.path, &String::from_utf8_lossy(&bytes)));
        match parsed {
            Ok(services) => {
                info!(path = %self.path.display(), services = services.len(), "loaded endpoints file");
                self.metrics.loaded.inc();
                self.metrics.refusing.set(0);
                Some(services)
            }
            Err(error) => {
                error!(path = %self.path.display(), %error, "keeping the last good endpoints");
                self.metrics.refused.inc();
                self.metrics.refusing.set(1);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use fulcrum_core::Health;
    use proptest::prelude::*;
    use tokio::sync::mpsc;

    use super::*;

    const GOOD: &str = "
services:
  checkout:
    endpoints:
      - address: 127.0.0.1:8082
        health: draining
      - address: 127.0.0.1:8081
        weight: 2
        zone: zone-a
        tags: [canary]
        metadata: { version: v2 }
";

    fn path() -> PathBuf {
        PathBuf::from("/etc/fulcrum/endpoints.yaml")
    }

    #[test]
    fn parses_endpoints_sorted_by_address_with_defaults() {
        let services = parse_static_file(&path(), GOOD).expect("valid");
        let endpoints = &services["checkout"].endpoints;
        assert_eq!(endpoints[0].address.port(), 8081);
        assert_eq!(endpoints[0].weight, 2);
        assert_eq!(endpoints[0].zone(), Some("zone-a"));
        assert_eq!(endpoints[1].weight, 1);
        assert_eq!(endpoints[1].health, Health::Draining);
    }

    #[test]
    fn unknown_field_names_the_file_and_the_field() {
        let error = parse_static_file(
            &path(),
            "services:\n  a:\n    endpoints:\n      - adress: 127.0.0.1:1\n",
        )
        .expect_err("typo");
        let message = error.to_string();
        assert!(message.contains("/etc/fulcrum/endpoints.yaml"), "{message}");
        assert!(message.contains("adress"), "{message}");
    }

    #[test]
    fn grpc_and_http2_services_are_http2_and_http_or_no_protocol_http1() {
        let text = "services:
  a: { protocol: grpc, endpoints: [] }
  b: { protocol: http2, endpoints: [] }
  c: { protocol: http, endpoints: [] }
  d: { endpoints: [] }
";
        let services = parse_static_file(&path(), text).expect("valid");
        let protocols: Vec<_> = services.values().map(|service| service.protocol).collect();
        assert_eq!(
            protocols,
            [
                Some(UpstreamProtocol::Http2),
                Some(UpstreamProtocol::Http2),
                Some(UpstreamProtocol::Http1),
                None,
            ]
        );
    }

    #[test]
    fn an_unknown_protocol_names_the_field_and_the_allowed_values() {
        let error = parse_static_file(
            &path(),
            "services:\n  a:\n    protocol: h2c\n    endpoints: []\n",
        )
        .expect_err("unknown protocol");
        let message = error.to_string();
        assert!(message.contains("services.a.protocol"), "{message}");
        assert!(message.contains("http2"), "{message}");
    }

    #[test]
    fn bad_address_is_refused() {
        let error = parse_static_file(
            &path(),
            "services:\n  a:\n    endpoints:\n      - address: localhost\n",
        )
        .expect_err("not IP:port");
        assert!(matches!(error, StaticFileError::Parse { .. }), "{error}");
    }

    #[test]
    fn a_file_whose_aliases_expand_it_a_thousandfold_is_refused_before_it_is_built() {
        // One endpoint's 40 KB metadata anchored and named 5,000 times: about 290 KB of
        // text, 200 MB built.
        let mut text = format!(
            "services:\n  a:\n    endpoints:\n      - address: 127.0.0.1:1\n        \
             metadata: &m {{note: \"{}\"}}\n",
            "x".repeat(40_000)
        );
        for port in 2..5_002 {
            text.push_str(&format!(
                "      - address: 127.0.0.1:{port}\n        metadata: *m\n"
            ));
        }
        let error = parse_static_file(&path(), &text).expect_err("over the budget");
        assert!(matches!(error, StaticFileError::Parse { .. }), "{error}");
        assert!(
            error.to_string().contains("expands through its aliases"),
            "{error}"
        );
    }

    #[test]
    fn duplicate_address_is_refused() {
        let text = "services:\n  a:\n    endpoints:\n      - address: 127.0.0.1:1\n      - address: 127.0.0.1:1\n";
        let error = parse_static_file(&path(), text).expect_err("duplicate");
        assert!(
            error.to_string().contains("lists 127.0.0.1:1 twice"),
            "{error}"
        );
    }

    #[test]
    fn empty_file_means_no_services() {
        assert!(
            parse_static_file(&path(), "services: {}\n")
                .expect("valid")
                .is_empty()
        );
    }

    proptest! {
        #[test]
        fn parser_never_panics_on_arbitrary_text(text in ".{0,200}") {
            let _ = parse_static_file(&path(), &text);
        }
    }

    async fn next_update(updates: &mut mpsc::Receiver<crate::SourceUpdate>) -> crate::SourceUpdate {
        tokio::time::timeout(Duration::from_secs(5), updates.recv())
            .await
            .expect("update in time")
            .expect("source still running")
    }

    #[tokio::test]
    async fn a_content_read_once_mid_write_is_never_published() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("endpoints.yaml");
        let source = StaticFileSource::new(&file);
        let mut seen = Seen::default();
        std::fs::write(&file, GOOD).expect("write");
        assert!(source.poll(&mut seen).await.is_none(), "read once");
        let first = source.poll(&mut seen).await.expect("read twice: taken");
        assert_eq!(first["checkout"].endpoints.len(), 2);
        // An in-place rewrite caught half-way: valid YAML, one endpoint short. The next poll
        // reads the finished file, so the torn content is never published.
        let torn = &GOOD[..GOOD
            .find("      - address: 127.0.0.1:8081")
            .expect("two endpoints")];
        assert_eq!(
            parse_static_file(&path(), torn).expect("valid on its own")["checkout"]
                .endpoints
                .len(),
            1
        );
        std::fs::write(&file, torn).expect("write");
        assert!(source.poll(&mut seen).await.is_none(), "torn, read once");
        std::fs::write(&file, GOOD).expect("write");
        assert!(
            source.poll(&mut seen).await.is_none(),
            "back to the content already taken: nothing to publish"
        );
        std::fs::write(&file, "").expect("write");
        assert!(source.poll(&mut seen).await.is_none(), "emptied, read once");
        std::fs::write(&file, "services:\n  other:\n    endpoints: []\n").expect("write");
        assert!(
            source.poll(&mut seen).await.is_none(),
            "new content, read once"
        );
        let next = source.poll(&mut seen).await.expect("read twice: taken");
        assert_eq!(next.keys().collect::<Vec<_>>(), ["other"]);
    }

    #[tokio::test]
    async fn a_refused_content_is_counted_and_flagged_until_a_good_one_is_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("endpoints.yaml");
        let source = StaticFileSource::new(&file);
        let metrics = source.metrics().clone();
        let mut seen = Seen::default();
        let mut take = async |content: &str| {
            std::fs::write(&file, content).expect("write");
            let first = source.poll(&mut seen).await;
            assert!(first.is_none(), "read once");
            source.poll(&mut seen).await
        };

        assert!(take(GOOD).await.is_some());
        assert_eq!((metrics.loaded.get(), metrics.refused.get()), (1, 0));
        assert_eq!(metrics.refusing.get(), 0);

        assert!(take("services: [not, a, map]").await.is_none());
        assert_eq!((metrics.loaded.get(), metrics.refused.get()), (1, 1));
        assert_eq!(
            metrics.refusing.get(),
            1,
            "the last good endpoints are served"
        );

        assert!(take("services: {}\n").await.is_some());
        assert_eq!((metrics.loaded.get(), metrics.refused.get()), (2, 1));
        assert_eq!(metrics.refusing.get(), 0);

        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        for name in [
            "fulcrum_static_file_loaded_total 2",
            "fulcrum_static_file_refused_total 1",
            "fulcrum_static_file_refusing 0",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
    }

    #[tokio::test]
    async fn reload_publishes_changes_and_keeps_the_last_good_state_on_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("endpoints.yaml");
        std::fs::write(&file, GOOD).expect("write");
        let (sender, mut updates) = mpsc::channel(8);
        let source =
            Box::new(StaticFileSource::new(&file).with_poll_interval(Duration::from_millis(20)));
        let task = tokio::spawn(source.run(SourceSink::new(0, sender)));
        let first = next_update(&mut updates).await;
        assert_eq!(first.services["checkout"].endpoints.len(), 2);

        std::fs::write(&file, "services: [not, a, map]\n").expect("write");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(updates.try_recv().is_err(), "a bad file publishes nothing");

        std::fs::write(&file, "services:\n  other:\n    endpoints: []\n").expect("write");
        let next = next_update(&mut updates).await;
        assert_eq!(next.services.keys().collect::<Vec<_>>(), ["other"]);
        drop(updates);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops when the sink closes")
            .expect("no panic");
    }
}
