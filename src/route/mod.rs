//! Which backend answers each call, decided from the call's policy snapshot, the resilience
//! state of each target, and the tower service that sends an attempt there.
//!
//! Routes are compiled from a snapshot once per revision and cached, so every call uses the
//! routes of the very snapshot it took at its start. Upstream connections are runtime state
//! kept in a registry outside the snapshot: a swap that leaves an upstream's settings alone
//! keeps its connections.
//!
//! # Determinism
//!
//! A model with several weighted routes sends a call to the route chosen by a fixed hash
//! (FNV-1a, then a 64-bit finaliser) of its request id, or of the model's `route_key`
//! metadata when the call has it: the same id (or user) always takes the same route, and a
//! retried or replayed call stays where it went. Weights are shares among the routes that
//! are on (weight above 0, flag condition holding).

pub mod cache;
pub mod canary;
pub mod ladder;

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use tonic::metadata::MetadataMap;
use tower::Service;

use crate::call::Call;
use crate::contract::Contracts;
use crate::error::Error;
use crate::observe::Metrics;
use crate::observe::metrics::RuntimeState;
use crate::policy::{
    BackendRef, METHODS, ModelPolicy, Policy, PolicyError, PolicyErrors, Settings, Snapshot, Tier,
    UpstreamSpec, When,
};
use crate::resilience::{BreakerCell, Changed, Latency, Limiter, RetryBudget};
use crate::upstream::embedded::Embedded;
use crate::upstream::grpc::GrpcUpstream;
use crate::upstream::{Backend, BackendFuture, Operation};

/// Checks the parts of a policy that depend on what Keel has built in: every model routed
/// to `embedded` must be an embedded model. Opens nothing, so `keel validate` can use it.
pub fn check(policy: &Policy, embedded: &Embedded) -> Result<(), PolicyErrors> {
    let Some(models) = &policy.models else {
        return Ok(());
    };
    let mut problems = Vec::new();
    for (name, m) in models {
        for (i, r) in m.routes.iter().enumerate() {
            if r.backend == BackendRef::Embedded && !embedded.has_model(name) {
                let path = if m.routes.len() == 1 {
                    format!("models.{name}.backend")
                } else {
                    format!("models.{name}.routes[{i}].backend")
                };
                problems.push(PolicyError {
                    path,
                    message: format!(
                        "there is no embedded model named {name:?} (embedded models: {})",
                        embedded.model_names().collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
    }
    for (name, m) in models {
        for (i, f) in m.fallback.iter().enumerate() {
            if let Tier::Static(outputs) = &f.tier
                && let Err(message) = ladder::static_tensors(outputs)
            {
                problems.push(PolicyError {
                    path: format!("models.{name}.fallback[{i}].static"),
                    message,
                });
            }
        }
    }
    // Adapters and v1 mappings of models served only by embedded models are checked
    // against their contracts now; an upstream's contract is known at the first call.
    for (name, m) in models {
        let embedded_only = m.routes.iter().all(|r| r.backend == BackendRef::Embedded);
        let Some(contract) = embedded.contract(name).filter(|_| embedded_only) else {
            continue;
        };
        for (version, a) in &m.adapters {
            let at = format!("models.{name}.adapters.{version:?}");
            for (path, message) in crate::adapt::version::check(a, &contract, &at) {
                problems.push(PolicyError { path, message });
            }
        }
        if let Some(v1) = &m.v1 {
            let at = format!("models.{name}.v1");
            // A name may be the model's, or what an adapted version's clients call it.
            let views: Vec<_> = std::iter::once(contract.clone())
                .chain(
                    m.adapters
                        .values()
                        .map(|a| crate::adapt::version::client_contract(a, &contract)),
                )
                .collect();
            let has_input = |i: &str| views.iter().any(|c| c.input(i).is_some());
            let has_output = |o: &str| views.iter().any(|c| c.output(o).is_some());
            if let Some(input) = v1.input.as_deref().filter(|i| !has_input(i)) {
                problems.push(PolicyError {
                    path: format!("{at}.input"),
                    message: format!("model {name:?} has no input {input:?}"),
                });
            }
            if let Some(output) = v1.output.as_deref().filter(|o| !has_output(o)) {
                problems.push(PolicyError {
                    path: format!("{at}.output"),
                    message: format!("model {name:?} has no output {output:?}"),
                });
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PolicyErrors(problems))
    }
}

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

/// How one model stands, for health checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelHealth {
    /// The model.
    pub model: String,
    /// Whether Keel's readiness depends on it.
    pub required: bool,
    /// Why it cannot answer now; `None` when it can.
    pub problem: Option<String>,
}

/// What picks a call's route besides its model and version.
#[derive(Clone, Copy, Debug)]
pub struct Pick<'a> {
    /// The call's request id: the hash key when there is no `route_key` value.
    pub request_id: &'a str,
    /// The call's metadata: the `route_key` value and the `keel-route` override.
    pub metadata: Option<&'a MetadataMap>,
}

impl<'a> Pick<'a> {
    /// A pick by request id alone.
    pub fn by_id(request_id: &'a str) -> Self {
        Pick {
            request_id,
            metadata: None,
        }
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.metadata?.get(key)?.to_str().ok()
    }
}

/// The metadata that chooses a route by name, where the policy allows it.
pub const ROUTE_OVERRIDE: &str = "keel-route";

/// One compiled route of a model.
struct Entry {
    name: Arc<str>,
    target: Arc<Target>,
    version: Option<Arc<str>>,
    /// Zero when the route is off (weight 0 or its flag condition does not hold).
    weight: u64,
    canary: bool,
}

/// How one model's calls are routed.
struct ModelRoutes {
    model: Arc<str>,
    /// The fallback ladder, rungs whose flags are off left out.
    ladder: Vec<ladder::Step>,
    /// The response cache, if the model has one.
    cache: Option<Arc<cache::ResponseCache>>,
    /// Every route, in policy order; those that are off have weight 0.
    entries: Vec<Entry>,
    /// Versions clients may ask for; empty allows any.
    versions: Vec<String>,
    limiter: Arc<Limiter>,
    /// Effective settings per method, resolved once per revision.
    settings: BTreeMap<&'static str, Arc<Settings>>,
    /// The flag condition that switched the model off, when it did.
    switched_off: Option<When>,
    /// Metadata whose value picks the route.
    route_key: Option<String>,
    /// Whether `keel-route` may pick the route.
    route_override: bool,
    /// The canary analysis, while the canary takes calls.
    analysis: Option<Arc<canary::Analysis>>,
    /// Keel is ready only while this model can answer.
    required: bool,
}

impl ModelRoutes {
    fn route(&self, entry: &Entry, settings: Arc<Settings>) -> Route {
        let side = if entry.canary {
            canary::Side::Canary
        } else {
            canary::Side::Baseline
        };
        Route {
            model: self.model.clone(),
            target: entry.target.clone(),
            settings,
            limiter: self.limiter.clone(),
            name: entry.name.clone(),
            version: entry.version.clone(),
            canary: self.analysis.clone().map(|a| (a, side)),
        }
    }
}

/// The routes of one policy revision.
pub struct Routes {
    models: BTreeMap<String, ModelRoutes>,
}

impl Routes {
    /// The route of a call to `method` for `model` (`version`, empty for any), picked as
    /// `pick` says.
    ///
    /// A version the client pins goes to the routes that send that version, else to those
    /// that pass the client's version on; `keel-route`, where allowed, names the route.
    pub fn route(
        &self,
        method: &str,
        model: &str,
        version: &str,
        pick: &Pick<'_>,
    ) -> Result<Route, Error> {
        let routes = self.models.get(model).ok_or_else(|| Error::ModelNotFound {
            model: model.to_string(),
        })?;
        if let Some(condition) = &routes.switched_off {
            return Err(Error::ModelSwitchedOff {
                model: model.to_string(),
                condition: condition.to_string(),
            });
        }
        let not_found = |available: Vec<String>| Error::VersionNotFound {
            model: model.to_string(),
            version: version.to_string(),
            available,
        };
        if !version.is_empty()
            && !routes.versions.is_empty()
            && !routes.versions.iter().any(|v| v == version)
        {
            return Err(not_found(routes.versions.clone()));
        }
        let settings = routes
            .settings
            .get(method)
            .or_else(|| routes.settings.get(METHODS[0]))
            .cloned()
            .unwrap_or_default();
        if routes.route_override
            && let Some(name) = pick.get(ROUTE_OVERRIDE)
        {
            return match routes.entries.iter().find(|e| &*e.name == name) {
                Some(entry) => Ok(routes.route(entry, settings)),
                None => Err(Error::UnknownRoute {
                    model: model.to_string(),
                    route: name.to_string(),
                    routes: routes.entries.iter().map(|e| e.name.to_string()).collect(),
                }),
            };
        }
        let on = || routes.entries.iter().filter(|e| e.weight > 0);
        let candidates: Vec<&Entry> = if version.is_empty() {
            on().collect()
        } else {
            let sends = |e: &&Entry| e.version.as_deref() == Some(version);
            if on().any(|e| sends(&e)) {
                on().filter(sends).collect()
            } else {
                on().filter(|e| e.version.is_none()).collect()
            }
        };
        let total: u64 = candidates.iter().map(|e| e.weight).sum();
        if total == 0 {
            let mut available: Vec<String> = on()
                .filter_map(|e| e.version.as_deref().map(str::to_string))
                .collect();
            available.dedup();
            return Err(not_found(available));
        }
        let key = routes
            .route_key
            .as_deref()
            .and_then(|k| pick.get(k))
            .unwrap_or(pick.request_id);
        let mut point = share(key.as_bytes(), total);
        for entry in candidates {
            if point < entry.weight {
                return Ok(routes.route(entry, settings));
            }
            point -= entry.weight;
        }
        // Unreachable: the point is below the total.
        Err(not_found(vec![]))
    }

    /// The fallback ladder of `model`.
    pub fn ladder(&self, model: &str) -> &[ladder::Step] {
        self.models.get(model).map_or(&[], |m| &m.ladder)
    }

    /// The response cache of `model`, if any.
    pub fn cache(&self, model: &str) -> Option<&Arc<cache::ResponseCache>> {
        self.models.get(model)?.cache.as_ref()
    }

    /// The route of a call for `model` sent to a fallback `target` (another upstream); it
    /// counts in no canary analysis.
    pub fn route_to(&self, method: &str, model: &str, target: &Arc<Target>) -> Option<Route> {
        let routes = self.models.get(model)?;
        Some(Route {
            model: routes.model.clone(),
            target: target.clone(),
            settings: routes.settings.get(method).cloned().unwrap_or_default(),
            limiter: routes.limiter.clone(),
            name: target.upstream.clone(),
            version: None,
            canary: None,
        })
    }

    /// The versions clients may ask `model` for: the policy's `versions`, else those its
    /// routes send; empty when any version passes through.
    pub fn versions(&self, model: &str) -> Vec<String> {
        let Some(m) = self.models.get(model) else {
            return vec![];
        };
        if !m.versions.is_empty() {
            return m.versions.clone();
        }
        let mut sent: Vec<String> = m
            .entries
            .iter()
            .filter_map(|e| e.version.as_deref().map(str::to_string))
            .collect();
        sent.sort();
        sent.dedup();
        if m.entries.iter().any(|e| e.version.is_none()) {
            return vec![];
        }
        sent
    }

    /// How each routed model stands: whether a call could be answered now (a route on a
    /// target whose breakers are not all open, or a fallback ladder), and why not.
    pub fn health(&self) -> Vec<ModelHealth> {
        self.models
            .iter()
            .map(|(name, m)| {
                let up = |t: &Target| {
                    t.backend.healthy()
                        && t.breaker
                            .as_ref()
                            .is_none_or(|b| b.state() != crate::resilience::BreakerState::Open)
                };
                let problem = if let Some(w) = &m.switched_off {
                    Some(format!("switched off ({w})"))
                } else if m.entries.iter().any(|e| e.weight > 0 && up(&e.target)) {
                    None
                } else if !m.ladder.is_empty() {
                    // Degraded, but answering.
                    None
                } else {
                    Some(
                        "no route can take calls: no upstream endpoint is serving, or the breaker is open"
                            .into(),
                    )
                };
                ModelHealth {
                    model: name.clone(),
                    required: m.required,
                    problem,
                }
            })
            .collect()
    }

    /// Whether `model` is routed.
    pub fn has(&self, model: &str) -> bool {
        self.models.contains_key(model)
    }

    /// Every routed model, sorted by name.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }
}

/// FNV-1a, 64 bits: a fixed, portable hash for deterministic choices.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A point in `0..total` for `key`: FNV-1a mixed by the murmur3 finaliser (FNV's low bits
/// depend only on the low bits of the input), scaled by multiplication rather than a
/// modulo, so every key spreads evenly.
fn share(key: &[u8], total: u64) -> u64 {
    let mut h = fnv1a(key);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    ((u128::from(h) * u128::from(total)) >> 64) as u64
}

struct Compiled {
    revision: u64,
    routes: Arc<Routes>,
}

/// Runtime state kept across policy swaps, by name. Each entry keeps the settings it was
/// built with: a swap that changes them gets a fresh entry, others keep their state.
#[derive(Default)]
struct Registry {
    upstreams: BTreeMap<String, (UpstreamSpec, Arc<GrpcUpstream>)>,
    budgets: BTreeMap<String, Arc<RetryBudget>>,
    breakers: BTreeMap<(String, String), Arc<BreakerCell>>,
    latency: BTreeMap<(String, String), Arc<Latency>>,
    contracts: BTreeMap<(String, String), Arc<Contracts>>,
    limiters: BTreeMap<String, Arc<Limiter>>,
    caches: BTreeMap<String, Arc<cache::ResponseCache>>,
    analyses: BTreeMap<String, Arc<canary::Analysis>>,
}

/// What Keel does with a canary's verdict: the server takes the canary out of the policy.
pub type RollbackSink = Box<dyn Fn(&canary::Verdict) + Send + Sync>;

/// Compiles and caches the routes of each snapshot; owns the state that outlives them.
pub struct Router {
    embedded: Arc<Embedded>,
    max_message_size: usize,
    metrics: Arc<Metrics>,
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
        Arc::new(Router {
            embedded,
            max_message_size,
            metrics,
            registry: Mutex::new(Registry::default()),
            compiled: ArcSwapOption::empty(),
            rollback: std::sync::OnceLock::new(),
            health_changed: Arc::new(tokio::sync::Notify::new()),
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
        &self.metrics
    }

    /// The resilience state kept across swaps, for the metrics scrape: breakers per
    /// (model, upstream), endpoint standings, and per-model in-flight and queued calls.
    pub fn runtime_state(&self, into: &mut RuntimeState) {
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        for ((model, upstream), b) in &registry.breakers {
            into.breakers.push((
                model.clone(),
                upstream.clone(),
                b.state() as i64,
                b.trips_total(),
            ));
        }
        for (name, (_, up)) in &registry.upstreams {
            for (endpoint, state) in up.endpoint_states() {
                into.endpoints.push((name.clone(), endpoint, state));
            }
        }
        for (model, l) in &registry.limiters {
            into.models.push((
                model.clone(),
                i64::from(l.in_flight()),
                i64::from(l.queued()),
            ));
        }
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

    fn compile(&self, policy: &Policy) -> Routes {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let registry = &mut *registry;
        let embedded_only;
        let wanted: Vec<(&String, &ModelPolicy)> = match &policy.models {
            Some(models) => models.iter().collect(),
            None => {
                let only = ModelPolicy::served_by(BackendRef::Embedded);
                embedded_only = self
                    .embedded
                    .model_names()
                    .map(|m| (m.to_string(), only.clone()))
                    .collect::<Vec<_>>();
                embedded_only.iter().map(|(n, m)| (n, m)).collect()
            }
        };
        let mut models = BTreeMap::new();
        for (name, model) in wanted {
            models.insert(
                name.clone(),
                self.compile_model(registry, policy, name, model),
            );
        }
        // Upstreams no longer named are dropped from the registry; calls still using them
        // hold their own reference until they finish. So is the analysis of a canary that
        // no longer takes calls: a canary brought back starts afresh.
        registry
            .upstreams
            .retain(|name, _| policy.upstreams.contains_key(name));
        registry.analyses.retain(|model, _| {
            models
                .get(model)
                .is_some_and(|m: &ModelRoutes| m.analysis.is_some())
        });
        Routes { models }
    }

    fn compile_model(
        &self,
        registry: &mut Registry,
        policy: &Policy,
        name: &str,
        model: &ModelPolicy,
    ) -> ModelRoutes {
        // The infer method's settings govern the state shared by every method of a model.
        let infer = METHODS[0];
        let shared_budget = policy.resolve(infer, None).budget;
        let settings: BTreeMap<&'static str, Arc<Settings>> = METHODS
            .iter()
            .map(|m| (*m, Arc::new(policy.resolve(m, Some(name)))))
            .collect();
        let infer_settings = settings.get(infer).cloned().unwrap_or_default();
        let limiter = keep(
            &mut registry.limiters,
            name.to_string(),
            // Size limits are read per call from the settings; only concurrency needs a
            // fresh limiter.
            |l| {
                let (a, b) = (l.settings(), &infer_settings.limits);
                (
                    a.max_in_flight,
                    a.max_queue,
                    a.queue_timeout,
                    a.interactive_reserve,
                ) == (
                    b.max_in_flight,
                    b.max_queue,
                    b.queue_timeout,
                    b.interactive_reserve,
                )
            },
            || Limiter::new(infer_settings.limits.clone()),
        );
        let target = |registry: &mut Registry, backend: &BackendRef| {
            self.target(
                registry,
                policy,
                name,
                backend,
                &infer_settings,
                &shared_budget,
            )
        };
        let mut entries = Vec::new();
        for r in &model.routes {
            if let Some(t) = target(registry, &r.backend) {
                entries.push(Entry {
                    name: r.name.as_str().into(),
                    target: t,
                    version: r.version.as_deref().map(Arc::from),
                    weight: if r.is_on(&policy.flags) {
                        u64::from(r.weight)
                    } else {
                        0
                    },
                    canary: r.canary,
                });
            }
        }
        let ladder = model
            .fallback
            .iter()
            .filter(|f| f.when.as_ref().is_none_or(|w| w.holds(&policy.flags)))
            .filter_map(|f| {
                let rung = match &f.tier {
                    Tier::Model(other) => ladder::Rung::Model(other.clone()),
                    Tier::Upstream(u) => {
                        ladder::Rung::Upstream(target(registry, &BackendRef::Upstream(u.clone()))?)
                    }
                    Tier::Cache => ladder::Rung::Cache,
                    // Checked when the policy was applied (`check`).
                    Tier::Static(outputs) => {
                        ladder::Rung::Static(Arc::new(ladder::static_tensors(outputs).ok()?))
                    }
                };
                Some(ladder::Step {
                    rung,
                    on: f.on.clone(),
                })
            })
            .collect::<Vec<_>>();
        let mut ladder = ladder;
        if model.cache.as_ref().is_some_and(|c| c.serve_stale_on_error)
            && !ladder.iter().any(|s| matches!(s.rung, ladder::Rung::Cache))
        {
            let at = ladder
                .iter()
                .position(|s| matches!(s.rung, ladder::Rung::Static(_)))
                .unwrap_or(ladder.len());
            ladder.insert(
                at,
                ladder::Step {
                    rung: ladder::Rung::Cache,
                    on: crate::policy::Trigger::ALL.to_vec(),
                },
            );
        }
        let cache = model.cache.as_ref().map(|spec| {
            keep(
                &mut registry.caches,
                name.to_string(),
                |c| c.spec() == spec,
                || cache::ResponseCache::new(spec.clone()),
            )
        });
        let canary_on = entries.iter().find(|e| e.canary && e.weight > 0);
        let analysis = model.rollback.as_ref().zip(canary_on).map(|(spec, c)| {
            keep(
                &mut registry.analyses,
                name.to_string(),
                |a| a.spec() == spec && a.route() == &c.name,
                || canary::Analysis::new(name.into(), c.name.clone(), spec.clone()),
            )
        });
        ModelRoutes {
            model: name.into(),
            ladder,
            cache,
            entries,
            versions: model.versions.clone(),
            limiter,
            settings,
            switched_off: model.when.clone().filter(|w| !w.holds(&policy.flags)),
            route_key: model.route_key.clone(),
            route_override: model.route_override,
            analysis,
            required: model.required,
        }
    }

    /// The target of `model` on `backend`, with its resilience state from the registry.
    fn target(
        &self,
        registry: &mut Registry,
        policy: &Policy,
        model: &str,
        backend: &BackendRef,
        infer_settings: &Settings,
        shared_budget: &crate::policy::Budget,
    ) -> Option<Arc<Target>> {
        let (upstream, backend) = match backend {
            BackendRef::Embedded => (
                "embedded".to_string(),
                Some(self.embedded.clone() as Arc<dyn Backend>),
            ),
            BackendRef::Upstream(u) => (u.clone(), self.upstream(registry, u, policy)),
        };
        let backend = backend?;
        let budget = keep(
            &mut registry.budgets,
            upstream.clone(),
            |b| b.settings() == shared_budget,
            || RetryBudget::new(shared_budget.clone()),
        );
        let key = (model.to_string(), upstream.clone());
        let breaker = infer_settings.breaker.enabled.then(|| {
            keep(
                &mut registry.breakers,
                key.clone(),
                |b| b.settings() == &infer_settings.breaker,
                || {
                    BreakerCell::named(
                        infer_settings.breaker.clone(),
                        format!("{model}@{upstream}"),
                    )
                    .notifying(Changed::to(self.health_changed.clone()))
                },
            )
        });
        let latency = keep(
            &mut registry.latency,
            key.clone(),
            |_| true,
            Latency::default,
        );
        let contracts = keep(
            &mut registry.contracts,
            key,
            |c| c.serves(&backend),
            || Contracts::new(backend.clone(), model.into()),
        );
        Some(Arc::new(Target {
            backend,
            upstream: upstream.into(),
            breaker,
            latency,
            budget,
            contracts,
        }))
    }

    fn upstream(
        &self,
        registry: &mut Registry,
        name: &str,
        policy: &Policy,
    ) -> Option<Arc<dyn Backend>> {
        let spec = policy.upstreams.get(name)?;
        if let Some((built_spec, up)) = registry.upstreams.get(name)
            && built_spec == spec
        {
            return Some(up.clone());
        }
        let up = GrpcUpstream::new(
            name,
            spec,
            self.max_message_size,
            self.metrics.clone(),
            Changed::to(self.health_changed.clone()),
        );
        registry
            .upstreams
            .insert(name.to_string(), (spec.clone(), up.clone()));
        Some(up)
    }
}

/// The registry entry for `key` if `same` says its settings still hold, else a fresh one.
fn keep<K: Ord, V>(
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

/// The innermost service: sends an attempt to its route's backend.
#[derive(Debug)]
pub struct Deliver<Op> {
    _op: PhantomData<fn(Op)>,
}

impl<Op> Deliver<Op> {
    /// The service.
    pub fn new() -> Self {
        Deliver { _op: PhantomData }
    }
}

impl<Op> Default for Deliver<Op> {
    fn default() -> Self {
        Deliver::new()
    }
}

impl<Op> Clone for Deliver<Op> {
    fn clone(&self) -> Self {
        Deliver::new()
    }
}

impl<Op: Operation> Service<Call<Op>> for Deliver<Op> {
    type Response = Op::Response;
    type Error = Error;
    type Future = BackendFuture<Op::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call<Op>) -> Self::Future {
        Op::send(call.ctx.route.target.backend.as_ref(), call.attempt())
    }
}

#[cfg(test)]
mod tests;
