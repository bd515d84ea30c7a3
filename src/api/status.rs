//! The one place where a Keel [`Error`] becomes the gRPC status a client sees.
//!
//! Each status carries `google.rpc.ErrorInfo` (a stable reason, domain `keel`, and the
//! model or upstream involved) and `google.rpc.BadRequest` naming the field for invalid
//! requests. The edge adds the call's `x-request-id` and policy revision.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

/// The `ErrorInfo` domain of Keel's errors.
pub const DOMAIN: &str = "keel";

/// The status code for each error.
pub fn code(e: &Error) -> Code {
    match e {
        Error::ModelNotFound { .. } | Error::VersionNotFound { .. } => Code::NotFound,
        Error::InvalidRequest(_) => Code::InvalidArgument,
        Error::UpstreamUnavailable { .. } => Code::Unavailable,
        Error::UpstreamStatus { code, .. } => *code,
        Error::UpstreamProtocol { .. } => Code::Internal,
        Error::DeadlineExceeded { .. } => Code::DeadlineExceeded,
    }
}

/// The status for `e`.
pub fn to_status(e: &Error) -> Status {
    let mut info = HashMap::new();
    match e {
        Error::ModelNotFound { model } | Error::VersionNotFound { model, .. } => {
            info.insert("model".to_string(), model.clone());
        }
        Error::UpstreamUnavailable { upstream, .. }
        | Error::UpstreamStatus { upstream, .. }
        | Error::UpstreamProtocol { upstream, .. } => {
            info.insert("upstream".to_string(), upstream.clone());
        }
        _ => {}
    }
    let mut details = ErrorDetails::with_error_info(e.reason(), DOMAIN, info);
    if let Error::InvalidRequest(invalid) = e {
        details.add_bad_request_violation(invalid.field(), invalid.to_string());
    }
    Status::with_error_details(code(e), e.to_string(), details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InvalidRequest;

    #[test]
    fn statuses_carry_the_reason_and_the_field() {
        let e = Error::InvalidRequest(InvalidRequest::MissingInput {
            model: "simple".into(),
            tensor: "INPUT1".into(),
        });
        let s = to_status(&e);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "input 'INPUT1' of model 'simple' is missing");
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INVALID_REQUEST");
        assert_eq!(info.domain, DOMAIN);
        let bad = s.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations[0].field, "inputs[INPUT1]");
    }

    #[test]
    fn upstream_codes_pass_through_and_unreachable_is_unavailable() {
        let e = Error::UpstreamStatus {
            upstream: "triton".into(),
            code: Code::ResourceExhausted,
            message: "busy".into(),
        };
        assert_eq!(code(&e), Code::ResourceExhausted);
        let s = to_status(&Error::UpstreamUnavailable {
            upstream: "triton".into(),
            detail: "connection refused".into(),
        });
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("'triton'"));
        assert_eq!(
            s.get_details_error_info().unwrap().metadata["upstream"],
            "triton"
        );
    }
}
