//! Keel owns a call's deadline from its first byte: a client whose `grpc-timeout` passes
//! before Keel answered hears DEADLINE_EXCEEDED with Keel's `ErrorInfo`, never CANCELLED,
//! whether its body was still arriving or it waited for a model slot.
//!
//! A raw HTTP/2 client, because tonic's own client runs the same timer on its side and
//! would hide what the server answered.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{Keel, Script, ScriptedUpstream, get, input, simple_request, simple_via, value};
use keel::pb::inference as pb;
use tonic::Code;
use tonic_types::StatusExt as _;

const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// An HTTP/2 connection to `addr`; its driver task ends with the connection.
async fn connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    send.ready().await.unwrap()
}

/// The headers of a gRPC call to `path` under `grpc-timeout: timeout`.
fn call(addr: SocketAddr, path: &str, timeout: &str, request_id: &str) -> http::Request<()> {
    http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .header("x-request-id", request_id)
        .body(())
        .unwrap()
}

/// `message` as one length-prefixed gRPC frame.
fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(u32::try_from(len).unwrap());
    message.encode(&mut b).unwrap();
    b.freeze()
}

/// The status a response carries, from its headers (a trailers-only answer) or its
/// trailers; and the headers or trailers it came in.
async fn status_of(res: http::Response<h2::RecvStream>) -> (tonic::Status, http::HeaderMap) {
    let (parts, mut body) = res.into_parts();
    if let Some(s) = tonic::Status::from_header_map(&parts.headers) {
        return (s, parts.headers);
    }
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    (tonic::Status::from_header_map(&trailers).unwrap(), trailers)
}

/// Asserts Keel's own DEADLINE_EXCEEDED, tagged as every Keel answer is.
fn assert_keels_deadline(s: &tonic::Status, md: &http::HeaderMap, request_id: &str) {
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    let info = s.get_details_error_info().expect("Keel's ErrorInfo");
    assert_eq!(info.reason, "DEADLINE_EXCEEDED", "{info:?}");
    assert_eq!(info.domain, "keel");
    assert_eq!(info.metadata["class"], "deadline_exceeded");
    assert!(s.message().starts_with("deadline of "), "{}", s.message());
    assert_eq!(md["x-request-id"], request_id);
    assert_eq!(md["keel-policy-revision"], "1");
}

/// A 4 MiB request to `identity`, raw.
fn large_identity_request() -> pb::ModelInferRequest {
    let n = 4 << 20;
    pb::ModelInferRequest {
        model_name: "identity".into(),
        inputs: vec![input("x", "UINT8", &[n])],
        raw_input_contents: vec![Bytes::from(vec![7u8; n as usize])],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_large_body_still_arriving_at_the_deadline_is_answered_deadline_exceeded() {
    let keel = Keel::with_admin("").await;
    let mut h2 = connect(keel.addr).await;
    let (response, mut body) = h2
        .send_request(call(keel.addr, MODEL_INFER, "100m", "slow-body"), false)
        .unwrap();
    tokio::pin!(response);
    let whole = frame(&large_identity_request());
    // 256 KiB every 20 ms, and never the last piece: the handler cannot start, and the
    // deadline passes while the body is still arriving.
    let chunks: Vec<Bytes> = (0..whole.len())
        .step_by(256 << 10)
        .map(|at| whole.slice(at..whole.len().min(at + (256 << 10))))
        .collect();
    let mut answered = None;
    for chunk in &chunks[..chunks.len() - 1] {
        // Keel may have answered (and closed the stream) between two pieces.
        if body.send_data(chunk.clone(), false).is_err() {
            break;
        }
        tokio::select! {
            res = &mut response => {
                answered = Some(res);
                break;
            }
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let res = match answered {
        Some(res) => res,
        None => tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("an answer within 10s"),
    }
    .unwrap();
    let (s, md) = status_of(res).await;
    assert_ne!(s.code(), Code::Cancelled, "{s:?}");
    assert_keels_deadline(&s, &md, "slow-body");
    assert_eq!(
        s.get_details_error_info().unwrap().metadata["policy_revision"],
        "1"
    );
    drop(body);

    // Counted as the client heard it.
    let (_, scrape) = get(keel.admin.unwrap(), "/metrics").await;
    let series = "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"inference.GRPCInferenceService\",grpc_method=\"ModelInfer\",grpc_code=\"DeadlineExceeded\"}";
    assert_eq!(value(&scrape, series), Some(1.0), "{scrape}");

    // The connection still serves calls in time.
    let (response, mut body) = h2
        .send_request(call(keel.addr, MODEL_INFER, "10S", "next"), false)
        .unwrap();
    body.send_data(frame(&simple_request()), true).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .unwrap()
        .unwrap();
    let (s, _) = status_of(res).await;
    assert_eq!(s.code(), Code::Ok, "{s:?}");
    drop(h2);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_call_waiting_for_a_model_slot_is_answered_deadline_exceeded_at_its_deadline() {
    let up = ScriptedUpstream::new(Script::slow(Duration::from_secs(30)));
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(
        addr,
        "[server]\ndrain_timeout = \"1s\"\n[defaults.limits]\nmax_in_flight = 1\nmax_queue = 4\nqueue_timeout = \"30s\"",
    ))
    .await;
    let held = up.call_in_flight(keel.client().await).await;

    let mut h2 = connect(keel.addr).await;
    let (response, mut body) = h2
        .send_request(call(keel.addr, MODEL_INFER, "300m", "queued"), false)
        .unwrap();
    body.send_data(frame(&simple_request()), true).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("an answer within 10s")
        .unwrap();
    let (s, md) = status_of(res).await;
    assert_ne!(s.code(), Code::Cancelled, "{s:?}");
    assert_keels_deadline(&s, &md, "queued");
    assert!(
        up.seen_for("queued").is_empty(),
        "the queued call never went upstream"
    );

    held.abort();
    drop(h2);
    keel.stop().await.unwrap();
}
