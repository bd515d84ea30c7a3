//! What travels with every call from the edge to the backend: request id, deadline, the
//! client metadata to pass on, the policy snapshot and route the call took at its start,
//! and the receipt its resilience layers fill in.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use crate::observe::traces::CallSpan;
use crate::policy::{Breaker, Priority, Retry, Snapshot};
use crate::resilience::{
    BreakerCell, HasAttempt, HasBreaker, HasDeadline, HasLimit, HasRetry, Latency, Limiter,
    Receipt, RetryBudget,
};
use crate::route::Route;
use crate::upstream::{Attempt, Timing};

/// Per-call context, built once at the edge and shared by every attempt.
#[derive(Debug)]
pub struct CallContext {
    /// The `x-request-id` the client sent, or one Keel generated.
    pub request_id: Arc<str>,
    /// When the call must be answered: the smallest of the client's deadline, the method's
    /// `timeout` and `max_timeout`.
    pub deadline: Instant,
    /// The time the call had when it arrived.
    pub budget: Duration,
    /// How long before `deadline` an upstream is told to give up (the route's
    /// `deadline_margin`), so its answer, or Keel's error, still reaches the client in time.
    pub margin: Duration,
    /// Client metadata to forward upstream (hop-by-hop and transport headers removed).
    pub metadata: Arc<MetadataMap>,
    /// The policy this call uses from start to end, whatever is swapped in meanwhile.
    pub snapshot: Arc<Snapshot>,
    /// Where the call goes, with its settings and the resilience state of its target.
    pub route: Route,
    /// What the resilience layers did, for the client.
    pub receipt: Receipt,
    /// The call's SERVER span, when tracing is on; each upstream attempt is a child.
    pub trace: Option<CallSpan>,
    /// A call of a sequence (a stateful model): never repeated, whatever the policy says.
    pub pinned: bool,
    /// The caller's priority class: under load, batch calls are shed first.
    pub priority: Priority,
}

impl CallContext {
    /// Time left before the deadline; zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// One attempt of a call: cheap to clone (two reference counts), so retries copy nothing.
#[derive(Debug)]
pub struct Call<T> {
    /// The context.
    pub ctx: Arc<CallContext>,
    /// The request.
    pub body: Arc<T>,
    /// Which attempt this is, 1 for the first.
    pub attempt: u32,
    /// When this attempt must end, if a per-try timeout applies.
    pub attempt_deadline: Option<Instant>,
}

impl<T> Clone for Call<T> {
    fn clone(&self) -> Self {
        Call {
            ctx: self.ctx.clone(),
            body: self.body.clone(),
            attempt: self.attempt,
            attempt_deadline: self.attempt_deadline,
        }
    }
}

impl<T> Call<T> {
    /// The first attempt of a call.
    pub fn new(ctx: Arc<CallContext>, body: T) -> Self {
        Call::shared(ctx, Arc::new(body))
    }

    /// The first attempt of a call whose body the caller keeps a reference to.
    pub fn shared(ctx: Arc<CallContext>, body: Arc<T>) -> Self {
        Call {
            ctx,
            body,
            attempt: 1,
            attempt_deadline: None,
        }
    }

    /// What the backend gets for this attempt: what to send, the time it has, the endpoint
    /// the attempt before it took; none of the route or the policy.
    pub fn attempt(&self) -> Attempt<T> {
        let ctx = &self.ctx;
        let settings = &ctx.route.settings;
        Attempt {
            body: self.body.clone(),
            request_id: ctx.request_id.clone(),
            metadata: ctx.metadata.clone(),
            number: self.attempt,
            timing: Timing {
                deadline: ctx.deadline,
                margin: ctx.margin,
                budget: ctx.budget,
                per_try: self
                    .attempt_deadline
                    .map(|at| (at, settings.retry.per_try_timeout.unwrap_or_default())),
            },
            avoid: (self.attempt > 1).then(|| ctx.receipt.endpoint()).flatten(),
            trace: ctx.trace.clone(),
            receipt: ctx.receipt.clone(),
        }
    }
}

impl<T> HasDeadline for Call<T> {
    fn deadline(&self) -> Instant {
        self.ctx.deadline
    }
    fn budget(&self) -> Duration {
        self.ctx.budget
    }
}

impl<T> HasRetry for Call<T> {
    fn retry(&self) -> &Retry {
        &self.ctx.route.settings.retry
    }
    fn idempotent(&self) -> bool {
        self.ctx.route.settings.idempotent && !self.ctx.pinned
    }
    fn jitter_seed(&self) -> (&str, u64) {
        (&self.ctx.request_id, self.ctx.snapshot.seed)
    }
    fn retry_budget(&self) -> &RetryBudget {
        &self.ctx.route.target.budget
    }
    fn receipt(&self) -> &Receipt {
        &self.ctx.receipt
    }
    fn latency(&self) -> &Latency {
        &self.ctx.route.target.latency
    }
    fn refuse_hopeless(&self) -> bool {
        self.ctx.route.settings.refuse_hopeless
    }
    fn set_attempt(&mut self, n: u32) {
        self.attempt = n;
    }
}

impl<T> HasBreaker for Call<T> {
    fn breaker(&self) -> Option<&Arc<BreakerCell>> {
        self.ctx.route.target.breaker.as_ref()
    }
    fn breaker_settings(&self) -> &Breaker {
        &self.ctx.route.settings.breaker
    }
}

impl<T> HasLimit for Call<T> {
    fn limiter(&self) -> &Arc<Limiter> {
        &self.ctx.route.limiter
    }
    fn priority(&self) -> Priority {
        self.ctx.priority
    }
}

impl<T> HasAttempt for Call<T> {
    fn per_try_timeout(&self) -> Option<Duration> {
        self.ctx.route.settings.retry.per_try_timeout
    }
    fn set_attempt_deadline(&mut self, at: Instant) {
        self.attempt_deadline = Some(at);
    }
    fn latency(&self) -> &Arc<Latency> {
        &self.ctx.route.target.latency
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_retry_s_attempt_avoids_the_endpoint_the_one_before_it_took() {
        let ctx = crate::testing::call_context("simple", Duration::from_secs(10)).expect("context");
        let mut call = Call::new(ctx.clone(), ());
        let first = call.attempt();
        assert_eq!((first.number, first.avoid.clone()), (1, None));
        assert_eq!(first.request_id, ctx.request_id);
        first
            .receipt
            .served("triton@10.0.0.7:8001".into(), Some("10.0.0.7:8001".into()));
        call.attempt = 2;
        let second = call.attempt();
        assert_eq!(second.number, 2);
        assert_eq!(second.avoid.as_deref(), Some("10.0.0.7:8001"));
        // The call's time, less the route's margin, and no per-try deadline unless one is set.
        let margin = ctx.route.settings.deadline_margin;
        assert_eq!(second.timing.margin, margin);
        assert_eq!(second.timing.left(), Duration::from_secs(10) - margin);
        assert!(second.timing.per_try.is_none());
        call.attempt_deadline = Some(Instant::now() + Duration::from_millis(200));
        assert_eq!(call.attempt().timing.left(), Duration::from_millis(200));
    }
}
