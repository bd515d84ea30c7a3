//! The one place where a Keel [`Error`] becomes the gRPC status a client sees.
//!
//! Each status carries `google.rpc.ErrorInfo` (a stable reason, domain `keel`, and the
//! model or upstream involved), `google.rpc.BadRequest` naming the field for invalid
//! requests, and the call's `x-request-id` in its metadata.

use std::collections::HashMap;

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;
use crate::upstream::grpc::REQUEST_ID;

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

/// The status for `e`, tagged with the call's request id.
pub fn to_status(e: &Error, request_id: &str) -> Status {
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
    let mut status = Status::with_error_details(code(e), e.to_string(), details);
    with_request_id(&mut status, request_id);
    status
}

/// Adds `x-request-id` to a status's metadata.
pub fn with_request_id(status: &mut Status, request_id: &str) {
    if let Ok(v) = MetadataValue::try_from(request_id) {
        status.metadata_mut().insert(REQUEST_ID, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InvalidRequest;

    #[test]
    fn statuses_carry_the_reason_the_field_and_the_request_id() {
        let e = Error::InvalidRequest(InvalidRequest::MissingInput {
            model: "simple".into(),
            tensor: "INPUT1".into(),
        });
        let s = to_status(&e, "req-1");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "input 'INPUT1' of model 'simple' is missing");
        assert_eq!(s.metadata().get(REQUEST_ID).unwrap(), "req-1");
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
        let s = to_status(
            &Error::UpstreamUnavailable {
                upstream: "triton".into(),
                detail: "connection refused".into(),
            },
            "r",
        );
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("'triton'"));
        assert_eq!(
            s.get_details_error_info().unwrap().metadata["upstream"],
            "triton"
        );
    }
}
