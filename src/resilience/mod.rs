//! Tower layers that keep calls calm: every layer of a method's stack, each testable alone
//! on paused time.
//!
//! The stack of a method, outermost first (assembled in `server/stack.rs`, which says why
//! each layer sits where it does): [`DeadlineLayer`], [`ValidateLayer`], [`LimitLayer`],
//! [`RetryLayer`], [`HedgeLayer`], [`BreakerLayer`], [`AttemptLayer`], [`FaultLayer`], then
//! the route's `Deliver`, which hands the attempt to its backend.
//!
//! Each layer is `XLayer`, and the service it makes `XService<S>`: the plain names
//! (`Retry`, `Breaker`, `Fault`) are the policy's settings of the same concern.
//! Failures are classified once, by [`classify`].
//!
//! The generic layers are generic over the inner service and the request, asking for what
//! they need through a small trait ([`failure`]). Two work on Keel's own [`Call`] because
//! what they do is Keel's: [`ValidateLayer`] checks a request against its model's contract,
//! [`FaultLayer`] answers as a sick backend would; both usually pass a call straight on
//! ([`passthrough`]).
//!
//! [`Call`]: crate::call::Call

mod attempt;
mod backoff;
mod breaker;
mod budget;
mod changed;
pub mod classify;
mod deadline;
pub mod failure;
pub mod fault;
mod hedge;
mod latency;
mod limit;
pub mod passthrough;
mod receipt;
mod retry;
mod slots;
#[cfg(test)]
mod test_support;
mod validate;

pub use attempt::{AttemptLayer, AttemptService, AttemptTimedOut};
pub use backoff::delay as backoff_delay;
pub use breaker::{
    Admission, BreakerCell, BreakerLayer, BreakerOpen, BreakerService, BreakerState,
};
pub use budget::RetryBudget;
pub use changed::Changed;
pub use classify::{ErrorClass, Handling, Origin, Refusal, classify};
pub use deadline::{DeadlineExceeded, DeadlineFuture, DeadlineLayer, DeadlineService, HasDeadline};
pub use failure::{Failure, HasAttempt, HasBreaker, HasLimit, HasRetry, Pushback};
pub use fault::{FaultLayer, FaultService};
pub use hedge::{HedgeLayer, HedgeService};
pub use latency::Latency;
pub use limit::{LimitLayer, LimitService, Limiter, Shed};
pub use receipt::{Receipt, ReceiptData};
pub use retry::{Hopeless, RetryLayer, RetryService, decide};
pub use slots::{Slot, Slots, reserve_note};
pub use validate::{ValidateLayer, ValidateService};
