//! A unary gRPC call's framing, as tonic's server frames one, without its buffers: the
//! request's one message read into a buffer sized by its length prefix (a message that
//! came in one DATA frame is not copied at all), and the answer sent as its own bytes with
//! the 5-byte prefix before them, then `grpc-status: 0`.
//!
//! # As tonic answers
//!
//! A request tonic's `Grpc::unary` would refuse is refused here with the same status, word
//! for word, so the edge rewrites it as it rewrites tonic's (`unreadable::fix_response`):
//!
//! | the request | status |
//! |---|---|
//! | `grpc-encoding` other than `identity` (Keel takes none) | UNIMPLEMENTED, with `grpc-accept-encoding: identity` |
//! | a message with its compressed flag set, or a flag other than 0 and 1 | INTERNAL |
//! | a length prefix over `server.max_message_size` | OUT_OF_RANGE (`Error, decoded message length too large`) |
//! | a body that ends inside a message | INTERNAL (`Unexpected EOF decoding stream.`) |
//! | a body with no message | INTERNAL (`Missing request message.`) |
//! | a body that fails (a reset, a limit of the edge's) | the status its error carries (a client's cancel ends the body) |
//!
//! Messages after the first are read, checked and dropped, and the body's trailers join the
//! request's metadata, as tonic does (the edge's body reader, `api::deadline::inbound`,
//! refuses a second message before it arrives here). An answer over `max_message_size` ends with tonic's
//! OUT_OF_RANGE in its trailers; a handler's error is a trailers-only answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tonic::body::Body as TonicBody;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};

use crate::grpc_code::{GRPC_MESSAGE, GRPC_STATUS};
use crate::pb::framing::{self, Messages, PREFIX};
use crate::pb::wire::Encoded;

/// Answers up to this size go out as one copied piece (prefix and message together, one
/// DATA frame); larger ones as their own bytes, never copied.
const COPY_BELOW: usize = 16 << 10;

const GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// The headers tonic keeps out of an answer's metadata: its framing sets them.
const RESERVED: [HeaderName; 5] = [
    http::header::TE,
    http::header::CONTENT_TYPE,
    GRPC_MESSAGE,
    HeaderName::from_static("grpc-message-type"),
    GRPC_STATUS,
];

const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");

/// Serves one unary call: reads `req`'s message (at most `max` bytes), calls `handler`,
/// and frames its answer (see the module docs).
pub(super) async fn serve<B, F, Fut>(
    req: http::Request<B>,
    max: usize,
    handler: F,
) -> http::Response<TonicBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: FnOnce(Request<Bytes>) -> Fut,
    Fut: Future<Output = Result<Response<Encoded>, Status>>,
{
    let request = match read(req, max).await {
        Ok(r) => r,
        Err(status) => return status.into_http(),
    };
    match handler(request).await {
        Ok(resp) => answer(resp, max),
        Err(status) => status.into_http(),
    }
}

/// The request with its one message, as tonic's `Grpc::unary` reads it.
async fn read<B>(req: http::Request<B>, max: usize) -> Result<Request<Bytes>, Status>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    refuse_compression(req.headers())?;
    let (parts, body) = req.into_parts();
    let mut body = std::pin::pin!(body);
    let mut messages = Messages::new(max);
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                let status = Status::from_error(e.into());
                // tonic reads a client's cancel as the end of its request.
                if status.code() == Code::Cancelled {
                    break;
                }
                return Err(status);
            }
        };
        match frame.into_data() {
            Ok(data) => messages.push(data)?,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    let message = messages.finish()?;
    let mut headers = parts.headers;
    if let Some(t) = trailers {
        headers.extend(t);
    }
    Ok(Request::from_parts(
        MetadataMap::from_headers(headers),
        parts.extensions,
        message,
    ))
}

/// tonic's refusal of a compressed request: Keel accepts no compression.
fn refuse_compression(headers: &HeaderMap) -> Result<(), Status> {
    let Some(value) = headers.get(GRPC_ENCODING) else {
        return Ok(());
    };
    let other = value.as_bytes();
    if other == b"identity" {
        return Ok(());
    }
    let other = match std::str::from_utf8(other) {
        Ok(s) => s.to_string(),
        Err(_) => format!("{other:?}"),
    };
    let mut status = Status::unimplemented(format!(
        "Content is compressed with `{other}` which isn't supported"
    ));
    status.metadata_mut().insert(
        "grpc-accept-encoding",
        MetadataValue::from_static("identity"),
    );
    Err(status)
}

/// The handler's answer as tonic's server frames it: its metadata as headers (less what
/// the framing sets), its message, then `grpc-status: 0`.
fn answer(resp: Response<Encoded>, max: usize) -> http::Response<TonicBody> {
    let (metadata, message, extensions) = resp.into_parts();
    let mut headers = metadata.into_headers();
    // A look at each name is cheaper than hashing five names that are almost never there.
    if headers.keys().any(|n| RESERVED.contains(n)) {
        for name in &RESERVED {
            headers.remove(name);
        }
    }
    headers.insert(http::header::CONTENT_TYPE, GRPC);
    let body = if message.len() > max {
        Answer::failed(Status::out_of_range(format!(
            "Error, encoded message length too large: found {} bytes, the limit is: {max} bytes",
            message.len()
        )))
    } else {
        Answer::new(message)
    };
    let mut res = http::Response::new(TonicBody::new(body));
    *res.version_mut() = http::Version::HTTP_2;
    *res.headers_mut() = headers;
    *res.extensions_mut() = extensions;
    res
}

/// An answer's body: its message's pieces (empty ones are skipped), then its trailers.
#[derive(Debug)]
struct Answer {
    pieces: [Bytes; 3],
    /// The first piece not yet sent.
    next: usize,
    trailers: Option<HeaderMap>,
}

impl Answer {
    fn new(message: Encoded) -> Answer {
        let len = message.len();
        let prefix = framing::prefix(len);
        let pieces = if len < COPY_BELOW {
            let mut one = BytesMut::with_capacity(PREFIX + len);
            one.put_slice(&prefix);
            one.put_slice(&message.head);
            one.put_slice(&message.tail);
            [one.freeze(), Bytes::new(), Bytes::new()]
        } else {
            [Bytes::copy_from_slice(&prefix), message.head, message.tail]
        };
        Answer {
            pieces,
            next: 0,
            trailers: Some(trailers(&Status::ok(""))),
        }
    }

    fn failed(status: Status) -> Answer {
        Answer {
            pieces: Default::default(),
            next: 0,
            trailers: Some(trailers(&status)),
        }
    }
}

/// The trailers that end an answer with `status`.
fn trailers(status: &Status) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(2);
    // Only fails on a message that cannot be a header value, which tonic's and Keel's are not.
    let _ = status.add_header(&mut map);
    map
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        while let Some(piece) = this.pieces.get_mut(this.next) {
            this.next += 1;
            if !piece.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(std::mem::take(piece)))));
            }
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        // The trailers go last.
        self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let n: usize = self.pieces[self.next..].iter().map(Bytes::len).sum();
        SizeHint::with_exact(n as u64)
    }
}

#[cfg(test)]
mod tests;
