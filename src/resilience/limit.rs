//! Bounds the calls in flight per model, with a bounded wait queue, and sheds the rest at
//! once: memory never grows with offered load.
//!
//! A call takes a slot if one is free (no allocation, no wait). Otherwise it may wait, if
//! fewer than `max_queue` calls already wait, for at most `queue_timeout`; else it is shed
//! with [`Shed`] (RESOURCE_EXHAUSTED with a retry hint). `interactive_reserve` of the slots
//! are kept for interactive callers ([`Slots`]), so batch calls are shed first.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use pin_project_lite::pin_project;
use tower::{Layer, Service, ServiceExt};

use super::failure::HasLimit;
use super::slots::{Slot, Slots, reserve_note};
use crate::policy::{Limits, Priority};

/// The call was shed: too many in flight and the queue was full or the wait too long.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "overloaded: {in_flight} calls in flight and the queue is full{}; retry in {retry_after:?}",
    reserve_note(*.reserved)
)]
pub struct Shed {
    /// Calls allowed in flight.
    pub in_flight: u32,
    /// A hint for when a retry may succeed.
    pub retry_after: Duration,
    /// For a batch call: the slots kept for interactive calls, which it could not take.
    pub reserved: Option<u32>,
}

/// The slots of one model.
#[derive(Debug)]
pub struct Limiter {
    settings: Limits,
    slots: Slots,
    waiting: AtomicU32,
}

impl Limiter {
    /// A limiter with these settings.
    pub fn new(settings: Limits) -> Self {
        Limiter {
            slots: Slots::new(settings.max_in_flight, settings.interactive_reserve),
            settings,
            waiting: AtomicU32::new(0),
        }
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &Limits {
        &self.settings
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> u32 {
        self.slots.in_flight()
    }

    /// Calls waiting for a slot now.
    pub fn queued(&self) -> u32 {
        self.waiting.load(Ordering::Acquire)
    }

    fn shed(&self, priority: Priority) -> Shed {
        Shed {
            in_flight: self.settings.max_in_flight,
            retry_after: self.settings.queue_timeout.max(Duration::from_millis(10)),
            reserved: self.slots.reserved_from(priority),
        }
    }

    /// Waits for a slot, within the queue bound and `queue_timeout`.
    async fn wait(self: Arc<Self>, priority: Priority) -> Result<Slot, Shed> {
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = Leave(&self.waiting);
        if queued >= self.settings.max_queue {
            return Err(self.shed(priority));
        }
        match tokio::time::timeout(self.settings.queue_timeout, self.slots.take(priority)).await {
            Ok(Some(slot)) => Ok(slot),
            _ => Err(self.shed(priority)),
        }
    }
}

/// Leaves the queue when dropped.
struct Leave<'a>(&'a AtomicU32);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Applies [`LimitService`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LimitLayer;

impl<S> Layer<S> for LimitLayer {
    type Service = LimitService<S>;
    fn layer(&self, inner: S) -> LimitService<S> {
        LimitService { inner }
    }
}

/// Holds a slot of the request's model for the whole call.
#[derive(Clone, Debug)]
pub struct LimitService<S> {
    inner: S,
}

impl<S, R> Service<R> for LimitService<S>
where
    S: Service<R> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: From<Shed> + Send,
    S::Response: Send,
    R: HasLimit + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = LimitFuture<S::Future, S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let limiter = req.limiter().clone();
        let priority = req.priority();
        match limiter.slots.try_take(priority) {
            // The common case: a free slot, taken without waiting or allocating.
            Some(slot) => LimitFuture::Running {
                fut: self.inner.call(req),
                _slot: slot,
            },
            None => {
                // Waiting needs the service again later; only this slow path boxes.
                let inner = self.inner.clone();
                LimitFuture::Queued {
                    fut: Box::pin(async move {
                        let _slot = limiter.wait(priority).await?;
                        inner.oneshot(req).await
                    }),
                }
            }
        }
    }
}

pin_project! {
    /// The response future of [`LimitService`].
    #[project = Proj]
    pub enum LimitFuture<F, T, E> {
        /// Running with a slot.
        Running { #[pin] fut: F, _slot: Slot },
        /// Waiting for a slot, then running.
        Queued { fut: BoxFuture<'static, Result<T, E>> },
    }
}

impl<F, T, E> Future for LimitFuture<F, T, E>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Running { fut, .. } => fut.poll(cx),
            Proj::Queued { fut } => fut.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::service_fn;

    #[derive(Clone)]
    struct Req(Arc<Limiter>);

    impl HasLimit for Req {
        fn limiter(&self) -> &Arc<Limiter> {
            &self.0
        }
    }

    #[derive(Debug, PartialEq)]
    enum E {
        Shed(Shed),
    }

    impl From<Shed> for E {
        fn from(s: Shed) -> Self {
            E::Shed(s)
        }
    }

    fn limiter(max_in_flight: u32, max_queue: u32) -> Arc<Limiter> {
        Arc::new(Limiter::new(Limits {
            max_in_flight,
            max_queue,
            queue_timeout: Duration::from_millis(100),
            ..crate::policy::Settings::default().limits
        }))
    }

    fn slow() -> impl Service<Req, Response = (), Error = E, Future: Send> + Clone + Send + 'static
    {
        service_fn(|_: Req| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(())
        })
    }

    #[tokio::test(start_paused = true)]
    async fn calls_beyond_the_slots_and_the_queue_are_shed_at_once() {
        let l = limiter(2, 1);
        let svc = LimitLayer.layer(slow());
        let running: Vec<_> = (0..2)
            .map(|_| tokio::spawn(svc.clone().oneshot(Req(l.clone()))))
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(l.in_flight(), 2);
        let queued = tokio::spawn(svc.clone().oneshot(Req(l.clone())));
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        let shed = svc.clone().oneshot(Req(l.clone())).await;
        assert!(matches!(shed, Err(E::Shed(_))), "the queue holds one");
        assert_eq!(start.elapsed(), Duration::ZERO, "shed without waiting");
        // The queued call waits up to 100ms, less than the 1s the running calls take.
        assert!(matches!(queued.await.unwrap(), Err(E::Shed(_))));
        for r in running {
            assert_eq!(r.await.unwrap(), Ok(()));
        }
        assert_eq!(l.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_runs_when_a_slot_frees_in_time() {
        let l = limiter(1, 4);
        let quick = LimitLayer.layer(service_fn(|_: Req| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, E>(())
        }));
        let first = tokio::spawn(quick.clone().oneshot(Req(l.clone())));
        tokio::task::yield_now().await;
        let second = quick.clone().oneshot(Req(l.clone())).await;
        assert_eq!(second, Ok(()));
        assert_eq!(first.await.unwrap(), Ok(()));
    }
}
