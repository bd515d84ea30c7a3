//! Answers an oversized request with RESOURCE_EXHAUSTED, as the gRPC status code guide asks,
//! instead of the OUT_OF_RANGE tonic's decoder gives.
//!
//! tonic rejects a unary request larger than the decoding limit before any handler runs,
//! answering with a trailers-only response; [`fix_response`] rewrites that status. Streaming
//! handlers see the same error as a stream item and map it with [`fix_status`].

/// What the client is told.
const MESSAGE: &str =
    "request message is larger than this server accepts (server.max_message_size)";

/// Maps tonic's oversize error to RESOURCE_EXHAUSTED; other statuses pass through.
pub fn fix_status(status: tonic::Status) -> tonic::Status {
    if crate::grpc_code::is_too_large(status.code(), status.message()) {
        tonic::Status::resource_exhausted(format!("{MESSAGE}: {}", status.message()))
    } else {
        status
    }
}

/// Rewrites a trailers-only oversize answer; used with `tower::util::MapResponseLayer`.
pub fn fix_response<B>(mut res: http::Response<B>) -> http::Response<B> {
    let headers = res.headers_mut();
    let oversize = headers.get("grpc-status").map(|v| v.as_bytes()) == Some(b"11")
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| {
                crate::grpc_code::is_too_large(tonic::Code::OutOfRange, &percent_decode(m))
            });
    if oversize {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        headers.insert("grpc-message", http::HeaderValue::from_static(MESSAGE));
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
        let res = fix_response(res);
        assert_eq!(res.headers()["grpc-status"], "8");
        assert_eq!(res.headers()["grpc-message"], MESSAGE);
    }

    #[test]
    fn other_answers_are_untouched() {
        let res = http::Response::builder()
            .header("grpc-status", "11")
            .header("grpc-message", "index out of range")
            .body(())
            .unwrap();
        assert_eq!(fix_response(res).headers()["grpc-status"], "11");
        let s = fix_status(tonic::Status::invalid_argument("x"));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s = fix_status(tonic::Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        ));
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    }
}
