//! Retries a failed call when the policy, the error, the deadline and the budget allow.
//!
//! # Decision
//!
//! After a failed attempt, the call is retried only if every rule holds:
//!
//! 1. fewer than `max_attempts` attempts were made;
//! 2. the error's class (or its status code) is in `retry_on`;
//! 3. the call is idempotent, or the request provably never reached the upstream;
//! 4. the upstream's pushback, if any, does not say stop;
//! 5. the wait (the pushback, or the deterministic backoff) plus the expected duration of
//!    an attempt fits in the time left before the deadline;
//! 6. the upstream's retry budget grants it.
//!
//! Otherwise the last error is returned. The receipt records every attempt and wait, and
//! whether the budget said no.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use super::backoff;
use super::deadline::HasDeadline;
use super::failure::{Failure, HasRetry, Pushback};
use crate::policy::RetryOn;

/// The shortest attempt worth starting: below this, a retry cannot finish in time.
const MIN_ATTEMPT: Duration = Duration::from_millis(1);

/// Refused up front: the deadline is shorter than the fastest answer this model has given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("refused: the deadline leaves {left:?} but the fastest answer seen took {fastest:?}")]
pub struct Hopeless {
    /// Time left when the call arrived.
    pub left: Duration,
    /// The fastest successful attempt seen.
    pub fastest: Duration,
}

/// Applies [`RetryService`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RetryLayer;

impl<S> Layer<S> for RetryLayer {
    type Service = RetryService<S>;
    fn layer(&self, inner: S) -> RetryService<S> {
        RetryService { inner }
    }
}

/// Retries failed attempts.
#[derive(Clone, Debug)]
pub struct RetryService<S> {
    inner: S,
}

impl<S, R> Service<R> for RetryService<S>
where
    S: Service<R> + Clone,
    S::Error: Failure + From<Hopeless>,
    R: HasRetry + HasDeadline,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RetryFuture<S, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let service = self.inner.clone();
        let left = req.deadline().saturating_duration_since(Instant::now());
        if req.refuse_hopeless()
            && let Some(fastest) = req.latency().floor()
            && left < fastest
        {
            return RetryFuture {
                service,
                request: req,
                attempt: 0,
                state: State::Failed {
                    error: Some(Hopeless { left, fastest }.into()),
                },
            };
        }
        req.retry_budget().deposit();
        req.receipt().update(|r| r.attempts = 1);
        let mut first = req.clone();
        first.set_attempt(1);
        let fut = self.inner.call(first);
        RetryFuture {
            service,
            request: req,
            attempt: 1,
            state: State::Calling { fut },
        }
    }
}

pin_project! {
    /// The response future of [`RetryService`]: attempts and waits, no allocation.
    pub struct RetryFuture<S, R>
    where
        S: Service<R>,
    {
        service: S,
        request: R,
        attempt: u32,
        #[pin]
        state: State<S::Future, S::Error>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, E> {
        Calling { #[pin] fut: F },
        Waiting { #[pin] sleep: Sleep },
        Failed { error: Option<E> },
    }
}

/// Decides whether attempt `attempt` that failed with `error` is retried, and after how long
/// (the rules in the module docs). A retry it grants is withdrawn from the budget.
pub fn decide<R, E>(request: &R, attempt: u32, error: &E) -> Option<Duration>
where
    R: HasRetry + HasDeadline,
    E: Failure,
{
    let policy = request.retry();
    if attempt >= policy.max_attempts {
        return None;
    }
    let (class, code) = (error.class(), error.code());
    let listed = policy.retry_on.iter().any(|r| match r {
        RetryOn::Class(c) => *c == class,
        RetryOn::Code(c) => *c == code,
    });
    if !listed || !(request.idempotent() || error.never_sent()) {
        return None;
    }
    let wait = match error.pushback() {
        Pushback::Stop => return None,
        Pushback::After(d) => d,
        Pushback::None => {
            let (id, seed) = request.jitter_seed();
            backoff::delay(policy, attempt, id, seed)
        }
    };
    let left = request.deadline().saturating_duration_since(Instant::now());
    let needed = request
        .latency()
        .expected()
        .unwrap_or(MIN_ATTEMPT)
        .max(MIN_ATTEMPT);
    if wait + needed > left {
        return None;
    }
    if !request.retry_budget().withdraw() {
        request.receipt().update(|r| r.budget_exhausted = true);
        return None;
    }
    Some(wait)
}

impl<S, R> Future for RetryFuture<S, R>
where
    S: Service<R>,
    S::Error: Failure,
    R: HasRetry + HasDeadline,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let error = match ready!(fut.poll(cx)) {
                        Ok(resp) => return Poll::Ready(Ok(resp)),
                        Err(e) => e,
                    };
                    // The call's own deadline is reported by the deadline; the upstream's last
                    // words are what the client needs next to it.
                    if error.class() != crate::policy::ErrorClass::DeadlineExceeded {
                        let message = error.to_string();
                        this.request
                            .receipt()
                            .update(|r| r.last_error = Some(message));
                    }
                    match decide(this.request, *this.attempt, &error) {
                        Some(wait) => {
                            let reason = error.class().as_str();
                            this.request.receipt().update(|r| {
                                r.delays.push(wait);
                                r.retry_reasons.push(reason);
                            });
                            this.state.set(State::Waiting {
                                sleep: tokio::time::sleep(wait),
                            });
                        }
                        None => return Poll::Ready(Err(error)),
                    }
                }
                StateProj::Waiting { sleep } => {
                    ready!(sleep.poll(cx));
                    ready!(this.service.poll_ready(cx))?;
                    *this.attempt += 1;
                    let n = *this.attempt;
                    this.request.receipt().update(|r| r.attempts = n);
                    let mut again = this.request.clone();
                    again.set_attempt(n);
                    let fut = this.service.call(again);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Failed { error } => {
                    return match error.take() {
                        Some(e) => Poll::Ready(Err(e)),
                        None => Poll::Pending,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
