//! Answers an oversized request with RESOURCE_EXHAUSTED (reason `REQUEST_TOO_LARGE`), as the
//! gRPC status code guide asks, instead of the OUT_OF_RANGE tonic's decoder gives.
//!
//! tonic rejects a unary request larger than the decoding limit before any handler runs,
//! answering with a trailers-only response; [`fix_response`] rewrites that status. Streaming
//! handlers see the same error as a stream item and map it with [`fix_status`].

use crate::error::Error;

/// The status for tonic's oversize error, as Keel's error; other statuses pass through.
/// `revision` is the policy revision the status reports.
pub fn fix_status(status: tonic::Status, revision: u64) -> tonic::Status {
    if crate::grpc_code::is_too_large(status.code(), status.message()) {
        let e = Error::RequestTooLarge {
            detail: status.message().to_string(),
        };
        super::status::to_status(&e, None, revision)
    } else {
        status
    }
}

/// Rewrites a trailers-only oversize answer (status, message and details in its headers);
/// used with `tower::util::MapResponseLayer`.
pub fn fix_response<B>(mut res: http::Response<B>, revision: u64) -> http::Response<B> {
    let headers = res.headers_mut();
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
        return res;
    }
    let Some(message) = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
    else {
        return res;
    };
    let fixed = fix_status(tonic::Status::out_of_range(message), revision);
    if fixed.code() != tonic::Code::OutOfRange {
        // Only fails on a message that cannot be a header value, which Keel's is not.
        let _ = fixed.add_header(headers);
    }
    res
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt as _;

    #[test]
    fn tonics_oversize_answer_becomes_resource_exhausted() {
        let res = http::Response::builder()
            .header("grpc-status", "11")
            .header(
                "grpc-message",
                "Error,%20decoded%20message%20length%20too%20large:%20found%205%20bytes",
            )
            .body(())
            .unwrap();
        let res = fix_response(res, 4);
        assert_eq!(res.headers()["grpc-status"], "8");
        let s = tonic::Status::from_header_map(res.headers()).unwrap();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "request message is larger than Keel takes (server.max_message_size): \
             Error, decoded message length too large: found 5 bytes"
        );
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "REQUEST_TOO_LARGE");
        assert_eq!(info.metadata["class"], "client_error");
        assert_eq!(info.metadata["policy_revision"], "4");
    }

    #[test]
    fn other_answers_are_untouched() {
        let res = http::Response::builder()
            .header("grpc-status", "11")
            .header("grpc-message", "index out of range")
            .body(())
            .unwrap();
        assert_eq!(fix_response(res, 1).headers()["grpc-status"], "11");
        let s = fix_status(tonic::Status::invalid_argument("x"), 1);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s = fix_status(
            tonic::Status::out_of_range(
                "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
            ),
            1,
        );
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    }
}
