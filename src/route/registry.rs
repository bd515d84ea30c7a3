//! The runtime state kept across policy swaps (upstream connections, breakers, budgets,
//! latency, contracts, limiters, caches, canary analyses), and the one place an upstream's
//! backend is built for its protocol.
//!
//! Each entry keeps the settings it was built with: a swap that changes them gets a fresh
//! entry, others keep their state (and an upstream its connections).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{cache, canary};
use crate::contract::Contracts;
use crate::observe::Metrics;
use crate::observe::metrics::RuntimeState;
use crate::policy::{Policy, UpstreamSpec};
use crate::resilience::{BreakerCell, Changed, Latency, Limiter, RetryBudget};
use crate::upstream::Backend;
use crate::upstream::grpc::GrpcUpstream;

/// Runtime state kept across policy swaps, by name (upstream) or by (model, upstream).
#[derive(Default)]
pub(super) struct Registry {
    /// Each upstream's backend, with the spec it was built from.
    pub(super) upstreams: BTreeMap<String, (UpstreamSpec, Arc<dyn UpstreamBackend>)>,
    pub(super) budgets: BTreeMap<String, Arc<RetryBudget>>,
    pub(super) breakers: BTreeMap<(String, String), Arc<BreakerCell>>,
    pub(super) latency: BTreeMap<(String, String), Arc<Latency>>,
    pub(super) contracts: BTreeMap<(String, String), Arc<Contracts>>,
    pub(super) limiters: BTreeMap<String, Arc<Limiter>>,
    pub(super) caches: BTreeMap<String, Arc<cache::ResponseCache>>,
    pub(super) analyses: BTreeMap<String, Arc<canary::Analysis>>,
}

impl Registry {
    /// The backend of upstream `name` in `policy`: the one built before while its spec is
    /// unchanged, else a fresh one from its protocol's [`Connect`]. `None` when the policy
    /// names no such upstream.
    pub(super) fn upstream(
        &mut self,
        name: &str,
        policy: &Policy,
        handles: &Handles,
    ) -> Option<Arc<dyn Backend>> {
        let spec = policy.upstreams.get(name)?;
        if let Some((built_spec, up)) = self.upstreams.get(name)
            && built_spec == spec
        {
            return Some(up.clone() as Arc<dyn Backend>);
        }
        let up = connector(Protocol::of(spec)).connect(name, spec, handles);
        self.upstreams
            .insert(name.to_string(), (spec.clone(), up.clone()));
        Some(up as Arc<dyn Backend>)
    }

    /// The state the metrics scrape reports: breakers per (model, upstream), endpoint
    /// standings, and per-model in-flight and queued calls.
    pub(super) fn runtime_state(&self, into: &mut RuntimeState) {
        for ((model, upstream), b) in &self.breakers {
            into.breakers.push((
                model.clone(),
                upstream.clone(),
                b.state() as i64,
                b.trips_total(),
            ));
        }
        for (name, (_, up)) in &self.upstreams {
            for (endpoint, state) in up.endpoint_states() {
                into.endpoints.push((name.clone(), endpoint, state));
            }
        }
        for (model, l) in &self.limiters {
            into.models.push((
                model.clone(),
                i64::from(l.in_flight()),
                i64::from(l.queued()),
            ));
        }
    }
}

/// The registry entry for `key` if `same` says its settings still hold, else a fresh one.
pub(super) fn keep<K: Ord, V>(
    map: &mut BTreeMap<K, Arc<V>>,
    key: K,
    same: impl Fn(&V) -> bool,
    make: impl FnOnce() -> V,
) -> Arc<V> {
    match map.get(&key) {
        Some(v) if same(v) => v.clone(),
        _ => {
            let v = Arc::new(make());
            map.insert(key, v.clone());
            v
        }
    }
}

/// What every upstream's backend is built with, whatever its protocol: the router's
/// shared handles.
pub(super) struct Handles {
    /// The largest message a backend may send or take.
    pub(super) max_message_size: usize,
    /// Where the backend counts its calls.
    pub(super) metrics: Arc<Metrics>,
    /// Told when an endpoint's standing changes, so the health view recomputes at once.
    pub(super) changed: Changed,
}

/// A backend reached over endpoints, as the registry keeps it: what calls go to, and how
/// its endpoints stand for the metrics scrape.
pub(super) trait UpstreamBackend: Backend {
    /// Each endpoint with its standing (0 serving, 1 failing checks, 2 ejected).
    fn endpoint_states(&self) -> Vec<(String, i64)>;
}

/// Builds the backend of an upstream that speaks one protocol.
pub(super) trait Connect: Sync {
    /// The backend of upstream `name` as `spec` describes it; must run inside a Tokio
    /// runtime (pools start their background work here).
    fn connect(
        &self,
        name: &str,
        spec: &UpstreamSpec,
        handles: &Handles,
    ) -> Arc<dyn UpstreamBackend>;
}

/// The protocol an upstream speaks, which picks the [`Connect`] that builds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Protocol {
    /// The KServe Open Inference Protocol v2 over gRPC ([`GrpcUpstream`]).
    OipGrpc,
}

impl Protocol {
    /// The protocol of `spec`. Every `[upstreams.<name>]` is an OIP gRPC server: the
    /// policy names no other kind (the embedded models are not an upstream).
    fn of(_spec: &UpstreamSpec) -> Protocol {
        Protocol::OipGrpc
    }
}

/// The factory of each protocol, in one place. A new upstream protocol: implement
/// [`Connect`] (and [`UpstreamBackend`] for its backend), add a [`Protocol`] variant that
/// [`Protocol::of`] tells from the spec, and add it here.
fn connector(protocol: Protocol) -> &'static dyn Connect {
    match protocol {
        Protocol::OipGrpc => &OipGrpc,
    }
}

/// Builds [`GrpcUpstream`]s.
struct OipGrpc;

impl Connect for OipGrpc {
    fn connect(
        &self,
        name: &str,
        spec: &UpstreamSpec,
        handles: &Handles,
    ) -> Arc<dyn UpstreamBackend> {
        GrpcUpstream::new(
            name,
            spec,
            handles.max_message_size,
            handles.metrics.clone(),
            handles.changed.clone(),
        )
    }
}

impl UpstreamBackend for GrpcUpstream {
    fn endpoint_states(&self) -> Vec<(String, i64)> {
        GrpcUpstream::endpoint_states(self)
    }
}
