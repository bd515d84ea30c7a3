//! The error taxonomy: every outcome of a call is classified once, here, and the class (not
//! the raw status code) decides retry, breaker and fallback handling.
//!
//! The table is published in `docs/error-taxonomy.md`; a test keeps the two in agreement.

use tonic::Code;

pub use crate::policy::ErrorClass;

/// Where a failure came from, as much as classification needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The upstream answered with this status.
    Upstream(Code),
    /// The connection failed (refused, reset, closed); the upstream may not have seen it.
    Transport,
    /// The upstream's answer broke the protocol (a malformed tensor, say).
    Protocol,
    /// Keel's per-try timeout fired while the call's deadline still had time.
    AttemptTimeout,
    /// The call's own deadline ran out.
    Deadline,
    /// Keel refused the call itself: breaker open, budget exhausted, shed.
    LocalRejection,
    /// The request is invalid or names what does not exist (Keel found out before sending).
    Request,
}

/// The class of an outcome. `pushback` says the upstream sent `grpc-retry-pushback-ms`,
/// which marks it overloaded whatever its code.
pub fn classify(origin: Origin, pushback: bool) -> ErrorClass {
    match origin {
        Origin::Upstream(_) if pushback => ErrorClass::Overloaded,
        Origin::Upstream(code) => match code {
            Code::Unavailable | Code::Cancelled | Code::Aborted => ErrorClass::Transient,
            Code::ResourceExhausted => ErrorClass::Overloaded,
            Code::DeadlineExceeded => ErrorClass::AttemptTimeout,
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unauthenticated
            | Code::PermissionDenied => ErrorClass::ClientError,
            Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented | Code::Ok => {
                ErrorClass::ServerBug
            }
        },
        Origin::Transport => ErrorClass::Transient,
        Origin::Protocol => ErrorClass::ServerBug,
        Origin::AttemptTimeout => ErrorClass::AttemptTimeout,
        Origin::Deadline => ErrorClass::DeadlineExceeded,
        Origin::LocalRejection => ErrorClass::LocalRejection,
        Origin::Request => ErrorClass::ClientError,
    }
}

/// What each class means for the layers that handle failures.
pub trait Handling {
    /// Whether the class says something about the upstream's health, so counts against
    /// its breaker.
    fn trips_breaker(self) -> bool;
    /// Whether a fallback may answer instead.
    fn may_fall_back(self) -> bool;
}

impl Handling for ErrorClass {
    fn trips_breaker(self) -> bool {
        matches!(
            self,
            ErrorClass::Transient
                | ErrorClass::Overloaded
                | ErrorClass::AttemptTimeout
                | ErrorClass::ServerBug
        )
    }

    fn may_fall_back(self) -> bool {
        !matches!(self, ErrorClass::ClientError | ErrorClass::DeadlineExceeded)
    }
}

/// Every origin with the name the published table gives it, for the doc test and the docs.
pub fn table() -> Vec<(String, ErrorClass)> {
    const CODES: [Code; 16] = [
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];
    let mut rows: Vec<(String, ErrorClass)> = CODES
        .iter()
        .map(|&c| {
            let name = crate::grpc_code::name(c);
            (
                format!("upstream {name}"),
                classify(Origin::Upstream(c), false),
            )
        })
        .collect();
    rows.extend([
        (
            "upstream status with grpc-retry-pushback-ms".to_string(),
            classify(Origin::Upstream(Code::Unavailable), true),
        ),
        (
            "connection refused, reset or closed".into(),
            classify(Origin::Transport, false),
        ),
        (
            "malformed upstream answer".into(),
            classify(Origin::Protocol, false),
        ),
        (
            "per-try timeout".into(),
            classify(Origin::AttemptTimeout, false),
        ),
        ("call deadline".into(), classify(Origin::Deadline, false)),
        (
            "breaker open, retry budget exhausted, load shed, answer over Keel's size limit, drain timeout".into(),
            classify(Origin::LocalRejection, false),
        ),
        (
            "invalid request, unknown model, request over Keel's size limit".into(),
            classify(Origin::Request, false),
        ),
    ]);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{RetryOn, Settings};

    /// Reads the markdown rows `| <first> | <second> | ...` of the table under `heading`.
    fn doc_rows(doc: &str, heading: &str) -> Vec<Vec<String>> {
        let section = doc
            .split(heading)
            .nth(1)
            .unwrap_or_else(|| panic!("no {heading}"));
        section
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2) // header and separator
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().trim_matches('`').to_string())
                    .collect()
            })
            .collect()
    }

    const DOC: &str = include_str!("../../docs/error-taxonomy.md");

    #[test]
    fn the_published_table_matches_the_code() {
        let rows = doc_rows(DOC, "## Outcomes");
        let published: Vec<(String, String)> = rows
            .into_iter()
            .map(|r| (r[0].clone(), r[1].clone()))
            .collect();
        let code: Vec<(String, String)> = table()
            .into_iter()
            .map(|(o, c)| (o, c.as_str().to_string()))
            .collect();
        assert_eq!(
            published, code,
            "docs/error-taxonomy.md disagrees with classify()"
        );
    }

    #[test]
    fn the_published_handling_matches_the_code() {
        let defaults = Settings::default().retry.retry_on;
        let rows = doc_rows(DOC, "## Classes");
        assert_eq!(rows.len(), ErrorClass::ALL.len());
        for (row, class) in rows.iter().zip(ErrorClass::ALL) {
            let yes = |b: bool| if b { "yes" } else { "no" };
            assert_eq!(row[0], class.as_str());
            assert_eq!(
                row[1],
                yes(defaults.contains(&RetryOn::Class(class))),
                "{class:?} retried by default"
            );
            assert_eq!(
                row[2],
                yes(class.trips_breaker()),
                "{class:?} trips the breaker"
            );
            assert_eq!(
                row[3],
                yes(class.may_fall_back()),
                "{class:?} may fall back"
            );
        }
    }

    #[test]
    fn pushback_means_overloaded_whatever_the_code() {
        assert_eq!(
            classify(Origin::Upstream(Code::Internal), true),
            ErrorClass::Overloaded
        );
        assert_eq!(
            classify(Origin::Upstream(Code::Internal), false),
            ErrorClass::ServerBug
        );
    }
}
