//! What can go wrong with a call, as one enum whose variants say what happened.
//!
//! Each variant has one origin in the error taxonomy, from which `resilience::classify`
//! gives its class ([`Error::class`]) and its fallback trigger ([`Error::trigger`]), and one
//! status code ([`Error::code`]); `api::status` builds the client's status from them.

use std::time::Duration;

use crate::model::{InvalidRequest, Rejection};
use crate::policy::Trigger;
use crate::resilience::{
    AttemptTimedOut, BreakerOpen, DeadlineExceeded, ErrorClass, Failure, Hopeless, Origin,
    Pushback, Refusal, Shed, classify,
};

/// A failed call.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Error {
    /// No backend serves this model.
    #[error("unknown model '{model}'")]
    ModelNotFound {
        /// The model asked for.
        model: String,
    },
    /// The model exists but not in this version.
    #[error("model '{model}' has no version '{version}' (versions: {})", available.join(", "))]
    VersionNotFound {
        /// The model.
        model: String,
        /// The version asked for.
        version: String,
        /// Versions served.
        available: Vec<String>,
    },
    /// A flag of the policy has switched the model off.
    #[error("model '{model}' is switched off (flag condition {condition} does not hold)")]
    ModelSwitchedOff {
        /// The model.
        model: String,
        /// The condition that must hold for it to serve.
        condition: String,
    },
    /// `keel-route` metadata names no route of the model.
    #[error("keel-route {route:?} is not a route of model '{model}' (routes: {})", routes.join(", "))]
    UnknownRoute {
        /// The model.
        model: String,
        /// The route asked for.
        route: String,
        /// The model's routes.
        routes: Vec<String>,
    },
    /// A version adapter of the policy names tensors the target model does not have, so
    /// no request for that version can be adapted until the policy is fixed.
    #[error("the policy's adapter for model '{model}' version {version:?} does not fit the model: {}", problems.join("; "))]
    AdapterMismatch {
        /// The model.
        model: String,
        /// The version clients ask for.
        version: String,
        /// Each problem, with the policy path that causes it.
        problems: Vec<String>,
    },
    /// A call of a sequence whose endpoint (holding the sequence's state) no longer serves.
    #[error(
        "sequence {sequence} of model '{model}' is bound to endpoint {endpoint} of upstream '{upstream}', which {why}; start the sequence again (sequence_start = true)"
    )]
    SequenceBroken {
        /// Upstream name from the policy.
        upstream: String,
        /// The model.
        model: String,
        /// The sequence id.
        sequence: String,
        /// The endpoint the sequence was bound to.
        endpoint: String,
        /// What happened to it.
        why: &'static str,
    },
    /// The request breaks the protocol or the model's contract (every broken rule).
    #[error(transparent)]
    InvalidRequest(#[from] Rejection),
    /// The upstream could not be reached (connection refused, reset, no endpoint).
    #[error("upstream '{upstream}' is unavailable: {detail}")]
    UpstreamUnavailable {
        /// Upstream name from the policy.
        upstream: String,
        /// What the transport said.
        detail: String,
        /// The connection was refused, so the request never reached the upstream.
        never_sent: bool,
    },
    /// The upstream answered with an error status; its code is passed on.
    #[error("upstream '{upstream}': {message}")]
    UpstreamStatus {
        /// Upstream name from the policy.
        upstream: String,
        /// The upstream's status code.
        code: tonic::Code,
        /// The upstream's message.
        message: String,
        /// What the upstream said about retrying (`grpc-retry-pushback-ms`).
        pushback: Pushback,
    },
    /// An error answer injected by the policy's `fault.abort` (or a request's `keel-fault`),
    /// standing for what a sick backend would answer.
    #[error("fault injected: {}", crate::grpc_code::name(*code))]
    FaultInjected {
        /// The code answered.
        code: tonic::Code,
        /// The wait it asks for (`fault.pushback_ms`).
        pushback: Pushback,
    },
    /// The client's request is larger than Keel takes (`server.max_message_size`).
    #[error("request message is larger than Keel takes (server.max_message_size): {detail}")]
    RequestTooLarge {
        /// The size and the limit, as the decoder saw them.
        detail: String,
    },
    /// The call's metadata (its header block, counted as HTTP/2 counts it) is larger than
    /// Keel takes (`server.max_metadata_size`): the call is refused, its connection kept.
    #[error(
        "the call's metadata is {size} bytes, above the limit of {limit} (server.max_metadata_size)"
    )]
    MetadataTooLarge {
        /// The header list size: each name and value, plus 32 bytes per entry.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The request body is not what the method takes: not a message of its type, a message
    /// cut short, no message, or a second message in a unary call.
    #[error("the request is malformed: {detail}")]
    MalformedRequest {
        /// What is wrong, in the decoder's words or Keel's.
        detail: String,
    },
    /// Keel is shutting down and the drain timeout passed while the call was running.
    #[error("Keel is shutting down and the drain timeout passed; retry on another instance")]
    DrainTimeout,
    /// The upstream's answer is larger than Keel takes (`server.max_message_size`): Keel's
    /// own limit refused it, which says nothing of the upstream's health, and the same
    /// request would get the same answer again.
    #[error(
        "upstream '{upstream}' answered with a message larger than Keel takes (server.max_message_size): {detail}"
    )]
    AnswerTooLarge {
        /// Upstream name from the policy.
        upstream: String,
        /// The size and the limit, as the decoder saw them.
        detail: String,
    },
    /// The upstream answered something Keel cannot use (a malformed tensor, for example).
    #[error("upstream '{upstream}' sent an invalid answer: {detail}")]
    UpstreamProtocol {
        /// Upstream name from the policy.
        upstream: String,
        /// What was wrong.
        detail: String,
    },
    /// The call's deadline passed before an answer.
    #[error("deadline of {budget:?} exceeded")]
    DeadlineExceeded {
        /// The time the call had.
        budget: Duration,
    },
    /// The deadline is shorter than the fastest answer the model has given.
    #[error("deadline exceeded before sending: {0}")]
    Hopeless(Hopeless),
    /// One attempt ran out of its per-try timeout.
    #[error("{0}")]
    AttemptTimeout(AttemptTimedOut),
    /// The breaker of the call's (model, upstream) is open. The edge names both.
    #[error("{0}")]
    BreakerOpen(BreakerOpen),
    /// Every endpoint of the upstream is ejected for failing calls (its breaker may well be
    /// closed): handled as an open breaker, since the upstream is as far out of reach.
    #[error(
        "every endpoint of upstream '{upstream}' is ejected for failing calls; the first returns in {retry_after:?}"
    )]
    NoEndpoint {
        /// Upstream name from the policy.
        upstream: String,
        /// Time until the first endpoint's ejection ends.
        retry_after: Duration,
    },
    /// The legacy API needs the model's contract to build the request, and it could not be
    /// fetched (yet).
    #[error(
        "model '{model}' has not described its inputs yet (its metadata could not be fetched); the v1 API needs them to build the request"
    )]
    ContractUnknown {
        /// The model.
        model: String,
    },
    /// A method of the protocol Keel does not serve: models are managed on its upstreams,
    /// and tensors travel in the request.
    #[error(
        "{what} is not supported by Keel: it is a gateway, so models are managed on its upstreams and tensors travel in the request"
    )]
    Unsupported {
        /// The method or feature, as the protocol names it.
        what: &'static str,
    },
    /// The model's answer does not fit the legacy API's predictions.
    #[error("the answer of model '{model}' cannot be given as v1 predictions: {problem}")]
    AnswerNotV1 {
        /// The model.
        model: String,
        /// What does not fit.
        problem: String,
    },
    /// Too many calls for the model: shed. The edge names the model.
    #[error("{0}")]
    Overloaded(Shed),
    /// The caller gave no valid API key (the policy defines tenants).
    #[error("{0}")]
    Unauthenticated(#[from] crate::auth::Unauthenticated),
    /// The tenant may not call the model.
    #[error("tenant '{tenant}' may not call model '{model}'")]
    PermissionDenied {
        /// The tenant.
        tenant: String,
        /// The model asked for.
        model: String,
    },
    /// The tenant is over one of its rate limits or has all of its calls in flight.
    #[error("{0}")]
    TenantLimited(crate::auth::Refused),
    /// Keel as a whole has too many calls in flight.
    #[error(
        "Keel is at its limit of {max_in_flight} calls in flight{}",
        crate::resilience::reserve_note(*.reserved)
    )]
    GatewayOverloaded {
        /// The limit (`server.max_in_flight`).
        max_in_flight: u32,
        /// For a batch call: the slots kept for interactive calls, which it could not take.
        reserved: Option<u32>,
    },
    /// The bytes in transit on the call's connection, or in Keel, are at their limit
    /// (`server.max_buffered_per_connection`, `server.max_buffered`).
    #[error("{0}")]
    BufferLimit(crate::transport::BufferFull),
}

impl From<crate::auth::Refused> for Error {
    /// A hidden model is refused exactly as an unknown one; a denied one names the tenant.
    fn from(r: crate::auth::Refused) -> Self {
        use crate::auth::Refused;
        match r {
            Refused::Hidden { model } => Error::ModelNotFound { model },
            Refused::Denied { tenant, model } => Error::PermissionDenied { tenant, model },
            limited => Error::TenantLimited(limited),
        }
    }
}

impl From<InvalidRequest> for Error {
    fn from(problem: InvalidRequest) -> Self {
        Error::InvalidRequest(problem.into())
    }
}

impl Error {
    /// A short, stable, machine-readable reason (`MODEL_NOT_FOUND`) for `google.rpc.ErrorInfo`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::ModelNotFound { .. } => "MODEL_NOT_FOUND",
            Error::VersionNotFound { .. } => "MODEL_VERSION_NOT_FOUND",
            Error::ModelSwitchedOff { .. } => "MODEL_SWITCHED_OFF",
            Error::UnknownRoute { .. } => "UNKNOWN_ROUTE",
            Error::InvalidRequest(_) => "INVALID_REQUEST",
            Error::AdapterMismatch { .. } => "ADAPTER_MISMATCH",
            Error::SequenceBroken { .. } => "SEQUENCE_BROKEN",
            Error::UpstreamUnavailable { .. } => "UPSTREAM_UNAVAILABLE",
            Error::UpstreamStatus { .. } => "UPSTREAM_ERROR",
            Error::UpstreamProtocol { .. } => "UPSTREAM_PROTOCOL",
            Error::AnswerTooLarge { .. } => "ANSWER_TOO_LARGE",
            Error::RequestTooLarge { .. } => "REQUEST_TOO_LARGE",
            Error::MetadataTooLarge { .. } => "METADATA_TOO_LARGE",
            Error::MalformedRequest { .. } => "MALFORMED_REQUEST",
            Error::DrainTimeout => "DRAIN_TIMEOUT",
            Error::FaultInjected { .. } => "FAULT_INJECTED",
            Error::DeadlineExceeded { .. } | Error::Hopeless(_) => "DEADLINE_EXCEEDED",
            Error::AttemptTimeout(_) => "ATTEMPT_TIMEOUT",
            Error::BreakerOpen(_) => "BREAKER_OPEN",
            Error::NoEndpoint { .. } => "ALL_ENDPOINTS_EJECTED",
            Error::ContractUnknown { .. } => "CONTRACT_UNKNOWN",
            Error::AnswerNotV1 { .. } => "ANSWER_NOT_V1",
            Error::Unsupported { .. } => "UNSUPPORTED",
            Error::Overloaded(_) | Error::GatewayOverloaded { .. } => "OVERLOADED",
            Error::BufferLimit(_) => "BUFFER_LIMIT",
            Error::Unauthenticated(_) => "UNAUTHENTICATED",
            Error::PermissionDenied { .. } => "PERMISSION_DENIED",
            Error::TenantLimited(crate::auth::Refused::Quota { .. }) => "TENANT_QUOTA_EXCEEDED",
            Error::TenantLimited(_) => "RATE_LIMITED",
        }
    }

    /// Where the failure came from, for classification.
    pub fn origin(&self) -> Origin {
        match self {
            Error::ModelNotFound { .. }
            | Error::VersionNotFound { .. }
            | Error::ModelSwitchedOff { .. }
            | Error::UnknownRoute { .. }
            | Error::AdapterMismatch { .. }
            | Error::SequenceBroken { .. }
            | Error::InvalidRequest(_)
            | Error::RequestTooLarge { .. }
            | Error::MetadataTooLarge { .. }
            | Error::MalformedRequest { .. }
            | Error::Unauthenticated(_)
            | Error::PermissionDenied { .. }
            | Error::Unsupported { .. } => Origin::Request,
            Error::UpstreamUnavailable { .. } | Error::ContractUnknown { .. } => Origin::Transport,
            Error::UpstreamStatus { code, .. } => Origin::Upstream(*code),
            Error::FaultInjected { code, .. } => Origin::Injected(*code),
            Error::UpstreamProtocol { .. } | Error::AnswerNotV1 { .. } => Origin::Protocol,
            Error::DeadlineExceeded { .. } | Error::Hopeless(_) => Origin::Deadline,
            Error::AttemptTimeout(_) => Origin::AttemptTimeout,
            Error::BreakerOpen(_) => Origin::Refused(Refusal::BreakerOpen),
            Error::NoEndpoint { .. } => Origin::Refused(Refusal::NoEndpoint),
            Error::Overloaded(_) => Origin::Refused(Refusal::Shed),
            Error::GatewayOverloaded { .. } => Origin::Refused(Refusal::GatewayFull),
            Error::BufferLimit(_) => Origin::Refused(Refusal::BufferFull),
            Error::TenantLimited(_) => Origin::Refused(Refusal::TenantLimit),
            Error::AnswerTooLarge { .. } => Origin::Refused(Refusal::AnswerTooLarge),
            Error::DrainTimeout => Origin::Refused(Refusal::Drain),
        }
    }

    /// Whether the upstream (or the fault standing for it) sent `grpc-retry-pushback-ms`.
    fn pushed_back(&self) -> bool {
        matches!(
            self,
            Error::UpstreamStatus {
                pushback: Pushback::After(_) | Pushback::Stop,
                ..
            } | Error::FaultInjected {
                pushback: Pushback::After(_) | Pushback::Stop,
                ..
            }
        )
    }

    /// The fallback trigger the failure stands for, if a fallback may answer it at all
    /// ([`crate::resilience::classify::trigger`]).
    pub fn trigger(&self) -> Option<Trigger> {
        crate::resilience::classify::trigger(self.origin(), self.pushed_back())
    }

    /// The status code the client sees: the one place it is chosen.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::ModelNotFound { .. }
            | Error::VersionNotFound { .. }
            | Error::ModelSwitchedOff { .. } => Code::NotFound,
            Error::InvalidRequest(_)
            | Error::UnknownRoute { .. }
            | Error::MalformedRequest { .. } => Code::InvalidArgument,
            Error::AdapterMismatch { .. } => Code::FailedPrecondition,
            Error::SequenceBroken { .. } => Code::Aborted,
            Error::UpstreamUnavailable { .. }
            | Error::BreakerOpen(_)
            | Error::NoEndpoint { .. }
            | Error::ContractUnknown { .. } => Code::Unavailable,
            Error::UpstreamStatus { code, .. } | Error::FaultInjected { code, .. } => *code,
            Error::UpstreamProtocol { .. } | Error::AnswerNotV1 { .. } => Code::Internal,
            Error::DeadlineExceeded { .. } | Error::Hopeless(_) => Code::DeadlineExceeded,
            // An attempt's timeout that ends the call: the upstream did not answer in time.
            Error::AttemptTimeout(_) => Code::Unavailable,
            Error::Overloaded(_)
            | Error::GatewayOverloaded { .. }
            | Error::BufferLimit(_)
            | Error::TenantLimited(_)
            | Error::AnswerTooLarge { .. }
            | Error::RequestTooLarge { .. }
            | Error::MetadataTooLarge { .. } => Code::ResourceExhausted,
            Error::DrainTimeout => Code::Unavailable,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::Unsupported { .. } => Code::Unimplemented,
        }
    }

    /// When a retry later makes sense, how long to wait (`google.rpc.RetryInfo`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::BreakerOpen(open) => Some(open.retry_after),
            Error::NoEndpoint { retry_after, .. } => Some(*retry_after),
            Error::Overloaded(shed) => Some(shed.retry_after),
            Error::GatewayOverloaded { .. } | Error::BufferLimit(_) => {
                Some(Duration::from_millis(100))
            }
            Error::TenantLimited(r) => r.retry_after(),
            Error::UpstreamStatus {
                pushback: Pushback::After(d),
                ..
            }
            | Error::FaultInjected {
                pushback: Pushback::After(d),
                ..
            } => Some(*d),
            _ => None,
        }
    }

    /// The upstream involved, if any.
    pub fn upstream(&self) -> Option<&str> {
        match self {
            Error::UpstreamUnavailable { upstream, .. }
            | Error::UpstreamStatus { upstream, .. }
            | Error::UpstreamProtocol { upstream, .. }
            | Error::AnswerTooLarge { upstream, .. }
            | Error::NoEndpoint { upstream, .. } => Some(upstream),
            _ => None,
        }
    }

    /// The tenant refused, if any.
    pub fn tenant(&self) -> Option<&str> {
        use crate::auth::Refused;
        match self {
            Error::PermissionDenied { tenant, .. }
            | Error::TenantLimited(Refused::RateLimited { tenant, .. })
            | Error::TenantLimited(Refused::Quota { tenant, .. })
            | Error::TenantLimited(Refused::Denied { tenant, .. }) => Some(tenant),
            _ => None,
        }
    }

    /// The model involved, if any.
    pub fn model(&self) -> Option<&str> {
        match self {
            Error::ModelNotFound { model }
            | Error::VersionNotFound { model, .. }
            | Error::ModelSwitchedOff { model, .. }
            | Error::UnknownRoute { model, .. }
            | Error::ContractUnknown { model }
            | Error::AnswerNotV1 { model, .. }
            | Error::PermissionDenied { model, .. } => Some(model),
            Error::TenantLimited(crate::auth::Refused::RateLimited {
                model: Some(model), ..
            }) => Some(model),
            _ => None,
        }
    }
}

impl Failure for Error {
    fn class(&self) -> ErrorClass {
        classify(self.origin(), self.pushed_back())
    }

    fn code(&self) -> tonic::Code {
        Error::code(self)
    }

    fn pushback(&self) -> Pushback {
        match self {
            Error::UpstreamStatus { pushback, .. } | Error::FaultInjected { pushback, .. } => {
                *pushback
            }
            _ => Pushback::None,
        }
    }

    fn never_sent(&self) -> bool {
        matches!(
            self,
            Error::UpstreamUnavailable {
                never_sent: true,
                ..
            }
        )
    }
}

impl From<DeadlineExceeded> for Error {
    fn from(e: DeadlineExceeded) -> Self {
        Error::DeadlineExceeded { budget: e.budget }
    }
}

impl From<Hopeless> for Error {
    fn from(e: Hopeless) -> Self {
        Error::Hopeless(e)
    }
}

impl From<BreakerOpen> for Error {
    fn from(e: BreakerOpen) -> Self {
        Error::BreakerOpen(e)
    }
}

impl From<Shed> for Error {
    fn from(e: Shed) -> Self {
        Error::Overloaded(e)
    }
}

impl From<AttemptTimedOut> for Error {
    fn from(e: AttemptTimedOut) -> Self {
        Error::AttemptTimeout(e)
    }
}
