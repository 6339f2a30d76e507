//! The HTTP listeners' connections: how many a listener holds and how long one may sit.
//!
//! Every pod of a mesh can reach the control plane, so a connection is hostile until it
//! proves otherwise. A listener holds at most [`ListenerLimits::http_max_connections`] at once
//! (one beyond is closed as it is accepted); an HTTP/1 request's head must arrive within
//! [`ListenerLimits::http_header_read_timeout`] and fit in [`MAX_HEAD_BYTES`]; an HTTP/2
//! connection carries at most [`ListenerLimits::http2_max_streams_per_connection`] streams and
//! must answer keepalive pings; and a connection on which no byte moves either way for
//! [`ListenerLimits::http_idle_timeout`] while it waits on the peer is closed ([`Stalled`]: a
//! reader that stopped reading, a body that stopped coming; hyper's head deadline, which
//! also runs while an HTTP/1 keep-alive connection waits for its next request, closes the
//! idle ones first). Each closing is
//! counted (`fulcrum_http_connections_closed_total{reason}`) and the open connections are a
//! gauge, so an alert sees a listener filling up. What a request may hold once it is read
//! (a slot, a deadline, its answer's bytes) is [`crate::limits`]'.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::serve::Listener;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{Semaphore, watch},
    task::JoinHandle,
    time::{Instant, Sleep},
};
use tracing::debug;

use crate::limits::ListenerLimits;

/// Largest HTTP/1 request head (request line and headers) a connection buffers; a larger
/// one is refused with `431`. The proxies' polls and the registry's clients send a few
/// hundred bytes.
pub const MAX_HEAD_BYTES: usize = 16 << 10;

/// How often an HTTP/2 connection is pinged, and how long its answer may take.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(30);

/// Labels of [`ConnectionMetrics::closed`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClosedLabels {
    /// `max_connections` (closed as accepted, the listener full), `header_timeout` (an
    /// HTTP/1 request head slower than the header deadline) or `stalled` (no byte moved for
    /// the idle timeout while waiting on the peer).
    pub reason: &'static str,
}

/// The listeners' connections. Cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    /// `fulcrum_http_connections`: open HTTP connections, all listeners.
    pub open: Gauge,
    /// `fulcrum_http_connections_closed_total{reason}`: connections the limits closed.
    pub closed: Family<ClosedLabels, Counter>,
}

impl ConnectionMetrics {
    /// Registers both under the `fulcrum` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("fulcrum");
        registry.register(
            "http_connections",
            "Open HTTP connections (the API and admin listeners)",
            self.open.clone(),
        );
        registry.register(
            "http_connections_closed",
            "HTTP connections closed by the listener limits: max_connections (refused as accepted), header_timeout or stalled",
            self.closed.clone(),
        );
    }

    fn close(&self, reason: &'static str) {
        self.closed.get_or_create(&ClosedLabels { reason }).inc();
    }
}

/// Serves `router` on the connections `listener` accepts, within `limits`, until `stopped`
/// turns true; then stops accepting and lets the connections' requests finish (HTTP/1
/// keep-alive ends, HTTP/2 gets a `GOAWAY`).
pub fn serve<L>(
    mut listener: L,
    router: axum::Router,
    limits: &ListenerLimits,
    metrics: ConnectionMetrics,
    mut stopped: watch::Receiver<bool>,
) -> JoinHandle<io::Result<()>>
where
    L: Listener<Addr = std::net::SocketAddr>,
    L::Io: Unpin,
{
    let slots = Arc::new(Semaphore::new(limits.http_max_connections));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.http_header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_streams_per_connection)
        .keep_alive_interval(HTTP2_KEEPALIVE)
        .keep_alive_timeout(HTTP2_KEEPALIVE);
    let builder = Arc::new(builder);
    let idle = limits.http_idle_timeout;
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (io, peer) = tokio::select! {
                accepted = listener.accept() => accepted,
                () = until_stopped(&mut stopped) => break,
            };
            // Reap the finished connections' tasks as new ones come.
            while connections.try_join_next().is_some() {}
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                metrics.close("max_connections");
                debug!(peer = %peer, "closed a connection: the listener holds as many as it may");
                continue;
            };
            let (builder, router, metrics) =
                (Arc::clone(&builder), router.clone(), metrics.clone());
            let mut stopped = stopped.clone();
            metrics.open.inc();
            connections.spawn(async move {
                let _slot = slot;
                let io = Stalled::new(io, idle);
                let service = TowerToHyperService::new(router);
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                tokio::pin!(connection);
                let served = tokio::select! {
                    served = connection.as_mut() => served,
                    () = until_stopped(&mut stopped) => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                metrics.open.dec();
                if let Err(problem) = served {
                    if let Some(reason) = closed_by_limit(problem.as_ref()) {
                        metrics.close(reason);
                    }
                    debug!(peer = %peer, error = %problem, "HTTP connection ended");
                }
            });
        }
        // Stopping: the connections finish what they serve (bounded by the caller's grace).
        while connections.join_next().await.is_some() {}
        Ok(())
    })
}

/// Returns once `stopped` turns true (or its sender is gone).
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Which limit ended a connection that failed with `problem` (hyper's, its sources
/// included): `stalled` ([`Stalled`]), `header_timeout` (an HTTP/1 head too slow), or none.
fn closed_by_limit(problem: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cause = Some(problem);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::TimedOut
            && io.to_string() == STALLED
        {
            return Some("stalled");
        }
        if error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return Some("header_timeout");
        }
        cause = error.source();
    }
    None
}

/// The error a [`Stalled`] connection ends with.
const STALLED: &str = "no byte moved on the connection for the idle timeout";

/// A connection that fails once it has waited on the peer (a read or a write pending) for
/// `idle` without a byte moving either way. The clock starts when a wait begins and stops at
/// any progress, so time the server spends answering never counts.
#[derive(Debug)]
pub struct Stalled<Io> {
    io: Io,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    /// Whether `deadline` times the current wait.
    waiting: bool,
}

impl<Io> Stalled<Io> {
    /// `io`, failing after waiting `idle` on the peer without progress.
    pub fn new(io: Io, idle: Duration) -> Self {
        Self {
            io,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
        }
    }

    /// An operation completed: whatever waited is over.
    fn progressed<T>(&mut self, done: T) -> Poll<T> {
        self.waiting = false;
        Poll::Ready(done)
    }

    /// An operation is pending on the peer: starts the clock if no wait is timed yet, and
    /// fails once it ran out (the task is woken then).
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if !self.waiting {
            self.waiting = true;
            self.deadline.as_mut().reset(Instant::now() + self.idle);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, STALLED))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Stalled<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(read) => this.progressed(read),
            Poll::Pending => this.waiting(cx),
        }
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Stalled<Io> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(written) => this.progressed(written),
            Poll::Pending => this.waiting(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(written) => this.progressed(written),
            Poll::Pending => this.waiting(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Ready(flushed) => this.progressed(flushed),
            Poll::Pending => this.waiting(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Ready(shut) => this.progressed(shut),
            Poll::Pending => this.waiting(cx),
        }
    }
}
