//! TLS (rustls, on ring) on every listener, when a certificate and key are configured.
//!
//! One certificate serves all listeners: the HTTP API, the admin API, xDS and the registry's
//! gRPC API. It is read from PEM files and read again every [`RELOAD_EVERY`], so a rotation by
//! cert-manager or a re-mounted Secret takes effect without a restart; a pair that does not
//! load is logged and counted (`fulcrum_tls_reload_failures_total`) and the one in use stays.
//!
//! Handshakes run in their own tasks, at most [`MAX_HANDSHAKES`] at once and each within
//! [`HANDSHAKE_DEADLINE`], so a client that connects and sends nothing holds neither the accept
//! loop nor memory beyond that bound. Listeners offer ALPN by what they serve: `h2` for gRPC,
//! `h2` and `http/1.1` for HTTP.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use rustls::{
    ServerConfig,
    crypto::ring::{default_provider, sign::any_supported_type},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::{debug, info, warn};

/// How often the certificate and key files are read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// The longest a TLS handshake may take.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Handshakes in progress at once, per listener; further connections wait to be accepted.
pub const MAX_HANDSHAKES: usize = 256;

/// The PEM files of the certificate (chain first) and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// TLS metrics. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct TlsMetrics {
    /// `fulcrum_tls_reload_failures_total`: certificate reloads that failed.
    pub reload_failures: Counter,
    /// `fulcrum_tls_handshake_failures_total`: handshakes that failed or timed out.
    pub handshake_failures: Counter,
}

impl TlsMetrics {
    /// Registers every metric under the `fulcrum_tls` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let tls = registry.sub_registry_with_prefix("fulcrum_tls");
        tls.register(
            "reload_failures",
            "Certificate reloads that failed; the certificate in use stays",
            self.reload_failures.clone(),
        );
        tls.register(
            "handshake_failures",
            "TLS handshakes that failed or exceeded their deadline",
            self.handshake_failures.clone(),
        );
    }
}

/// The certificate in use, swapped on reload.
#[derive(Debug)]
struct Reloading {
    current: RwLock<(Arc<CertifiedKey>, [u8; 32])>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Some(current.0.clone())
    }
}

/// The configured certificate, shared by every listener. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Tls {
    certificate: Arc<Reloading>,
    metrics: TlsMetrics,
}

/// Reads and parses the pair; the hash of both files' bytes tells a change.
fn load(files: &TlsFiles) -> anyhow::Result<(Arc<CertifiedKey>, [u8; 32])> {
    let read = |path: &Path, what: &str| {
        std::fs::read(path)
            .with_context(|| format!("cannot read the TLS {what} {}", path.display()))
    };
    let (cert_pem, key_pem) = (read(&files.cert, "certificate")?, read(&files.key, "key")?);
    let hash: [u8; 32] = Sha256::new()
        .chain_update(&cert_pem)
        .chain_update(&key_pem)
        .finalize()
        .into();
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", files.cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "{} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)",
        files.cert.display()
    );
    let key = PrivateKeyDer::from_pem_slice(&key_pem).with_context(|| {
        format!(
            "{} is not a PEM private key (PKCS#8, PKCS#1 or SEC1)",
            files.key.display()
        )
    })?;
    let signing = any_supported_type(&key)
        .with_context(|| format!("{} is not a usable key type", files.key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().with_context(|| {
        format!(
            "{} does not match {}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    Ok((Arc::new(certified), hash))
}

impl Tls {
    /// Loads the pair (failing with the file and the problem named) and keeps reading it
    /// again every `reload_every` ([`RELOAD_EVERY`] in the control plane) while it is used.
    pub fn start(
        files: TlsFiles,
        reload_every: Duration,
        metrics: TlsMetrics,
    ) -> anyhow::Result<Self> {
        let certificate = Arc::new(Reloading {
            current: RwLock::new(load(&files)?),
        });
        let reloading = Arc::downgrade(&certificate);
        let reload_metrics = metrics.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(reload_every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(certificate) = reloading.upgrade() else {
                    return;
                };
                let files = files.clone();
                match tokio::task::spawn_blocking(move || load(&files)).await {
                    Ok(Ok((key, hash))) => {
                        let mut current = certificate
                            .current
                            .write()
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        if current.1 != hash {
                            *current = (key, hash);
                            info!("TLS certificate reloaded");
                        }
                    }
                    Ok(Err(problem)) => {
                        reload_metrics.reload_failures.inc();
                        warn!(error = %format!("{problem:#}"), "TLS certificate not reloaded; the one in use stays");
                    }
                    Err(_) => {
                        reload_metrics.reload_failures.inc();
                    }
                }
            }
        });
        Ok(Self {
            certificate,
            metrics,
        })
    }

    fn acceptor(&self, alpn: &[&[u8]]) -> TlsAcceptor {
        let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .map(|builder| {
                builder
                    .with_no_client_auth()
                    .with_cert_resolver(self.certificate.clone())
            })
            // ring's default provider supports the safe default versions.
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"));
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        TlsAcceptor::from(Arc::new(config))
    }

    /// Accepts TCP connections on `listener` and hands over those whose handshake completed.
    pub fn accept(&self, listener: TcpListener, alpn: &[&[u8]]) -> TlsListener {
        let acceptor = self.acceptor(alpn);
        let local = listener.local_addr();
        let (ready, connections) = mpsc::channel(MAX_HANDSHAKES);
        let metrics = self.metrics.clone();
        let task = tokio::spawn(async move {
            let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
            loop {
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match listener.accept().await {
                    Ok((stream, peer)) => {
                        // Small answers are not held back for delayed ACKs, as Envoy does.
                        let _ = stream.set_nodelay(true);
                        (stream, peer)
                    }
                    Err(problem) => {
                        debug!(error = %problem, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let (acceptor, ready, metrics) = (acceptor.clone(), ready.clone(), metrics.clone());
                tokio::spawn(async move {
                    // The permit is held until the server took the connection, so at most
                    // MAX_HANDSHAKES connections wait here, handshaking or handed over.
                    let _permit = permit;
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            let _ = ready.send((TlsConnection(stream), peer)).await;
                        }
                        Ok(Err(problem)) => {
                            metrics.handshake_failures.inc();
                            debug!(%peer, error = %problem, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics.handshake_failures.inc();
                            debug!(%peer, "TLS handshake exceeded its deadline");
                        }
                    }
                });
            }
        });
        TlsListener {
            connections,
            local,
            task,
        }
    }
}

/// Connections whose TLS handshake completed. Stops accepting when dropped.
#[derive(Debug)]
pub struct TlsListener {
    connections: mpsc::Receiver<(TlsConnection, SocketAddr)>,
    local: io::Result<SocketAddr>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsListener {
    /// The next connection, or `None` once accepting stopped.
    pub async fn next(&mut self) -> Option<(TlsConnection, SocketAddr)> {
        self.connections.recv().await
    }

    /// The connections as a stream, for tonic's `serve_with_incoming`.
    pub fn into_stream(self) -> impl futures::Stream<Item = io::Result<TlsConnection>> {
        futures::stream::unfold(self, |mut listener| async move {
            let (connection, _) = listener.next().await?;
            Some((Ok(connection), listener))
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.next().await {
            Some(accepted) => accepted,
            // Accepting stopped (the runtime is going away): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        match &self.local {
            Ok(address) => Ok(*address),
            Err(problem) => Err(io::Error::new(problem.kind(), problem.to_string())),
        }
    }
}

/// One TLS connection, readable and writable as the plain stream it wraps.
#[derive(Debug)]
pub struct TlsConnection(TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
