//! What a client's request brings to its dispatch: who calls, what it asked for in its
//! metadata, and the one policy snapshot it took at its start; and where a call's deadline
//! is computed.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataKey, MetadataMap};

use crate::auth::Caller;
use crate::call::CallContext;
use crate::observe::traces::CallSpan;
use crate::policy::{Priority, Settings, Snapshot};
use crate::resilience::Receipt;
use crate::route::{Pick, Route};

/// What the edge read from a client's request metadata (`api::context` reads it).
#[derive(Clone, Debug)]
pub struct EdgeContext {
    /// The client's `x-request-id` or a generated one.
    pub request_id: Arc<str>,
    /// The client's deadline, counted from the call's arrival, and the time it gave, if it
    /// sent a `grpc-timeout`.
    pub client_deadline: Option<(Instant, Duration)>,
    /// Metadata to forward, shared by the call's contexts and attempts: cloned only where
    /// an attempt adds to it (the upstream's request id, retry number and trace).
    pub metadata: Arc<MetadataMap>,
}

/// A bound on one call's deadline, below the client's and the route's.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cap {
    /// A deadline the call must not pass (a fallback never gets more time than the call it
    /// stands in for).
    pub at: Option<Instant>,
    /// Give up the route's `deadline_margin` before the deadline, so a fallback's answer
    /// still reaches the client in time.
    pub leave_margin: bool,
}

impl EdgeContext {
    /// The context of one call starting now, under `snapshot`, taking `route`: its deadline
    /// is the smallest of the client's, the route's `timeout` and `max_timeout`, so no call
    /// is without one, and then `cap` ([`EdgeContext::deadline`], the one place a call's
    /// deadline is decided).
    pub fn call(
        &self,
        snapshot: &Arc<Snapshot>,
        route: Route,
        trace: Option<CallSpan>,
        cap: Cap,
    ) -> CallContext {
        let (deadline, budget) = self.deadline(&route.settings, cap);
        let margin = route.settings.deadline_margin;
        CallContext {
            request_id: self.request_id.clone(),
            deadline,
            budget,
            margin,
            metadata: self.metadata.clone(),
            snapshot: snapshot.clone(),
            route,
            receipt: Receipt::default(),
            trace,
            pinned: false,
            priority: Priority::Interactive,
        }
    }
}

impl EdgeContext {
    /// The deadline of a call starting now under `settings`, and the time it has: the
    /// smallest of the client's deadline, `timeout` and `max_timeout`, then `cap`.
    pub fn deadline(&self, settings: &Settings, cap: Cap) -> (Instant, Duration) {
        let now = Instant::now();
        let most = settings.timeout.min(settings.max_timeout);
        let (mut deadline, mut budget) = match self.client_deadline {
            Some((deadline, budget)) if budget <= most => (deadline, budget),
            _ => (now + most, most),
        };
        let mut bound = cap.at.unwrap_or(deadline);
        if cap.leave_margin {
            bound = bound.checked_sub(settings.deadline_margin).unwrap_or(bound);
        }
        if bound < deadline {
            deadline = bound.max(now);
            budget = bound.saturating_duration_since(now);
        }
        (deadline, budget)
    }
}

/// `traceparent`, parsed once.
static TRACEPARENT: LazyLock<MetadataKey<Ascii>> =
    LazyLock::new(|| MetadataKey::from_static("traceparent"));

/// What one client request keeps from its start: its edge context, its policy snapshot,
/// its peer and its caller.
pub struct Edge {
    /// What its metadata said.
    pub ctx: EdgeContext,
    /// The policy it is served under from start to end.
    pub snapshot: Arc<Snapshot>,
    /// The client's address.
    pub peer: Option<std::net::SocketAddr>,
    /// The API the client used: `v2`, or `v1` for the legacy PredictionService.
    pub api: &'static str,
    /// The authenticated tenant; `None` when the policy defines no tenants.
    pub caller: Option<Caller>,
}

impl Edge {
    /// The calling tenant's name, when the policy defines tenants.
    pub fn tenant(&self) -> Option<&str> {
        self.caller.as_ref().map(Caller::name)
    }

    /// The caller's priority class; interactive without tenants.
    pub fn priority(&self) -> Priority {
        self.caller
            .as_ref()
            .map_or(Priority::Interactive, Caller::priority)
    }

    /// Whether the caller may see and call `model` (anyone may without tenants).
    pub fn may_call(&self, model: &str) -> bool {
        self.caller.as_ref().is_none_or(|c| c.may_call(model))
    }

    /// What picks the call's route: its request id and metadata.
    pub fn pick(&self) -> Pick<'_> {
        Pick {
            request_id: &self.ctx.request_id,
            metadata: Some(&self.ctx.metadata),
        }
    }

    /// The trace id of the client's W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
    pub fn trace_id(&self) -> Option<&str> {
        let tp = self.ctx.metadata.get(&*TRACEPARENT)?.to_str().ok()?;
        tp.split('-').nth(1).filter(|t| t.len() == 32)
    }
}
