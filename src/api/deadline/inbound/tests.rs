//! The rules of an unfinished body, stepped by hand in paused time.

use std::convert::Infallible;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use http_body_util::{BodyExt as _, StreamBody};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic_types::StatusExt as _;

use super::*;
use crate::transport::Buffers;

type Chunks = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
type Raw = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

const WINDOW: Duration = Duration::from_secs(30);

struct Setup {
    body: Pin<Box<Inbound<Raw>>>,
    send: Option<Chunks>,
    call: Arc<Call>,
    gate: Arc<Slots>,
    buffers: Arc<ConnectionBuffers>,
}

/// A unary call's body fed by hand, with `slots` of Keel's and a connection budget of
/// `budget` bytes.
fn setup(slots: u32, budget: usize) -> Setup {
    setup_with(slots, budget, true, None, None)
}

/// A stream's body, else as [`setup`].
fn setup_stream(slots: u32, budget: usize) -> Setup {
    setup_with(slots, budget, false, None, None)
}

fn setup_with(
    slots: u32,
    budget: usize,
    one_message: bool,
    caps: Option<Caps>,
    refusal: Option<Error>,
) -> Setup {
    let (send, rx) = mpsc::channel(16);
    let call = Call::arriving();
    let gate = Arc::new(Slots::new(slots, 0.0));
    let buffers = Buffers::new(budget).connection(budget);
    let terms = Terms {
        window: WINDOW,
        gate: gate.clone(),
        buffers: Some(buffers.clone()),
        max_message_size: 1 << 20,
        one_message,
        caps,
        refusal,
    };
    let raw = StreamBody::new(ReceiverStream::new(rx));
    Setup {
        body: Box::pin(Inbound::new(raw, call.clone(), terms)),
        send: Some(send),
        call,
        gate,
        buffers,
    }
}

/// The prefix of a message of `len` bytes, and its first `have` bytes.
fn message_start(len: usize, have: usize) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_u32(u32::try_from(len).unwrap());
    b.put_bytes(7, have);
    b.freeze()
}

impl Setup {
    async fn send(&self, data: Bytes) {
        let tx = self.send.as_ref().unwrap();
        tx.send(Ok(Frame::data(data))).await.unwrap();
    }

    fn end(&mut self) {
        self.send = None;
    }

    /// Polls once, without waiting.
    fn poll(&mut self) -> Poll<Option<Result<Frame<Bytes>, tower::BoxError>>> {
        let waker = futures::task::noop_waker();
        self.body
            .as_mut()
            .poll_frame(&mut Context::from_waker(&waker))
    }

    /// The next frame's data, which must be ready.
    fn data(&mut self) -> Bytes {
        match self.poll() {
            Poll::Ready(Some(Ok(f))) => f.into_data().unwrap(),
            other => panic!("expected data, got {other:?}"),
        }
    }

    /// Waits for the body to fail; the status it failed with.
    async fn failure(&mut self) -> tonic::Status {
        loop {
            match self.body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return *e.downcast::<tonic::Status>().unwrap(),
                None => panic!("the body ended without failing"),
            }
        }
    }
}

fn reason(s: &tonic::Status) -> String {
    s.get_details_error_info().unwrap().reason
}

#[tokio::test(start_paused = true)]
async fn a_body_that_arrives_whole_with_its_headers_takes_nothing() {
    let mut b = setup(1, 1 << 20);
    b.send(message_start(100, 100)).await;
    b.end();
    assert_eq!(b.data().len(), 105);
    assert_eq!((b.gate.in_flight(), b.buffers.used()), (0, 0));
    assert!(matches!(b.poll(), Poll::Ready(None)));
}

#[tokio::test(start_paused = true)]
async fn a_waiting_body_holds_a_slot_and_its_announced_bytes_until_it_ends() {
    let mut b = setup(2, 1 << 20);
    b.send(message_start(1000, 10)).await;
    b.data();
    // The decoder reserves the whole announced length at once: so much is held.
    assert_eq!(b.buffers.used(), 1000);
    assert!(b.poll().is_pending());
    assert_eq!(b.gate.in_flight(), 1);
    b.send(Bytes::from(vec![7; 990])).await;
    b.data();
    assert_eq!(b.buffers.used(), 0, "the message is whole");
    // Whole, but the body has not ended: still unfinished.
    assert!(b.poll().is_pending());
    assert_eq!(b.gate.in_flight(), 1);
    b.end();
    assert!(matches!(b.poll(), Poll::Ready(None)));
    assert_eq!(b.gate.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_unfinished_body_fails_deadline_exceeded_at_the_window_from_its_arrival() {
    let mut b = setup(2, 1 << 20);
    let arrival = b.call.arrival;
    tokio::time::sleep(Duration::from_secs(5)).await;
    b.send(message_start(1000, 10)).await;
    let s = b.failure().await;
    assert_eq!(Instant::now() - arrival, WINDOW);
    assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
    assert_eq!(s.message(), "deadline of 30s exceeded");
    assert_eq!(s.metadata().get("x-request-id").unwrap(), "r1");
    assert_eq!(s.metadata().get("keel-policy-revision").unwrap(), "1");
    assert_eq!((b.gate.in_flight(), b.buffers.used()), (0, 0));
    assert!(matches!(b.poll(), Poll::Ready(None)));
    // A whole message whose body never ends is as unfinished.
    let mut b = setup(2, 1 << 20);
    b.send(message_start(10, 10)).await;
    assert_eq!(
        b.failure().await.code(),
        tonic::Code::DeadlineExceeded,
        "no END_STREAM"
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_free_slot_a_waiting_body_is_refused_overloaded() {
    let mut b = setup(1, 1 << 20);
    let _taken = b.gate.try_take(Priority::Interactive).unwrap();
    b.send(message_start(1000, 10)).await;
    b.data();
    let s = b.failure().await;
    assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    assert_eq!(reason(&s), "OVERLOADED");
    assert_eq!(b.buffers.used(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_message_past_the_budget_is_refused_before_the_decoder_sees_it() {
    let mut b = setup(2, 1000);
    b.send(message_start(800, 10)).await;
    b.data();
    // A second connection's message would take Keel's budget past its limit too; here
    // the same connection's does.
    let mut other = setup(2, 1000);
    other.buffers = b.buffers.clone();
    let terms = Terms {
        window: WINDOW,
        gate: other.gate.clone(),
        buffers: Some(b.buffers.clone()),
        max_message_size: 1 << 20,
        one_message: true,
        caps: None,
        refusal: None,
    };
    let (tx, rx) = mpsc::channel(4);
    let mut second = Box::pin(Inbound::new(
        StreamBody::new(ReceiverStream::new(rx)),
        Call::arriving(),
        terms,
    ));
    tx.send(Ok::<_, Infallible>(Frame::data(message_start(300, 10))))
        .await
        .unwrap();
    let Some(Err(e)) = second.frame().await else {
        panic!("the message over the budget was handed on");
    };
    let s = e.downcast::<tonic::Status>().unwrap();
    assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    assert_eq!(reason(&s), "BUFFER_LIMIT");
    assert!(
        s.message().contains("server.max_buffered_per_connection"),
        "{}",
        s.message()
    );
    assert_eq!(b.buffers.used(), 800, "the refused message holds nothing");
}

#[tokio::test(start_paused = true)]
async fn once_answered_a_stream_is_timed_per_message_and_may_idle_between_them() {
    let mut b = setup_stream(1, 1 << 20);
    b.call.answered.store(true, Ordering::Release);
    let _all = b.gate.try_take(Priority::Interactive).unwrap();
    b.send(message_start(10, 10)).await;
    b.data();
    // Between messages: idle as long as it likes, holding no slot.
    assert!(b.poll().is_pending());
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(b.poll().is_pending());
    // A message partly received has the window from then.
    b.send(message_start(1000, 10)).await;
    b.data();
    let started = Instant::now();
    let s = b.failure().await;
    assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
    assert_eq!(Instant::now() - started, WINDOW);
}

/// The MALFORMED_REQUEST a body failed with: its message.
async fn malformed(b: &mut Setup) -> String {
    let s = b.failure().await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert_eq!(reason(&s), "MALFORMED_REQUEST");
    assert_eq!(s.metadata().get("x-request-id").unwrap(), "r1");
    s.message().to_string()
}

#[tokio::test(start_paused = true)]
async fn a_unary_body_without_its_one_whole_message_is_malformed() {
    // No message at all.
    let mut b = setup(1, 1 << 20);
    b.end();
    assert_eq!(
        malformed(&mut b).await,
        "the request is malformed: the body has no message; a unary call carries exactly one"
    );
    // Cut short, inside the prefix and inside the message.
    let mut b = setup(1, 1 << 20);
    b.send(Bytes::from_static(&[0, 0, 0])).await;
    b.end();
    assert_eq!(
        malformed(&mut b).await,
        "the request is malformed: the body ended 3 bytes into the 5-byte prefix of message 1"
    );
    let mut b = setup(1, 1 << 20);
    b.send(message_start(100, 40)).await;
    b.end();
    assert_eq!(
        malformed(&mut b).await,
        "the request is malformed: the body ended 40 of 100 bytes into message 1 (truncated)"
    );
    assert_eq!((b.gate.in_flight(), b.buffers.used()), (0, 0));
    // A second message, even in the chunk that finishes the first: refused, not ignored.
    let mut b = setup(1, 1 << 20);
    let mut two = BytesMut::from(&message_start(3, 3)[..]);
    two.extend_from_slice(&message_start(3, 3));
    b.send(two.freeze()).await;
    assert_eq!(
        malformed(&mut b).await,
        "the request is malformed: a second message began; a unary call carries exactly one"
    );
    assert!(matches!(b.poll(), Poll::Ready(None)));
}

#[tokio::test(start_paused = true)]
async fn a_stream_may_carry_many_messages_or_none_but_not_a_cut_one() {
    let mut b = setup_stream(1, 1 << 20);
    b.end();
    assert!(matches!(b.poll(), Poll::Ready(None)), "an empty stream");
    let mut b = setup_stream(1, 1 << 20);
    b.send(message_start(3, 3)).await;
    b.send(message_start(3, 3)).await;
    b.send(message_start(9, 2)).await;
    b.end();
    assert_eq!(b.data().len(), 8);
    assert_eq!(b.data().len(), 8);
    assert_eq!(
        malformed(&mut b).await,
        "the request is malformed: the body ended 2 of 9 bytes into message 3 (truncated)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_refused_at_its_headers_fails_at_its_first_read() {
    let e = Error::MetadataTooLarge {
        size: 20_000,
        limit: 16_384,
    };
    let mut b = setup_with(1, 1 << 20, true, None, Some(e));
    b.send(message_start(3, 3)).await;
    let s = b.failure().await;
    assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    assert_eq!(reason(&s), "METADATA_TOO_LARGE");
    assert_eq!(
        s.message(),
        "the call's metadata is 20000 bytes, above the limit of 16384 (server.max_metadata_size)"
    );
    assert!(matches!(b.poll(), Poll::Ready(None)));
}

#[tokio::test(start_paused = true)]
async fn an_inference_request_over_every_models_caps_is_refused_before_it_is_decoded() {
    use prost::Message as _;
    let caps = Caps {
        inputs: 2,
        outputs: 1,
    };
    let message = |inputs: usize, outputs: usize| {
        let req = crate::pb::inference::ModelInferRequest {
            inputs: vec![Default::default(); inputs],
            outputs: vec![Default::default(); outputs],
            ..Default::default()
        };
        let mut b = BytesMut::new();
        b.put_u8(0);
        b.put_u32(u32::try_from(req.encoded_len()).unwrap());
        b.extend_from_slice(&req.encode_to_vec());
        b.freeze()
    };
    let with_caps = || setup_with(1, 1 << 20, true, Some(caps), None);
    let mut b = with_caps();
    b.send(message(2, 1)).await;
    b.end();
    assert!(b.data().len() > 5, "within the caps: handed on");
    let mut b = with_caps();
    // Split inside the message: refused only once it is whole, before the decoder has it.
    let m = message(3, 0);
    b.send(m.slice(..4)).await;
    assert_eq!(b.data().len(), 4);
    b.send(m.slice(4..)).await;
    let s = b.failure().await;
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "the request has 3 inputs, above the limit of 2 (limits.max_inputs)"
    );
    let mut b = with_caps();
    b.send(message(0, 2)).await;
    assert!(b.failure().await.message().contains("limits.max_outputs"));
}
