//! Slots for calls in flight, of which a share is kept for interactive calls: under load,
//! `batch` callers run out of slots first and are shed while interactive ones still get in.
//!
//! A batch call holds two permits: one of all the slots and one of the batch share (all
//! slots but the reserve). An interactive call holds only the first. So batch calls never
//! take the last `reserve` slots, and nothing waits on a priority queue.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::policy::Priority;

/// `total` slots, of which `reserve` only interactive calls may take.
#[derive(Debug)]
pub struct Slots {
    all: Arc<Semaphore>,
    /// The batch share; `None` when nothing is reserved.
    batch: Option<Arc<Semaphore>>,
    total: u32,
    reserve: u32,
}

/// A slot, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    _all: OwnedSemaphorePermit,
    _batch: Option<OwnedSemaphorePermit>,
}

impl Slots {
    /// `total` slots keeping `share` of them (rounded up) for interactive calls; at least
    /// one slot is always left to batch calls.
    pub fn new(total: u32, share: f64) -> Self {
        let reserve = reserved(total, share);
        Slots {
            all: Arc::new(Semaphore::new(total as usize)),
            batch: (reserve > 0).then(|| Arc::new(Semaphore::new((total - reserve) as usize))),
            total,
            reserve,
        }
    }

    /// Slots in all.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Slots only interactive calls may take.
    pub fn reserve(&self) -> u32 {
        self.reserve
    }

    /// For a refused call of `priority`: the slots it could not take because they are kept
    /// for interactive calls (`None` for an interactive call or without a reserve).
    pub fn reserved_from(&self, priority: Priority) -> Option<u32> {
        (priority == Priority::Batch && self.reserve > 0).then_some(self.reserve)
    }

    /// Slots taken now.
    pub fn in_flight(&self) -> u32 {
        self.total - self.all.available_permits() as u32
    }

    /// A slot for a call of `priority`, if one is free for it now.
    pub fn try_take(&self, priority: Priority) -> Option<Slot> {
        let batch = match (priority, &self.batch) {
            (Priority::Batch, Some(b)) => Some(b.clone().try_acquire_owned().ok()?),
            _ => None,
        };
        let all = self.all.clone().try_acquire_owned().ok()?;
        Some(Slot {
            _all: all,
            _batch: batch,
        })
    }

    /// Waits for a slot for a call of `priority`. Batch calls wait for their share first,
    /// so a batch waiter never holds a slot an interactive call could use.
    pub async fn take(&self, priority: Priority) -> Option<Slot> {
        let batch = match (priority, &self.batch) {
            (Priority::Batch, Some(b)) => Some(b.clone().acquire_owned().await.ok()?),
            _ => None,
        };
        let all = self.all.clone().acquire_owned().await.ok()?;
        Some(Slot {
            _all: all,
            _batch: batch,
        })
    }
}

/// Says, in a refusal's message, that a batch call was refused the reserved slots.
pub fn reserve_note(reserved: Option<u32>) -> String {
    match reserved {
        Some(1) => " for batch calls (1 slot is kept for interactive calls)".to_string(),
        Some(n) => format!(" for batch calls ({n} slots are kept for interactive calls)"),
        None => String::new(),
    }
}

/// The slots of `total` kept for interactive calls: `share` of them rounded up, but never
/// all of them.
fn reserved(total: u32, share: f64) -> u32 {
    let wanted = (f64::from(total) * share.clamp(0.0, 1.0)).ceil();
    // `wanted` is within 0..=total, so the conversion is exact.
    (wanted as u32).min(total.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_a_rounded_up_share_that_leaves_batch_a_slot() {
        assert_eq!(reserved(1024, 0.1), 103);
        assert_eq!(reserved(10, 0.1), 1);
        assert_eq!(reserved(4, 0.1), 1);
        assert_eq!(reserved(1, 0.1), 0, "one slot is batch's too");
        assert_eq!(reserved(4, 1.0), 3);
        assert_eq!(reserved(4, 0.0), 0);
    }

    #[test]
    fn batch_calls_leave_the_reserve_to_interactive_ones() {
        let s = Slots::new(4, 0.5);
        assert_eq!(s.reserve(), 2);
        let b1 = s.try_take(Priority::Batch).expect("a batch slot");
        let _b2 = s.try_take(Priority::Batch).expect("a second batch slot");
        assert!(
            s.try_take(Priority::Batch).is_none(),
            "the rest is reserved"
        );
        let _i1 = s.try_take(Priority::Interactive).expect("reserved slot");
        let _i2 = s.try_take(Priority::Interactive).expect("reserved slot");
        assert!(s.try_take(Priority::Interactive).is_none(), "all taken");
        assert_eq!(s.in_flight(), 4);
        drop(b1);
        assert_eq!(s.in_flight(), 3);
        assert!(
            s.try_take(Priority::Batch).is_some(),
            "a batch slot came back"
        );
    }

    #[test]
    fn interactive_calls_may_take_every_slot() {
        let s = Slots::new(3, 0.5);
        let held: Vec<_> = (0..3).map(|_| s.try_take(Priority::Interactive)).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(s.try_take(Priority::Batch).is_none());
        assert!(s.try_take(Priority::Interactive).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_batch_call_does_not_hold_a_slot() {
        let s = Arc::new(Slots::new(2, 0.5));
        let b = s.try_take(Priority::Batch).expect("batch share");
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.take(Priority::Batch).await.is_some() })
        };
        tokio::task::yield_now().await;
        assert_eq!(s.in_flight(), 1, "the waiter holds nothing");
        assert!(s.try_take(Priority::Interactive).is_some());
        drop(b);
        assert!(waiter.await.expect("no panic"));
    }
}
