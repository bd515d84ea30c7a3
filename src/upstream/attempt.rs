//! What a backend gets for one attempt of a call.
//!
//! The resilience layers work on a [`crate::call::Call`]: its context holds the policy
//! snapshot and the route, because they decide from them (retry rules, budgets, breakers).
//! A backend decides nothing of the kind: it sends one attempt and says how it went. So it
//! gets an [`Attempt`], which holds what one attempt needs and nothing of the route or the
//! policy that chose it; `upstream/` depends on neither `call` nor `route`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use crate::observe::traces::CallSpan;
use crate::resilience::Receipt;

/// One attempt of a call, as its backend sees it.
#[derive(Debug)]
pub struct Attempt<T> {
    /// The request, shared by every attempt of the call.
    pub body: Arc<T>,
    /// The call's request id: the same on every attempt, so an upstream can tell retries of
    /// one call from new calls.
    pub request_id: Arc<str>,
    /// The client metadata to pass on (hop-by-hop and transport headers removed), shared
    /// with the call: a backend that sends it clones it to add its own.
    pub metadata: Arc<MetadataMap>,
    /// Which attempt this is, 1 for the first.
    pub number: u32,
    /// The time the call and this attempt have.
    pub timing: Timing,
    /// The endpoint (`host:port`) the attempt before this one went to: a retry goes
    /// elsewhere where it can.
    pub avoid: Option<Arc<str>>,
    /// The call's SERVER span, when tracing is on: the attempt's span is its child.
    pub trace: Option<CallSpan>,
    /// The call's receipt, where the backend writes who answered ([`Receipt::served`]).
    pub receipt: Receipt,
}

impl<T> Attempt<T> {
    /// The same attempt with another body (a query derived from the request).
    pub fn with_body<U>(&self, body: Arc<U>) -> Attempt<U> {
        Attempt {
            body,
            request_id: self.request_id.clone(),
            metadata: self.metadata.clone(),
            number: self.number,
            timing: self.timing,
            avoid: self.avoid.clone(),
            trace: self.trace.clone(),
            receipt: self.receipt.clone(),
        }
    }

    /// A first attempt of Keel's own (not a client's): no client metadata, nothing to
    /// write in a client's receipt, `deadline` and no margin.
    pub fn own(request_id: Arc<str>, body: T, deadline: Instant) -> Attempt<T> {
        Attempt {
            body: Arc::new(body),
            request_id,
            metadata: Arc::default(),
            number: 1,
            timing: Timing {
                deadline,
                margin: Duration::ZERO,
                budget: deadline.saturating_duration_since(Instant::now()),
                per_try: None,
            },
            avoid: None,
            trace: None,
            receipt: Receipt::default(),
        }
    }
}

/// When a call and one of its attempts must end.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// When the call must be answered.
    pub deadline: Instant,
    /// The policy's `deadline_margin`: an upstream is given the deadline less this, so Keel
    /// can still answer (fall back, say why) after the upstream gives up.
    pub margin: Duration,
    /// The time the call had when it arrived.
    pub budget: Duration,
    /// When this attempt must end and the per-try timeout that says so, if one applies.
    pub per_try: Option<(Instant, Duration)>,
}

impl Timing {
    /// Time this attempt may take: until the call's deadline less the margin, or the
    /// per-try deadline if sooner. Zero when nothing is left.
    pub fn left(&self) -> Duration {
        let call_end = self
            .deadline
            .checked_sub(self.margin)
            .unwrap_or(self.deadline);
        let end = self.per_try.map_or(call_end, |(at, _)| at.min(call_end));
        end.saturating_duration_since(Instant::now())
    }

    /// Whether a timeout seen `now` is the call's: too little of its time is left for
    /// another attempt to be worth it.
    pub fn call_ran_out(&self, now: Instant) -> bool {
        now + self.margin >= self.deadline
    }

    /// The per-try timeout, if it is what ended an attempt at `now`.
    pub fn try_ran_out(&self, now: Instant) -> Option<Duration> {
        self.per_try
            .and_then(|(at, after)| (now >= at).then_some(after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(deadline_in: u64, margin: u64, per_try_in: Option<u64>) -> Timing {
        let now = Instant::now();
        Timing {
            deadline: now + Duration::from_millis(deadline_in),
            margin: Duration::from_millis(margin),
            budget: Duration::from_millis(deadline_in),
            per_try: per_try_in.map(|t| (now + Duration::from_millis(t), Duration::from_millis(t))),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_has_the_call_s_time_less_the_margin_or_its_own_if_sooner() {
        assert_eq!(timing(1000, 100, None).left(), Duration::from_millis(900));
        assert_eq!(
            timing(1000, 100, Some(300)).left(),
            Duration::from_millis(300)
        );
        assert_eq!(
            timing(1000, 100, Some(950)).left(),
            Duration::from_millis(900)
        );
        // A margin larger than the time left leaves the attempt none.
        assert_eq!(timing(50, 100, None).left(), Duration::ZERO);
        let t = timing(1000, 100, None);
        tokio::time::advance(Duration::from_millis(2000)).await;
        assert_eq!(t.left(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_is_the_call_s_only_within_the_margin_of_its_deadline() {
        let t = timing(1000, 100, Some(300));
        let start = Instant::now();
        assert!(!t.call_ran_out(start + Duration::from_millis(800)));
        assert!(t.call_ran_out(start + Duration::from_millis(900)));
        assert_eq!(t.try_ran_out(start + Duration::from_millis(299)), None);
        assert_eq!(
            t.try_ran_out(start + Duration::from_millis(300)),
            Some(Duration::from_millis(300))
        );
    }
}
