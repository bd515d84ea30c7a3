//! The tower stack of each per-model method, assembled in one place, outermost layer
//! first, with why each layer sits where it does.

use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::dispatch::{CallService, Stacks};
use crate::resilience::{AttemptLayer, BreakerLayer, HedgeLayer, LimitLayer, RetryLayer};
use crate::resilience::{DeadlineLayer, FaultLayer, ValidateLayer};
use crate::route::Deliver;
use crate::upstream::Operation;

/// One stack per per-model method of the inference API.
pub(super) fn stacks() -> Stacks {
    Stacks {
        infer: stack(),
        ready: stack(),
        metadata: stack(),
        config: stack(),
        statistics: stack(),
    }
}

/// The tower stack of one per-model method, outermost layer first.
fn stack<Op: Operation>() -> CallService<Op> {
    let svc = ServiceBuilder::new()
        // Outermost, so the whole call (queueing, every attempt and every wait) shares the
        // client's one deadline, counted from the call's arrival: it fires at the instant
        // the edge deadline does, and answers with the call's receipt.
        .layer(DeadlineLayer)
        // Before anything is spent on it: a request that breaks its model's contract or the
        // size limits never takes a slot, an attempt or a breaker's count. Inside the
        // deadline, which bounds the first fetch of a model's contract.
        .layer(ValidateLayer)
        // A slot of the model is held across retries: retries never add concurrency.
        .layer(LimitLayer)
        // Retry sees BreakerOpen as a local rejection and does not retry it.
        .layer(RetryLayer)
        // Inside retry: a slow attempt may be hedged, and the pair counts as one attempt's
        // outcome for the retry decision.
        .layer(HedgeLayer)
        // Per attempt, so each attempt's outcome feeds the breaker.
        .layer(BreakerLayer)
        // Bounds one attempt and measures it for the latency estimate.
        .layer(AttemptLayer)
        // Innermost: an injected fault looks to every layer above like the backend's answer.
        .layer(FaultLayer)
        .service(Deliver::<Op>::new());
    BoxCloneSyncService::new(svc)
}
