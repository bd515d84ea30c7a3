//! gRPC status codes by name: the canonical name (`UNAVAILABLE`) that policies, logs and
//! docs spell, and the Prometheus label value (`Unavailable`) that metrics carry. A leaf:
//! depends on nothing else in the crate.
//!
//! # Two spellings
//!
//! The canonical names are the gRPC status code guide's, as `retry_on` and `fault.abort.code`
//! take them. The label values are grpc-go's `codes.Code.String()`, which
//! go-grpc-prometheus writes into `grpc_code`, so the gRPC dashboards and alerts people
//! already run (`grpc_code!="OK"`, `grpc_code="Unavailable"`) work on Keel unchanged.

use http::HeaderName;
use tonic::Code;

/// The header (or trailer) that carries a call's status code. A constant name is looked up
/// without being parsed again, which a `&str` key is on every call.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// The header that carries a status's message, percent-encoded.
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// The header that carries a status's details, base64-encoded `google.rpc.Status`.
pub const GRPC_STATUS_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");

/// The start of tonic's message when a message is over its decoding limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// Whether a status is tonic's own refusal of a message over the decoding limit (it answers
/// OUT_OF_RANGE, where the gRPC status code guide asks for RESOURCE_EXHAUSTED).
pub fn is_too_large(code: Code, message: &str) -> bool {
    code == Code::OutOfRange && message.starts_with(TONIC_TOO_LARGE)
}

/// Every code with its canonical name and its Prometheus label value, in numeric order.
/// `Canceled` has one L, as grpc-go spells it.
pub const CODES: [(&str, &str, Code); 17] = [
    ("OK", "OK", Code::Ok),
    ("CANCELLED", "Canceled", Code::Cancelled),
    ("UNKNOWN", "Unknown", Code::Unknown),
    ("INVALID_ARGUMENT", "InvalidArgument", Code::InvalidArgument),
    (
        "DEADLINE_EXCEEDED",
        "DeadlineExceeded",
        Code::DeadlineExceeded,
    ),
    ("NOT_FOUND", "NotFound", Code::NotFound),
    ("ALREADY_EXISTS", "AlreadyExists", Code::AlreadyExists),
    (
        "PERMISSION_DENIED",
        "PermissionDenied",
        Code::PermissionDenied,
    ),
    (
        "RESOURCE_EXHAUSTED",
        "ResourceExhausted",
        Code::ResourceExhausted,
    ),
    (
        "FAILED_PRECONDITION",
        "FailedPrecondition",
        Code::FailedPrecondition,
    ),
    ("ABORTED", "Aborted", Code::Aborted),
    ("OUT_OF_RANGE", "OutOfRange", Code::OutOfRange),
    ("UNIMPLEMENTED", "Unimplemented", Code::Unimplemented),
    ("INTERNAL", "Internal", Code::Internal),
    ("UNAVAILABLE", "Unavailable", Code::Unavailable),
    ("DATA_LOSS", "DataLoss", Code::DataLoss),
    ("UNAUTHENTICATED", "Unauthenticated", Code::Unauthenticated),
];

/// The canonical name of a code (`UNAVAILABLE`), for policies, logs and messages.
pub fn name(code: Code) -> &'static str {
    CODES[code as usize].0
}

/// The Prometheus label value of a code (`Unavailable`), go-grpc-prometheus's spelling.
pub fn label(code: Code) -> &'static str {
    CODES[code as usize].1
}

/// The code of a canonical name.
pub fn parse(s: &str) -> Option<Code> {
    CODES.iter().find(|(n, _, _)| *n == s).map(|&(_, _, c)| c)
}

/// The code of a `grpc-status` header value; `Unknown` for anything unparsable.
pub fn code_of_status(value: &[u8]) -> Code {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .map_or(Code::Unknown, Code::from_i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_in_numeric_order_and_round_trip() {
        for (i, (n, _, c)) in CODES.iter().enumerate() {
            assert_eq!(*c as usize, i);
            assert_eq!(parse(n), Some(*c));
            assert_eq!(name(*c), *n);
        }
        assert_eq!(code_of_status(b"14"), Code::Unavailable);
        assert_eq!(code_of_status(b" 5 "), Code::NotFound);
        assert_eq!(code_of_status(b"x"), Code::Unknown);
        assert_eq!(code_of_status(b"99"), Code::Unknown);
    }

    #[test]
    fn labels_are_grpc_gos_names() {
        // codes.Code.String() in grpc-go, which go-grpc-prometheus puts in grpc_code.
        let go = [
            "OK",
            "Canceled",
            "Unknown",
            "InvalidArgument",
            "DeadlineExceeded",
            "NotFound",
            "AlreadyExists",
            "PermissionDenied",
            "ResourceExhausted",
            "FailedPrecondition",
            "Aborted",
            "OutOfRange",
            "Unimplemented",
            "Internal",
            "Unavailable",
            "DataLoss",
            "Unauthenticated",
        ];
        for (i, want) in go.iter().enumerate() {
            assert_eq!(label(Code::from_i32(i as i32)), *want);
        }
        // Only canonical names parse: policies keep spelling `UNAVAILABLE`.
        assert_eq!(parse("Unavailable"), None);
        assert_eq!(parse("UNAVAILABLE"), Some(Code::Unavailable));
    }
}
