//! Bounds one attempt by the per-try timeout, and feeds the latency estimate with the
//! duration of every successful attempt.
//!
//! The attempt's end is written into the request, so the upstream's `grpc-timeout` is the
//! smaller of the call's remaining time and the attempt's.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use super::Latency;
use super::failure::HasAttempt;

/// The attempt ran out of its per-try timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("attempt timed out after {after:?}")]
pub struct AttemptTimedOut {
    /// The per-try timeout.
    pub after: Duration,
}

/// Applies [`AttemptService`].
#[derive(Clone, Copy, Debug, Default)]
pub struct AttemptLayer;

impl<S> Layer<S> for AttemptLayer {
    type Service = AttemptService<S>;
    fn layer(&self, inner: S) -> AttemptService<S> {
        AttemptService { inner }
    }
}

/// Times one attempt.
#[derive(Clone, Debug)]
pub struct AttemptService<S> {
    inner: S,
}

impl<S, R> Service<R> for AttemptService<S>
where
    S: Service<R>,
    S::Error: From<AttemptTimedOut>,
    R: HasAttempt,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = AttemptFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: R) -> Self::Future {
        let start = Instant::now();
        let limit = req.per_try_timeout();
        if let Some(after) = limit {
            req.set_attempt_deadline(start + after);
        }
        let latency = std::sync::Arc::clone(req.latency());
        AttemptFuture {
            fut: self.inner.call(req),
            sleep: limit.map(|after| tokio::time::sleep_until(start + after)),
            limit: limit.unwrap_or_default(),
            start,
            latency,
        }
    }
}

pin_project! {
    /// The response future of [`AttemptService`].
    pub struct AttemptFuture<F> {
        #[pin]
        fut: F,
        #[pin]
        sleep: Option<Sleep>,
        limit: Duration,
        start: Instant,
        latency: std::sync::Arc<Latency>,
    }
}

impl<F, T, E> Future for AttemptFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: From<AttemptTimedOut>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            if out.is_ok() {
                this.latency.observe(this.start.elapsed());
            }
            return Poll::Ready(out);
        }
        if let Some(sleep) = this.sleep.as_pin_mut()
            && sleep.poll(cx).is_ready()
        {
            return Poll::Ready(Err(AttemptTimedOut { after: *this.limit }.into()));
        }
        Poll::Pending
    }
}
