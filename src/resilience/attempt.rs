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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tower::{ServiceExt, service_fn};

    use super::*;

    struct Req {
        per_try: Option<Duration>,
        attempt_deadline: Option<Instant>,
        latency: Arc<Latency>,
        /// How long the inner service takes, and whether it then fails.
        work: Duration,
        fails: bool,
    }

    impl HasAttempt for Req {
        fn per_try_timeout(&self) -> Option<Duration> {
            self.per_try
        }
        fn set_attempt_deadline(&mut self, at: Instant) {
            self.attempt_deadline = Some(at);
        }
        fn latency(&self) -> &Arc<Latency> {
            &self.latency
        }
    }

    #[derive(Debug, PartialEq)]
    enum E {
        TimedOut(AttemptTimedOut),
        Backend,
    }

    impl From<AttemptTimedOut> for E {
        fn from(t: AttemptTimedOut) -> Self {
            E::TimedOut(t)
        }
    }

    /// A scripted backend: answers with the attempt deadline it was given, after `work`.
    fn backend() -> impl Service<Req, Response = Option<Instant>, Error = E, Future: Send> {
        service_fn(|r: Req| async move {
            tokio::time::sleep(r.work).await;
            if r.fails {
                Err(E::Backend)
            } else {
                Ok(r.attempt_deadline)
            }
        })
    }

    fn req(per_try: Option<Duration>, work: Duration, latency: &Arc<Latency>) -> Req {
        Req {
            per_try,
            attempt_deadline: None,
            latency: latency.clone(),
            work,
            fails: false,
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn an_attempt_over_its_per_try_timeout_fails_exactly_at_the_timeout() {
        let latency = Arc::new(Latency::default());
        let start = Instant::now();
        let out = AttemptLayer
            .layer(backend())
            .oneshot(req(Some(100 * MS), Duration::from_secs(60), &latency))
            .await;
        assert_eq!(out, Err(E::TimedOut(AttemptTimedOut { after: 100 * MS })));
        assert_eq!(start.elapsed(), 100 * MS, "cut at the timeout, not later");
        assert_eq!(latency.floor(), None, "a cut attempt is no latency sample");
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_under_its_per_try_timeout_passes_its_answer_through() {
        let latency = Arc::new(Latency::default());
        let start = Instant::now();
        let out = AttemptLayer
            .layer(backend())
            .oneshot(req(Some(100 * MS), 99 * MS, &latency))
            .await;
        assert_eq!(
            out,
            Ok(Some(start + 100 * MS)),
            "the backend saw the attempt's end"
        );
        assert_eq!(start.elapsed(), 99 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_per_try_timeout_an_attempt_is_never_cut() {
        let latency = Arc::new(Latency::default());
        let start = Instant::now();
        let out = AttemptLayer
            .layer(backend())
            .oneshot(req(None, Duration::from_secs(3600), &latency))
            .await;
        assert_eq!(out, Ok(None), "no attempt deadline was written");
        assert_eq!(start.elapsed(), Duration::from_secs(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn the_latency_estimate_is_fed_by_successful_attempts_only() {
        let latency = Arc::new(Latency::default());
        let mut svc = AttemptLayer.layer(backend());
        let failing = Req {
            fails: true,
            ..req(Some(100 * MS), 5 * MS, &latency)
        };
        let out = svc.ready().await.unwrap().call(failing).await;
        assert_eq!(out, Err(E::Backend), "a backend error passes through");
        assert_eq!(latency.floor(), None, "a failed attempt is no sample");
        assert_eq!(latency.expected(), None);

        for work in [30 * MS, 10 * MS] {
            let r = req(Some(100 * MS), work, &latency);
            svc.ready().await.unwrap().call(r).await.unwrap();
        }
        assert_eq!(latency.floor(), Some(10 * MS), "the fastest attempt");
        let expected = latency.expected().unwrap();
        assert!(
            (10 * MS..=30 * MS).contains(&expected),
            "{expected:?} lies between the samples"
        );
    }
}
