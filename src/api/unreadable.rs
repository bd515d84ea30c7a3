//! Answers a request tonic's decoder could not read in Keel's words, instead of tonic's:
//! one larger than `server.max_message_size` with RESOURCE_EXHAUSTED (`REQUEST_TOO_LARGE`,
//! tonic says OUT_OF_RANGE), one that is not a message of the method's type with
//! INVALID_ARGUMENT (`MALFORMED_REQUEST`, tonic says INTERNAL, which Keel's taxonomy keeps
//! for its own bugs), as the gRPC status code guide asks.
//!
//! tonic refuses such a unary request before any handler runs, answering with a
//! trailers-only response; [`fix_response`] rewrites that status. Streaming handlers see the
//! same error as a stream item and map it with [`fix_status`]. A status that carries details
//! is Keel's own (or an upstream's, passed on): never rewritten.

use crate::error::Error;
use crate::grpc_code::{GRPC_MESSAGE, GRPC_STATUS, GRPC_STATUS_DETAILS};

/// How prost's decode errors begin.
const PROST_DECODE_ERROR: &str = "failed to decode Protobuf message";

/// Keel's error for a status of tonic's decoder, if it is one.
fn unreadable(code: tonic::Code, message: &str) -> Option<Error> {
    if crate::grpc_code::is_too_large(code, message) {
        return Some(Error::RequestTooLarge {
            detail: message.to_string(),
        });
    }
    (code == tonic::Code::Internal && message.starts_with(PROST_DECODE_ERROR)).then(|| {
        Error::MalformedRequest {
            detail: message.to_string(),
        }
    })
}

/// The status for tonic's decoder errors, as Keel's error; other statuses pass through.
/// `revision` is the policy revision the status reports.
pub fn fix_status(status: tonic::Status, revision: u64) -> tonic::Status {
    if !status.details().is_empty() {
        return status;
    }
    match unreadable(status.code(), status.message()) {
        Some(e) => super::status::to_status(&e, None, revision),
        None => status,
    }
}

/// In the extensions of an answer [`fix_response`] rewrote: the error it answered, for the
/// edge to log as it logs a call (no handler ran to do it).
#[derive(Clone, Debug)]
pub struct Refused(pub Error);

/// Rewrites a trailers-only answer of tonic's decoder (status, message and details in its
/// headers), and marks it [`Refused`]; used with `tower::util::MapResponseLayer`.
pub fn fix_response<B>(mut res: http::Response<B>, revision: u64) -> http::Response<B> {
    let headers = res.headers_mut();
    let code = match headers.get(GRPC_STATUS).map(|v| v.as_bytes()) {
        Some(b"11") => tonic::Code::OutOfRange,
        Some(b"13") => tonic::Code::Internal,
        _ => return res,
    };
    if headers.contains_key(GRPC_STATUS_DETAILS) {
        return res;
    }
    let Some(message) = headers
        .get(GRPC_MESSAGE)
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
    else {
        return res;
    };
    if let Some(e) = unreadable(code, &message) {
        // Only fails on a message that cannot be a header value, which Keel's is not.
        let _ = super::status::to_status(&e, None, revision).add_header(headers);
        res.extensions_mut().insert(Refused(e));
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
    fn a_request_prost_cannot_decode_becomes_invalid_argument() {
        let res = http::Response::builder()
            .header("grpc-status", "13")
            .header(
                "grpc-message",
                "failed%20to%20decode%20Protobuf%20message:%20ModelInferRequest.model_name:%20invalid%20string%20value:%20data%20is%20not%20UTF-8%20encoded",
            )
            .body(())
            .unwrap();
        let res = fix_response(res, 2);
        let s = tonic::Status::from_header_map(res.headers()).unwrap();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "the request is malformed: failed to decode Protobuf message: \
             ModelInferRequest.model_name: invalid string value: data is not UTF-8 encoded"
        );
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "MALFORMED_REQUEST");
        assert_eq!(info.metadata["class"], "client_error");
        assert!(matches!(
            res.extensions().get(),
            Some(Refused(Error::MalformedRequest { .. }))
        ));
        // The same as a stream item.
        let s = fix_status(
            tonic::Status::internal("failed to decode Protobuf message: buffer underflow"),
            2,
        );
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
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
        // An INTERNAL of Keel's own, or with details, stays what it is.
        let res = http::Response::builder()
            .header("grpc-status", "13")
            .header("grpc-message", "a bug")
            .body(())
            .unwrap();
        assert_eq!(fix_response(res, 1).headers()["grpc-status"], "13");
        let keels =
            crate::api::status::to_status(&Error::MalformedRequest { detail: "x".into() }, None, 1);
        let s = tonic::Status::with_details(
            tonic::Code::Internal,
            "failed to decode Protobuf message: upstream",
            keels.details().to_vec().into(),
        );
        assert_eq!(fix_status(s, 1).code(), tonic::Code::Internal);
    }
}
