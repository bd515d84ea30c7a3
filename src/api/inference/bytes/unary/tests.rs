use http_body_util::{BodyExt as _, StreamBody};

use super::*;
use crate::pb::framing::framed;

/// A request whose body arrives as `pieces`, then `trailers` if any.
fn request(
    pieces: Vec<Vec<u8>>,
    trailers: Option<HeaderMap>,
) -> http::Request<impl Body<Data = Bytes, Error = Status>> {
    let mut frames: Vec<Result<Frame<Bytes>, Status>> = pieces
        .into_iter()
        .map(|p| Ok(Frame::data(Bytes::from(p))))
        .collect();
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    let mut req = http::Request::new(StreamBody::new(futures::stream::iter(frames)));
    req.headers_mut()
        .insert("x-client", HeaderValue::from_static("a"));
    req
}

async fn read_all(pieces: Vec<Vec<u8>>) -> Result<Request<Bytes>, Status> {
    read(request(pieces, None), 1024).await
}

#[tokio::test]
async fn a_message_split_anywhere_reads_the_same() {
    let body = framed(0, b"a message split in pieces");
    for cut in 1..body.len() {
        let (a, b) = body.split_at(cut);
        let req = read_all(vec![a.to_vec(), b.to_vec()]).await.unwrap();
        assert_eq!(
            &req.get_ref()[..],
            b"a message split in pieces",
            "cut at {cut}"
        );
    }
    // One byte per frame.
    let req = read_all(body.iter().map(|b| vec![*b]).collect())
        .await
        .unwrap();
    assert_eq!(&req.get_ref()[..], b"a message split in pieces");
}

#[tokio::test]
async fn an_empty_message_is_a_message() {
    let req = read_all(vec![framed(0, b"")]).await.unwrap();
    assert!(req.get_ref().is_empty());
}

#[tokio::test]
async fn later_messages_are_dropped_and_trailers_join_the_metadata() {
    let mut body = framed(0, b"first");
    body.extend(framed(0, b"second"));
    let mut t = HeaderMap::new();
    t.insert("x-trailer", HeaderValue::from_static("b"));
    let req = read(request(vec![body], Some(t)), 1024).await.unwrap();
    assert_eq!(&req.get_ref()[..], b"first");
    assert_eq!(req.metadata().get("x-client").unwrap(), "a");
    assert_eq!(req.metadata().get("x-trailer").unwrap(), "b");
}

#[tokio::test]
async fn faults_get_tonics_statuses() {
    let cases: Vec<(Vec<Vec<u8>>, Code, &str)> = vec![
        (vec![], Code::Internal, "Missing request message."),
        (
            vec![framed(0, b"whole")[..7].to_vec()],
            Code::Internal,
            "Unexpected EOF decoding stream.",
        ),
        (
            vec![vec![0, 0, 0]],
            Code::Internal,
            "Unexpected EOF decoding stream.",
        ),
        (
            vec![framed(1, b"zipped")],
            Code::Internal,
            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
        ),
        (
            vec![framed(7, b"odd")],
            Code::Internal,
            "protocol error: received message with invalid compression flag: 7 (valid flags are 0 and 1), while sending request",
        ),
        (
            vec![framed(0, &[0; 1025])],
            Code::OutOfRange,
            "Error, decoded message length too large: found 1025 bytes, the limit is: 1024 bytes",
        ),
    ];
    for (pieces, code, message) in cases {
        let status = read_all(pieces.clone()).await.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (code, message),
            "{pieces:?}"
        );
    }
    // A second message over the limit fails the call too, as tonic's reader does.
    let mut body = framed(0, b"ok");
    body.extend(framed(0, &[0; 2000]));
    assert_eq!(
        read_all(vec![body]).await.unwrap_err().code(),
        Code::OutOfRange
    );
}

#[tokio::test]
async fn the_oversize_refusal_is_the_one_the_edge_rewrites() {
    let status = read_all(vec![framed(0, &[0; 2048])]).await.unwrap_err();
    assert!(crate::grpc_code::is_too_large(
        status.code(),
        status.message()
    ));
}

#[tokio::test]
async fn a_compressed_request_is_unimplemented_with_what_keel_accepts() {
    let mut req = request(vec![framed(0, b"x")], None);
    req.headers_mut()
        .insert("grpc-encoding", HeaderValue::from_static("gzip"));
    let status = read(req, 1024).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(
        status.message(),
        "Content is compressed with `gzip` which isn't supported"
    );
    assert_eq!(
        status.metadata().get("grpc-accept-encoding").unwrap(),
        "identity"
    );
    // identity is no compression.
    let mut req = request(vec![framed(0, b"x")], None);
    req.headers_mut()
        .insert("grpc-encoding", HeaderValue::from_static("identity"));
    assert!(read(req, 1024).await.is_ok());
}

#[tokio::test]
async fn a_failed_body_fails_with_its_status_and_a_cancel_ends_it() {
    let frames: Vec<Result<Frame<Bytes>, Status>> = vec![
        Ok(Frame::data(Bytes::from(framed(0, b"ok")))),
        Err(Status::resource_exhausted("buffer limit")),
    ];
    let req = http::Request::new(StreamBody::new(futures::stream::iter(frames)));
    let status = read(req, 1024).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::ResourceExhausted, "buffer limit")
    );

    let frames: Vec<Result<Frame<Bytes>, Status>> = vec![
        Ok(Frame::data(Bytes::from(framed(0, b"ok")))),
        Err(Status::cancelled("gone")),
    ];
    let req = http::Request::new(StreamBody::new(futures::stream::iter(frames)));
    assert_eq!(&read(req, 1024).await.unwrap().get_ref()[..], b"ok");
}

/// Every frame of an answer's body: its bytes joined, and its trailers.
async fn frames(res: http::Response<TonicBody>) -> (Vec<Bytes>, HeaderMap) {
    let mut body = res.into_body();
    let (mut data, mut trailers) = (Vec::new(), HeaderMap::new());
    while let Some(frame) = body.frame().await {
        match frame.unwrap().into_data() {
            Ok(d) => data.push(d),
            Err(f) => trailers = f.into_trailers().unwrap(),
        }
    }
    (data, trailers)
}

#[tokio::test]
async fn an_answer_is_its_prefix_message_and_ok() {
    for (head, tail) in [
        (vec![7u8; 100], vec![9u8; 3]),
        (vec![7u8; 40 << 10], vec![9u8; 3]),
        (vec![7; 40 << 10], vec![]),
    ] {
        let message = Encoded {
            head: Bytes::from(head.clone()),
            tail: Bytes::from(tail.clone()),
        };
        let head_at = message.head.as_ptr();
        let mut resp = Response::new(message);
        resp.metadata_mut()
            .insert("x-upstream", MetadataValue::from_static("u"));
        resp.metadata_mut()
            .insert("grpc-status", MetadataValue::from_static("5"));
        let res = answer(resp, 1 << 20);
        assert_eq!(
            res.headers().get("content-type").unwrap(),
            "application/grpc"
        );
        assert_eq!(res.headers().get("x-upstream").unwrap(), "u");
        assert!(
            res.headers().get("grpc-status").is_none(),
            "the framing's, not metadata's"
        );
        let (data, trailers) = frames(res).await;
        let joined: Vec<u8> = data.iter().flat_map(|d| d.iter().copied()).collect();
        let mut whole = head.clone();
        whole.extend(&tail);
        assert_eq!(joined, framed(0, &whole));
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert_eq!(trailers.len(), 1);
        if head.len() >= COPY_BELOW {
            // The message's own bytes, not a copy.
            assert_eq!(data[1].len(), head.len());
            assert_eq!(data[1].as_ptr(), head_at);
        } else {
            assert_eq!(data.len(), 1);
        }
    }
}

#[tokio::test]
async fn an_answer_over_the_limit_ends_with_tonics_status() {
    let message = Encoded {
        head: Bytes::from(vec![1u8; 2000]),
        tail: Bytes::new(),
    };
    let (data, trailers) = frames(answer(Response::new(message), 1024)).await;
    assert!(data.is_empty());
    assert_eq!(trailers.get("grpc-status").unwrap(), "11");
    assert!(
        trailers
            .get("grpc-message")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("Error,%20encoded%20message%20length%20too%20large")
    );
}

#[tokio::test]
async fn a_handler_error_is_trailers_only() {
    let res = serve(request(vec![framed(0, b"x")], None), 1024, |_req| async {
        Err::<Response<Encoded>, _>(Status::not_found("no such model"))
    })
    .await;
    assert_eq!(res.headers().get("grpc-status").unwrap(), "5");
    assert_eq!(
        res.headers().get("content-type").unwrap(),
        "application/grpc"
    );
    let (data, trailers) = frames(res).await;
    assert!(data.is_empty() && trailers.is_empty());
}
