//! ModelInfer forwarded as bytes: what the upstream receives is what the client sent
//! (unless the policy changes the message), what the client receives is the upstream's
//! answer with Keel's parameters appended, and the upstream's own headers and trailers
//! reach the client under Keel's. The upstream here is a bare HTTP/2 server that records
//! the bytes it is sent and answers with bytes it was given.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use common::{Keel, i32_bytes, simple_request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel::pb::inference as pb;
use pb::infer_parameter::ParameterChoice;
use pb::model_infer_response::InferOutputTensor;
use prost::Message;
use tokio::net::TcpListener;

/// One request the upstream received.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    body: Bytes,
}

/// How the upstream answers ModelInfer.
#[derive(Clone)]
struct Answer {
    /// The body: one gRPC frame, or anything else.
    body: Bytes,
    headers: Vec<(&'static str, &'static str)>,
    trailers: Vec<(&'static str, &'static str)>,
}

/// A gRPC frame around `msg`.
fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// A field protobuf readers skip: number 99, length-delimited.
fn unknown_field() -> Vec<u8> {
    let mut b = Vec::new();
    prost::encoding::bytes::encode(99, &b"from the client".to_vec(), &mut b);
    b
}

/// The upstream's answer to `simple`: OUTPUT0/OUTPUT1 with one parameter of its own and an
/// unknown field, which only a byte-for-byte pass keeps.
fn canned_answer() -> Vec<u8> {
    let out = |name: &str| InferOutputTensor {
        name: name.into(),
        datatype: "INT32".into(),
        shape: vec![1, 16],
        ..Default::default()
    };
    let mut msg = pb::ModelInferResponse {
        model_name: "simple".into(),
        model_version: "1".into(),
        id: "req-1".into(),
        outputs: vec![out("OUTPUT0"), out("OUTPUT1")],
        raw_output_contents: vec![i32_bytes(&[7; 16]), i32_bytes(&[8; 16])],
        ..Default::default()
    };
    msg.parameters.insert(
        "upstream.queue_us".into(),
        pb::InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(42)),
        },
    );
    let mut b = msg.encode_to_vec();
    prost::encoding::bytes::encode(99, &b"from the upstream".to_vec(), &mut b);
    b
}

/// Serves HTTP/2 on 127.0.0.1:0: ModelInfer gets `answer`, every other method
/// UNIMPLEMENTED (so Keel validates nothing it would fetch a contract for).
async fn upstream(
    answer: Answer,
) -> (
    SocketAddr,
    Arc<Mutex<Vec<Received>>>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
    let record = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (record, answer) = (record.clone(), answer.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (record, answer) = (record.clone(), answer.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let infer = path.ends_with("/ModelInfer");
                            record.lock().unwrap().push(Received { path, body });
                            let mut resp = http::Response::builder()
                                .header("content-type", "application/grpc");
                            if !infer {
                                resp = resp.header("grpc-status", "12");
                                let body = Full::new(Bytes::new()).map_err(|e| match e {}).boxed();
                                return Ok::<_, std::convert::Infallible>(resp.body(body).unwrap());
                            }
                            for (k, v) in &answer.headers {
                                resp = resp.header(*k, *v);
                            }
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            for (k, v) in &answer.trailers {
                                trailers.insert(*k, v.parse().unwrap());
                            }
                            let body = http_body_util::StreamBody::new(futures::stream::iter([
                                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                    answer.body.clone(),
                                )),
                                Ok(hyper::body::Frame::trailers(trailers)),
                            ]))
                            .boxed();
                            Ok(resp.body(body).unwrap())
                        }
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen, task)
}

/// The ModelInfer requests the upstream received, in order.
fn model_infers(seen: &Mutex<Vec<Received>>) -> Vec<Received> {
    let seen = seen.lock().unwrap();
    seen.iter()
        .filter(|r| r.path.ends_with("/ModelInfer"))
        .cloned()
        .collect()
}

/// What a client gets for one raw ModelInfer.
struct Got {
    headers: http::HeaderMap,
    body: Bytes,
    trailers: http::HeaderMap,
}

/// Sends `body` (a gRPC frame) as ModelInfer to Keel and reads the answer as bytes.
async fn raw_call(keel: SocketAddr, body: Bytes) -> Got {
    let tcp = tokio::net::TcpStream::connect(keel).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!(
        "http://{keel}/inference.GRPCInferenceService/ModelInfer"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("x-request-id", "wire-1")
    .body(Full::new(body))
    .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Got {
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

fn ok_answer() -> Answer {
    Answer {
        body: frame(&canned_answer()),
        headers: vec![("x-upstream-name", "up-1"), ("keel-tier", "forged")],
        trailers: vec![("x-upstream-trailer", "t1"), ("keel-attempts", "99")],
    }
}

/// The client's request, encoded with a field no re-encoding would keep.
fn clients_message() -> Vec<u8> {
    let mut msg = simple_request().encode_to_vec();
    msg.extend(unknown_field());
    msg
}

fn string_param(
    p: &std::collections::HashMap<String, pb::InferParameter>,
    key: &str,
) -> Option<String> {
    match p.get(key)?.parameter_choice.as_ref()? {
        ParameterChoice::StringParam(s) => Some(s.clone()),
        ParameterChoice::BoolParam(b) => Some(b.to_string()),
        ParameterChoice::Int64Param(i) => Some(i.to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn the_upstream_receives_the_clients_bytes_and_the_client_the_upstreams_with_keels_labels() {
    let (up, seen, task) = upstream(ok_answer()).await;
    let keel = Keel::with_config(&common::simple_via(up, "")).await;
    let sent = frame(&clients_message());
    let got = raw_call(keel.addr, sent.clone()).await;
    assert_eq!(
        got.trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "{:?}",
        got.trailers
    );

    let infers = model_infers(&seen);
    assert_eq!(infers.len(), 1);
    assert_eq!(
        infers[0].body, sent,
        "the upstream got other bytes than the client sent"
    );

    // The answer: the upstream's message as it was, then Keel's labels as map entries.
    let canned = canned_answer();
    let msg = &got.body[5..];
    assert_eq!(
        got.body.len(),
        5 + u32::from_be_bytes(got.body[1..5].try_into().unwrap()) as usize
    );
    assert!(
        msg.starts_with(&canned),
        "the upstream's answer was not passed on as it came"
    );
    let decoded = pb::ModelInferResponse::decode(msg).unwrap();
    assert_eq!(
        string_param(&decoded.parameters, "keel.tier").as_deref(),
        Some("primary")
    );
    assert_eq!(
        string_param(&decoded.parameters, "keel.degraded").as_deref(),
        Some("false")
    );
    assert_eq!(
        string_param(&decoded.parameters, "keel.served_by").as_deref(),
        Some("simple:1")
    );
    assert_eq!(
        string_param(&decoded.parameters, "upstream.queue_us").as_deref(),
        Some("42")
    );
    assert_eq!(decoded.raw_output_contents[0], i32_bytes(&[7; 16]));

    // The upstream's metadata, under Keel's own.
    assert_eq!(got.headers.get("x-upstream-name").unwrap(), "up-1");
    assert_ne!(
        got.headers.get("keel-tier").map(|v| v.as_bytes()),
        Some(&b"forged"[..])
    );
    assert_eq!(got.trailers.get("x-upstream-trailer").unwrap(), "t1");
    assert_eq!(got.trailers.get("keel-attempts").unwrap(), "1");
    assert_eq!(got.trailers.get("keel-tier").unwrap(), "primary");
    keel.stop().await.unwrap();
    task.abort();
}

#[tokio::test]
async fn a_generated_client_reads_the_appended_answer_and_the_upstreams_metadata() {
    let (up, _seen, task) = upstream(ok_answer()).await;
    let keel = Keel::with_config(&common::simple_via(up, "")).await;
    let mut client = keel.client().await;
    let resp = client.model_infer(simple_request()).await.unwrap();
    assert_eq!(resp.metadata().get("x-upstream-name").unwrap(), "up-1");
    let answer = resp.into_inner();
    assert_eq!(
        string_param(&answer.parameters, "keel.tier").as_deref(),
        Some("primary")
    );
    assert_eq!(answer.outputs.len(), 2);
    assert_eq!(answer.raw_output_contents[1], i32_bytes(&[8; 16]));
    keel.stop().await.unwrap();
    task.abort();
}

#[tokio::test]
async fn a_routed_version_is_appended_to_the_clients_bytes() {
    let (up, seen, task) = upstream(ok_answer()).await;
    let policy = format!(
        "[upstreams.up]\nendpoints = [\"{up}\"]\n[models.simple]\nroutes = [{{ backend = \"up\", version = \"7\", weight = 100 }}]\n"
    );
    let keel = Keel::with_config(&policy).await;
    let message = clients_message();
    let got = raw_call(keel.addr, frame(&message)).await;
    assert_eq!(got.trailers.get("grpc-status").unwrap(), "0");
    let infers = model_infers(&seen);
    let body = &infers[0].body;
    assert!(
        body[5..].starts_with(&message),
        "the client's bytes were re-encoded"
    );
    let upstream_saw = pb::ModelInferRequest::decode(&body[5..]).unwrap();
    assert_eq!(upstream_saw.model_version, "7");
    assert_eq!(
        upstream_saw.raw_input_contents,
        simple_request().raw_input_contents
    );
    keel.stop().await.unwrap();
    task.abort();
}

/// The error an answer carries: its code and its ErrorInfo reason.
async fn failing_with(answer: Answer) -> (tonic::Code, String) {
    use tonic_types::StatusExt;
    let (up, _seen, task) = upstream(answer).await;
    let keel = Keel::with_config(&common::simple_via(
        up,
        "[defaults.retry]\nmax_attempts = 1\n",
    ))
    .await;
    let err = keel
        .client()
        .await
        .model_infer(simple_request())
        .await
        .unwrap_err();
    keel.stop().await.unwrap();
    task.abort();
    let reason = err
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default();
    (err.code(), reason)
}

#[tokio::test]
async fn a_malformed_answer_is_a_classified_upstream_error() {
    let cases = [
        ("not a ModelInferResponse", frame(b"\xff\xff\xff\xff")),
        ("cut short", Bytes::from_static(b"\0\0\0\0\x10abc")),
        ("compressed", {
            let mut f = BytesMut::from(&frame(&canned_answer())[..]);
            f[0] = 1;
            f.freeze()
        }),
        ("two messages", {
            let mut f = BytesMut::from(&frame(&canned_answer())[..]);
            f.extend_from_slice(&frame(&canned_answer()));
            f.freeze()
        }),
    ];
    for (what, body) in cases {
        let (code, reason) = failing_with(Answer {
            body,
            headers: vec![],
            trailers: vec![],
        })
        .await;
        assert_eq!(reason, "UPSTREAM_PROTOCOL", "{what}: {code:?}");
    }
}

#[tokio::test]
async fn a_version_adapter_sends_a_whole_new_message_the_upstream_reads() {
    let (up, seen, task) = upstream(ok_answer()).await;
    let policy = format!(
        "{}[models.simple.adapters.\"old\"]\nto = \"1\"\nrename_inputs = {{ A = \"INPUT0\", B = \"INPUT1\" }}\n",
        common::simple_via(up, "")
    );
    let keel = Keel::with_config(&policy).await;
    let mut old = simple_request();
    old.model_version = "old".into();
    old.inputs[0].name = "A".into();
    old.inputs[1].name = "B".into();
    let mut message = old.encode_to_vec();
    message.extend(unknown_field());
    let got = raw_call(keel.addr, frame(&message)).await;
    assert_eq!(
        got.trailers.get("grpc-status").unwrap(),
        "0",
        "{:?}",
        got.trailers
    );
    let infers = model_infers(&seen);
    let body = &infers[0].body;
    assert!(
        !body[5..].starts_with(&message),
        "an adapted request went out as the client's bytes"
    );
    let upstream_saw = pb::ModelInferRequest::decode(&body[5..]).unwrap();
    assert_eq!(upstream_saw.model_version, "1");
    let names: Vec<&str> = upstream_saw
        .inputs
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert_eq!(names, vec!["INPUT0", "INPUT1"]);
    assert_eq!(upstream_saw.raw_input_contents, old.raw_input_contents);
    keel.stop().await.unwrap();
    task.abort();
}

#[tokio::test]
async fn an_endpoints_stream_limit_holds_further_calls_until_one_ends() {
    use common::{Script, ScriptedUpstream};
    let up = ScriptedUpstream::new(Script::slow(std::time::Duration::from_millis(800)));
    let (addr, _stop) = up.serve().await;
    let policy = format!(
        "[upstreams.up]\nendpoints = [\"{addr}\"]\nmax_concurrent_streams = 1\n\
         [models.simple]\nbackend = \"up\"\n"
    );
    let keel = Keel::with_config(&policy).await;
    let first = up
        .hold(keel.client().await, tonic::Request::new(simple_request()))
        .await;
    let mut client = keel.client().await;
    let second = tokio::spawn(async move { client.model_infer(simple_request()).await });
    // While the first holds the endpoint's one stream, the second waits in Keel.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let infers = |up: &ScriptedUpstream| {
        up.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == "ModelInfer")
            .count()
    };
    assert_eq!(
        infers(&up),
        1,
        "a second call reached the upstream past the limit"
    );
    assert!(first.await.unwrap().is_ok());
    assert!(second.await.unwrap().is_ok());
    assert_eq!(infers(&up), 2);
    keel.stop().await.unwrap();
}
