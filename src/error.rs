//! What can go wrong with a call, as one enum whose variants say what happened.
//!
//! The gRPC status a client sees is chosen in one place, `api::status`, from these variants.

use std::time::Duration;

use crate::model::InvalidRequest;

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
    /// The request breaks the protocol or the model's contract.
    #[error(transparent)]
    InvalidRequest(#[from] InvalidRequest),
    /// The upstream could not be reached (connection refused, reset, no endpoint).
    #[error("upstream '{upstream}' is unavailable: {detail}")]
    UpstreamUnavailable {
        /// Upstream name from the policy.
        upstream: String,
        /// What the transport said.
        detail: String,
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
}

impl Error {
    /// A short, stable, machine-readable reason (`MODEL_NOT_FOUND`) for `google.rpc.ErrorInfo`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::ModelNotFound { .. } => "MODEL_NOT_FOUND",
            Error::VersionNotFound { .. } => "MODEL_VERSION_NOT_FOUND",
            Error::InvalidRequest(_) => "INVALID_REQUEST",
            Error::UpstreamUnavailable { .. } => "UPSTREAM_UNAVAILABLE",
            Error::UpstreamStatus { .. } => "UPSTREAM_ERROR",
            Error::UpstreamProtocol { .. } => "UPSTREAM_PROTOCOL",
            Error::DeadlineExceeded { .. } => "DEADLINE_EXCEEDED",
        }
    }
}

impl From<crate::resilience::DeadlineExceeded> for Error {
    fn from(e: crate::resilience::DeadlineExceeded) -> Self {
        Error::DeadlineExceeded { budget: e.budget }
    }
}
