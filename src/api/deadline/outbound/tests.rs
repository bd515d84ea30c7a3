//! The rules of an answer not taken, stepped by hand.

use std::convert::Infallible;

use http_body_util::{BodyExt as _, StreamBody};
use tonic_types::StatusExt as _;

use super::*;
use crate::transport::Buffers;

type Raw = StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// An answer of one `len`-byte chunk then OK trailers, on a connection budget of `budget`.
fn answer(len: usize, budget: usize) -> (Pin<Box<Outbound<Raw>>>, Arc<ConnectionBuffers>) {
    let mut ok = http::HeaderMap::new();
    ok.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = vec![
        Ok(Frame::data(Bytes::from(vec![1; len]))),
        Ok(Frame::trailers(ok)),
    ];
    let buffers = Buffers::new(budget).connection(budget);
    let terms = Terms {
        buffers: Some(buffers.clone()),
        client_deadline: None,
        window: Duration::from_secs(30),
    };
    let raw = StreamBody::new(futures::stream::iter(frames));
    (
        Box::pin(Outbound::new(raw, Call::arriving(), terms)),
        buffers,
    )
}

#[tokio::test]
async fn a_large_chunk_goes_out_in_pieces_holding_its_length_until_all_are_taken() {
    let (mut body, buffers) = answer(100 << 10, 1 << 20);
    let mut pieces = Vec::new();
    let trailers = loop {
        let frame = body.frame().await.unwrap().unwrap();
        match frame.into_data() {
            Ok(piece) => {
                assert_eq!(buffers.used(), 100 << 10, "held while pieces are out");
                pieces.push(piece.len());
            }
            Err(frame) => break frame.into_trailers().unwrap(),
        }
    };
    assert_eq!(pieces.iter().sum::<usize>(), 100 << 10);
    assert!(pieces.iter().all(|n| *n <= ANSWER_PIECE));
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(buffers.used(), 0);
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn a_small_chunk_goes_out_whole_and_holds_nothing() {
    let (mut body, buffers) = answer(100, 1 << 20);
    let piece = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!((piece.len(), buffers.used()), (100, 0));
}

#[tokio::test]
async fn a_chunk_past_the_budget_is_dropped_and_the_answer_ends_resource_exhausted() {
    let (mut body, buffers) = answer(100 << 10, 64 << 10);
    let frame = body.frame().await.unwrap().unwrap();
    let trailers = frame.into_trailers().expect("no data: the refusal");
    let s = tonic::Status::from_header_map(&trailers).unwrap();
    assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    assert_eq!(s.get_details_error_info().unwrap().reason, "BUFFER_LIMIT");
    assert_eq!(trailers["x-request-id"], "r1");
    assert_eq!(trailers["keel-policy-revision"], "1");
    assert_eq!(buffers.used(), 0);
    assert!(body.frame().await.is_none());
}
