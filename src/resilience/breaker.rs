//! Fails a call fast while the circuit breaker of its (model, upstream) is open.
//!
//! State lives in a [`BreakerCell`] kept outside the policy snapshot (the router's
//! registry), so it survives a swap; a swap that changes the breaker's settings gives it a
//! fresh cell.
//!
//! # States
//!
//! 1. **Closed**: calls pass. It trips after `consecutive_failures` failures in a row, or
//!    when the failure share over the window reaches `failure_ratio` once `min_requests`
//!    calls were seen, or (with `slow_call_duration`) when the share of calls slower than
//!    that reaches `slow_call_ratio`: a model gone slow is as unusable as one gone down.
//! 2. **Open**: calls fail at once with [`BreakerOpen`] for `open_for`, doubled on each
//!    trip in a row, up to `max_open_for`.
//! 3. **Half-open**: up to `half_open_probes` calls go through; when that many succeed the
//!    breaker closes, and one failure (or slow probe) opens it again.
//!
//! Only failures that say something about the upstream's health count (see
//! [`Handling::trips_breaker`]): a client error is a healthy answer, and so is a refused
//! connection (one endpoint down; ejection from the pool and retries deal with it).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::classify::Handling;
use super::failure::{Failure, HasBreaker};
use crate::policy::Breaker;

const BUCKETS: usize = 10;

/// The call was refused because the breaker is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker open; next probe in {retry_after:?}")]
pub struct BreakerOpen {
    /// Time until the breaker lets a probe through.
    pub retry_after: Duration,
}

/// The breaker's state, for logs, metrics (as a number) and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass.
    Closed = 0,
    /// Probes pass.
    HalfOpen = 1,
    /// Calls are refused.
    Open = 2,
}

/// What an admitted call's outcome says about the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer, or an error that says nothing of the upstream's health.
    Healthy,
    /// The same, but slower than `slow_call_duration`.
    Slow,
    /// A failure that counts against the upstream.
    Failed,
}

impl From<bool> for Outcome {
    /// `true`: healthy; `false`: failed.
    fn from(healthy: bool) -> Self {
        if healthy {
            Outcome::Healthy
        } else {
            Outcome::Failed
        }
    }
}

/// Calls of one bucket of the window.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    /// Calls that did not fail (slow ones included).
    ok: u64,
    failed: u64,
    slow: u64,
}

/// One breaker.
#[derive(Debug)]
pub struct BreakerCell {
    settings: Breaker,
    /// What it guards, for log events (`simple@triton`, `triton/10.0.0.7:8001`).
    name: Arc<str>,
    inner: Mutex<Inner>,
    /// Times it opened, for metrics.
    trips_total: std::sync::atomic::AtomicU64,
    /// Told when it opens or closes (the health view listens).
    on_change: super::Changed,
}

#[derive(Debug)]
enum Mode {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, succeeded: u32 },
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    consecutive: u32,
    /// Trips in a row without closing, for the growing open time.
    trips: u32,
    /// Calls per bucket of the window.
    buckets: [Counts; BUCKETS],
    current: usize,
    current_start: Instant,
}

/// A call the breaker let through (and whether it is a half-open probe), to hand back
/// with its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    probe: bool,
}

impl BreakerCell {
    /// A closed breaker, unnamed.
    pub fn new(settings: Breaker) -> Self {
        BreakerCell::named(settings, "breaker")
    }

    /// A closed breaker named for its log events.
    pub fn named(settings: Breaker, name: impl Into<Arc<str>>) -> Self {
        BreakerCell {
            settings,
            name: name.into(),
            trips_total: std::sync::atomic::AtomicU64::new(0),
            on_change: super::Changed::default(),
            inner: Mutex::new(Inner {
                mode: Mode::Closed,
                consecutive: 0,
                trips: 0,
                buckets: [Counts::default(); BUCKETS],
                current: 0,
                current_start: Instant::now(),
            }),
        }
    }

    /// The same breaker, telling `changed` whenever it opens or closes.
    pub fn notifying(mut self, changed: super::Changed) -> Self {
        self.on_change = changed;
        self
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &Breaker {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Times the breaker opened since it was built.
    pub fn trips_total(&self) -> u64 {
        self.trips_total.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        let mut inner = self.lock();
        inner.refresh();
        match inner.mode {
            Mode::Closed => BreakerState::Closed,
            Mode::Open { .. } => BreakerState::Open,
            Mode::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Lets a call through, or refuses it.
    pub fn admit(&self) -> Result<Admission, BreakerOpen> {
        let mut inner = self.lock();
        inner.refresh();
        match &mut inner.mode {
            Mode::Closed => Ok(Admission { probe: false }),
            Mode::Open { until } => Err(BreakerOpen {
                retry_after: until.saturating_duration_since(Instant::now()),
            }),
            Mode::HalfOpen { in_flight, .. } => {
                if *in_flight < self.settings.half_open_probes {
                    *in_flight += 1;
                    Ok(Admission { probe: true })
                } else {
                    // The probes are out; their answers decide soon.
                    Err(BreakerOpen {
                        retry_after: Duration::from_millis(100),
                    })
                }
            }
        }
    }

    /// Records the outcome of an admitted call (a `bool` says healthy or failed).
    pub fn record(&self, admission: Admission, outcome: impl Into<Outcome>) {
        let outcome = outcome.into();
        let mut inner = self.lock();
        inner.refresh();
        let s = &self.settings;
        enum Next {
            Trip(&'static str),
            Close,
            Count,
            Nothing,
        }
        let next = match &mut inner.mode {
            Mode::HalfOpen {
                in_flight,
                succeeded,
            } if admission.probe => {
                *in_flight = in_flight.saturating_sub(1);
                if outcome == Outcome::Failed {
                    Next::Trip("probe_failed")
                } else if outcome == Outcome::Slow {
                    Next::Trip("probe_slow")
                } else {
                    *succeeded += 1;
                    if *succeeded >= s.half_open_probes {
                        Next::Close
                    } else {
                        Next::Nothing
                    }
                }
            }
            Mode::Closed => Next::Count,
            // A call admitted before the breaker opened, or a non-probe in half-open: its
            // outcome is old news.
            _ => Next::Nothing,
        };
        match next {
            Next::Trip(cause) => {
                inner.trip(s);
                self.tripped(&inner, cause);
            }
            Next::Close => {
                inner.close();
                tracing::info!(breaker = %self.name, state = "closed", "breaker closed");
                self.on_change.tell();
            }
            Next::Nothing => {}
            Next::Count => {
                inner.advance(s.window);
                let at = inner.current;
                let bucket = &mut inner.buckets[at];
                match outcome {
                    Outcome::Healthy => bucket.ok += 1,
                    Outcome::Slow => {
                        bucket.ok += 1;
                        bucket.slow += 1;
                    }
                    Outcome::Failed => bucket.failed += 1,
                }
                if outcome == Outcome::Failed {
                    inner.consecutive += 1;
                } else {
                    inner.consecutive = 0;
                }
                if outcome != Outcome::Healthy
                    && let Some(cause) = inner.cause(s)
                {
                    inner.trip(s);
                    self.tripped(&inner, cause);
                }
            }
        }
    }
}

impl BreakerCell {
    /// Counts and logs a trip, with its cause.
    fn tripped(&self, inner: &Inner, cause: &'static str) {
        self.on_change.tell();
        let trips = self
            .trips_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if let Mode::Open { until } = inner.mode {
            self.on_change.tell_at(until);
            let open_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64;
            tracing::warn!(breaker = %self.name, state = "open", open_ms, trips, cause, "breaker opened");
        }
    }
}

impl Inner {
    /// Why the closed breaker must open now, if it must: `consecutive_failures`,
    /// `failure_ratio` or `slow_calls`.
    fn cause(&self, s: &Breaker) -> Option<&'static str> {
        if self.consecutive >= s.consecutive_failures {
            return Some("consecutive_failures");
        }
        let all = self.buckets.iter().fold(Counts::default(), |a, b| Counts {
            ok: a.ok + b.ok,
            failed: a.failed + b.failed,
            slow: a.slow + b.slow,
        });
        let total = all.ok + all.failed;
        if total < u64::from(s.min_requests) {
            return None;
        }
        if all.failed > 0 && all.failed as f64 >= s.failure_ratio * total as f64 {
            return Some("failure_ratio");
        }
        let slow_counts = s.slow_call_duration.is_some() && all.slow > 0;
        (slow_counts && all.slow as f64 >= s.slow_call_ratio * total as f64).then_some("slow_calls")
    }

    /// Moves an open breaker whose time is up to half-open.
    fn refresh(&mut self) {
        if let Mode::Open { until } = self.mode
            && Instant::now() >= until
        {
            self.mode = Mode::HalfOpen {
                in_flight: 0,
                succeeded: 0,
            };
        }
    }

    fn trip(&mut self, s: &Breaker) {
        self.trips += 1;
        let factor = 2u32.saturating_pow(self.trips.saturating_sub(1).min(16));
        let open_for = s.open_for.saturating_mul(factor).min(s.max_open_for);
        self.mode = Mode::Open {
            until: Instant::now() + open_for,
        };
        self.consecutive = 0;
        self.buckets = [Counts::default(); BUCKETS];
    }

    fn close(&mut self) {
        self.mode = Mode::Closed;
        self.trips = 0;
        self.consecutive = 0;
        self.buckets = [Counts::default(); BUCKETS];
        self.current_start = Instant::now();
    }

    /// Moves the window to now, clearing buckets that fell out of it.
    fn advance(&mut self, window: Duration) {
        let width = (window / BUCKETS as u32).max(Duration::from_millis(1));
        let elapsed = Instant::now().saturating_duration_since(self.current_start);
        let steps = (elapsed.as_nanos() / width.as_nanos()) as usize;
        for _ in 0..steps.min(BUCKETS) {
            self.current = (self.current + 1) % BUCKETS;
            self.buckets[self.current] = Counts::default();
        }
        if steps > 0 {
            self.current_start += width * u32::try_from(steps).unwrap_or(u32::MAX);
        }
    }
}

/// Applies [`BreakerService`].
#[derive(Clone, Copy, Debug, Default)]
pub struct BreakerLayer;

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;
    fn layer(&self, inner: S) -> BreakerService<S> {
        BreakerService { inner }
    }
}

/// Refuses calls while the request's breaker is open and feeds it every outcome.
#[derive(Clone, Debug)]
pub struct BreakerService<S> {
    inner: S,
}

impl<S, R> Service<R> for BreakerService<S>
where
    S: Service<R>,
    S::Error: Failure + From<BreakerOpen>,
    R: HasBreaker,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BreakerFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let Some(cell) = req.breaker().cloned() else {
            return BreakerFuture::Passing {
                fut: self.inner.call(req),
            };
        };
        match cell.admit() {
            Ok(admission) => BreakerFuture::Called {
                // The clock is read only when slowness counts.
                started: cell.settings.slow_call_duration.map(|_| Instant::now()),
                fut: self.inner.call(req),
                cell,
                admission,
            },
            Err(open) => BreakerFuture::Rejected {
                error: Some(open.into()),
            },
        }
    }
}

pin_project! {
    /// The response future of [`BreakerService`].
    #[project = Proj]
    pub enum BreakerFuture<F, E> {
        /// No breaker for this call.
        Passing { #[pin] fut: F },
        /// Admitted; the outcome is recorded.
        Called {
            #[pin] fut: F,
            cell: Arc<BreakerCell>,
            admission: Admission,
            started: Option<Instant>,
        },
        /// Refused.
        Rejected { error: Option<E> },
    }
}

impl<F, T, E> Future for BreakerFuture<F, E>
where
    F: Future<Output = Result<T, E>>,
    E: Failure,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Passing { fut } => fut.poll(cx),
            Proj::Called {
                fut,
                cell,
                admission,
                started,
            } => {
                let out = std::task::ready!(fut.poll(cx));
                // A refused connection never reached the model: it says one endpoint is
                // down, which that endpoint's own breaker tracks, and a retry goes to
                // another. Counting it here would shut the model off while other
                // endpoints answer.
                let failed = out
                    .as_ref()
                    .is_err_and(|e| e.class().trips_breaker() && !e.never_sent());
                let slow = started
                    .zip(cell.settings.slow_call_duration)
                    .is_some_and(|(at, limit)| at.elapsed() > limit);
                let outcome = match (failed, slow) {
                    (true, _) => Outcome::Failed,
                    (false, true) => Outcome::Slow,
                    (false, false) => Outcome::Healthy,
                };
                cell.record(*admission, outcome);
                Poll::Ready(out)
            }
            Proj::Rejected { error } => match error.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests;
