//! Serves HTTP/2 on a listener's accepted connections with hyper: Keel's own connection
//! loop, so nothing sits between a connection and Keel's edge layers.
//!
//! tonic's `transport::Server` wraps every service in a timer of its own, outside any layer
//! given to it, that answers a passed `grpc-timeout` CANCELLED with no details. Serving the
//! traffic listener here leaves the client's deadline to Keel from the first byte
//! (`api::deadline`).
//!
//! # Connections
//!
//! 1. Each connection from [`incoming`](super::incoming) is served in its own task, with
//!    the HTTP/2 settings of `[server]` ([`Http2`]), and its [`Peer`] and its
//!    [`ConnectionBuffers`] in every request's extensions. Each stream runs in a task of
//!    its own that its answer can give a deadline ([`StreamDeadline`](super::StreamDeadline)).
//! 2. A service error becomes the gRPC status it carries, else UNKNOWN, as tonic answered.
//! 3. A connection older than `max_connection_age` is sent GOAWAY; its calls get
//!    `max_connection_age_grace` to finish, then it is closed. So is a connection that
//!    never made a call, when it is closed to make room for a new one at
//!    `server.max_connections` (a call that raced the GOAWAY still finishes).
//!
//! # Shutdown
//!
//! When `shutdown` completes, the loop stops accepting (the listening socket closes), every
//! open connection is sent GOAWAY, and [`serve`] returns once all have closed. Dropping the
//! [`serve`] future closes every connection still open.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::Service;

use super::budget::{Buffers, ConnectionBuffers};
use super::open::Tracked;
use super::stream::Exec;
use super::{Conn, Peer};
use crate::policy::ServerSettings;

/// The service a connection's streams are given to: cloned into each stream's task, its
/// errors turned into statuses (rule 2).
pub trait Handler<B>:
    Service<
        http::Request<Incoming>,
        Response = http::Response<B>,
        Future: Send + 'static,
        Error: Into<tower::BoxError>,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> Handler<B> for S
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
{
}

/// Streams one connection may make Keel reset for their protocol errors before it is sent
/// GOAWAY. tonic passes hyper none, which leaves it unbounded; this is hyper's own default.
pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// What h2 queues for one stream ahead of its client's flow-control window. An answer
/// goes to hyper in pieces no larger than [`ANSWER_PIECE`], and the next piece only once
/// this has room, so a client that stops reading leaves at most this much plus one piece
/// in h2 per stream; the rest stays in the answer's body, counted and dropped at its
/// deadline. (hyper's default is 400 KiB.)
pub const MAX_SEND_BUF: usize = 64 << 10;

/// The largest piece of an answer handed to hyper at once: one HTTP/2 frame of the
/// default size.
pub const ANSWER_PIECE: usize = 16 << 10;

/// The header block h2 decodes before refusing a stream itself (HTTP 431), when
/// `server.max_metadata_size` is smaller: Keel's edge refuses the calls between the two
/// with a gRPC status, and keeps their connection.
///
/// h2 sends GOAWAY, failing every call of the connection, for a header block over four
/// times its limit or in more CONTINUATION frames than its limit needs; with its limit at
/// `max_metadata_size` (16 KiB), 10,000 small metadata entries were enough. With this one,
/// only a block over 4 MiB decoded, or about 1.3 MB on the wire, is treated as a flood.
pub const HEADER_DECODE_BOUND: u32 = 1 << 20;

/// How a listener speaks HTTP/2, from `[server]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Http2 {
    /// `server.max_metadata_size`: the traffic listener's edge refuses a call over it; h2
    /// itself only one over [`HEADER_DECODE_BOUND`] too.
    pub max_header_list_size: u32,
    /// Streams open at once on one connection.
    pub max_concurrent_streams: u32,
    /// How often each connection is pinged, to find peers that vanished.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// How long a connection may live before it is sent GOAWAY; `None`: forever.
    pub max_connection_age: Option<Duration>,
    /// How long the calls of a connection sent GOAWAY for its age may still run.
    pub max_connection_age_grace: Duration,
    /// Bytes in transit one connection may hold (`server.max_buffered_per_connection`).
    pub max_buffered_per_connection: usize,
}

impl Http2 {
    /// The settings `[server]` gives; an aged connection's calls get `drain_timeout`, as a
    /// shutdown's do.
    pub fn from_settings(s: &ServerSettings) -> Http2 {
        Http2 {
            max_header_list_size: s.max_metadata_size,
            max_concurrent_streams: s.max_concurrent_streams,
            keepalive_interval: s.keepalive_interval,
            keepalive_timeout: s.keepalive_timeout,
            max_connection_age: s.max_connection_age,
            max_connection_age_grace: s.drain_timeout,
            max_buffered_per_connection: s.max_buffered_per_connection,
        }
    }

    /// hyper's connection builder with these settings; its timer is what keepalive needs.
    fn builder(&self) -> hyper::server::conn::http2::Builder<Exec> {
        let mut b = hyper::server::conn::http2::Builder::new(Exec);
        b.timer(TokioTimer::new())
            .max_header_list_size(self.max_header_list_size.max(HEADER_DECODE_BOUND))
            .max_concurrent_streams(self.max_concurrent_streams)
            .keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout)
            .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
            .max_send_buf_size(MAX_SEND_BUF);
        b
    }
}

/// Serves `service` on every connection of `incoming` until `shutdown` completes and the
/// open connections have closed (see the module docs). Every connection's budget draws on
/// `buffers`.
pub async fn serve<S, B>(
    incoming: impl Stream<Item = Result<Conn, std::io::Error>>,
    service: S,
    http2: Http2,
    buffers: Arc<Buffers>,
    shutdown: impl Future<Output = ()>,
) where
    S: Handler<B>,
    B: http_body::Body<Data = Bytes, Error: Into<tower::BoxError>> + Send + 'static,
{
    let builder = http2.builder();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut open = JoinSet::new();
    {
        // Dropped when the loop ends, which closes the listening socket at once.
        let mut incoming = std::pin::pin!(incoming);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(done) = open.join_next(), if !open.is_empty() => report(done),
                conn = incoming.next() => match conn {
                    Some(Ok(conn)) => {
                        open.spawn(connection(
                            conn,
                            service.clone(),
                            builder.clone(),
                            http2.clone(),
                            buffers.connection(http2.max_buffered_per_connection),
                            stop_rx.clone(),
                        ));
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, "accept failed"),
                    None => break,
                },
            }
        }
    }
    let _ = stop_tx.send(true);
    while let Some(done) = open.join_next().await {
        report(done);
    }
}

fn report(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "a connection task panicked");
    }
}

/// Serves one connection until it closes, is closed for its age, or has drained after
/// `stop`.
async fn connection<S, B>(
    conn: Conn,
    service: S,
    builder: hyper::server::conn::http2::Builder<Exec>,
    http2: Http2,
    buffers: Arc<ConnectionBuffers>,
    mut stop: watch::Receiver<bool>,
) where
    S: Handler<B>,
    B: http_body::Body<Data = Bytes, Error: Into<tower::BoxError>> + Send + 'static,
{
    let tracked = conn.tracked().clone();
    let service = TowerToHyperService::new(PerConnection {
        inner: service,
        peer: conn.peer.clone(),
        tracked: tracked.clone(),
        buffers,
    });
    let served = builder.serve_connection(TokioIo::new(conn), service);
    let mut served = std::pin::pin!(served);
    let aged = async {
        match http2.max_connection_age {
            Some(age) => tokio::time::sleep(age).await,
            None => std::future::pending().await,
        }
    };
    let mut aged = std::pin::pin!(aged);
    // Set once the connection was sent GOAWAY for its age: when its calls must be done.
    let mut cut_at: Option<tokio::time::Instant> = None;
    let mut stopping = false;
    loop {
        let cut = async {
            match cut_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            done = served.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut aged, if cut_at.is_none() => {
                served.as_mut().graceful_shutdown();
                cut_at = Some(tokio::time::Instant::now() + http2.max_connection_age_grace);
            }
            // Closed to make room for a new connection, having made no call.
            () = tracked.closing(), if cut_at.is_none() => {
                served.as_mut().graceful_shutdown();
                cut_at = Some(tokio::time::Instant::now() + http2.max_connection_age_grace);
            }
            () = cut => {
                tracing::debug!(grace = ?http2.max_connection_age_grace, "connection closed: calls still running after max_connection_age and its grace");
                return;
            }
            changed = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                // The sender is gone only when `serve` is, which drops this task too.
                if changed.is_ok() {
                    served.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// A connection's view of the service: puts the [`Peer`] (as tonic's
/// `Connected::connect_info` did) and the connection's budget in each request's
/// extensions, marks the connection used, and answers a call's error with its gRPC status.
#[derive(Clone)]
struct PerConnection<S> {
    inner: S,
    peer: Peer,
    tracked: Arc<Tracked>,
    buffers: Arc<ConnectionBuffers>,
}

impl<S, B> Service<http::Request<Incoming>> for PerConnection<S>
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Error: Into<tower::BoxError>,
{
    type Response = http::Response<Either<B, Empty<Bytes>>>;
    // Only readiness can fail, as with tonic's server: an error from the call itself is
    // answered.
    type Error = tower::BoxError;
    type Future = Recover<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<Incoming>) -> Self::Future {
        self.tracked.used();
        req.extensions_mut().insert(self.peer.clone());
        req.extensions_mut().insert(self.buffers.clone());
        Recover {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of [`PerConnection`].
    struct Recover<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for Recover<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<tower::BoxError>,
{
    type Output = Result<http::Response<Either<B, Empty<Bytes>>>, tower::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(match ready!(self.project().inner.poll(cx)) {
            Ok(res) => res.map(Either::Left),
            Err(e) => status_response(tonic::Status::from_error(e.into())),
        }))
    }
}

/// A trailers-only answer with `status`.
fn status_response<B>(status: tonic::Status) -> http::Response<Either<B, Empty<Bytes>>> {
    let (parts, ()) = status.into_http::<()>().into_parts();
    http::Response::from_parts(parts, Either::Right(Empty::new()))
}

#[cfg(test)]
mod tests;
