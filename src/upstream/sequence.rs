//! Sequence affinity for stateful models (Triton's sequence batcher): the calls of one
//! sequence (`sequence_id`, from `sequence_start` to `sequence_end`) go to the endpoint
//! that took its first call, because that endpoint holds the sequence's state.
//!
//! A sequence call is never retried elsewhere, hedged or answered by a fallback (the route
//! treats it as not idempotent and the ladder passes it by); if its endpoint leaves the
//! pool, is ejected or fails its checks mid-sequence, the call fails with ABORTED
//! (`SEQUENCE_BROKEN`) rather than silently going elsewhere. A binding is dropped at
//! `sequence_end` or after `sequence_idle_timeout` without a call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::model::{InferRequest, Param};

/// A call's place in a sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marks {
    /// The sequence id, as text (Triton takes an unsigned integer or a string).
    pub id: String,
    /// The first call of the sequence.
    pub start: bool,
    /// The last call of the sequence.
    pub end: bool,
}

/// The sequence marks of `req`, if it belongs to a sequence (`sequence_id` present and not
/// 0 or empty, which Triton reads as "no sequence").
pub fn of(req: &InferRequest) -> Option<Marks> {
    let id = match req.parameters.get("sequence_id")? {
        Param::Int64(0) => return None,
        Param::Int64(n) => n.to_string(),
        Param::String(s) if s.is_empty() => return None,
        Param::String(s) => s.clone(),
        _ => return None,
    };
    let flag = |key: &str| matches!(req.parameters.get(key), Some(Param::Bool(true)));
    Some(Marks {
        id,
        start: flag("sequence_start"),
        end: flag("sequence_end"),
    })
}

/// (model, sequence id) → (endpoint address, last call).
type Bindings = HashMap<(String, String), (Arc<str>, Instant)>;

/// Which endpoint each live sequence is bound to.
#[derive(Debug)]
pub struct Affinity {
    idle_timeout: Duration,
    bound: Mutex<Bindings>,
}

impl Affinity {
    /// No sequences yet; a binding lapses after `idle_timeout` without a call.
    pub fn new(idle_timeout: Duration) -> Affinity {
        Affinity {
            idle_timeout,
            bound: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bindings> {
        self.bound.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoint sequence `marks.id` of `model` is bound to, unless the call starts a
    /// new sequence or the binding lapsed. Ends the binding at `sequence_end`.
    pub fn bound(&self, model: &str, marks: &Marks) -> Option<Arc<str>> {
        let now = Instant::now();
        let mut map = self.lock();
        let key = (model.to_string(), marks.id.clone());
        if marks.start {
            map.remove(&key);
            // Starts are the time to forget lapsed sequences, so the map stays bounded by
            // the sequences alive within the idle timeout.
            map.retain(|_, (_, last)| now.duration_since(*last) < self.idle_timeout);
            return None;
        }
        let (addr, last) = map.get_mut(&key)?;
        if now.duration_since(*last) >= self.idle_timeout {
            map.remove(&key);
            return None;
        }
        *last = now;
        let addr = addr.clone();
        if marks.end {
            map.remove(&key);
        }
        Some(addr)
    }

    /// Binds sequence `marks.id` of `model` to `addr` (unless the call also ends it).
    pub fn bind(&self, model: &str, marks: &Marks, addr: Arc<str>) {
        if !marks.end {
            self.lock().insert(
                (model.to_string(), marks.id.clone()),
                (addr, Instant::now()),
            );
        }
    }

    /// Forgets sequence `marks.id` of `model` (its endpoint is gone).
    pub fn forget(&self, model: &str, marks: &Marks) {
        self.lock().remove(&(model.to_string(), marks.id.clone()));
    }

    /// Sequences bound now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no sequence is bound.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(id: &str, start: bool, end: bool) -> Marks {
        Marks {
            id: id.into(),
            start,
            end,
        }
    }

    #[test]
    fn zero_and_empty_ids_are_no_sequence() {
        let mut r = InferRequest {
            model: "m".into(),
            version: String::new(),
            id: String::new(),
            parameters: Default::default(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            form: Default::default(),
            wire: Default::default(),
        };
        assert_eq!(of(&r), None);
        r.parameters.insert("sequence_id".into(), Param::Int64(0));
        assert_eq!(of(&r), None);
        r.parameters
            .insert("sequence_id".into(), Param::String("abc".into()));
        r.parameters
            .insert("sequence_start".into(), Param::Bool(true));
        assert_eq!(of(&r), Some(marks("abc", true, false)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_binding_lasts_until_the_end_or_the_idle_timeout() {
        let a = Affinity::new(Duration::from_secs(60));
        assert_eq!(a.bound("m", &marks("1", true, false)), None);
        a.bind("m", &marks("1", true, false), "e1".into());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(
            a.bound("m", &marks("1", false, false)).as_deref(),
            Some("e1")
        );
        // Each call renews it; the end call still goes to it, then it is gone.
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(
            a.bound("m", &marks("1", false, true)).as_deref(),
            Some("e1")
        );
        assert!(a.is_empty());
        // Idle past the timeout: lapsed.
        a.bind("m", &marks("2", true, false), "e2".into());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(a.bound("m", &marks("2", false, false)), None);
        assert!(a.is_empty());
        // The same id on another model is another sequence.
        a.bind("m", &marks("3", true, false), "e3".into());
        assert_eq!(a.bound("n", &marks("3", false, false)), None);
    }
}
