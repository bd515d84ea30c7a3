//! A token bucket for one tenant (or one tenant's model), lock-free.
//!
//! It is the generic cell rate algorithm: instead of a token count it keeps the theoretical
//! arrival time (`tat`) of the next request at the sustained rate, in nanoseconds since the
//! bucket was made. A request is allowed when, after adding one emission interval, `tat` is
//! no further ahead of now than `burst` intervals; otherwise the excess is how long until a
//! token. One atomic compare-and-swap per request, no lock, no task.
//!
//! # Determinism
//!
//! Time is `tokio::time::Instant`, so `tokio::time::pause()` drives it in tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::policy::RateLimit;

/// One bucket.
#[derive(Debug)]
pub struct Bucket {
    /// What it was made from, so a policy reload keeps a bucket whose limit did not change.
    pub(super) limit: RateLimit,
    base: Instant,
    /// Nanoseconds per token.
    interval: u64,
    /// How far `tat` may run ahead of now: `burst` intervals.
    tolerance: u64,
    tat: AtomicU64,
}

impl Bucket {
    /// A full bucket for `limit`.
    pub fn new(limit: RateLimit) -> Bucket {
        // Policy bounds per_second to 0.001..=1e6, so the interval is 1_000 ns..=1e12 ns.
        let interval = (1e9 / limit.per_second).clamp(1.0, 1e15) as u64;
        Bucket {
            limit,
            base: Instant::now(),
            interval,
            tolerance: interval.saturating_mul(u64::from(limit.burst)),
            tat: AtomicU64::new(0),
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&self) -> Result<(), Duration> {
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(self.interval);
            let ahead = next - now;
            if ahead > self.tolerance {
                return Err(Duration::from_nanos(ahead - self.tolerance));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: f64, burst: u32) -> RateLimit {
        RateLimit { per_second, burst }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_allowed_then_one_token_per_interval() {
        let b = Bucket::new(limit(10.0, 3));
        for _ in 0..3 {
            assert_eq!(b.take(), Ok(()));
        }
        assert_eq!(b.take(), Err(Duration::from_millis(100)));
        tokio::time::advance(Duration::from_millis(40)).await;
        assert_eq!(b.take(), Err(Duration::from_millis(60)), "the wait shrinks");
        tokio::time::advance(Duration::from_millis(60)).await;
        assert_eq!(b.take(), Ok(()));
        assert!(b.take().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_spell_refills_up_to_the_burst_only() {
        let b = Bucket::new(limit(1.0, 2));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(b.take(), Ok(()));
        assert_eq!(b.take(), Ok(()));
        assert_eq!(b.take(), Err(Duration::from_secs(1)));
    }
}
