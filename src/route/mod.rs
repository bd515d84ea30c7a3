//! Which backend answers each call, decided from the call's policy snapshot, the resilience
//! state of each target, and the tower service that sends an attempt there.
//!
//! Routes are compiled from a snapshot once per revision and cached, so every call uses the
//! routes of the very snapshot it took at its start. Upstream connections are runtime state
//! kept in a registry outside the snapshot: a swap that leaves an upstream's settings alone
//! keeps its connections.
//!
//! # Files
//!
//! - `mod.rs`: [`Target`], [`Route`] and the [`Router`], which caches each revision's routes.
//! - `select.rs`: choosing a call's route ([`Routes`], [`Pick`]): weights, the route key
//!   hash, flags, the pinned version, `keel-route`; its `# Determinism` contract.
//! - `health.rs`: how each routed model stands ([`ModelHealth`]).
//! - `compile.rs`: compiling a snapshot's routes, model by model, and each target.
//! - `builtin.rs`: what the policy's built-in check asks of the embedded models
//!   ([`crate::policy::builtin::Builtin`]).
//! - `registry.rs`: the state kept across swaps, and the factory that builds an upstream's
//!   backend for its protocol (the one place a new upstream protocol is added).
//! - `deliver.rs`: [`Deliver`], the innermost tower service.
//! - `ladder.rs`, `cache.rs`, `canary.rs`: the fallback ladder, the response cache and the
//!   canary analysis.

mod builtin;
pub mod cache;
pub mod canary;
mod compile;
mod deliver;
mod health;
pub mod ladder;
mod registry;
mod select;

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;

use crate::contract::Contracts;
use crate::observe::Metrics;
use crate::observe::metrics::RuntimeState;
use crate::policy::{Settings, Snapshot};
use crate::resilience::{BreakerCell, Changed, Latency, Limiter, RetryBudget};
use crate::upstream::Backend;
use crate::upstream::embedded::Embedded;

pub use deliver::Deliver;
pub use health::ModelHealth;
use registry::{Handles, Registry};
pub use select::{Pick, ROUTE_OVERRIDE, Routes};

/// One backend a model's calls may go to, with the resilience state kept for it.
#[derive(Debug)]
pub struct Target {
    /// The backend.
    pub backend: Arc<dyn Backend>,
    /// The upstream's name (`embedded` for the built-in models).
    pub upstream: Arc<str>,
    /// The breaker of this (model, upstream); `None` when disabled.
    pub breaker: Option<Arc<BreakerCell>>,
    /// The latency estimate of this (model, upstream).
    pub latency: Arc<Latency>,
    /// The retry budget of the upstream, shared by every model on it.
    pub budget: Arc<RetryBudget>,
    /// The model's contract on this backend, fetched and cached for validation.
    pub contracts: Arc<Contracts>,
}

/// Where one call goes and under which settings: what the edge puts in the call context.
#[derive(Clone, Debug)]
pub struct Route {
    /// The model.
    pub model: Arc<str>,
    /// The chosen target.
    pub target: Arc<Target>,
    /// The call's effective settings (model > method > defaults).
    pub settings: Arc<Settings>,
    /// The model's concurrency limiter.
    pub limiter: Arc<Limiter>,
    /// The route's name (`name`, else its version, else its backend).
    pub name: Arc<str>,
    /// The model version the route sends, replacing the client's; `None` passes it on.
    pub version: Option<Arc<str>>,
    /// The canary analysis this call counts in, and on which side.
    pub canary: Option<(Arc<canary::Analysis>, canary::Side)>,
}

/// The routes of one revision, as cached by the router.
struct Compiled {
    revision: u64,
    routes: Arc<Routes>,
}

/// What Keel does with a canary's verdict: the server takes the canary out of the policy.
pub type RollbackSink = Box<dyn Fn(&canary::Verdict) + Send + Sync>;

/// Compiles and caches the routes of each snapshot; owns the state that outlives them.
pub struct Router {
    embedded: Arc<Embedded>,
    /// What every upstream's backend is built with.
    handles: Handles,
    registry: Mutex<Registry>,
    compiled: ArcSwapOption<Compiled>,
    rollback: std::sync::OnceLock<RollbackSink>,
    /// Told when a breaker opens or closes or an endpoint's standing changes: the health
    /// view recomputes at once instead of at its next tick.
    health_changed: Arc<tokio::sync::Notify>,
}

impl Router {
    /// A router over `embedded`; upstream channels are created lazily, in a Tokio runtime.
    pub fn new(
        embedded: Arc<Embedded>,
        max_message_size: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Router> {
        let health_changed = Arc::new(tokio::sync::Notify::new());
        Arc::new(Router {
            embedded,
            handles: Handles {
                max_message_size,
                metrics,
                changed: Changed::to(health_changed.clone()),
            },
            registry: Mutex::new(Registry::default()),
            compiled: ArcSwapOption::empty(),
            rollback: std::sync::OnceLock::new(),
            health_changed,
        })
    }

    /// Notified when something the health view reads has changed (a breaker, an
    /// endpoint's standing).
    pub fn health_changed(&self) -> &Arc<tokio::sync::Notify> {
        &self.health_changed
    }

    /// Sets what happens to a canary's verdict (once; later calls are ignored).
    pub fn on_rollback(&self, sink: RollbackSink) {
        let _ = self.rollback.set(sink);
    }

    /// Acts on a canary's verdict: says at WARN what was compared, then rolls it back.
    pub fn condemn(&self, verdict: &canary::Verdict) {
        tracing::warn!(
            model = %verdict.model,
            route = %verdict.route,
            canary_calls = verdict.canary.calls,
            canary_error_rate = verdict.canary.error_rate(),
            canary_p99_ms = verdict.canary.p99.as_secs_f64() * 1000.0,
            baseline_calls = verdict.baseline.calls,
            baseline_error_rate = verdict.baseline.error_rate(),
            baseline_p99_ms = verdict.baseline.p99.as_secs_f64() * 1000.0,
            windows = verdict.windows,
            "rolling back canary: {verdict}"
        );
        match self.rollback.get() {
            Some(sink) => sink(verdict),
            None => {
                tracing::warn!(model = %verdict.model, "no rollback is wired: the canary keeps its weight")
            }
        }
    }

    /// The embedded backend.
    pub fn embedded(&self) -> &Arc<Embedded> {
        &self.embedded
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.handles.metrics
    }

    /// The resilience state kept across swaps, for the metrics scrape: breakers per
    /// (model, upstream), endpoint standings, and per-model in-flight and queued calls.
    pub fn runtime_state(&self, into: &mut RuntimeState) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .runtime_state(into);
    }

    /// The routes of `snapshot`, compiled on first use of its revision.
    pub fn routes(&self, snapshot: &Snapshot) -> Arc<Routes> {
        if let Some(c) = self.compiled.load().as_ref()
            && c.revision == snapshot.revision
        {
            return c.routes.clone();
        }
        let routes = Arc::new(self.compile(&snapshot.policy));
        self.compiled.store(Some(Arc::new(Compiled {
            revision: snapshot.revision,
            routes: routes.clone(),
        })));
        routes
    }
}

#[cfg(test)]
mod tests;
