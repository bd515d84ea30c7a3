//! A call's answer body at the edge: what an answer its client does not take may cost,
//! bounded.
//!
//! # Rules
//!
//! 1. **Pieces.** Each data chunk (an encoded message) goes to hyper in pieces of at most
//!    [`ANSWER_PIECE`] bytes, the next once hyper asks for it, which it does only when h2
//!    has room for it ([`MAX_SEND_BUF`](crate::transport::MAX_SEND_BUF) per stream). What
//!    a client does not read therefore stays here, not in h2.
//! 2. **Bytes.** A chunk larger than one piece holds its length from the connection's
//!    budget and Keel's until its last piece was taken. Past either limit the chunk is
//!    dropped and the answer ends with Keel's RESOURCE_EXHAUSTED (`BUFFER_LIMIT`) in its
//!    trailers.
//! 3. **Time.** While a chunk is not all taken, the stream's task has a deadline
//!    ([`StreamDeadline`]): the client's, else the window after the chunk was produced.
//!    When it passes the stream is dropped (reset), and all it held with it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::Call;
use crate::error::Error;
use crate::transport::{ANSWER_PIECE, ConnectionBuffers, Held, StreamDeadline};

/// What bounds one call's answer, from its edge layer.
pub(super) struct Terms {
    /// The connection's budget; `None` for a call that did not come through Keel's
    /// connection loop.
    pub(super) buffers: Option<Arc<ConnectionBuffers>>,
    /// The client's deadline, if it gave one.
    pub(super) client_deadline: Option<Instant>,
    /// How long a chunk may wait on its client without one.
    pub(super) window: Duration,
}

pin_project! {
    /// An answer body whose cost is bounded (see the module docs).
    pub struct Outbound<B> {
        #[pin]
        inner: B,
        call: Arc<Call>,
        terms: Terms,
        // What hyper has not taken of the current chunk.
        rest: Bytes,
        held: Option<Held>,
        // The stream's, found at the first poll (inside the stream's task).
        stream: Option<Option<Arc<StreamDeadline>>>,
        done: bool,
    }
}

impl<B> Outbound<B> {
    pub(super) fn new(inner: B, call: Arc<Call>, terms: Terms) -> Outbound<B> {
        Outbound {
            inner,
            call,
            terms,
            rest: Bytes::new(),
            held: None,
            stream: None,
            done: false,
        }
    }

    /// The answer body as the service gave it.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B> Body for Outbound<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let stream = this.stream.get_or_insert_with(StreamDeadline::current);
        if !this.rest.is_empty() {
            let n = this.rest.len().min(ANSWER_PIECE);
            return Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))));
        }
        // Asked again: all of the last chunk is with h2 now.
        *this.held = None;
        if let Some(s) = stream {
            s.clear();
        }
        let frame = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(None) => {
                *this.done = true;
                return Poll::Ready(None);
            }
            other => return other,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                // Trailers: the end.
                *this.done = frame.is_trailers();
                return Poll::Ready(Some(Ok(frame)));
            }
        };
        if data.len() > ANSWER_PIECE
            && let Some(buffers) = &this.terms.buffers
        {
            match buffers.hold(data.len()) {
                Ok(held) => *this.held = Some(held),
                Err(full) => {
                    *this.done = true;
                    let status = this.call.refuse(&Error::BufferLimit(full), None);
                    let mut trailers = http::HeaderMap::new();
                    // Only fails on a message that cannot be a header value; Keel's is.
                    let _ = status.add_header(&mut trailers);
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
        }
        if let Some(s) = stream {
            let at = Instant::now() + this.terms.window;
            s.set(this.terms.client_deadline.map_or(at, |d| d.min(at)));
        }
        let n = data.len().min(ANSWER_PIECE);
        *this.rest = data.split_off(n);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.rest.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match (self.done, self.rest.is_empty()) {
            (true, _) => SizeHint::with_exact(0),
            (false, true) => self.inner.size_hint(),
            // A piece is out: what is left is at least the rest.
            (false, false) => {
                let mut hint = SizeHint::new();
                hint.set_lower(self.rest.len() as u64);
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests;
