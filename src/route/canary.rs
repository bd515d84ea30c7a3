//! Canary analysis: the canary route's error rate and p99 latency against the baseline's,
//! window by window, and the verdict that takes a worse canary out of traffic.
//!
//! Windows are fixed spans of `tokio::time` (so paused-time tests drive them), closed by the
//! first call recorded after their end. A window is compared only when both sides had
//! `min_requests` calls; one that was not (or passed with no calls at all) breaks the
//! streak, so only `windows` consecutive, measured, bad windows roll the canary back.
//! Latencies go into a log-scale histogram (four buckets per doubling, so a p99 is known to
//! within 19%) whose size is fixed, whatever the load.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::policy::RollbackSpec;

/// Which side of the comparison a call was on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Any route but the canary.
    Baseline,
    /// The canary route.
    Canary,
}

/// Buckets of the latency histogram: 4 per doubling from 1µs, up to about 4.6 hours.
const BUCKETS: usize = 4 * 34;

/// One side's calls in one window.
#[derive(Clone)]
struct Tally {
    calls: u32,
    errors: u32,
    latency: [u32; BUCKETS],
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            calls: 0,
            errors: 0,
            latency: [0; BUCKETS],
        }
    }
}

fn bucket(latency: Duration) -> usize {
    let us = latency.as_micros().max(1) as f64;
    ((us.log2() * 4.0).ceil() as usize).min(BUCKETS - 1)
}

impl Tally {
    fn add(&mut self, ok: bool, latency: Duration) {
        self.calls = self.calls.saturating_add(1);
        if !ok {
            self.errors = self.errors.saturating_add(1);
        }
        self.latency[bucket(latency)] += 1;
    }

    fn stats(&self) -> Stats {
        let rank = (u64::from(self.calls) * 99).div_ceil(100);
        let mut seen = 0u64;
        let mut p99 = Duration::ZERO;
        for (b, n) in self.latency.iter().enumerate() {
            seen += u64::from(*n);
            if seen >= rank && *n > 0 {
                // The bucket's upper bound.
                p99 = Duration::from_nanos((1000.0 * 2f64.powf(b as f64 / 4.0)) as u64);
                break;
            }
        }
        Stats {
            calls: self.calls,
            errors: self.errors,
            p99,
        }
    }
}

/// One side of a compared window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// Calls recorded.
    pub calls: u32,
    /// Of which failed.
    pub errors: u32,
    /// The 99th percentile latency (the upper bound of its histogram bucket).
    pub p99: Duration,
}

impl Stats {
    /// Errors per call.
    pub fn error_rate(&self) -> f64 {
        f64::from(self.errors) / f64::from(self.calls.max(1))
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} calls, error rate {:.1}%, p99 {:?}",
            self.calls,
            self.error_rate() * 100.0,
            self.p99
        )
    }
}

/// Why the canary must go: the last bad window's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The model.
    pub model: Arc<str>,
    /// The canary route's name.
    pub route: Arc<str>,
    /// The canary in the last window.
    pub canary: Stats,
    /// The baseline in the last window.
    pub baseline: Stats,
    /// Consecutive bad windows.
    pub windows: u32,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "canary route {:?} of model {:?} was worse than the baseline for {} consecutive windows; last window: canary {}, baseline {}",
            self.route, self.model, self.windows, self.canary, self.baseline
        )
    }
}

struct State {
    started: Instant,
    canary: Tally,
    baseline: Tally,
    streak: u32,
    /// A verdict was given: nothing more to decide for this canary.
    decided: bool,
}

/// The analysis of one model's canary route.
pub struct Analysis {
    model: Arc<str>,
    route: Arc<str>,
    spec: RollbackSpec,
    state: Mutex<State>,
}

impl fmt::Debug for Analysis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Analysis")
            .field("model", &self.model)
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl Analysis {
    /// An analysis of `route` of `model`, its first window starting now.
    pub fn new(model: Arc<str>, route: Arc<str>, spec: RollbackSpec) -> Self {
        Analysis {
            model,
            route,
            spec,
            state: Mutex::new(State {
                started: Instant::now(),
                canary: Tally::default(),
                baseline: Tally::default(),
                streak: 0,
                decided: false,
            }),
        }
    }

    /// The settings it runs with.
    pub fn spec(&self) -> &RollbackSpec {
        &self.spec
    }

    /// The canary route's name.
    pub fn route(&self) -> &Arc<str> {
        &self.route
    }

    /// Records one call; returns the verdict when this call closed the window that made the
    /// canary's case (once per analysis).
    pub fn record(&self, side: Side, ok: bool, latency: Duration) -> Option<Verdict> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.decided {
            return None;
        }
        let mut verdict = None;
        let elapsed = now.saturating_duration_since(s.started);
        if elapsed >= self.spec.window {
            let windows = elapsed.as_nanos() / self.spec.window.as_nanos().max(1);
            verdict = self.close(&mut s);
            if windows > 1 {
                // Windows with no calls at all passed since: the streak is broken.
                s.streak = 0;
            }
            let step = self
                .spec
                .window
                .saturating_mul(u32::try_from(windows).unwrap_or(u32::MAX));
            s.started += step;
        }
        match side {
            Side::Canary => s.canary.add(ok, latency),
            Side::Baseline => s.baseline.add(ok, latency),
        }
        verdict
    }

    /// Compares the window that ended and starts the next.
    fn close(&self, s: &mut State) -> Option<Verdict> {
        let canary = std::mem::take(&mut s.canary).stats();
        let baseline = std::mem::take(&mut s.baseline).stats();
        let min = self.spec.min_requests;
        if canary.calls < min || baseline.calls < min {
            s.streak = 0;
            return None;
        }
        let errors_worse =
            canary.error_rate() - baseline.error_rate() > self.spec.max_error_rate_increase;
        let floor = Duration::from_micros(1);
        let slower = canary.p99.as_secs_f64() / baseline.p99.max(floor).as_secs_f64()
            > self.spec.max_p99_ratio;
        if !(errors_worse || slower) {
            s.streak = 0;
            return None;
        }
        s.streak += 1;
        if s.streak < self.spec.windows {
            return None;
        }
        s.decided = true;
        Some(Verdict {
            model: self.model.clone(),
            route: self.route.clone(),
            canary,
            baseline,
            windows: s.streak,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RollbackSpec {
        RollbackSpec {
            window: Duration::from_secs(10),
            min_requests: 10,
            max_error_rate_increase: 0.05,
            max_p99_ratio: 1.5,
            windows: 2,
        }
    }

    fn analysis() -> Analysis {
        Analysis::new("simple".into(), "v2".into(), spec())
    }

    /// One window of traffic: `n` calls per side, then the clock moves to the next window.
    async fn window(a: &Analysis, canary_errors: u32, canary_ms: u64, n: u32) -> Option<Verdict> {
        let mut verdict = None;
        for i in 0..n {
            let ok = i >= canary_errors;
            verdict = verdict.or(a.record(Side::Canary, ok, Duration::from_millis(canary_ms)));
            verdict = verdict.or(a.record(Side::Baseline, true, Duration::from_millis(10)));
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        verdict
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_canary_is_condemned_after_the_configured_bad_windows() {
        let a = analysis();
        assert_eq!(window(&a, 5, 10, 20).await, None, "first window still open");
        // Closing the first bad window (25% errors against 0%) makes a streak of one.
        assert_eq!(window(&a, 5, 10, 20).await, None);
        let v = a
            .record(Side::Baseline, true, Duration::from_millis(10))
            .unwrap();
        assert_eq!(v.windows, 2);
        assert_eq!((v.canary.calls, v.canary.errors), (20, 5));
        assert_eq!(v.baseline.errors, 0);
        assert!(v.to_string().contains("error rate 25.0%"), "{v}");
        assert_eq!(
            a.record(Side::Canary, false, Duration::ZERO),
            None,
            "decided once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_canary_is_condemned_by_its_p99() {
        let a = analysis();
        window(&a, 0, 40, 20).await;
        window(&a, 0, 40, 20).await;
        let v = a
            .record(Side::Canary, true, Duration::from_millis(40))
            .unwrap();
        assert!(v.canary.p99 > v.baseline.p99.mul_f64(3.0), "{v}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_good_window_or_a_thin_one_breaks_the_streak() {
        let a = analysis();
        window(&a, 5, 10, 20).await;
        window(&a, 0, 10, 20).await; // closes the bad one: streak 1
        window(&a, 5, 10, 20).await; // closes the good one: streak 0
        window(&a, 5, 10, 5).await; // closes a bad one: streak 1
        // Closes the thin one (5 calls a side, under min_requests): streak 0.
        assert_eq!(window(&a, 5, 10, 20).await, None);
        // A silent gap of several windows breaks it too.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(window(&a, 5, 10, 20).await, None);
        assert_eq!(
            a.record(Side::Canary, true, Duration::ZERO),
            None,
            "only one bad window in a row"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_canary_within_the_thresholds_is_left_alone() {
        let a = analysis();
        for _ in 0..5 {
            // 5% more errors is not more than 5 points; 10ms against 10ms.
            assert_eq!(window(&a, 1, 10, 20).await, None);
        }
    }

    #[test]
    fn the_histogram_places_latencies_within_a_fifth() {
        let mut t = Tally::default();
        for ms in 1..=100 {
            t.add(true, Duration::from_millis(ms));
        }
        let p99 = t.stats().p99;
        assert!(
            p99 >= Duration::from_millis(99) && p99 <= Duration::from_millis(119),
            "{p99:?}"
        );
    }
}
