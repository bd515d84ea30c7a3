//! The log line of a call refused before any handler ran: a request tonic's decoder could
//! not read is logged as the handler logs a call, with its request id and Keel's code.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

/// Log lines written in this test binary.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_request_the_decoder_refused_is_logged_as_a_call() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .expect("the only subscriber of this test binary");
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
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["request_id"] == "undecodable-1")
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
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
    keel.stop().await.unwrap();
}
