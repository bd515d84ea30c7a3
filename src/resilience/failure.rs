//! What the layers need to know about a request and an error, as small traits, so each
//! layer can be tested with a two-field request and a hand-made error.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{BreakerCell, ErrorClass, Latency, Limiter, Receipt, RetryBudget};
use crate::policy::{Breaker, Retry};

/// What the upstream said about retrying, from `grpc-retry-pushback-ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushback {
    /// Nothing said: the computed backoff applies.
    None,
    /// Retry after this long, instead of the computed backoff.
    After(Duration),
    /// A negative or malformed value: do not retry.
    Stop,
}

impl Pushback {
    /// Parses a `grpc-retry-pushback-ms` value.
    pub fn parse(value: Option<&str>) -> Pushback {
        match value {
            None => Pushback::None,
            Some(v) => match v.trim().parse::<i64>() {
                Ok(ms) if ms >= 0 => Pushback::After(Duration::from_millis(ms.unsigned_abs())),
                _ => Pushback::Stop,
            },
        }
    }
}

/// An error the layers can reason about; its message is what the receipt reports as the
/// last error.
pub trait Failure: std::fmt::Display {
    /// Its class in the taxonomy.
    fn class(&self) -> ErrorClass;
    /// The status code it will be answered with (for `retry_on` code entries).
    fn code(&self) -> tonic::Code;
    /// What the upstream said about retrying.
    fn pushback(&self) -> Pushback {
        Pushback::None
    }
    /// Whether the request provably never reached the upstream (the connection was refused),
    /// so even a non-idempotent call may be retried.
    fn never_sent(&self) -> bool {
        false
    }
}

/// A request carrying what the retry layer needs.
pub trait HasRetry: Clone {
    /// The retry policy.
    fn retry(&self) -> &Retry;
    /// Whether the call may be repeated safely.
    fn idempotent(&self) -> bool;
    /// The request id and the policy's seed (from its content hash), which fix the jitter.
    fn jitter_seed(&self) -> (&str, u64);
    /// The retry budget of the upstream.
    fn retry_budget(&self) -> &RetryBudget;
    /// The receipt to record attempts and delays in.
    fn receipt(&self) -> &Receipt;
    /// The latency estimate of the (model, upstream), so hopeless attempts are not started.
    fn latency(&self) -> &Latency;
    /// Whether to refuse at once a call whose deadline is shorter than the fastest answer.
    fn refuse_hopeless(&self) -> bool;
    /// Marks this copy of the request as attempt `n` (1 = the first).
    fn set_attempt(&mut self, n: u32);
}

/// A request carrying a breaker.
pub trait HasBreaker {
    /// The breaker of the request's (model, upstream), `None` when disabled.
    fn breaker(&self) -> Option<&Arc<BreakerCell>>;
    /// Its settings.
    fn breaker_settings(&self) -> &Breaker;
}

/// A request carrying a concurrency limiter.
pub trait HasLimit {
    /// The limiter of the request's model.
    fn limiter(&self) -> &Arc<Limiter>;
    /// The caller's priority class: batch calls are shed first.
    fn priority(&self) -> crate::policy::Priority {
        crate::policy::Priority::Interactive
    }
}

/// A request whose single attempt can be bounded.
pub trait HasAttempt {
    /// The per-try timeout, if any.
    fn per_try_timeout(&self) -> Option<Duration>;
    /// Records when this attempt must end (the upstream's `grpc-timeout` follows it).
    fn set_attempt_deadline(&mut self, at: Instant);
    /// The latency estimate to feed with this attempt's duration.
    fn latency(&self) -> &Arc<Latency>;
}
