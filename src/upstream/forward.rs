//! ModelInfer on one endpoint as bytes: the request's message goes out as one gRPC frame
//! on Keel's own HTTP/2 client connection, the answer comes back as the upstream's bytes
//! with its headers and trailers, and nothing is decoded on the way but the status.
//!
//! tonic's client `Channel` puts every call through a `tower::buffer` (a hop through a
//! channel to a task of its own) and re-encodes the message it is given; here a call
//! clones the connection's `SendRequest` and writes the frame it already has, ending the
//! stream on its DATA frame.
//!
//! # Connections
//!
//! Each endpoint keeps one connection per worker ([`crate::worker`]), made on the first
//! call of that worker and again after it closes, so a call's I/O stays on the core that
//! serves it. A TLS endpoint's calls take its tonic channel instead, still as bytes.
//! `connection.max_concurrent_streams`, when set, bounds the calls in flight on the
//! endpoint as tonic's concurrency limit did.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderValue, TE};
use http::{HeaderMap, HeaderName, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use crate::grpc_code::{GRPC_MESSAGE, GRPC_STATUS, GRPC_STATUS_DETAILS};
use crate::pb::framing;
use crate::pb::wire::{Encoded, Frame};
use crate::policy::UpstreamSpec;
use crate::transport::coalesce::Coalesce;

/// The path of ModelInfer.
pub const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// A request body: one gRPC frame, sent with END_STREAM on its DATA frame.
type RequestBody = Full<Frame>;

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

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
    live: Mutex<Option<SendRequest<RequestBody>>>,
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn open(&self) -> Option<SendRequest<RequestBody>> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.as_ref().filter(|s| !s.is_closed()).cloned()
    }
}

/// How one endpoint's ModelInfer calls travel.
pub struct Forwarder {
    addr: Arc<str>,
    uri: http::Uri,
    connect_timeout: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    max_message_size: usize,
    slots: Box<[Slot]>,
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
        let uri = format!("http://{addr}{MODEL_INFER_PATH}")
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("http://invalid.invalid:1/"));
        let workers =
            crate::worker::count().max(std::thread::available_parallelism().map_or(1, usize::from));
        let c = &spec.connection;
        Forwarder {
            addr: addr.into(),
            uri,
            connect_timeout: spec.connect_timeout,
            keepalive_interval: c.keepalive_interval,
            keepalive_timeout: c.keepalive_timeout,
            max_message_size,
            slots: (0..workers).map(|_| Slot::default()).collect(),
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
                    None => self.via_hyper(message, headers).await,
                }
            };
        match tokio::time::timeout(time, exchange).await {
            Ok(r) => r,
            Err(_) => Err(NoAnswer::TimedOut),
        }
    }

    async fn via_hyper(&self, message: Encoded, headers: HeaderMap) -> Result<Answered, NoAnswer> {
        let mut send = self.sender().await?;
        // As tonic's channel does before each call: a connection that closed or was told to
        // go away since it was taken takes no new stream, so the request never waits in a
        // dying connection's queue. It never left: the next attempt connects again.
        if let Err(e) = send.ready().await {
            return Err(NoAnswer::Transport {
                detail: format!("{}: the connection closed: {}", self.addr, chain(&e)),
                never_sent: true,
            });
        }
        let mut req = Request::new(Full::new(message.framed()));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = headers;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| NoAnswer::Transport {
                detail: format!("{}: {}", self.addr, chain(&e)),
                never_sent: false,
            })?;
        self.read(resp).await
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
        *req.uri_mut() = format!("https://{}{MODEL_INFER_PATH}", self.addr)
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("https://invalid.invalid:1/"));
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
    async fn sender(&self) -> Result<SendRequest<RequestBody>, NoAnswer> {
        let slot = &self.slots[crate::worker::index() % self.slots.len()];
        if let Some(s) = slot.open() {
            return Ok(s);
        }
        let _one = slot.connecting.lock().await;
        if let Some(s) = slot.open() {
            return Ok(s);
        }
        let send = self.connect().await?;
        *slot.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(send.clone());
        Ok(send)
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, NoAnswer> {
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
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(Coalesce::new(tcp)))
            .await
            .map_err(|e| unreachable(format!("HTTP/2 handshake failed: {}", chain(&e)), true))?;
        let addr = self.addr.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %addr, error = %chain(&e), "upstream connection closed");
            }
        });
        Ok(send)
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
