//! Exponential backoff with deterministic jitter.
//!
//! # Determinism
//!
//! The random fraction of each wait comes from xxh3 (fixed and platform-independent) of the
//! request id, seeded with the retry number and the policy's seed (from its content hash,
//! [`crate::policy::Snapshot::seed`]): the same request id under the same policy and the same
//! failures waits the same on every replica and after every restart.

use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::policy::{Jitter, Retry};

/// A number in `[0, 1)` fixed by (request id, retry number, policy seed).
pub(super) fn unit(request_id: &str, retry: u32, policy_seed: u64) -> f64 {
    let seed = policy_seed.rotate_left(32) ^ u64::from(retry);
    let h = xxh3_64_with_seed(request_id.as_bytes(), seed);
    // The top 53 bits, as a double in [0, 1).
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The cap of the wait before retry `n` (1 = the first retry):
/// `min(max_backoff, initial_backoff × multiplier^(n-1))`.
pub(super) fn ceiling(policy: &Retry, n: u32) -> Duration {
    let exp = policy.multiplier.powi(n.saturating_sub(1).min(1000) as i32);
    let secs = policy.initial_backoff.as_secs_f64() * exp;
    let max = policy.max_backoff;
    if !secs.is_finite() || secs >= max.as_secs_f64() {
        max
    } else {
        Duration::from_secs_f64(secs)
    }
}

/// The wait before retry `n` of the request `request_id` under the policy seeded `seed`.
pub fn delay(policy: &Retry, n: u32, request_id: &str, seed: u64) -> Duration {
    let cap = ceiling(policy, n);
    match policy.jitter {
        Jitter::None => cap,
        Jitter::Full => cap.mul_f64(unit(request_id, n, seed)),
        Jitter::Equal => cap / 2 + (cap / 2).mul_f64(unit(request_id, n, seed)),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::policy::Settings;

    fn policy(initial_ms: u64, max_ms: u64, multiplier: f64, jitter: Jitter) -> Retry {
        Retry {
            initial_backoff: Duration::from_millis(initial_ms),
            max_backoff: Duration::from_millis(max_ms),
            multiplier,
            jitter,
            ..Settings::default().retry
        }
    }

    proptest! {
        #[test]
        fn every_delay_is_within_zero_and_its_ceiling(
            initial in 1u64..5_000,
            extra in 0u64..60_000,
            multiplier in 1.0f64..10.0,
            n in 1u32..12,
            id in "[a-z0-9-]{0,40}",
            seed in any::<u64>(),
        ) {
            let p = policy(initial, initial + extra, multiplier, Jitter::Full);
            let cap = Duration::from_millis(initial + extra)
                .min(Duration::from_secs_f64(initial as f64 / 1000.0 * multiplier.powi(n as i32 - 1)));
            let d = delay(&p, n, &id, seed);
            prop_assert!(d <= cap + Duration::from_micros(1), "{d:?} > {cap:?}");
            let e = delay(&policy(initial, initial + extra, multiplier, Jitter::Equal), n, &id, seed);
            prop_assert!(e >= cap / 2 && e <= cap + Duration::from_micros(1));
        }
    }

    #[test]
    fn the_same_request_waits_the_same_and_others_differ() {
        let p = Settings::default().retry;
        let a: Vec<Duration> = (1..=3).map(|n| delay(&p, n, "req-1", 7)).collect();
        let b: Vec<Duration> = (1..=3).map(|n| delay(&p, n, "req-1", 7)).collect();
        assert_eq!(a, b);
        assert_ne!(
            a,
            (1..=3)
                .map(|n| delay(&p, n, "req-2", 7))
                .collect::<Vec<_>>()
        );
        assert_ne!(
            a,
            (1..=3)
                .map(|n| delay(&p, n, "req-1", 8))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn pinned_values_hold_on_every_machine() {
        // Real numbers, not a value compared with itself: xxh3 and the seed layout are part
        // of Keel's contract, since replicas and restarts must wait alike. Changing either
        // changes these.
        let p = Settings::default().retry;
        let waits = |id: &str, seed: u64| -> Vec<u128> {
            (1..=3).map(|n| delay(&p, n, id, seed).as_nanos()).collect()
        };
        assert_eq!(unit("req-1", 1, 7), 0.3938491840392446);
        assert_eq!(waits("req-1", 7), [9_846_230, 25_909_978, 88_281_764]);
        let seed = 0x9f86_d081_884c_7d65;
        assert_eq!(unit("abc", 1, seed), 0.9231475045612145);
        assert_eq!(waits("abc", seed), [23_078_688, 25_782_002, 67_187_108]);
    }

    #[test]
    fn ceilings_grow_then_cap() {
        let p = policy(25, 1000, 2.0, Jitter::None);
        let d: Vec<u128> = (1..=7).map(|n| delay(&p, n, "x", 1).as_millis()).collect();
        assert_eq!(d, [25, 50, 100, 200, 400, 800, 1000]);
    }
}
