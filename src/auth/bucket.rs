//! A token bucket for one tenant (or one tenant's model): `governor`'s lock-free GCRA
//! rate limiter (one compare-and-swap per request, no lock, no task), on Tokio's clock.
//!
//! # Determinism
//!
//! The clock is `tokio::time::Instant`, so `tokio::time::pause()` drives it in tests.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use crate::policy::RateLimit;

/// Tokio's clock for `governor`: the time since the bucket was made.
#[derive(Clone, Debug)]
struct TokioClock {
    base: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.base.elapsed()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// One bucket.
#[derive(Debug)]
pub struct Bucket {
    /// What it was made from, so a policy reload keeps a bucket whose limit did not change.
    pub(super) limit: RateLimit,
    limiter: Limiter,
    clock: TokioClock,
}

impl Bucket {
    /// A full bucket for `limit`.
    pub fn new(limit: RateLimit) -> Bucket {
        // Policy bounds per_second to 0.001..=1e6 and burst to 1..=1e6; the fallbacks only
        // keep a hand-made limit from panicking.
        let period = Duration::from_secs_f64(1.0 / limit.per_second.clamp(1e-3, 1e9));
        let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        let clock = TokioClock {
            base: Instant::now(),
        };
        Bucket {
            limit,
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
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
