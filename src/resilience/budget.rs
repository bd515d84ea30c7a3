//! The retry budget of an upstream: retries may add at most `ratio` of the recent calls,
//! plus `min_per_sec` so a quiet service can still retry, so retries never amplify an
//! outage.
//!
//! Counted in ten buckets over the window, on `tokio::time::Instant`, so paused-time tests
//! drive it. (tower's `TpsBudget` over-issues retries for ratios below 1.)

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::policy::Budget;

const BUCKETS: usize = 10;

/// One upstream's budget, shared by every call to it.
#[derive(Debug)]
pub struct RetryBudget {
    settings: Budget,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// (calls, retries) per bucket; `current` is the newest.
    buckets: [(u64, u64); BUCKETS],
    current: usize,
    current_start: Instant,
}

impl RetryBudget {
    /// A budget with these settings, empty.
    pub fn new(settings: Budget) -> Self {
        RetryBudget {
            settings,
            state: Mutex::new(State {
                buckets: [(0, 0); BUCKETS],
                current: 0,
                current_start: Instant::now(),
            }),
        }
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &Budget {
        &self.settings
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.advance(self.settings.window / BUCKETS as u32);
        f(&mut state)
    }

    /// Counts a new call (its first attempt).
    pub fn deposit(&self) {
        self.with_state(|s| s.buckets[s.current].0 += 1);
    }

    /// Asks for one retry; `false` when the budget is exhausted.
    pub fn withdraw(&self) -> bool {
        let ratio = self.settings.ratio;
        let floor = f64::from(self.settings.min_per_sec) * self.settings.window.as_secs_f64();
        self.with_state(|s| {
            let (calls, retries) = s
                .buckets
                .iter()
                .fold((0u64, 0u64), |(c, r), b| (c + b.0, r + b.1));
            let allowed = ratio * calls as f64 + floor;
            if (retries + 1) as f64 <= allowed {
                s.buckets[s.current].1 += 1;
                true
            } else {
                false
            }
        })
    }
}

impl State {
    /// Moves to the bucket of now, clearing the buckets that fell out of the window.
    fn advance(&mut self, width: Duration) {
        let width = width.max(Duration::from_millis(1));
        let elapsed = Instant::now().saturating_duration_since(self.current_start);
        let steps = (elapsed.as_nanos() / width.as_nanos()) as usize;
        for _ in 0..steps.min(BUCKETS) {
            self.current = (self.current + 1) % BUCKETS;
            self.buckets[self.current] = (0, 0);
        }
        if steps > 0 {
            self.current_start += width * u32::try_from(steps).unwrap_or(u32::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_sec: u32) -> RetryBudget {
        RetryBudget::new(Budget {
            ratio,
            min_per_sec,
            window: Duration::from_secs(10),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_limited_to_the_ratio_of_calls_plus_the_floor() {
        let b = budget(0.2, 0);
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 20);
        let b = budget(0.0, 1);
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 10, "1 per second over a 10s window");
    }

    #[tokio::test(start_paused = true)]
    async fn old_calls_and_retries_leave_the_window() {
        let b = budget(0.5, 0);
        for _ in 0..10 {
            b.deposit();
        }
        assert_eq!((0..10).filter(|_| b.withdraw()).count(), 5);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!b.withdraw(), "nothing deposited in the window any more");
        b.deposit();
        b.deposit();
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }
}
