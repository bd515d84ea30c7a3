//! gRPC status codes by their canonical names (`UNAVAILABLE`), as policies, metrics and
//! docs spell them. A leaf: depends on nothing else in the crate.

use tonic::Code;

/// The start of tonic's message when a message is over its decoding limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// Whether a status is tonic's own refusal of a message over the decoding limit (it answers
/// OUT_OF_RANGE, where the gRPC status code guide asks for RESOURCE_EXHAUSTED).
pub fn is_too_large(code: Code, message: &str) -> bool {
    code == Code::OutOfRange && message.starts_with(TONIC_TOO_LARGE)
}

/// Every code with its name, in numeric order.
pub const CODES: [(&str, Code); 17] = [
    ("OK", Code::Ok),
    ("CANCELLED", Code::Cancelled),
    ("UNKNOWN", Code::Unknown),
    ("INVALID_ARGUMENT", Code::InvalidArgument),
    ("DEADLINE_EXCEEDED", Code::DeadlineExceeded),
    ("NOT_FOUND", Code::NotFound),
    ("ALREADY_EXISTS", Code::AlreadyExists),
    ("PERMISSION_DENIED", Code::PermissionDenied),
    ("RESOURCE_EXHAUSTED", Code::ResourceExhausted),
    ("FAILED_PRECONDITION", Code::FailedPrecondition),
    ("ABORTED", Code::Aborted),
    ("OUT_OF_RANGE", Code::OutOfRange),
    ("UNIMPLEMENTED", Code::Unimplemented),
    ("INTERNAL", Code::Internal),
    ("UNAVAILABLE", Code::Unavailable),
    ("DATA_LOSS", Code::DataLoss),
    ("UNAUTHENTICATED", Code::Unauthenticated),
];

/// The canonical name of a code.
pub fn name(code: Code) -> &'static str {
    CODES[code as usize].0
}

/// The code of a canonical name.
pub fn parse(s: &str) -> Option<Code> {
    CODES.iter().find(|(n, _)| *n == s).map(|&(_, c)| c)
}

/// The name of a `grpc-status` header value; `UNKNOWN` for anything unparsable.
pub fn name_of_status(value: &[u8]) -> &'static str {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .map_or("UNKNOWN", |n| name(Code::from_i32(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_in_numeric_order_and_round_trip() {
        for (i, (n, c)) in CODES.iter().enumerate() {
            assert_eq!(*c as usize, i);
            assert_eq!(parse(n), Some(*c));
            assert_eq!(name(*c), *n);
        }
        assert_eq!(name_of_status(b"14"), "UNAVAILABLE");
        assert_eq!(name_of_status(b"x"), "UNKNOWN");
    }
}
