//! What travels with every call from the edge to the backend: request id, deadline, the
//! client metadata to pass on, and the policy snapshot the call took at its start.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use crate::policy::Snapshot;

/// Per-call context, built once at the edge.
#[derive(Clone, Debug)]
pub struct CallContext {
    /// The `x-request-id` the client sent, or one Keel generated.
    pub request_id: Arc<str>,
    /// When the call must be answered: the client's deadline or the policy default.
    pub deadline: Instant,
    /// The time the call had when it arrived (for error messages).
    pub budget: Duration,
    /// Client metadata to forward upstream (hop-by-hop and transport headers removed).
    pub metadata: MetadataMap,
    /// The policy this call uses from start to end, whatever is swapped in meanwhile.
    pub snapshot: Arc<Snapshot>,
}

impl CallContext {
    /// Time left before the deadline; zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// A request body with its context.
#[derive(Clone, Debug)]
pub struct Call<T> {
    /// The context.
    pub ctx: CallContext,
    /// The request.
    pub body: T,
}

/// A model and optional version, as the metadata RPCs name them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRef {
    /// Model name.
    pub name: String,
    /// Version; empty lets the backend choose.
    pub version: String,
}

impl<T> crate::resilience::HasDeadline for Call<T> {
    fn deadline(&self) -> Instant {
        self.ctx.deadline
    }
    fn budget(&self) -> Duration {
        self.ctx.budget
    }
}
