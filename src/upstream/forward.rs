//! ModelInfer on one endpoint as bytes: the request's message goes out as one gRPC frame
//! on Keel's own HTTP/2 client connection, the answer comes back as the upstream's bytes
//! with its headers and trailers, and nothing is decoded on the way but the status.
//!
//! tonic's client `Channel` puts every call through a `tower::buffer` (a hop through a
//! channel to a task of its own) and re-encodes the message it is given. hyper's HTTP/2
//! client, in turn, hands each request to its connection task through a channel and spawns
//! two tasks per call (one awaits the answer, one pipes the body). Here a call clones the
//! connection's h2 `SendRequest`, opens its stream and queues its one frame with
//! END_STREAM from its own task, and awaits the answer there: the connection's task does
//! the I/O and nothing else is spawned.
//!
//! # Connections
//!
//! Each endpoint keeps one connection per worker ([`crate::worker`]), made on the first
//! call of that worker and again after it closes, so a call's I/O stays on the core that
//! serves it. Its task also pings the peer (`connection.keepalive_interval`) and closes the
//! connection when a ping goes unanswered for `keepalive_timeout`. A TLS endpoint's calls
//! take its tonic channel instead, still as bytes. `connection.max_concurrent_streams`,
//! when set, bounds the calls in flight on the endpoint as tonic's concurrency limit did.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderValue, TE};
use http::{HeaderMap, HeaderName, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt as _, Full};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tonic::transport::Channel;

use crate::grpc_code::{GRPC_MESSAGE, GRPC_STATUS, GRPC_STATUS_DETAILS};
use crate::pb::framing;
use crate::pb::wire::{Encoded, Frame};
use crate::policy::UpstreamSpec;
use crate::transport::coalesce::Coalesce;

/// The path of ModelInfer.
pub const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// A connection's handle for opening streams: each carries one gRPC frame.
type Sender = h2::client::SendRequest<Frame>;

/// The receive window Keel grants each stream and the connection (hyper's defaults, which
/// the forwarder had before it spoke h2 itself): an answer of a few MiB is not held up
/// waiting for WINDOW_UPDATEs, as it would be with HTTP/2's 64 KiB.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// At most this much of a request is buffered per stream beyond the peer's window.
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// The largest header list Keel accepts from an upstream (hyper's default).
const MAX_HEADER_LIST: u32 = 16 * 1024;

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static(crate::headers::GRPC_TIMEOUT);

/// Why an attempt got no answer.
#[derive(Debug)]
pub enum NoAnswer {
    /// No connection, or it broke before the answer was whole; `never_sent` when the
    /// connection was refused (the request never left).
    Transport {
        /// What happened, for the client and the logs.
        detail: String,
        /// Whether the request cannot have reached the upstream.
        never_sent: bool,
    },
    /// The upstream answered with a gRPC status other than OK.
    Status(tonic::Status),
    /// The attempt's time ran out.
    TimedOut,
    /// The answer is larger than `server.max_message_size`.
    TooLarge(String),
    /// The answer is not a gRPC answer of one message.
    Protocol(String),
}

/// An OK answer: its message and the metadata the upstream sent with it.
#[derive(Debug)]
pub struct Answered {
    /// The ModelInferResponse, as the upstream encoded it.
    pub message: Bytes,
    /// The response headers.
    pub headers: HeaderMap,
    /// The trailers, `grpc-status` and `grpc-message` removed.
    pub trailers: HeaderMap,
}

/// One connection slot: the live connection, and a lock so that one call of the worker
/// makes it while the others wait for it.
#[derive(Default)]
struct Slot {
    live: Mutex<Option<Live>>,
    connecting: tokio::sync::Mutex<()>,
}

/// A connection made by a [`Slot`].
struct Live {
    send: Sender,
    /// Set when the connection takes no more streams: its task ended, or a call could not
    /// open a stream on it (it was told to go away, or failed). The slot then makes a new
    /// one, while this one finishes the streams it has.
    closed: Arc<AtomicBool>,
}

/// Why a connection's task ended.
#[derive(Debug)]
enum Ended {
    /// The connection closed (an error, or the peer went away).
    Closed(Result<(), h2::Error>),
    /// A keepalive ping went unanswered: the connection is dropped.
    Unanswered,
    /// Its forwarder was dropped.
    Dropped,
}

impl Live {
    /// A connection's handle, and the task that drives it: its I/O, a ping every `every`
    /// that must be answered within `within`, until it closes or `stop`'s sender (the
    /// forwarder's) is dropped.
    fn run<T>(
        send: Sender,
        mut conn: h2::client::Connection<T, Frame>,
        every: Duration,
        within: Duration,
        mut stop: watch::Receiver<()>,
    ) -> (Live, impl Future<Output = Ended> + Send + 'static)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let closed = Arc::new(AtomicBool::new(false));
        let pings = conn.ping_pong();
        let done = closed.clone();
        let run = async move {
            let ended = tokio::select! {
                r = &mut conn => Ended::Closed(r),
                () = keepalive(pings, every, within) => Ended::Unanswered,
                _ = stop.changed() => Ended::Dropped,
            };
            done.store(true, Ordering::Release);
            ended
        };
        (Live { send, closed }, run)
    }
}

impl Slot {
    /// The live connection's handle and its `closed` flag, if it takes streams.
    fn open(&self) -> Option<(Sender, Arc<AtomicBool>)> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.as_ref()
            .filter(|l| !l.closed.load(Ordering::Acquire))
            .map(|l| (l.send.clone(), l.closed.clone()))
    }
}

/// How one endpoint's ModelInfer calls travel.
pub struct Forwarder {
    addr: Arc<str>,
    uri: http::Uri,
    /// The same through a TLS endpoint's channel.
    tls_uri: http::Uri,
    connect_timeout: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    max_message_size: usize,
    slots: Box<[Slot]>,
    /// Dropped with the forwarder: every connection's task ends.
    stop: watch::Sender<()>,
    streams: Option<Arc<Semaphore>>,
    /// A TLS endpoint's channel: its calls go through tonic's transport.
    tls: Option<Channel>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Forwarder {
    /// The forwarder of endpoint `addr` (`host:port`) of an upstream with `spec`; `tls` is
    /// the endpoint's tonic channel when the upstream speaks TLS.
    pub fn new(
        addr: &str,
        spec: &UpstreamSpec,
        max_message_size: usize,
        tls: Option<Channel>,
    ) -> Forwarder {
        let uri = |scheme: &'static str| {
            format!("{scheme}://{addr}{MODEL_INFER_PATH}")
                .parse()
                .unwrap_or_else(|_| http::Uri::from_static("http://invalid.invalid:1/"))
        };
        let workers =
            crate::worker::count().max(std::thread::available_parallelism().map_or(1, usize::from));
        let c = &spec.connection;
        Forwarder {
            addr: addr.into(),
            uri: uri("http"),
            tls_uri: uri("https"),
            connect_timeout: spec.connect_timeout,
            keepalive_interval: c.keepalive_interval,
            keepalive_timeout: c.keepalive_timeout,
            max_message_size,
            slots: (0..workers).map(|_| Slot::default()).collect(),
            stop: watch::channel(()).0,
            streams: c
                .max_concurrent_streams
                .map(|n| Arc::new(Semaphore::new(n))),
            tls,
        }
    }

    /// Sends `message` with `headers` (the call's metadata: request id, deadline, trace)
    /// and reads the answer, within `time`.
    pub async fn infer(
        &self,
        message: Encoded,
        mut headers: HeaderMap,
        time: Duration,
    ) -> Result<Answered, NoAnswer> {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        if let Ok(mut v) = HeaderValue::from_str(&grpc_timeout(time)) {
            // Never indexed: it differs per call (see `grpc::request_id_value`).
            v.set_sensitive(true);
            headers.insert(GRPC_TIMEOUT, v);
        }
        let exchange =
            async {
                let _stream =
                    match &self.streams {
                        Some(s) => Some(s.clone().acquire_owned().await.map_err(|_| {
                            NoAnswer::Transport {
                                detail: format!("{}: closed", self.addr),
                                never_sent: true,
                            }
                        })?),
                        None => None,
                    };
                match &self.tls {
                    Some(channel) => self.via_channel(channel.clone(), message, headers).await,
                    None => self.via_h2(message, headers).await,
                }
            };
        match tokio::time::timeout(time, exchange).await {
            Ok(r) => r,
            Err(_) => Err(NoAnswer::TimedOut),
        }
    }

    async fn via_h2(&self, message: Encoded, headers: HeaderMap) -> Result<Answered, NoAnswer> {
        let (send, closed) = self.sender().await?;
        // As tonic's channel does before each call: a connection that closed or was told to
        // go away since it was taken takes no new stream, so the request never waits in a
        // dying connection's queue. It never left, and the connection is marked so that the
        // next attempt makes a new one (while this one finishes the streams it has).
        let never_sent = |e: h2::Error| {
            closed.store(true, Ordering::Release);
            NoAnswer::Transport {
                detail: format!("{}: the connection closed: {}", self.addr, chain(&e)),
                never_sent: true,
            }
        };
        let mut send = send.ready().await.map_err(never_sent)?;
        let mut req = Request::new(());
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = headers;
        let (answer, mut body) = send.send_request(req, false).map_err(never_sent)?;
        // h2 queues the frame whatever the peer's window: no capacity to wait for here.
        let sent = body.send_data(message.framed(), true);
        let resp = match (sent, answer.await) {
            (_, Ok(resp)) => resp,
            (Err(e), Err(_)) | (Ok(()), Err(e)) => {
                return Err(NoAnswer::Transport {
                    detail: format!("{}: {}", self.addr, chain(&e)),
                    never_sent: false,
                });
            }
        };
        self.read(resp.map(Received::new)).await
    }

    async fn via_channel(
        &self,
        mut channel: Channel,
        message: Encoded,
        headers: HeaderMap,
    ) -> Result<Answered, NoAnswer> {
        use tower::ServiceExt as _;
        let mut frame = message.framed();
        let body = tonic::body::Body::new(Full::new(frame.copy_to_bytes(frame.remaining())));
        let mut req = Request::new(body);
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.tls_uri.clone();
        *req.headers_mut() = headers;
        let resp = (&mut channel)
            .oneshot(req)
            .await
            .map_err(|e| NoAnswer::Transport {
                detail: format!("{}: {}", self.addr, chain(&e)),
                never_sent: refused(&e),
            })?;
        self.read(resp).await
    }

    /// This worker's connection, made now if it has none open.
    async fn sender(&self) -> Result<(Sender, Arc<AtomicBool>), NoAnswer> {
        let slot = &self.slots[crate::worker::index() % self.slots.len()];
        if let Some(s) = slot.open() {
            return Ok(s);
        }
        let _one = slot.connecting.lock().await;
        if let Some(s) = slot.open() {
            return Ok(s);
        }
        let live = self.connect().await?;
        let open = (live.send.clone(), live.closed.clone());
        *slot.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(live);
        Ok(open)
    }

    async fn connect(&self) -> Result<Live, NoAnswer> {
        let unreachable = |detail: String, never_sent| NoAnswer::Transport {
            detail: format!("{}: {detail}", self.addr),
            never_sent,
        };
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(&*self.addr))
            .await
        {
            Err(_) => {
                return Err(unreachable(
                    format!("no connection within {:?}", self.connect_timeout),
                    true,
                ));
            }
            Ok(Err(e)) => {
                let refused = e.kind() == std::io::ErrorKind::ConnectionRefused;
                return Err(unreachable(format!("cannot connect: {e}"), refused));
            }
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .enable_push(false)
            .handshake::<_, Frame>(Coalesce::new(tcp));
        let (send, conn) = match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(unreachable(
                    format!("HTTP/2 handshake failed: {}", chain(&e)),
                    true,
                ));
            }
            Err(_) => {
                return Err(unreachable(
                    format!("no HTTP/2 handshake within {:?}", self.connect_timeout),
                    true,
                ));
            }
        };
        let (live, run) = Live::run(
            send,
            conn,
            self.keepalive_interval,
            self.keepalive_timeout,
            self.stop.subscribe(),
        );
        let addr = self.addr.clone();
        tokio::spawn(async move {
            match run.await {
                Ended::Closed(Err(e)) => {
                    tracing::debug!(endpoint = %addr, error = %chain(&e), "upstream connection closed");
                }
                Ended::Unanswered => {
                    tracing::debug!(endpoint = %addr, "upstream connection closed: a ping went unanswered");
                }
                Ended::Closed(Ok(())) | Ended::Dropped => {}
            }
        });
        Ok(live)
    }

    /// Reads an answer: its status, then its one message and trailers.
    async fn read<B>(&self, resp: Response<B>) -> Result<Answered, NoAnswer>
    where
        B: Body<Data: Buf> + Unpin,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let (parts, mut body) = resp.into_parts();
        let mut headers = parts.headers;
        // A trailers-only answer: its status is in the headers.
        if let Some(status) = status_of(&mut headers) {
            return Err(NoAnswer::Status(status));
        }
        if parts.status != http::StatusCode::OK {
            return Err(NoAnswer::Status(http_status(parts.status)));
        }
        let limit = self.max_message_size.saturating_add(5);
        let mut first: Option<Bytes> = None;
        let mut more = BytesMut::new();
        let mut trailers = HeaderMap::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| NoAnswer::Transport {
                detail: format!("{}: {}", self.addr, chain(&e)),
                never_sent: false,
            })?;
            match frame.into_data() {
                Ok(mut data) => {
                    let len = first.as_ref().map_or(0, Bytes::len) + more.len();
                    if len + data.remaining() > limit {
                        return Err(NoAnswer::TooLarge(format!(
                            "the answer is over {} bytes",
                            self.max_message_size
                        )));
                    }
                    let data = data.copy_to_bytes(data.remaining());
                    match &first {
                        None if more.is_empty() => first = Some(data),
                        _ => {
                            if let Some(f) = first.take() {
                                // The answer's length is in its prefix: room for all of
                                // it at once, not regrown (and copied) as frames come.
                                let len = framing::read_prefix(&f)
                                    .map_or(0, |(_, n)| framing::PREFIX + n);
                                more.reserve(len.min(limit));
                                more.extend_from_slice(&f);
                            }
                            more.extend_from_slice(&data);
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = t;
                    }
                }
            }
        }
        match status_of(&mut trailers) {
            Some(status) => return Err(NoAnswer::Status(status)),
            None if !trailers.contains_key(GRPC_STATUS) => {
                return Err(NoAnswer::Protocol(
                    "the answer ended without a grpc-status".into(),
                ));
            }
            None => {}
        }
        trailers.remove(GRPC_STATUS);
        trailers.remove(GRPC_MESSAGE);
        let data = first.unwrap_or_else(|| more.freeze());
        Ok(Answered {
            message: one_message(data, self.max_message_size)?,
            headers,
            trailers,
        })
    }
}

/// Pings the peer every `every` and returns when a ping goes unanswered for `within` (or
/// the connection can take no more pings): the connection is then closed.
async fn keepalive(pings: Option<h2::PingPong>, every: Duration, within: Duration) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(within, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// An answer's body as h2 receives it: each DATA frame's bytes are handed back to the
/// stream's window as they are taken, then the trailers.
struct Received {
    stream: h2::RecvStream,
    trailers_read: bool,
}

impl Received {
    fn new(stream: h2::RecvStream) -> Received {
        Received {
            stream,
            trailers_read: false,
        }
    }
}

impl Body for Received {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, h2::Error>>> {
        if self.trailers_read {
            return Poll::Ready(None);
        }
        if let Some(data) = ready!(self.stream.poll_data(cx)) {
            let data = data?;
            let _ = self.stream.flow_control().release_capacity(data.len());
            return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        let trailers = ready!(self.stream.poll_trailers(cx))?;
        self.trailers_read = true;
        Poll::Ready(trailers.map(|t| Ok(http_body::Frame::trailers(t))))
    }
}

/// The status in `headers` when it is not OK; a `grpc-status-details-bin` that is not
/// base64 is dropped (tonic's reader would panic on it).
fn status_of(headers: &mut HeaderMap) -> Option<tonic::Status> {
    let code = headers.get(GRPC_STATUS)?;
    if code.as_bytes() == b"0" {
        return None;
    }
    headers.remove(GRPC_STATUS_DETAILS);
    tonic::Status::from_header_map(headers)
}

/// The one message of a unary answer's body.
fn one_message(mut data: Bytes, max: usize) -> Result<Bytes, NoAnswer> {
    let Some((compressed, len)) = framing::read_prefix(&data) else {
        return Err(NoAnswer::Protocol(format!(
            "the answer has {} bytes, not a gRPC message",
            data.len()
        )));
    };
    if compressed != 0 {
        return Err(NoAnswer::Protocol(
            "the answer is compressed, and Keel asked for none".into(),
        ));
    }
    if len > max {
        return Err(NoAnswer::TooLarge(format!(
            "the answer is {len} bytes, over {max}"
        )));
    }
    if data.len() != framing::PREFIX + len {
        return Err(NoAnswer::Protocol(format!(
            "the answer's body is {} bytes for a message of {len}: {}",
            data.len(),
            if data.len() < framing::PREFIX + len {
                "cut short"
            } else {
                "more than one message"
            }
        )));
    }
    data.advance(framing::PREFIX);
    Ok(data)
}

/// The gRPC status for an HTTP status other than 200, as gRPC's HTTP mapping says.
fn http_status(status: http::StatusCode) -> tonic::Status {
    use tonic::Code;
    let code = match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    tonic::Status::new(code, format!("the upstream answered HTTP {status}"))
}

/// `grpc-timeout` for `d`: the most precise unit that fits in 8 digits.
pub fn grpc_timeout(d: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let units: [(char, u128); 6] = [
        ('n', d.as_nanos()),
        ('u', d.as_micros()),
        ('m', d.as_millis()),
        ('S', u128::from(d.as_secs())),
        ('M', u128::from(d.as_secs() / 60)),
        ('H', u128::from(d.as_secs() / 3600)),
    ];
    units
        .iter()
        .find(|(_, v)| *v <= MAX)
        .map_or_else(|| format!("{MAX}H"), |(u, v)| format!("{v}{u}"))
}

/// An error and its causes, as one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Whether a transport error is a refused connection.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(flag: u8, msg: &[u8], declared: usize) -> Bytes {
        let mut b = BytesMut::new();
        b.extend_from_slice(&[flag]);
        b.extend_from_slice(&(declared as u32).to_be_bytes());
        b.extend_from_slice(msg);
        b.freeze()
    }

    #[test]
    fn one_message_is_read_without_its_prefix() {
        let m = one_message(framed(0, b"abc", 3), 10).expect("message");
        assert_eq!(&m[..], b"abc");
        assert_eq!(&one_message(framed(0, b"", 0), 10).expect("empty")[..], b"");
    }

    #[test]
    fn a_malformed_answer_is_a_protocol_failure_not_a_panic() {
        let cases = [
            (Bytes::from_static(b"\0\0"), "not a gRPC message"),
            (framed(1, b"abc", 3), "compressed"),
            (framed(0, b"ab", 3), "cut short"),
            (framed(0, b"abcd", 3), "more than one message"),
        ];
        for (data, says) in cases {
            match one_message(data, 10) {
                Err(NoAnswer::Protocol(m)) => assert!(m.contains(says), "{m}"),
                other => panic!("{says}: {other:?}"),
            }
        }
        assert!(matches!(
            one_message(framed(0, b"abc", 3), 2),
            Err(NoAnswer::TooLarge(_))
        ));
    }

    /// A client connection over an in-memory pipe to an h2 server, driven by
    /// [`Live::run`]: the server's end, handshaken, and the stop (the forwarder's part).
    async fn connection(
        every: Duration,
        within: Duration,
    ) -> (
        Live,
        tokio::task::JoinHandle<Ended>,
        h2::server::Connection<tokio::io::DuplexStream, Bytes>,
        watch::Sender<()>,
    ) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let (send, conn) = h2::client::Builder::new()
            .handshake::<_, Frame>(near)
            .await
            .expect("client handshake");
        let (stop, stopped) = watch::channel(());
        let (live, run) = Live::run(send, conn, every, within, stopped);
        let run = tokio::spawn(run);
        let server = h2::server::handshake(far).await.expect("server handshake");
        (live, run, server, stop)
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_answers_pings_keeps_its_connection() {
        let (live, run, mut server, stop) =
            connection(Duration::from_secs(1), Duration::from_millis(500)).await;
        // The server answers pings while it is polled.
        let serving = tokio::spawn(async move { while server.accept().await.is_some() {} });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            !live.closed.load(Ordering::Acquire),
            "closed after 10 pings"
        );
        assert!(!run.is_finished());
        drop(stop);
        let ended = tokio::time::timeout(Duration::from_secs(1), run).await;
        assert!(matches!(ended, Ok(Ok(Ended::Dropped))), "{ended:?}");
        serving.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_answering_pings_loses_its_connection() {
        let (live, run, server, _stop) =
            connection(Duration::from_secs(1), Duration::from_millis(500)).await;
        // Held, never polled: the server reads nothing and answers nothing.
        let started = tokio::time::Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the connection outlived a minute of unanswered pings")
            .expect("task");
        assert!(matches!(ended, Ended::Unanswered), "{ended:?}");
        // The first ping goes out after a second and is given half a second.
        assert_eq!(started.elapsed(), Duration::from_millis(1500));
        assert!(live.closed.load(Ordering::Acquire));
        drop(server);
    }

    /// Answers each stream of `conn` with the canned answer `OK`, until it closes.
    async fn answer_all(mut conn: h2::server::Connection<TcpStream, Bytes>) {
        while let Some(Ok((_req, respond))) = conn.accept().await {
            answer(respond);
        }
    }

    fn answer(mut respond: h2::server::SendResponse<Bytes>) {
        let mut head = Response::new(());
        head.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        let Ok(mut body) = respond.send_response(head, false) else {
            return;
        };
        let mut trailers = HeaderMap::new();
        trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
        let _ = body.send_data(framed(0, b"OK", 2), false);
        let _ = body.send_trailers(trailers);
    }

    #[tokio::test]
    async fn a_connection_told_to_go_away_is_replaced_while_it_finishes_its_calls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (first_call, first_call_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            // The first connection: its first call is held, then the server goes away.
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut conn = h2::server::handshake(tcp).await.expect("handshake");
            let (_req, respond) = conn.accept().await.expect("a call").expect("a stream");
            conn.graceful_shutdown();
            let _ = first_call.send(respond);
            let first = tokio::spawn(async move { while conn.accept().await.is_some() {} });
            // Every later connection answers.
            loop {
                let (tcp, _) = listener.accept().await.expect("accept");
                let conn = h2::server::handshake(tcp).await.expect("handshake");
                tokio::spawn(answer_all(conn));
                if first.is_finished() {
                    break;
                }
            }
        });
        let policy =
            crate::policy::Policy::parse(&format!("[upstreams.up]\nendpoints = [\"{addr}\"]\n"))
                .expect("policy");
        let fwd = Arc::new(Forwarder::new(
            &addr,
            &policy.upstreams["up"],
            1 << 20,
            None,
        ));
        let message = || Encoded {
            head: Bytes::from_static(b"hi"),
            tail: Bytes::new(),
        };
        let held = tokio::spawn({
            let fwd = fwd.clone();
            async move {
                fwd.infer(message(), HeaderMap::new(), Duration::from_secs(10))
                    .await
            }
        });
        let respond = first_call_rx.await.expect("the first call arrived");
        // The next calls meet the GOAWAY: the first of them that does is refused before it
        // leaves, and the one after it goes on a new connection, while the held call's
        // connection is still open.
        let mut refused = 0;
        let mut served = false;
        for _ in 0..20 {
            match fwd
                .infer(message(), HeaderMap::new(), Duration::from_secs(10))
                .await
            {
                Ok(a) => {
                    assert_eq!(&a.message[..], b"OK");
                    served = true;
                    break;
                }
                Err(NoAnswer::Transport { .. }) => refused += 1,
                Err(other) => panic!("{other:?}"),
            }
        }
        assert!(
            served,
            "no call served on a new connection after {refused} refusals"
        );
        assert!(refused <= 2, "{refused} calls refused");
        assert!(!held.is_finished(), "the held call ended early");
        answer(respond);
        let held = held
            .await
            .expect("task")
            .expect("the held call is answered");
        assert_eq!(&held.message[..], b"OK");
        server.abort();
    }

    #[test]
    fn grpc_timeout_uses_the_most_precise_unit_that_fits() {
        assert_eq!(grpc_timeout(Duration::from_millis(1500)), "1500000u");
        assert_eq!(grpc_timeout(Duration::from_nanos(10)), "10n");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), "200000S");
    }

    #[test]
    fn a_status_in_headers_is_read_and_bad_details_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("14"));
        h.insert("grpc-message", HeaderValue::from_static("down%20now"));
        h.insert(
            "grpc-status-details-bin",
            HeaderValue::from_static("%%%not base64"),
        );
        let s = status_of(&mut h).expect("status");
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.message(), "down now");
        let mut ok = HeaderMap::new();
        ok.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(status_of(&mut ok).is_none());
    }

    #[test]
    fn http_statuses_map_as_grpc_says() {
        assert_eq!(
            http_status(http::StatusCode::SERVICE_UNAVAILABLE).code(),
            tonic::Code::Unavailable
        );
        assert_eq!(
            http_status(http::StatusCode::NOT_FOUND).code(),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            http_status(http::StatusCode::IM_A_TEAPOT).code(),
            tonic::Code::Unknown
        );
    }
}
