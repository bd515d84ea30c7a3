//! Accepting connections: each listener's accept loop, with its cap on open connections,
//! TLS handshakes run beside the loop, who is on the other end of each connection, and the
//! HTTP/2 connection loop that serves the traffic listener ([`serve`]).
//!
//! # Accepting
//!
//! 1. The loop accepts a TCP connection and takes one of the listener's
//!    `server.max_connections` slots ([`Connections`], one for all the sockets the
//!    listener's workers accept on). At the cap, a connection that never became useful
//!    is closed to make room ([`open`](self::open) says which); when every open one made
//!    a call, the new one is closed at once and counted in
//!    `keel_connections_refused_total`.
//! 2. On a TLS listener the handshake runs in its own task, so a slow or silent client
//!    never stalls the loop. A failed handshake closes the connection and counts in
//!    `keel_tls_handshake_failures_total`.
//! 3. The connection goes to the server with its [`Peer`] (Keel's [`serve`] on the traffic
//!    listener, tonic's on the admin one); the slot is freed when the server drops the
//!    connection.
//!
//! # Handshake deadline
//!
//! From its accept, a connection has `server.handshake_timeout` to complete its TLS
//! handshake (itself bounded by `server.tls_handshake_timeout` too) and the first bytes a
//! client must send, the HTTP/2 preface ([`preface`](self::preface)). Until then, every
//! read of the connection also watches that deadline; when it passes the read fails, the
//! server drops the connection, and `keel_connections_closed_total{reason =
//! "handshake_timeout"}` counts it. A connection whose first bytes are not HTTP/2 (the
//! admin listener's HTTP/1.1) is left to its server once they arrive.
//!
//! The loop stops, and the listening socket closes, when the server stops reading from it
//! (at shutdown).

mod budget;
pub(crate) mod coalesce;
mod open;
mod peer;
mod preface;
mod serve;
mod stream;
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
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use coalesce::Coalesce;
use open::{Admitted, Open, Slot};
use preface::{Preface, Progress};

pub use budget::{BufferFull, Buffers, ConnectionBuffers, Held, Scope};
pub use peer::{Peer, identity};
pub use serve::{
    ANSWER_PIECE, HEADER_DECODE_BOUND, Http2, MAX_LOCAL_ERROR_RESETS, MAX_SEND_BUF, serve,
};
pub use stream::StreamDeadline;
pub use tls::Tls;

use crate::observe::Metrics;
use crate::observe::metrics::{ConnectionClosedLabels, ListenerLabels};

/// How one listener accepts.
#[derive(Clone)]
pub struct Accept {
    /// `traffic` or `admin`, for logs and metrics.
    pub name: &'static str,
    /// Connections open at once; at the cap, one that never became useful makes room for
    /// a new one, else the new one is closed.
    pub max_connections: u32,
    /// Whether the server marks connections that made a call (Keel's [`serve`] does), so
    /// one that never did may make room at the cap.
    pub reports_use: bool,
    /// TLS, when the listener speaks it.
    pub tls: Option<Arc<Tls>>,
    /// How long a client has to finish its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// How long a connection has, from its accept, to finish its TLS handshake and its
    /// HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Where refusals and failed handshakes are counted.
    pub metrics: Arc<Metrics>,
}

/// A listener's open connections, counted against its `max_connections`: one for all the
/// sockets of a listener, so the cap bounds the listener however many workers accept on it
/// (each with its own socket). Taken on accept and on close only, never per call.
#[derive(Clone)]
pub struct Connections(Arc<Open>);

impl Connections {
    /// No connection open yet, with the cap and the use reports of `accept`.
    pub fn new(accept: &Accept) -> Connections {
        Connections(Open::new(accept.max_connections, accept.reports_use))
    }
}

/// The connections accepted on `listener`, for [`serve`] or tonic's
/// `serve_with_incoming_shutdown`, counted against a cap of their own.
pub fn incoming(
    listener: TcpListener,
    accept: Accept,
) -> impl Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    let open = Connections::new(&accept);
    incoming_counted(listener, accept, open)
}

/// The connections accepted on `listener`, counted in `open` with those of the other
/// sockets of the same listener (one per worker). The accept loop runs on the calling
/// runtime.
pub fn incoming_counted(
    listener: TcpListener,
    accept: Accept,
    open: Connections,
) -> impl Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    // A short queue: the server takes connections as fast as they come.
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(accept_loop(listener, accept, open.0, tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    accept: Accept,
    open: Arc<Open>,
    tx: mpsc::Sender<Result<Conn, io::Error>>,
) {
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
        let deadline = Instant::now() + accept.handshake_timeout;
        let slot = match open.admit() {
            Some(Admitted::Room(slot)) => slot,
            Some(Admitted::Displacing(slot, stage)) => {
                accept
                    .metrics
                    .connections_closed
                    .get_or_create(&ConnectionClosedLabels {
                        listener: accept.name,
                        reason: "displaced",
                    })
                    .inc();
                tracing::debug!(listener = accept.name, peer = %remote, max_connections = accept.max_connections, displaced = ?stage, "a connection that never made a call closed to make room");
                slot
            }
            None => {
                accept
                    .metrics
                    .connections_refused
                    .get_or_create(&labels)
                    .inc();
                tracing::debug!(listener = accept.name, peer = %remote, max_connections = accept.max_connections, "connection refused: too many open, all of them used");
                drop(stream);
                continue;
            }
        };
        // Small gRPC frames go out at once instead of waiting out the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        let closed = Closed {
            metrics: accept.metrics.clone(),
            listener: accept.name,
        };
        let Some(tls) = &accept.tls else {
            let conn = Conn::new(
                Io::Plain(Coalesce::new(stream)),
                Some(remote),
                None,
                slot,
                deadline,
                closed,
            );
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
        let tls_deadline = deadline.min(Instant::now() + accept.tls_handshake_timeout);
        tokio::spawn(async move {
            let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
            let tracked = slot.tracked().clone();
            let outcome = tokio::select! {
                outcome = tokio::time::timeout_at(tls_deadline, handshake) => outcome,
                // Closed to make room for a newer connection; counted as that.
                () = tracked.closing() => return,
            };
            let stream = match outcome {
                Ok(Ok(stream)) => stream,
                outcome => {
                    metrics.tls_handshake_failures.get_or_create(&labels).inc();
                    let error = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => "no handshake in time (server.tls_handshake_timeout, server.handshake_timeout)".to_string(),
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
            let conn = Conn::new(
                Io::Tls(Box::new(Coalesce::new(stream))),
                Some(remote),
                identity,
                slot,
                deadline,
                closed,
            );
            let _ = tx.send(Ok(conn)).await;
        });
    }
}

/// Where a connection closed for its handshake deadline is counted.
struct Closed {
    metrics: Arc<Metrics>,
    listener: &'static str,
}

/// The byte stream of a connection: plain TCP or TLS over it.
/// Writes are gathered ([`coalesce`]) so that h2 writes a connection's frames together.
enum Io {
    Plain(Coalesce<TcpStream>),
    Tls(Box<Coalesce<tokio_rustls::server::TlsStream<TcpStream>>>),
}

/// An accepted connection, holding its listener slot until dropped.
pub struct Conn {
    io: Io,
    peer: Peer,
    slot: Slot,
    /// Until the preface is complete: what was read of it, and its deadline.
    handshake: Option<Handshake>,
}

/// A connection's HTTP/2 preface, while it is arriving.
struct Handshake {
    preface: Preface,
    /// Boxed: a [`Conn`] must be `Unpin`, and this is one allocation per connection.
    deadline: Pin<Box<Sleep>>,
    closed: Closed,
}

impl Conn {
    fn new(
        io: Io,
        remote: Option<SocketAddr>,
        identity: Option<Arc<str>>,
        slot: Slot,
        deadline: Instant,
        closed: Closed,
    ) -> Conn {
        Conn {
            io,
            peer: Peer { remote, identity },
            slot,
            handshake: Some(Handshake {
                preface: Preface::default(),
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
                closed,
            }),
        }
    }

    /// What the listener knows of this connection: the server marks it used.
    pub(crate) fn tracked(&self) -> &Arc<open::Tracked> {
        self.slot.tracked()
    }

    /// Fails the read of a connection still in its handshake once its deadline passed or
    /// it was closed to make room; registers the task to be woken for either.
    fn check_handshake(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(h) = &mut self.handshake else {
            return Ok(());
        };
        let tracked = self.slot.tracked();
        tracked.wake_reader_when_displaced(cx.waker());
        if tracked.displaced() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room for a new connection (server.max_connections)",
            ));
        }
        if h.deadline.as_mut().poll(cx).is_ready() {
            h.closed
                .metrics
                .connections_closed
                .get_or_create(&ConnectionClosedLabels {
                    listener: h.closed.listener,
                    reason: "handshake_timeout",
                })
                .inc();
            tracing::debug!(listener = h.closed.listener, peer = ?self.peer.remote, "connection closed: no HTTP/2 preface within server.handshake_timeout");
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within server.handshake_timeout",
            ));
        }
        Ok(())
    }

    /// Feeds newly read bytes to the preface; once it is complete (or the bytes are not
    /// HTTP/2), the connection is ready and its reads are plain again.
    fn saw(&mut self, bytes: &[u8]) {
        let Some(h) = &mut self.handshake else {
            return;
        };
        if bytes.is_empty() {
            return;
        }
        if h.preface.feed(bytes) != Progress::Partial {
            self.slot.tracked().ready();
            self.handshake = None;
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
        let this = self.get_mut();
        this.check_handshake(cx)?;
        let before = buf.filled().len();
        let read = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Poll::Ready(Ok(())) = read {
            this.saw(&buf.filled()[before..]);
        }
        read
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
