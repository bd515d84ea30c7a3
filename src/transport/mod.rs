//! Accepting connections: each listener's accept loop, with its cap on open connections,
//! TLS handshakes run beside the loop, who is on the other end of each connection, and the
//! HTTP/2 connection loop that serves the traffic listener ([`serve`]).
//!
//! # Accepting
//!
//! 1. The loop accepts a TCP connection and takes one of the listener's
//!    `server.max_connections` slots; with none free the connection is closed at once and
//!    counted in `keel_connections_refused_total`.
//! 2. On a TLS listener the handshake runs in its own task, bounded by
//!    `server.tls_handshake_timeout`, so a slow or silent client never stalls the loop.
//!    A failed handshake closes the connection and counts in
//!    `keel_tls_handshake_failures_total`.
//! 3. The connection goes to the server with its [`Peer`] (Keel's [`serve`] on the traffic
//!    listener, tonic's on the admin one); the slot is freed when the server drops the
//!    connection.
//!
//! The loop stops, and the listening socket closes, when the server stops reading from it
//! (at shutdown).

mod peer;
mod serve;
mod tls;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::transport::server::Connected;

pub use peer::{Peer, identity};
pub use serve::{Http2, MAX_LOCAL_ERROR_RESETS, serve};
pub use tls::Tls;

use crate::observe::Metrics;
use crate::observe::metrics::ListenerLabels;

/// How one listener accepts.
#[derive(Clone)]
pub struct Accept {
    /// `traffic` or `admin`, for logs and metrics.
    pub name: &'static str,
    /// Connections open at once; more are closed as they are accepted.
    pub max_connections: u32,
    /// TLS, when the listener speaks it.
    pub tls: Option<Arc<Tls>>,
    /// How long a client has to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// Where refusals and failed handshakes are counted.
    pub metrics: Arc<Metrics>,
}

/// The connections accepted on `listener`, for [`serve`] or tonic's
/// `serve_with_incoming_shutdown`.
pub fn incoming(
    listener: TcpListener,
    accept: Accept,
) -> impl Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    // A short queue: the server takes connections as fast as they come.
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(accept_loop(listener, accept, tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    accept: Accept,
    tx: mpsc::Sender<Result<Conn, io::Error>>,
) {
    let slots = Arc::new(Semaphore::new(accept.max_connections as usize));
    let labels = ListenerLabels {
        listener: accept.name,
    };
    loop {
        let accepted = tokio::select! {
            // The server dropped the stream: it stopped accepting.
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(ok) => ok,
            Err(e) => {
                // Out of file descriptors, say: wait a moment rather than spin.
                tracing::warn!(listener = accept.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            accept
                .metrics
                .connections_refused
                .get_or_create(&labels)
                .inc();
            tracing::debug!(listener = accept.name, peer = %remote, max_connections = accept.max_connections, "connection refused: too many open");
            drop(stream);
            continue;
        };
        // Small gRPC frames go out at once instead of waiting out the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        let Some(tls) = &accept.tls else {
            let conn = Conn::new(Io::Plain(stream), Some(remote), None, slot);
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
            continue;
        };
        let (tx, config, metrics, labels) = (
            tx.clone(),
            tls.current(),
            accept.metrics.clone(),
            labels.clone(),
        );
        let timeout = accept.handshake_timeout;
        tokio::spawn(async move {
            let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
            let stream = match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(stream)) => stream,
                outcome => {
                    metrics.tls_handshake_failures.get_or_create(&labels).inc();
                    let error = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no handshake within {timeout:?}"),
                    };
                    tracing::debug!(listener = labels.listener, peer = %remote, %error, "TLS handshake failed");
                    return;
                }
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(peer::identity);
            let conn = Conn::new(Io::Tls(Box::new(stream)), Some(remote), identity, slot);
            let _ = tx.send(Ok(conn)).await;
        });
    }
}

/// The byte stream of a connection: plain TCP or TLS over it.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection, holding its listener slot until dropped.
pub struct Conn {
    io: Io,
    peer: Peer,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    fn new(
        io: Io,
        remote: Option<SocketAddr>,
        identity: Option<Arc<str>>,
        slot: OwnedSemaphorePermit,
    ) -> Conn {
        Conn {
            io,
            peer: Peer { remote, identity },
            _slot: slot,
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
