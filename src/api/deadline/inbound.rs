//! A call's request body at the edge: what an unfinished body may cost, bounded.
//!
//! # Rules
//!
//! A body is *unfinished* while its call has not been answered and its end has not arrived,
//! and, once the call is answered (a stream), while one of its messages is partly
//! received. Then:
//!
//! 1. **Time.** It must finish within the window ([`super::EdgeDeadlineLayer`] says which):
//!    an unanswered call's body counts from the call's arrival, a stream's message from its
//!    first byte. Past it the call fails DEADLINE_EXCEEDED.
//! 2. **Slots.** An unanswered call whose body has to wait for more bytes holds one of
//!    Keel's `server.max_in_flight` slots until its body ends or it is answered (a stream's
//!    messages take theirs when decoded); with none free it fails RESOURCE_EXHAUSTED
//!    (`OVERLOADED`). A body that arrives whole with its headers never waits, so never
//!    takes one.
//! 3. **Bytes.** A message that does not arrive in the chunk that announces it holds its
//!    announced length (what the decoder reserves for it) from its connection's budget and
//!    Keel's until it is whole; past either limit the call fails RESOURCE_EXHAUSTED
//!    (`BUFFER_LIMIT`) before the decoder sees it.
//!
//! 4. **Framing.** A unary call's body is one whole gRPC message: none, a second one, or one
//!    cut short by the body's end fails INVALID_ARGUMENT (`MALFORMED_REQUEST`) naming
//!    which, where tonic would answer INTERNAL or ignore the rest. A stream's message cut
//!    short by the end fails the same way.
//! 5. **Entries.** An inference request (ModelInfer, each message of ModelStreamInfer)
//!    with more inputs, raw contents or requested outputs than any model of the policy may
//!    take (`limits.max_inputs`, `limits.max_outputs`) fails INVALID_ARGUMENT as the
//!    contract check would fail it, counted from its bytes ([`Census`]) before the decoder
//!    builds them: decoded, an entry of 2 bytes takes about 200.
//! 6. **Refused at the headers.** A call its headers already refuse (metadata over
//!    `server.max_metadata_size`) fails at its first read, before any handler runs.
//!
//! A failure is logged as the handler logs a call and handed to the decoder as Keel's
//! status, tagged with the request id and revision, so the client hears it as the call's
//! answer (or, on a stream, as the stream's end).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::Call;
use crate::error::Error;
use crate::model::InvalidRequest;
use crate::pb::census::Census;
use crate::policy::Priority;
use crate::resilience::{Slot, Slots};
use crate::transport::{ConnectionBuffers, Held};

/// Where a body is in its gRPC messages: each is a 5-byte prefix (compressed flag, u32
/// length) and that many bytes.
#[derive(Debug, Default)]
struct Messages {
    /// Messages begun so far.
    begun: u64,
    /// Bytes of the current prefix read so far (0 between messages).
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come, once its prefix is whole.
    remaining: usize,
    /// The current message's announced length.
    len: usize,
    /// The entries of the current message so far, when they are bounded (rule 5).
    census: Option<Census>,
}

/// The most entries any model of the policy takes in one request (rule 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::api) struct Caps {
    /// The largest `limits.max_inputs`.
    pub(in crate::api) inputs: usize,
    /// The largest `limits.max_outputs`.
    pub(in crate::api) outputs: usize,
}

impl Messages {
    /// Takes a chunk of the body; linear in its length. With `caps`, a message whose
    /// entries pass them is refused once it is whole (rule 5).
    fn feed(&mut self, mut data: &[u8], caps: Option<Caps>) -> Option<Error> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                if let Some(c) = &mut self.census {
                    c.feed(&data[..n]);
                }
                self.remaining -= n;
                data = &data[n..];
                if self.remaining == 0
                    && let (Some(c), Some(caps)) = (&self.census, caps)
                    && let Some(e) = over(c, caps)
                {
                    return Some(e);
                }
                continue;
            }
            if self.have == 0 {
                self.begun += 1;
            }
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                let [_, a, b, c, d] = self.prefix;
                self.len = u32::from_be_bytes([a, b, c, d]) as usize;
                self.remaining = self.len;
                self.have = 0;
                self.census = caps.map(|_| Census::new());
            }
        }
        None
    }

    /// Whether a message is partly received.
    fn partial(&self) -> bool {
        self.have > 0 || self.remaining > 0
    }

    /// The announced length of the message partly received, once its prefix is whole.
    fn announced(&self) -> Option<usize> {
        (self.remaining > 0).then_some(self.len)
    }

    /// What is wrong with a body that ended here (rule 4); `one` for a unary call. Builds
    /// a text only for a body that ended badly.
    fn ended_badly(&self, one: bool) -> Option<String> {
        if self.have > 0 {
            return Some(format!(
                "the body ended {} bytes into the 5-byte prefix of message {}",
                self.have, self.begun
            ));
        }
        if self.remaining > 0 {
            return Some(format!(
                "the body ended {} of {} bytes into message {} (truncated)",
                self.len - self.remaining,
                self.len,
                self.begun
            ));
        }
        (one && self.begun == 0)
            .then(|| "the body has no message; a unary call carries exactly one".to_string())
    }
}

/// The contract check's refusal for a message with more entries than `caps`.
fn over(c: &Census, caps: Caps) -> Option<Error> {
    let inputs = c.inputs.max(c.raw);
    if inputs > caps.inputs {
        return Some(
            InvalidRequest::TooManyInputs {
                inputs,
                max: caps.inputs,
            }
            .into(),
        );
    }
    (c.outputs > caps.outputs).then(|| {
        InvalidRequest::TooManyOutputs {
            outputs: c.outputs,
            max: caps.outputs,
        }
        .into()
    })
}

/// What bounds one call's body, from its edge layer.
pub(super) struct Terms {
    /// The window of rule 1.
    pub(super) window: Duration,
    /// Keel's in-flight slots (rule 2).
    pub(super) gate: Arc<Slots>,
    /// The connection's budget (rule 3); `None` for a request that did not come through
    /// Keel's connection loop.
    pub(super) buffers: Option<Arc<ConnectionBuffers>>,
    /// A message larger than this is refused by the decoder at its prefix; it holds
    /// nothing.
    pub(super) max_message_size: usize,
    /// A unary call: its body is exactly one message (rule 4).
    pub(super) one_message: bool,
    /// For an inference request, the entries its messages may have (rule 5).
    pub(super) caps: Option<Caps>,
    /// Why the call's headers refuse it (rule 5), given at the first read.
    pub(super) refusal: Option<Error>,
}

pin_project! {
    /// A request body whose cost is bounded (see the module docs).
    pub struct Inbound<B> {
        #[pin]
        inner: B,
        call: Arc<Call>,
        terms: Terms,
        messages: Messages,
        // The bytes of the message partly received, and which message that is.
        held: Option<(u64, Held)>,
        // Taken while the unanswered call's body waits.
        slot: Option<Slot>,
        #[pin]
        deadline: Option<Sleep>,
        // What `deadline` is set for: the call's body, or this message.
        timing: Timing,
        ended: bool,
        failed: bool,
    }
}

/// What an armed deadline times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timing {
    Nothing,
    Body,
    Message(u64),
}

impl<B> Inbound<B> {
    pub(super) fn new(inner: B, call: Arc<Call>, terms: Terms) -> Inbound<B> {
        Inbound {
            inner,
            call,
            terms,
            messages: Messages::default(),
            held: None,
            slot: None,
            deadline: None,
            timing: Timing::Nothing,
            ended: false,
            failed: false,
        }
    }
}

impl<B> Body for Inbound<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<tower::BoxError>,
{
    type Data = Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        if let Some(e) = this.terms.refusal.take() {
            return fail(this.call, this.failed, &e);
        }
        let answered = this.call.answered.load(Ordering::Acquire);
        if answered {
            // The call's answer holds its own slot from here.
            *this.slot = None;
        }
        let polled = this.inner.as_mut().poll_frame(cx);
        let frame = match polled {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                *this.ended = true;
                *this.held = None;
                *this.slot = None;
                this.deadline.set(None);
                if let Some(detail) = this.messages.ended_badly(this.terms.one_message) {
                    return fail(this.call, this.failed, &Error::MalformedRequest { detail });
                }
                return Poll::Ready(None);
            }
            Poll::Pending => {
                // Waiting for more bytes: is the body unfinished (rules 1 and 2)?
                let partial = this.messages.partial();
                if *this.ended || (answered && !partial) {
                    this.deadline.set(None);
                    *this.timing = Timing::Nothing;
                    return Poll::Pending;
                }
                if !answered && this.slot.is_none() {
                    match this.terms.gate.try_take(Priority::Interactive) {
                        Some(slot) => *this.slot = Some(slot),
                        None => {
                            let e = Error::GatewayOverloaded {
                                max_in_flight: this.terms.gate.total(),
                                reserved: None,
                            };
                            *this.held = None;
                            return fail(this.call, this.failed, &e);
                        }
                    }
                }
                let timing = if answered {
                    Timing::Message(this.messages.begun)
                } else {
                    Timing::Body
                };
                if *this.timing != timing {
                    // An unanswered call's body counts from the arrival, a message from
                    // the poll that first found it partial (its first bytes came in the
                    // chunk just before).
                    let from = match timing {
                        Timing::Body => this.call.arrival,
                        _ => Instant::now(),
                    };
                    this.deadline
                        .set(Some(tokio::time::sleep_until(from + this.terms.window)));
                    *this.timing = timing;
                }
                if let Some(deadline) = this.deadline.as_mut().as_pin_mut() {
                    ready!(deadline.poll(cx));
                    let e = Error::DeadlineExceeded {
                        budget: this.terms.window,
                    };
                    *this.held = None;
                    *this.slot = None;
                    return fail(this.call, this.failed, &e);
                }
                return Poll::Pending;
            }
        };
        if let Some(data) = frame.data_ref() {
            if let Some(e) = this.messages.feed(data, this.terms.caps) {
                *this.held = None;
                *this.slot = None;
                return fail(this.call, this.failed, &e);
            }
            if this.terms.one_message && this.messages.begun > 1 {
                *this.held = None;
                *this.slot = None;
                let detail = "a second message began; a unary call carries exactly one".into();
                return fail(this.call, this.failed, &Error::MalformedRequest { detail });
            }
            // Rule 3: a message that did not arrive whole holds its announced length.
            let current = this.messages.begun;
            match this.messages.announced() {
                Some(len) if len <= this.terms.max_message_size => {
                    if this.held.as_ref().is_none_or(|(m, _)| *m != current)
                        && let Some(buffers) = &this.terms.buffers
                    {
                        *this.held = None;
                        match buffers.hold(len) {
                            Ok(held) => *this.held = Some((current, held)),
                            Err(full) => {
                                *this.slot = None;
                                return fail(this.call, this.failed, &Error::BufferLimit(full));
                            }
                        }
                    }
                }
                _ => *this.held = None,
            }
            let timed_is_whole = match *this.timing {
                Timing::Message(m) => m != current || !this.messages.partial(),
                _ => false,
            };
            if timed_is_whole {
                this.deadline.set(None);
                *this.timing = Timing::Nothing;
            }
        } else if frame.is_trailers() {
            *this.ended = true;
            *this.held = None;
            *this.slot = None;
            this.deadline.set(None);
        }
        if this.inner.is_end_stream() {
            *this.ended = true;
            *this.slot = None;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        // A failure still to report keeps the body open, or it would be dropped unread.
        self.failed
            || (self.terms.refusal.is_none()
                && self.inner.is_end_stream()
                && self.messages.ended_badly(self.terms.one_message).is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Fails the body with Keel's status for `e` (what it held was given back).
fn fail(
    call: &Call,
    failed: &mut bool,
    e: &Error,
) -> Poll<Option<Result<Frame<Bytes>, tower::BoxError>>> {
    *failed = true;
    Poll::Ready(Some(Err(call.refuse(e, None).into())))
}

#[cfg(test)]
mod tests;
