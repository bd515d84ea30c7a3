//! The one place where a Keel [`Error`] becomes the gRPC status a client sees.
//!
//! The code is [`Error::code`]. Each status carries `google.rpc.ErrorInfo` (domain `keel`,
//! a stable reason, and metadata: class, attempts, model, upstream, policy revision),
//! `google.rpc.RetryInfo` where a retry later makes sense, and `google.rpc.BadRequest`
//! naming the field for invalid requests. The edge adds the request id and the receipt.

use std::collections::HashMap;

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::call::CallContext;
use crate::error::Error;
use crate::model::clip;
use crate::resilience::Failure;

/// The `ErrorInfo` domain of Keel's errors.
pub const DOMAIN: &str = "keel";

/// The longest `grpc-message` Keel sends: messages quote what clients and upstreams sent
/// (model names, upstream errors), and an error answer has a fixed upper size.
pub const MAX_MESSAGE: usize = crate::model::MAX_MESSAGE;

/// The most text of `BadRequest` violations an answer lists; the rest are counted. With
/// `grpc-message` (also inside the details), an error's trailers stay near 10 KiB, under
/// the 16 KiB header list tonic's and grpc-go's clients take by default (32 violations
/// quoting 256-byte names and datatypes were 23 KiB, and tonic's client reset the stream).
const MAX_DETAILS: usize = 4096;

/// The longest value of an `ErrorInfo` metadata entry that quotes a client or upstream.
const MAX_INFO: usize = 256;

/// The status for `e`; `ctx` is the call's context when it got as far as being routed.
pub fn to_status(e: &Error, ctx: Option<&CallContext>, revision: u64) -> Status {
    let mut info = HashMap::new();
    info.insert("class".to_string(), e.class().as_str().to_string());
    info.insert("policy_revision".to_string(), revision.to_string());
    if let Some(m) = e.model().or(ctx.map(|c| &*c.route.model)) {
        info.insert("model".to_string(), clip(m, MAX_INFO).to_string());
    }
    if let Some(u) = e.upstream().or(ctx.map(|c| &*c.route.target.upstream)) {
        info.insert("upstream".to_string(), u.to_string());
    }
    if let Some(t) = e.tenant() {
        info.insert("tenant".to_string(), t.to_string());
    }
    let mut message = e.to_string();
    if let Some(ctx) = ctx {
        let r = ctx.receipt.read();
        info.insert("attempts".to_string(), r.attempts.max(1).to_string());
        if r.budget_exhausted {
            info.insert("retry_budget_exhausted".to_string(), "true".to_string());
        }
        match e {
            Error::DeadlineExceeded { .. } => {
                message = format!("{message} after {} attempt(s)", r.attempts.max(1));
                if let Some(last) = r.last_error.as_ref().filter(|l| **l != e.to_string()) {
                    message.push_str(&format!("; last error: {last}"));
                    info.insert("last_error".to_string(), clip(last, MAX_INFO).to_string());
                }
            }
            Error::BreakerOpen(_) => {
                message = format!(
                    "model '{}' on upstream '{}': {message}",
                    ctx.route.model, ctx.route.target.upstream
                );
            }
            Error::Overloaded(_) => {
                message = format!("model '{}' is {message}", ctx.route.model);
            }
            _ if r.budget_exhausted => {
                message.push_str(" (retries stopped: retry budget exhausted)")
            }
            _ => {}
        }
    }
    if matches!(e, Error::FaultInjected { .. }) {
        info.insert("injected".to_string(), "true".to_string());
    }
    let mut details = ErrorDetails::with_error_info(e.reason(), DOMAIN, info);
    if let Error::UnknownRoute { .. } = e {
        details.add_bad_request_violation("keel-route", e.to_string());
    }
    if let Error::InvalidRequest(rejection) = e {
        let mut room = MAX_DETAILS;
        let mut listed = 0;
        for v in rejection.violations() {
            let (field, problem) = (v.field_text(), v.problem_text());
            let Some(left) = room.checked_sub(field.len() + problem.len()) else {
                break;
            };
            room = left;
            listed += 1;
            details.add_bad_request_violation(field, problem);
        }
        let more = rejection.more() + rejection.violations().len() - listed;
        if more > 0 {
            details.add_bad_request_violation(
                "request",
                format!("and {more} more problems, not listed"),
            );
        }
    }
    if let Some(after) = e.retry_after() {
        details.set_retry_info(Some(after));
    }
    if message.len() > MAX_MESSAGE {
        let keep = clip(&message, MAX_MESSAGE).len();
        message.truncate(keep);
        message.push('…');
    }
    let mut status = Status::with_error_details(e.code(), message, details);
    // An injected fault looks like a sick server to whoever calls Keel, pushback included.
    if let Error::FaultInjected {
        pushback: crate::resilience::Pushback::After(d),
        ..
    } = e
        && let Ok(v) = tonic::metadata::MetadataValue::try_from(d.as_millis().to_string())
    {
        status
            .metadata_mut()
            .insert(crate::headers::RETRY_PUSHBACK, v);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InvalidRequest;
    use tonic::Code;

    #[test]
    fn statuses_carry_the_reason_the_class_and_the_field() {
        let e = Error::from(InvalidRequest::MissingInput {
            model: "simple".into(),
            tensor: "INPUT1".into(),
        });
        let s = to_status(&e, None, 3);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "input 'INPUT1' of model 'simple' is missing");
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INVALID_REQUEST");
        assert_eq!(info.domain, DOMAIN);
        assert_eq!(info.metadata["class"], "client_error");
        assert_eq!(info.metadata["policy_revision"], "3");
        let bad = s.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations[0].field, "inputs[INPUT1]");
    }

    #[test]
    fn an_error_answer_has_a_fixed_upper_size_whatever_the_request_held() {
        let violations: Vec<_> = (0..10_000)
            .map(|i| {
                InvalidRequest::DuplicateInput {
                    tensor: "x".repeat(10_000),
                }
                .at(format!("inputs[{i}].name"))
            })
            .collect();
        let rejection = crate::model::Rejection::of(violations).unwrap();
        let s = to_status(&Error::InvalidRequest(rejection), None, 1);
        assert!(
            s.message().len() <= MAX_MESSAGE + 3,
            "{}",
            s.message().len()
        );
        assert!(
            s.message().starts_with("10000 problems: "),
            "{}",
            &s.message()[..40]
        );
        // What fits in MAX_DETAILS is listed (fewer than MAX_REPORTED of these long ones),
        // the rest counted.
        let bad = s.get_details_bad_request().unwrap();
        let listed = bad.field_violations.len() - 1;
        assert!(
            (1..crate::model::MAX_REPORTED).contains(&listed),
            "{listed}"
        );
        let text: usize = bad.field_violations[..listed]
            .iter()
            .map(|v| v.field.len() + v.description.len())
            .sum();
        assert!(text <= MAX_DETAILS, "{text}");
        let last = bad.field_violations.last().unwrap();
        assert_eq!(last.field, "request");
        assert_eq!(
            last.description,
            format!("and {} more problems, not listed", 10_000 - listed)
        );
        assert!(
            bad.field_violations
                .iter()
                .all(|v| v.description.len() <= crate::model::MAX_VIOLATION_TEXT + 3)
        );
        // The whole answer: message and details together stay small.
        let details_len = s.details().len();
        assert!(details_len < 7 * 1024, "{details_len} bytes of details");

        // A client's long model name is clipped in the message and in ErrorInfo.
        let e = Error::ModelNotFound {
            model: "m".repeat(1 << 20),
        };
        let s = to_status(&e, None, 1);
        assert!(s.message().len() <= MAX_MESSAGE + 3);
        assert!(s.get_details_error_info().unwrap().metadata["model"].len() <= MAX_INFO);
    }

    #[test]
    fn upstream_codes_pass_through_and_unreachable_is_unavailable() {
        let e = Error::UpstreamStatus {
            upstream: "triton".into(),
            code: Code::ResourceExhausted,
            message: "busy".into(),
            pushback: crate::resilience::Pushback::After(std::time::Duration::from_millis(250)),
        };
        let s = to_status(&e, None, 1);
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            s.get_details_retry_info().unwrap().retry_delay,
            Some(std::time::Duration::from_millis(250))
        );
        let s = to_status(
            &Error::UpstreamUnavailable {
                upstream: "triton".into(),
                detail: "connection refused".into(),
                never_sent: true,
            },
            None,
            1,
        );
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("'triton'"));
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.metadata["upstream"], "triton");
        assert_eq!(info.metadata["class"], "transient");
    }
}
