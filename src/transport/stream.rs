//! Each HTTP/2 stream's task, and a deadline the stream's answer can give it: a stream
//! whose client has not taken its answer by then is dropped, with everything it holds.
//!
//! # Why here
//!
//! While a client reads nothing, hyper waits for flow-control capacity and polls neither
//! the answer's body nor anything in it, so no timer inside the body can fire. Every
//! stream's task is therefore run inside a [`Guarded`] future, which polls its
//! [`StreamDeadline`] beside the stream: when it passes, the stream's future is dropped,
//! which drops the answer not taken and makes h2 reset the stream (`RST_STREAM(CANCEL)`)
//! and discard what it still had queued for it.
//!
//! The deadline is found from inside the stream's task with [`StreamDeadline::current`]
//! (a task-local), so the answer's body sets it without knowing the connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

tokio::task_local! {
    static STREAM: Arc<StreamDeadline>;
}

/// When the stream must have handed its answer to its client; none by default.
#[derive(Debug)]
pub struct StreamDeadline {
    base: Instant,
    /// Nanoseconds after `base`, plus one; 0: no deadline.
    at: AtomicU64,
}

impl StreamDeadline {
    fn new() -> Arc<StreamDeadline> {
        Arc::new(StreamDeadline {
            base: Instant::now(),
            at: AtomicU64::new(0),
        })
    }

    /// The deadline of the stream whose task is running, when it runs under Keel's
    /// [`serve`](super::serve).
    pub fn current() -> Option<Arc<StreamDeadline>> {
        STREAM.try_with(Arc::clone).ok()
    }

    /// The stream is dropped unless it finished, or the deadline was cleared, by `at`.
    pub fn set(&self, at: Instant) {
        let nanos = at.saturating_duration_since(self.base).as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX - 1);
        self.at.store(nanos + 1, Ordering::Release);
    }

    /// Nothing of the answer is waiting on its client.
    pub fn clear(&self) {
        self.at.store(0, Ordering::Release);
    }

    fn get(&self) -> Option<(u64, Instant)> {
        match self.at.load(Ordering::Acquire) {
            0 => None,
            n => Some((
                n,
                self.base + std::time::Duration::from_nanos(n.saturating_sub(1)),
            )),
        }
    }
}

/// hyper's executor for the streams of Keel's connections: each runs [`Guarded`].
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Exec;

impl<F> hyper::rt::Executor<F> for Exec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Guarded {
            fut,
            deadline: StreamDeadline::new(),
            sleep: None,
            armed: 0,
        });
    }
}

pin_project! {
    /// A stream's task, dropped at its [`StreamDeadline`].
    pub(super) struct Guarded<F> {
        #[pin]
        fut: F,
        deadline: Arc<StreamDeadline>,
        #[pin]
        sleep: Option<Sleep>,
        // The deadline `sleep` is set to, as stored.
        armed: u64,
    }
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let fut = this.fut.as_mut();
        if STREAM
            .sync_scope(this.deadline.clone(), || fut.poll(cx))
            .is_ready()
        {
            return Poll::Ready(());
        }
        let Some((armed, at)) = this.deadline.get() else {
            this.sleep.set(None);
            *this.armed = 0;
            return Poll::Pending;
        };
        if *this.armed != armed {
            this.sleep.set(Some(tokio::time::sleep_until(at)));
            *this.armed = armed;
        }
        if let Some(sleep) = this.sleep.as_pin_mut()
            && sleep.poll(cx).is_ready()
        {
            tracing::debug!(
                "answer not taken by its client before the call's deadline: stream dropped"
            );
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn guarded<F: Future<Output = ()>>(fut: F) -> Guarded<F> {
        Guarded {
            fut,
            deadline: StreamDeadline::new(),
            sleep: None,
            armed: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_past_the_deadline_it_set_is_dropped() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let start = Instant::now();
        guarded(async move {
            let d = StreamDeadline::current().expect("inside a guarded stream");
            d.set(Instant::now() + Duration::from_millis(250));
            // Holds `tx` until dropped: the answer its client never takes.
            let _held = tx;
            std::future::pending::<()>().await;
        })
        .await;
        assert_eq!(Instant::now() - start, Duration::from_millis(250));
        assert!(rx.await.is_err(), "what the stream held was dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cleared_or_moved_deadline_does_not_drop_the_stream() {
        let start = Instant::now();
        guarded(async {
            let d = StreamDeadline::current().unwrap();
            d.set(Instant::now() + Duration::from_millis(10));
            tokio::time::sleep(Duration::from_millis(5)).await;
            d.clear();
            tokio::time::sleep(Duration::from_millis(50)).await;
            d.set(Instant::now() + Duration::from_secs(1));
            tokio::time::sleep(Duration::from_millis(100)).await;
        })
        .await;
        assert_eq!(Instant::now() - start, Duration::from_millis(155));
        assert!(StreamDeadline::current().is_none(), "only inside a stream");
    }
}
