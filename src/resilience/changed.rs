//! How state that others read (a breaker, an upstream's endpoints) says it has changed, so
//! the health view recomputes at once instead of at its next tick.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Tells a listener that some state it reads has changed; tells no one until given one.
/// Tells that come before the listener wakes count once.
#[derive(Clone, Debug, Default)]
pub struct Changed(Option<Arc<Notify>>);

impl Changed {
    /// Tells `listener`.
    pub fn to(listener: Arc<Notify>) -> Changed {
        Changed(Some(listener))
    }

    /// Says that a change happened.
    pub fn tell(&self) {
        if let Some(n) = &self.0 {
            n.notify_one();
        }
    }

    /// Says at `at` that a change happens then by time alone (an open breaker turning
    /// half-open, an ejection ending). Needs a Tokio runtime; without one, or without a
    /// listener, does nothing.
    pub fn tell_at(&self, at: Instant) {
        let (Some(n), Ok(runtime)) = (&self.0, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let n = n.clone();
        runtime.spawn(async move {
            tokio::time::sleep_until(at).await;
            n.notify_one();
        });
    }
}
