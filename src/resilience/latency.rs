//! A latency estimate per (model, upstream): an exponentially weighted moving average of
//! successful attempts, and the fastest one seen, so Keel does not start an attempt that
//! cannot finish before the deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Weight of a new observation in the average, in 1/16ths (4/16 = 0.25).
const WEIGHT_16THS: u64 = 4;

/// The estimate. Lock-free: a lost update under a race only slows convergence.
#[derive(Debug)]
pub struct Latency {
    /// EWMA in nanoseconds; 0 until the first observation.
    ewma_ns: AtomicU64,
    /// Fastest observation in nanoseconds; `u64::MAX` until the first.
    floor_ns: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            ewma_ns: AtomicU64::new(0),
            floor_ns: AtomicU64::new(u64::MAX),
        }
    }
}

impl Latency {
    /// Adds one successful attempt's duration.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.floor_ns.fetch_min(ns, Ordering::Relaxed);
        let old = self.ewma_ns.load(Ordering::Relaxed);
        let new = if old == 0 {
            ns
        } else {
            (old.saturating_mul(16 - WEIGHT_16THS) / 16)
                .saturating_add(ns.saturating_mul(WEIGHT_16THS) / 16)
        };
        self.ewma_ns.store(new, Ordering::Relaxed);
    }

    /// The expected duration of an attempt, once something was observed.
    pub fn expected(&self) -> Option<Duration> {
        match self.ewma_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// The fastest attempt seen, once something was observed.
    pub fn floor(&self) -> Option<Duration> {
        match self.floor_ns.load(Ordering::Relaxed) {
            u64::MAX => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_moves_towards_new_observations_and_the_floor_keeps_the_fastest() {
        let l = Latency::default();
        assert_eq!(l.expected(), None);
        assert_eq!(l.floor(), None);
        l.observe(Duration::from_millis(100));
        assert_eq!(l.expected(), Some(Duration::from_millis(100)));
        l.observe(Duration::from_millis(20));
        assert_eq!(l.expected(), Some(Duration::from_millis(80)));
        assert_eq!(l.floor(), Some(Duration::from_millis(20)));
        for _ in 0..50 {
            l.observe(Duration::from_millis(40));
        }
        let e = l.expected().unwrap();
        assert!(
            e >= Duration::from_millis(39) && e <= Duration::from_millis(41),
            "{e:?}"
        );
    }
}
