//! Hedging for tail latency: when an idempotent attempt has not answered after
//! `retry.hedge_delay`, the same call is sent again (the upstream's next endpoint takes it)
//! and the first success wins; the other is cancelled by being dropped.
//!
//! A hedge is started only when the call is idempotent, the retry budget grants it (hedges
//! and retries share one budget) and the expected latency still fits before the deadline.
//! Without a hedge delay the layer is a passthrough.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{BoxFuture, Either, select};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::deadline::HasDeadline;
use super::failure::HasRetry;

/// Applies [`HedgeService`].
#[derive(Clone, Copy, Debug, Default)]
pub struct HedgeLayer;

impl<S> Layer<S> for HedgeLayer {
    type Service = HedgeService<S>;
    fn layer(&self, inner: S) -> HedgeService<S> {
        HedgeService { inner }
    }
}

/// Sends a second copy of a slow attempt.
#[derive(Clone, Debug)]
pub struct HedgeService<S> {
    inner: S,
}

/// Whether a hedge may start now: the budget grants it and an attempt can still finish.
fn may_hedge<R: HasRetry + HasDeadline>(req: &R) -> bool {
    let left = req.deadline().saturating_duration_since(Instant::now());
    let needed = req.latency().expected().unwrap_or(Duration::from_millis(1));
    needed < left && req.retry_budget().withdraw()
}

impl<S, R> Service<R> for HedgeService<S>
where
    S: Service<R> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Send,
    R: HasRetry + HasDeadline + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = HedgeFuture<S::Future, S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let delay = match req.retry().hedge_delay {
            Some(d) if req.idempotent() => d,
            _ => {
                return HedgeFuture::Single {
                    fut: self.inner.call(req),
                };
            }
        };
        let hedge = self.inner.clone();
        let first = Box::pin(self.inner.call(req.clone()));
        HedgeFuture::Hedged {
            fut: Box::pin(async move {
                let timer = Box::pin(tokio::time::sleep(delay));
                let first = match select(first, timer).await {
                    Either::Left((out, _)) => return out,
                    Either::Right(((), first)) => first,
                };
                if !may_hedge(&req) {
                    return first.await;
                }
                let mut second = req;
                let n = second.receipt().read().attempts + 1;
                second.receipt().update(|r| {
                    r.attempts = n;
                    r.hedges += 1;
                });
                second.set_attempt(n);
                let second = Box::pin(hedge.oneshot(second));
                // The first success wins; after one failure, the other still may succeed.
                match select(first, second).await {
                    Either::Left((Ok(r), _)) | Either::Right((Ok(r), _)) => Ok(r),
                    Either::Left((Err(_), other)) => other.await,
                    Either::Right((Err(_), other)) => other.await,
                }
            }),
        }
    }
}

pin_project! {
    /// The response future of [`HedgeService`].
    #[project = Proj]
    pub enum HedgeFuture<F, T, E> {
        /// No hedging for this call.
        Single { #[pin] fut: F },
        /// An attempt that may be hedged.
        Hedged { fut: BoxFuture<'static, Result<T, E>> },
    }
}

impl<F, T, E> Future for HedgeFuture<F, T, E>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Single { fut } => fut.poll(cx),
            Proj::Hedged { fut } => fut.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tower::service_fn;

    use super::*;
    use crate::policy::{Budget, ErrorClass};
    use crate::resilience::RetryBudget;
    use crate::resilience::test_support::{E, Req, e};

    /// Attempt 1 answers after `first`, attempt 2 after 10ms with `second`.
    fn service(
        first: Duration,
        second: Result<&'static str, E>,
    ) -> (
        impl Service<Req, Response = &'static str, Error = E, Future: Send> + Clone + Send + 'static,
        Arc<Mutex<Vec<u32>>>,
    ) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let svc = service_fn(move |r: Req| {
            log.lock().unwrap().push(r.attempt);
            let second = second.clone();
            async move {
                if r.attempt <= 1 {
                    tokio::time::sleep(first).await;
                    Ok("first")
                } else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    second
                }
            }
        });
        (svc, seen)
    }

    fn hedged(mut req: Req) -> Req {
        req.retry.hedge_delay = Some(Duration::from_millis(50));
        req.attempt = 1;
        req.receipt.update(|r| r.attempts = 1);
        req
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_is_hedged_and_the_first_success_wins() {
        let (svc, seen) = service(Duration::from_secs(1), Ok("second"));
        let req = hedged(Req::new("h", Duration::from_secs(10)));
        let receipt = req.receipt.clone();
        let start = Instant::now();
        let out = HedgeLayer.layer(svc).oneshot(req).await;
        assert_eq!(out, Ok("second"));
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(60),
            "50ms delay + 10ms hedge"
        );
        assert_eq!(*seen.lock().unwrap(), [1, 2]);
        assert_eq!(receipt.read().attempts, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_attempt_is_not_hedged() {
        let (svc, seen) = service(Duration::from_millis(20), Ok("second"));
        let out = HedgeLayer
            .layer(svc)
            .oneshot(hedged(Req::new("h", Duration::from_secs(10))))
            .await;
        assert_eq!(out, Ok("first"));
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_hedge_leaves_the_first_attempt_to_answer() {
        let (svc, _) = service(Duration::from_millis(200), Err(e(ErrorClass::Transient)));
        let out = HedgeLayer
            .layer(svc)
            .oneshot(hedged(Req::new("h", Duration::from_secs(10))))
            .await;
        assert_eq!(out, Ok("first"));
    }

    #[tokio::test(start_paused = true)]
    async fn no_hedge_for_non_idempotent_calls_or_without_budget() {
        let (svc, seen) = service(Duration::from_millis(200), Ok("second"));
        let mut req = hedged(Req::new("h", Duration::from_secs(10)));
        req.idempotent = false;
        assert_eq!(
            HedgeLayer.layer(svc.clone()).oneshot(req).await,
            Ok("first")
        );
        assert_eq!(seen.lock().unwrap().len(), 1);

        let mut req = hedged(Req::new("h", Duration::from_secs(10)));
        req.budget = Arc::new(RetryBudget::new(Budget {
            ratio: 0.0,
            min_per_sec: 0,
            window: Duration::from_secs(10),
        }));
        assert_eq!(HedgeLayer.layer(svc).oneshot(req).await, Ok("first"));
        assert_eq!(seen.lock().unwrap().len(), 2, "one more call, not hedged");
    }
}
