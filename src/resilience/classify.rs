//! The error taxonomy: every outcome of a call is classified once, here, and the class (not
//! the raw status code) decides retry and breaker handling; the same outcome decides which
//! fallback trigger it stands for ([`trigger`]).
//!
//! The table is published in `docs/error-taxonomy.md`; a test keeps the two in agreement, so
//! the page states what the retry layer, the breaker and the fallback ladder actually do.

use tonic::Code;

pub use crate::policy::ErrorClass;
use crate::policy::Trigger;

/// Where a failure came from, as much as classification needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The upstream answered with this status.
    Upstream(Code),
    /// The policy's fault injection answered this status, standing for the upstream.
    Injected(Code),
    /// The connection failed (refused, reset, closed); the upstream may not have seen it.
    Transport,
    /// The upstream's answer broke the protocol (a malformed tensor, say).
    Protocol,
    /// Keel's per-try timeout fired while the call's deadline still had time.
    AttemptTimeout,
    /// The call's own deadline ran out.
    Deadline,
    /// Keel refused the call itself, for this reason.
    Refused(Refusal),
    /// The request is invalid or names what does not exist (Keel found out before sending).
    Request,
}

/// Why Keel refused a call itself (class `local_rejection`): the reasons differ in whether
/// a fallback may answer, since some say the upstream is out of reach and others say the
/// caller or the answer is over one of Keel's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The breaker of the call's (model, upstream) is open.
    BreakerOpen,
    /// Every endpoint of the upstream is ejected for failing calls.
    NoEndpoint,
    /// The model's concurrency limit shed the call.
    Shed,
    /// Keel as a whole has `server.max_in_flight` calls in flight.
    GatewayFull,
    /// The bytes in transit on the connection, or in Keel, are at their limit.
    BufferFull,
    /// The tenant is over its rate limit or its calls in flight.
    TenantLimit,
    /// The upstream's answer is larger than `server.max_message_size`.
    AnswerTooLarge,
    /// The drain timeout cut the call while Keel shut down.
    Drain,
}

/// The class of an outcome. `pushback` says the upstream sent `grpc-retry-pushback-ms`,
/// which marks it overloaded whatever its code.
pub fn classify(origin: Origin, pushback: bool) -> ErrorClass {
    match origin {
        Origin::Upstream(_) | Origin::Injected(_) if pushback => ErrorClass::Overloaded,
        Origin::Upstream(code) | Origin::Injected(code) => match code {
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
        Origin::Refused(_) => ErrorClass::LocalRejection,
        Origin::Request => ErrorClass::ClientError,
    }
}

/// The fallback trigger an outcome stands for: what the ladder matches against a tier's
/// `on` list. `None` never falls back: a client error (the same request fails anywhere)
/// and a refusal that is about the caller or the answer, not the upstream (a tenant's
/// limit, Keel's buffers or message size, the drain).
///
/// Mostly the class decides; where a class is mixed, the origin does: an upstream's
/// UNAVAILABLE is `unavailable` even with pushback (which makes it `overloaded` for retries),
/// and `local_rejection` splits by [`Refusal`].
pub fn trigger(origin: Origin, pushback: bool) -> Option<Trigger> {
    match origin {
        Origin::Upstream(Code::Unavailable) => Some(Trigger::Unavailable),
        Origin::Refused(Refusal::BreakerOpen | Refusal::NoEndpoint) => Some(Trigger::BreakerOpen),
        Origin::Refused(Refusal::Shed | Refusal::GatewayFull) => Some(Trigger::Overloaded),
        Origin::Refused(
            Refusal::BufferFull | Refusal::TenantLimit | Refusal::AnswerTooLarge | Refusal::Drain,
        ) => None,
        other => match classify(other, pushback) {
            ErrorClass::Transient => Some(Trigger::Unavailable),
            ErrorClass::Overloaded => Some(Trigger::Overloaded),
            ErrorClass::AttemptTimeout | ErrorClass::DeadlineExceeded => Some(Trigger::Deadline),
            ErrorClass::ServerBug => Some(Trigger::ServerBug),
            ErrorClass::ClientError | ErrorClass::LocalRejection => None,
        },
    }
}

/// What each class means for the layers that handle failures.
pub trait Handling {
    /// Whether the class says something about the upstream's health, so counts against
    /// its breaker.
    fn trips_breaker(self) -> bool;
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
}

/// One row of the published table: an outcome, its class and its fallback trigger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The outcome, as the page names it.
    pub outcome: String,
    /// Its class.
    pub class: ErrorClass,
    /// The trigger it falls back on, if any.
    pub trigger: Option<Trigger>,
}

/// Every origin with the name the published table gives it, for the doc test and the docs.
pub fn table() -> Vec<Row> {
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
    let row = |outcome: String, origin: Origin, pushback: bool| Row {
        outcome,
        class: classify(origin, pushback),
        trigger: trigger(origin, pushback),
    };
    let mut rows: Vec<Row> = CODES
        .iter()
        .map(|&c| {
            let name = crate::grpc_code::name(c);
            row(format!("upstream {name}"), Origin::Upstream(c), false)
        })
        .collect();
    let named: &[(&str, Origin, bool)] = &[
        (
            "upstream UNAVAILABLE with grpc-retry-pushback-ms",
            Origin::Upstream(Code::Unavailable),
            true,
        ),
        (
            "other upstream status with grpc-retry-pushback-ms",
            Origin::Upstream(Code::Internal),
            true,
        ),
        (
            "injected fault with grpc-retry-pushback-ms",
            Origin::Injected(Code::Unavailable),
            true,
        ),
        (
            "connection refused, reset or closed",
            Origin::Transport,
            false,
        ),
        ("malformed upstream answer", Origin::Protocol, false),
        ("per-try timeout", Origin::AttemptTimeout, false),
        ("call deadline", Origin::Deadline, false),
        ("breaker open", Origin::Refused(Refusal::BreakerOpen), false),
        (
            "every endpoint of the upstream ejected",
            Origin::Refused(Refusal::NoEndpoint),
            false,
        ),
        ("load shed", Origin::Refused(Refusal::Shed), false),
        (
            "Keel at server.max_in_flight",
            Origin::Refused(Refusal::GatewayFull),
            false,
        ),
        ("buffer limit", Origin::Refused(Refusal::BufferFull), false),
        (
            "tenant rate limit or quota",
            Origin::Refused(Refusal::TenantLimit),
            false,
        ),
        (
            "answer over Keel's size limit",
            Origin::Refused(Refusal::AnswerTooLarge),
            false,
        ),
        ("drain timeout", Origin::Refused(Refusal::Drain), false),
        (
            "invalid request, unknown model, request over Keel's size limit",
            Origin::Request,
            false,
        ),
    ];
    rows.extend(
        named
            .iter()
            .map(|&(name, origin, pushback)| row(name.to_string(), origin, pushback)),
    );
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

    /// The published "may fall back" of a class: `yes` when every outcome of the class falls
    /// back on some trigger, `no` when none does, `some` when it depends on the outcome.
    fn falls_back(class: ErrorClass) -> &'static str {
        let rows: Vec<Row> = table().into_iter().filter(|r| r.class == class).collect();
        match (
            rows.iter().all(|r| r.trigger.is_some()),
            rows.iter().any(|r| r.trigger.is_some()),
        ) {
            (true, _) => "yes",
            (false, false) => "no",
            (false, true) => "some",
        }
    }

    #[test]
    fn the_published_table_matches_the_code() {
        let rows = doc_rows(DOC, "## Outcomes");
        let published: Vec<[String; 3]> = rows
            .into_iter()
            .map(|r| [r[0].clone(), r[1].clone(), r[2].clone()])
            .collect();
        let code: Vec<[String; 3]> = table()
            .into_iter()
            .map(|r| {
                [
                    r.outcome,
                    r.class.as_str().to_string(),
                    r.trigger.map_or("no", Trigger::as_str).to_string(),
                ]
            })
            .collect();
        assert_eq!(
            published, code,
            "docs/error-taxonomy.md disagrees with classify() and trigger()"
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
            assert_eq!(row[3], falls_back(class), "{class:?} may fall back");
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

    #[test]
    fn client_errors_never_fall_back_and_deadlines_do() {
        assert_eq!(trigger(Origin::Request, false), None);
        assert_eq!(
            trigger(Origin::Upstream(Code::InvalidArgument), false),
            None
        );
        assert_eq!(trigger(Origin::Deadline, false), Some(Trigger::Deadline));
        assert_eq!(
            trigger(Origin::Upstream(Code::DeadlineExceeded), false),
            Some(Trigger::Deadline)
        );
    }
}
