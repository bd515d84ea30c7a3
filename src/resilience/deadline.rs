//! Answers a call with [`DeadlineExceeded`] when its deadline passes, whatever the inner
//! service is doing.
//!
//! The deadline comes from the request ([`HasDeadline`]); it is the client's `grpc-timeout`
//! or the policy default, so no call waits forever. This layer exists because tonic's own
//! server timeout answers CANCELLED, while a client whose deadline passed expects
//! DEADLINE_EXCEEDED.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// A request that knows when it must be answered.
pub trait HasDeadline {
    /// The instant by which the call must be answered.
    fn deadline(&self) -> Instant;
    /// The time the call had when it arrived.
    fn budget(&self) -> Duration;
}

/// The deadline passed before the inner service answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("deadline of {budget:?} exceeded")]
pub struct DeadlineExceeded {
    /// The time the call had.
    pub budget: Duration,
}

/// Applies [`Deadline`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;
    fn layer(&self, inner: S) -> DeadlineService<S> {
        DeadlineService { inner }
    }
}

/// Races the inner call against the request's deadline.
#[derive(Clone, Debug)]
pub struct DeadlineService<S> {
    inner: S,
}

impl<S, R> Service<R> for DeadlineService<S>
where
    S: Service<R>,
    S::Error: From<DeadlineExceeded>,
    R: HasDeadline,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let sleep = tokio::time::sleep_until(req.deadline());
        let budget = req.budget();
        DeadlineFuture {
            inner: self.inner.call(req),
            sleep,
            budget,
        }
    }
}

pin_project! {
    /// The response future of [`Deadline`].
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Sleep,
        budget: Duration,
    }
}

impl<F, T, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: From<DeadlineExceeded>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The inner call first: an answer that is ready at the deadline still counts.
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out);
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(DeadlineExceeded {
                budget: *this.budget,
            }
            .into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{ServiceExt, service_fn};

    struct Req {
        deadline: Instant,
        work: Duration,
    }

    impl HasDeadline for Req {
        fn deadline(&self) -> Instant {
            self.deadline
        }
        fn budget(&self) -> Duration {
            Duration::from_millis(100)
        }
    }

    #[derive(Debug, PartialEq)]
    enum E {
        Deadline(DeadlineExceeded),
    }

    impl From<DeadlineExceeded> for E {
        fn from(d: DeadlineExceeded) -> Self {
            E::Deadline(d)
        }
    }

    fn slow() -> impl Service<Req, Response = &'static str, Error = E, Future: Send> {
        service_fn(|r: Req| async move {
            tokio::time::sleep(r.work).await;
            Ok::<_, E>("done")
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_finishes_in_time_is_answered() {
        let svc = DeadlineLayer.layer(slow());
        let deadline = Instant::now() + Duration::from_millis(100);
        let out = svc
            .oneshot(Req {
                deadline,
                work: Duration::from_millis(99),
            })
            .await;
        assert_eq!(out, Ok("done"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_call_gets_deadline_exceeded_exactly_at_the_deadline() {
        let svc = DeadlineLayer.layer(slow());
        let start = Instant::now();
        let out = svc
            .oneshot(Req {
                deadline: start + Duration::from_millis(100),
                work: Duration::from_secs(60),
            })
            .await;
        assert_eq!(
            out,
            Err(E::Deadline(DeadlineExceeded {
                budget: Duration::from_millis(100)
            }))
        );
        assert_eq!(Instant::now() - start, Duration::from_millis(100));
    }
}
