//! Log lines at the edge: a request tonic's decoder could not read is logged as the handler
//! logs a call, with its request id and Keel's code; and a request's log lines have a fixed
//! upper size, whatever it quotes.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[tokio::test]
async fn a_request_the_decoder_refused_is_logged_as_a_call() {
    let logs = capture_logs();
    let keel = Keel::embedded().await;
    let tcp = tokio::net::TcpStream::connect(keel.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap();
    let req = http::Request::post("http://keel/inference.GRPCInferenceService/ModelInfer")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-request-id", "undecodable-1")
        .body(())
        .unwrap();
    let (res, mut body) = send.send_request(req, false).unwrap();
    // Field 1 (model_name) with bytes that are not UTF-8.
    body.send_data(
        bytes::Bytes::from_static(&[0, 0, 0, 0, 4, 0x0a, 0x02, 0xff, 0xfe]),
        true,
    )
    .unwrap();
    let res = res.await.unwrap();
    let s = tonic::Status::from_header_map(res.headers()).unwrap();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    let lines = logs.lines_of("undecodable-1");
    assert_eq!(lines.len(), 1, "{}", logs.text());
    assert_eq!(lines[0]["message"], "request");
    assert_eq!(lines[0]["grpc_code"], "INVALID_ARGUMENT");
    assert_eq!(lines[0]["class"], "client_error");
    assert!(
        lines[0]["error"]
            .as_str()
            .unwrap()
            .contains("failed to decode Protobuf message"),
        "{}",
        lines[0]
    );
    driver.abort();

    // 1,000 inputs with 1 KiB names and 1 KiB datatypes, every one a problem: each log
    // line of the call stays under its bound (the attack of issue 22 wrote 178 MB lines).
    let mut client = keel.client().await.max_encoding_message_size(64 << 20);
    let mut req = tonic::Request::new(keel::pb::inference::ModelInferRequest {
        model_name: "simple".into(),
        inputs: (0..1000)
            .map(|i| {
                input(
                    &format!("{i:04}{}", "n".repeat(1020)),
                    &"X".repeat(1024),
                    &[1],
                )
            })
            .collect(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-request-id", "quoting-1".parse().unwrap());
    // The answer comes back: its details list what fits in 4 KiB and count the rest (32
    // violations at their longest took the trailers past tonic's 16 KiB and the client
    // reset the stream).
    let s = client.model_infer(req).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(
        s.details().len() < 7 << 10,
        "{} bytes of details",
        s.details().len()
    );
    use tonic_types::StatusExt as _;
    let bad = s.get_details_bad_request().unwrap();
    let last = bad.field_violations.last().unwrap();
    assert!(
        last.description.ends_with("more problems, not listed"),
        "{last:?}"
    );
    let lines = logs.lines_of("quoting-1");
    assert!(!lines.is_empty(), "{}", logs.text());
    for line in &lines {
        let len = line.to_string().len();
        assert!(len < 8 << 10, "a log line of {len} bytes: {line}");
    }
    keel.stop().await.unwrap();
}
