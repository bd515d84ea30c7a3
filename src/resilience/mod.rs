//! Tower layers that keep calls calm, each generic over the inner service and the request,
//! asking for what it needs through a small trait ([`failure`]), and testable alone on
//! paused time.
//!
//! The stack of a method, outermost first (assembled in `server.rs`): [`DeadlineLayer`],
//! [`LimitLayer`], [`RetryLayer`], [`HedgeLayer`], [`BreakerLayer`], [`AttemptLayer`], then
//! the backend.
//! Failures are classified once, by [`classify`].

mod attempt;
mod backoff;
mod breaker;
mod budget;
mod changed;
pub mod classify;
mod deadline;
pub mod failure;
mod hedge;
mod latency;
mod limit;
mod receipt;
mod retry;
mod slots;
#[cfg(test)]
mod test_support;

pub use attempt::{AttemptLayer, AttemptService, AttemptTimedOut};
pub use backoff::delay as backoff_delay;
pub use breaker::{
    Admission, BreakerCell, BreakerLayer, BreakerOpen, BreakerService, BreakerState,
};
pub use budget::RetryBudget;
pub use changed::Changed;
pub use classify::{ErrorClass, Handling, Origin, Refusal, classify};
pub use deadline::{Deadline, DeadlineExceeded, DeadlineFuture, DeadlineLayer, HasDeadline};
pub use failure::{Failure, HasAttempt, HasBreaker, HasLimit, HasRetry, Pushback};
pub use hedge::{HedgeLayer, HedgeService};
pub use latency::Latency;
pub use limit::{LimitLayer, LimitService, Limiter, Shed};
pub use receipt::{Receipt, ReceiptData};
pub use retry::{Hopeless, RetryLayer, RetryService, decide};
pub use slots::{Slot, Slots, reserve_note};
