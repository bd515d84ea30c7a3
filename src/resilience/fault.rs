//! Fault injection: the policy's `fault` settings (or a request's `keel-fault` metadata,
//! where the policy allows it) delay or abort an attempt just before the backend call, so
//! the resilience stack above sees exactly what a sick backend would give it.
//!
//! Which attempts are hit is chosen from a hash of the request id, the attempt number
//! (counting the attempts a Keel in front already made, from `grpc-previous-rpc-attempts`)
//! and the policy's seed (from its content hash), so a run is replayable on every replica
//! with the same policy, and a retry of an aborted attempt is a fresh draw. A Keel on its
//! embedded backend with a fault policy is thus a sick model server for another Keel.

use std::time::Duration;

use tonic::metadata::MetadataMap;
use tower::Layer;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::passthrough::{Gate, Gated, Next, Passthrough, take};
use crate::call::Call;
use crate::error::Error;
use crate::headers::PREVIOUS_ATTEMPTS;
use crate::policy::{Abort, Delay, Fault, parse_code};
use crate::resilience::Pushback;

/// The metadata a request asks for a fault with (`abort=unavailable`, `delay=200ms`,
/// `pushback=100ms`, comma-separated), honoured only when the policy's
/// `fault.allow_request` is true.
pub const REQUEST_FAULT: &str = "keel-fault";

/// What to do to one attempt.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Decision {
    /// Wait this long first.
    pub delay: Option<Duration>,
    /// Then answer this error instead of calling the backend.
    pub abort: Option<(tonic::Code, Pushback)>,
}

impl Decision {
    fn is_none(&self) -> bool {
        self.delay.is_none() && self.abort.is_none()
    }
}

/// A point in [0, 100) for (`request_id`, `attempt`, the policy's `seed`) and a salt, so
/// delay and abort are drawn independently.
fn draw(request_id: &str, seed: u64, attempt: u64, salt: u64) -> f64 {
    let h = xxh3_64_with_seed(
        request_id.as_bytes(),
        seed ^ attempt.wrapping_mul(0x9e37_79b9) ^ salt,
    );
    (h >> 11) as f64 / (1u64 << 53) as f64 * 100.0
}

/// A fault a request asked for in `keel-fault` metadata; `Err` names what is wrong.
pub fn parse_request_fault(text: &str) -> Result<Fault, String> {
    let mut fault = Fault::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not key=value"))?;
        match key.trim() {
            "abort" => {
                let code = parse_code(value.trim())
                    .filter(|c| *c != tonic::Code::Ok)
                    .ok_or_else(|| format!("{value:?} is not a status code name"))?;
                fault.abort = Some(Abort {
                    percent: 100.0,
                    code,
                });
            }
            "delay" => {
                let duration = crate::policy::parse_duration(value.trim())?;
                fault.delay = Some(Delay {
                    percent: 100.0,
                    duration: duration.min(Duration::from_secs(3600)),
                });
            }
            "pushback" => fault.pushback = Some(crate::policy::parse_duration(value.trim())?),
            other => return Err(format!("unknown fault {other:?} (abort, delay, pushback)")),
        }
    }
    Ok(fault)
}

/// What `fault` (and, where it allows, the request's `keel-fault`) does to attempt
/// `attempt` of `request_id` under the policy seeded `seed`.
pub fn decide(
    fault: Option<&Fault>,
    metadata: &MetadataMap,
    request_id: &str,
    seed: u64,
    attempt: u32,
) -> Decision {
    let asked = fault
        .filter(|f| f.allow_request)
        .and_then(|_| metadata.get(REQUEST_FAULT)?.to_str().ok())
        .and_then(|text| match parse_request_fault(text) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!(request_id, error = %e, "ignoring keel-fault metadata");
                None
            }
        });
    let Some(fault) = asked.as_ref().or(fault) else {
        return Decision::default();
    };
    let previous: u64 = metadata
        .get(PREVIOUS_ATTEMPTS)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let attempt = previous + u64::from(attempt);
    let delay = fault
        .delay
        .as_ref()
        .filter(|d| draw(request_id, seed, attempt, 1) < d.percent)
        .map(|d| d.duration);
    let abort = fault
        .abort
        .as_ref()
        .filter(|a| draw(request_id, seed, attempt, 2) < a.percent)
        .map(|a| {
            let pushback = fault.pushback.map_or(Pushback::None, Pushback::After);
            (a.code, pushback)
        });
    Decision { delay, abort }
}

/// Applies [`FaultService`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultLayer;

impl<S> Layer<S> for FaultLayer {
    type Service = FaultService<S>;
    fn layer(&self, inner: S) -> FaultService<S> {
        Gated::new(inner, *self)
    }
}

/// Delays or aborts attempts as the call's settings say; other attempts pass untouched.
pub type FaultService<S> = Gated<S, FaultLayer>;

impl<Op: Send + Sync + 'static> Gate<Op> for FaultLayer {
    fn gate<S: Next<Op>>(
        &self,
        call: Call<Op>,
        inner: &mut S,
    ) -> Passthrough<S::Future, S::Response> {
        let ctx = &call.ctx;
        let fault = ctx.route.settings.fault.as_ref();
        if fault.is_none() {
            return Passthrough::inner(inner.call(call));
        }
        let seed = ctx.snapshot.seed;
        let decision = decide(fault, &ctx.metadata, &ctx.request_id, seed, call.attempt);
        if decision.is_none() {
            return Passthrough::inner(inner.call(call));
        }
        tracing::debug!(
            request_id = %ctx.request_id,
            model = %ctx.route.model,
            attempt = call.attempt,
            delay_ms = decision.delay.map(|d| d.as_millis() as u64),
            abort = decision.abort.map(|(c, _)| crate::grpc_code::name(c)),
            "injecting a fault"
        );
        let mut inner = take(inner);
        Passthrough::own(async move {
            if let Some(d) = decision.delay {
                tokio::time::sleep(d).await;
            }
            match decision.abort {
                Some((code, pushback)) => Err(Error::FaultInjected { code, pushback }),
                None => inner.call(call).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy's seed, as `Snapshot::seed` gives it.
    const SEED: u64 = 0x5eed;

    fn fault(abort: f64, delay: f64) -> Fault {
        Fault {
            abort: Some(Abort {
                percent: abort,
                code: tonic::Code::Unavailable,
            }),
            delay: Some(Delay {
                percent: delay,
                duration: Duration::from_millis(7),
            }),
            pushback: Some(Duration::from_millis(30)),
            allow_request: false,
        }
    }

    #[test]
    fn the_share_hit_matches_the_percent_and_is_replayable() {
        let f = fault(10.0, 25.0);
        let md = MetadataMap::new();
        let (mut aborts, mut delays) = (0, 0);
        for i in 0..10_000 {
            let id = format!("r{i}");
            let d = decide(Some(&f), &md, &id, SEED, 1);
            assert_eq!(d, decide(Some(&f), &md, &id, SEED, 1), "replayable");
            aborts += usize::from(d.abort.is_some());
            delays += usize::from(d.delay.is_some());
        }
        assert!((800..=1200).contains(&aborts), "{aborts}");
        assert!((2300..=2700).contains(&delays), "{delays}");
        assert_eq!(
            decide(Some(&fault(100.0, 0.0)), &md, "x", SEED, 1).abort,
            Some((
                tonic::Code::Unavailable,
                Pushback::After(Duration::from_millis(30))
            ))
        );
    }

    #[test]
    fn a_retry_is_a_fresh_draw_counting_the_attempts_made_in_front() {
        let f = fault(50.0, 0.0);
        let md = MetadataMap::new();
        let differ = (0..100)
            .filter(|i| {
                let id = format!("r{i}");
                decide(Some(&f), &md, &id, SEED, 1).abort
                    != decide(Some(&f), &md, &id, SEED, 2).abort
            })
            .count();
        assert!(differ > 20, "{differ}");
        let mut front = MetadataMap::new();
        front.insert(PREVIOUS_ATTEMPTS, "1".parse().unwrap());
        for i in 0..100 {
            let id = format!("r{i}");
            assert_eq!(
                decide(Some(&f), &front, &id, SEED, 1),
                decide(Some(&f), &md, &id, SEED, 2),
                "the second attempt overall"
            );
        }
    }

    #[test]
    fn a_request_asks_for_a_fault_only_where_the_policy_allows_it() {
        let mut md = MetadataMap::new();
        md.insert(
            REQUEST_FAULT,
            "abort=resource_exhausted, delay=5ms".parse().unwrap(),
        );
        let off = fault(0.0, 0.0);
        assert_eq!(decide(Some(&off), &md, "x", SEED, 1), Decision::default());
        assert_eq!(decide(None, &md, "x", SEED, 1), Decision::default());
        let allowed = Fault {
            allow_request: true,
            ..off
        };
        let d = decide(Some(&allowed), &md, "x", SEED, 1);
        assert_eq!(
            d.abort,
            Some((tonic::Code::ResourceExhausted, Pushback::None))
        );
        assert_eq!(d.delay, Some(Duration::from_millis(5)));
        assert!(parse_request_fault("abort=teapot").is_err());
        assert!(parse_request_fault("explode=1").is_err());
    }
}
