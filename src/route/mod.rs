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
//! (FNV-1a) of its request id, so the same request id always takes the same route.

pub mod cache;
pub mod ladder;

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use tower::Service;

use crate::call::Call;
use crate::error::Error;
use crate::observe::Metrics;
use crate::observe::metrics::RuntimeState;
use crate::policy::{
    BackendRef, Breaker, Flag, METHODS, Policy, PolicyError, PolicyErrors, Settings, Snapshot,
    Tier, UpstreamSpec,
};
use crate::resilience::{BreakerCell, Latency, Limiter, RetryBudget};
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
}

/// How one model's calls are routed.
struct ModelRoutes {
    model: Arc<str>,
    /// The fallback ladder, rungs whose flags are off left out.
    ladder: Vec<ladder::Step>,
    /// The response cache, if the model has one.
    cache: Option<Arc<cache::ResponseCache>>,
    /// Targets with their weights; weights sum to 100.
    targets: Vec<(Arc<Target>, u8)>,
    /// Versions clients may ask for; empty allows any.
    versions: Vec<String>,
    limiter: Arc<Limiter>,
    /// Effective settings per method, resolved once per revision.
    settings: BTreeMap<&'static str, Arc<Settings>>,
}

/// The routes of one policy revision.
pub struct Routes {
    models: BTreeMap<String, ModelRoutes>,
}

impl Routes {
    /// The route of a call to `method` for `model` (`version`) with `request_id`.
    pub fn route(
        &self,
        method: &str,
        model: &str,
        version: &str,
        request_id: &str,
    ) -> Result<Route, Error> {
        let routes = self.models.get(model).ok_or_else(|| Error::ModelNotFound {
            model: model.to_string(),
        })?;
        if !version.is_empty()
            && !routes.versions.is_empty()
            && !routes.versions.iter().any(|v| v == version)
        {
            return Err(Error::VersionNotFound {
                model: model.to_string(),
                version: version.to_string(),
                available: routes.versions.clone(),
            });
        }
        let settings = routes
            .settings
            .get(method)
            .or_else(|| routes.settings.get(METHODS[0]))
            .cloned()
            .unwrap_or_default();
        let mut point = (fnv1a(request_id.as_bytes()) % 100) as u8;
        for (target, weight) in &routes.targets {
            if point < *weight {
                return Ok(Route {
                    model: routes.model.clone(),
                    target: target.clone(),
                    settings,
                    limiter: routes.limiter.clone(),
                });
            }
            point -= weight;
        }
        // Unreachable while weights sum to 100, as validation ensures.
        Err(Error::ModelNotFound {
            model: model.to_string(),
        })
    }

    /// The fallback ladder of `model`.
    pub fn ladder(&self, model: &str) -> &[ladder::Step] {
        self.models.get(model).map_or(&[], |m| &m.ladder)
    }

    /// The response cache of `model`, if any.
    pub fn cache(&self, model: &str) -> Option<&Arc<cache::ResponseCache>> {
        self.models.get(model)?.cache.as_ref()
    }

    /// The route of a call for `model` sent to a fallback `target` (another upstream).
    pub fn route_to(&self, method: &str, model: &str, target: &Arc<Target>) -> Option<Route> {
        let routes = self.models.get(model)?;
        Some(Route {
            model: routes.model.clone(),
            target: target.clone(),
            settings: routes.settings.get(method).cloned().unwrap_or_default(),
            limiter: routes.limiter.clone(),
        })
    }

    /// Whether `model` is routed.
    pub fn has(&self, model: &str) -> bool {
        self.models.contains_key(model)
    }

    /// Every routed model, sorted by name.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Every model with a description of its backends (`simple → upstream triton`).
    pub fn describe(&self) -> Vec<(String, String)> {
        self.models
            .iter()
            .map(|(m, r)| {
                let targets: Vec<String> = r
                    .targets
                    .iter()
                    .map(|(t, w)| {
                        if r.targets.len() == 1 {
                            t.backend.describe()
                        } else {
                            format!("{w}% {}", t.backend.describe())
                        }
                    })
                    .collect();
                (m.clone(), targets.join(", "))
            })
            .collect()
    }
}

/// FNV-1a, 64 bits: a fixed, portable hash for deterministic choices.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

struct Compiled {
    revision: u64,
    routes: Arc<Routes>,
}

/// Runtime state kept across policy swaps, by name. Each entry keeps the settings it was
/// built with: a swap that changes them gets a fresh entry, others keep their state.
#[derive(Default)]
struct Registry {
    upstreams: BTreeMap<String, ((UpstreamSpec, Breaker), Arc<GrpcUpstream>)>,
    budgets: BTreeMap<String, Arc<RetryBudget>>,
    breakers: BTreeMap<(String, String), Arc<BreakerCell>>,
    latency: BTreeMap<(String, String), Arc<Latency>>,
    limiters: BTreeMap<String, Arc<Limiter>>,
    caches: BTreeMap<String, Arc<cache::ResponseCache>>,
}

/// Compiles and caches the routes of each snapshot; owns the state that outlives them.
pub struct Router {
    embedded: Arc<Embedded>,
    max_message_size: usize,
    metrics: Arc<Metrics>,
    registry: Mutex<Registry>,
    compiled: ArcSwapOption<Compiled>,
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
        })
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
    /// (model, upstream), endpoint breakers, and per-model in-flight and queued calls.
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
                into.endpoint_breakers.push((name.clone(), endpoint, state));
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
        // The infer method's settings govern the state shared by every method of a model.
        let infer = METHODS[0];
        let shared_budget = policy.resolve(infer, None).budget;
        let wanted: Vec<Wanted> = match &policy.models {
            None => self
                .embedded
                .model_names()
                .map(|m| (m.to_string(), vec![(BackendRef::Embedded, 100)], vec![]))
                .collect(),
            Some(models) => models
                .iter()
                .map(|(name, m)| {
                    let targets = m
                        .routes
                        .iter()
                        .map(|r| (r.backend.clone(), r.weight))
                        .collect();
                    (name.clone(), targets, m.versions.clone())
                })
                .collect(),
        };
        let mut models = BTreeMap::new();
        for (name, targets, versions) in wanted {
            let settings: BTreeMap<&'static str, Arc<Settings>> = METHODS
                .iter()
                .map(|m| (*m, Arc::new(policy.resolve(m, Some(&name)))))
                .collect();
            let infer_settings = settings.get(infer).cloned().unwrap_or_default();
            let limiter = keep(
                &mut registry.limiters,
                name.clone(),
                |l| l.settings() == &infer_settings.limits,
                || Limiter::new(infer_settings.limits.clone()),
            );
            let mut built = Vec::new();
            for (backend_ref, weight) in targets {
                if let Some(t) = self.target(
                    registry,
                    policy,
                    &name,
                    &backend_ref,
                    &infer_settings,
                    &shared_budget,
                ) {
                    built.push((t, weight));
                }
            }
            let model_policy = policy.models.as_ref().and_then(|m| m.get(&name));
            let ladder = model_policy
                .map(|m| {
                    m.fallback
                        .iter()
                        .filter(|f| {
                            f.flag.as_ref().is_none_or(|flag| {
                                policy.flags.get(flag) == Some(&Flag::Bool(true))
                            })
                        })
                        .filter_map(|f| {
                            let rung = match &f.tier {
                                Tier::Model(other) => ladder::Rung::Model(other.clone()),
                                Tier::Upstream(u) => ladder::Rung::Upstream(self.target(
                                    registry,
                                    policy,
                                    &name,
                                    &BackendRef::Upstream(u.clone()),
                                    &infer_settings,
                                    &shared_budget,
                                )?),
                                Tier::Cache => ladder::Rung::Cache,
                                // Checked when the policy was applied (`check`).
                                Tier::Static(outputs) => ladder::Rung::Static(Arc::new(
                                    ladder::static_tensors(outputs).ok()?,
                                )),
                            };
                            Some(ladder::Step {
                                rung,
                                on: f.on.clone(),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let cache = model_policy.and_then(|m| m.cache.as_ref()).map(|spec| {
                keep(
                    &mut registry.caches,
                    name.clone(),
                    |c| c.spec() == spec,
                    || cache::ResponseCache::new(spec.clone()),
                )
            });
            models.insert(
                name.clone(),
                ModelRoutes {
                    model: name.into(),
                    ladder,
                    cache,
                    targets: built,
                    versions,
                    limiter,
                    settings,
                },
            );
        }
        // Upstreams no longer named are dropped from the registry; calls still using them
        // hold their own reference until they finish.
        registry
            .upstreams
            .retain(|name, _| policy.upstreams.contains_key(name));
        Routes { models }
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
                },
            )
        });
        let latency = keep(&mut registry.latency, key, |_| true, Latency::default);
        Some(Arc::new(Target {
            backend,
            upstream: upstream.into(),
            breaker,
            latency,
            budget,
        }))
    }

    fn upstream(
        &self,
        registry: &mut Registry,
        name: &str,
        policy: &Policy,
    ) -> Option<Arc<dyn Backend>> {
        let spec = policy.upstreams.get(name)?;
        // Endpoint breakers take the infer method's settings from the defaults.
        let breaker = policy.resolve(METHODS[0], None).breaker;
        if let Some(((built_spec, built_breaker), up)) = registry.upstreams.get(name)
            && built_spec == spec
            && *built_breaker == breaker
        {
            return Some(up.clone());
        }
        let up = GrpcUpstream::new(
            name,
            spec,
            self.max_message_size,
            &breaker,
            self.metrics.clone(),
        );
        registry
            .upstreams
            .insert(name.to_string(), ((spec.clone(), breaker), up.clone()));
        Some(up)
    }
}

/// A model to compile: its name, weighted backends and allowed versions.
type Wanted = (String, Vec<(BackendRef, u8)>, Vec<String>);

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
        let backend = call.ctx.route.target.backend.clone();
        Op::send(backend.as_ref(), call)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Store;

    fn snapshot(text: &str) -> Arc<Snapshot> {
        let store = Store::new(
            Some(text.to_string()),
            crate::policy::Source::Startup(None),
            crate::policy::AuditLog::disabled(),
            Box::new(|_| Ok(())),
            Box::new(|_| {}),
        )
        .unwrap();
        store.current()
    }

    #[tokio::test]
    async fn weighted_routes_split_by_request_id_deterministically() {
        let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
        let snap = snapshot(
            "[upstreams.canary]\nendpoints = [\"127.0.0.1:1\"]\n[models.simple]\nroutes = [{ backend = \"embedded\", weight = 90 }, { backend = \"canary\", weight = 10 }]\n",
        );
        let routes = router.routes(&snap);
        let mut canary = 0;
        for i in 0..1000 {
            let id = format!("req-{i}");
            let b = routes.route(INFER, "simple", "", &id).unwrap();
            let again = routes.route(INFER, "simple", "", &id).unwrap();
            assert!(
                Arc::ptr_eq(&b.target, &again.target),
                "the same id takes the same route"
            );
            if &*b.target.upstream == "canary" {
                canary += 1;
            }
        }
        assert!(
            (60..=140).contains(&canary),
            "about 10% to the canary: {canary}"
        );
    }

    #[tokio::test]
    async fn routes_are_compiled_once_per_revision_and_upstreams_survive_a_swap() {
        let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
        let a = snapshot(
            "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n[models.simple]\nbackend = \"u\"\n",
        );
        let r1 = router.routes(&a);
        assert!(
            Arc::ptr_eq(&r1, &router.routes(&a)),
            "cached for the revision"
        );
        let before = router.registry.lock().unwrap().upstreams["u"].1.clone();
        // A later revision with the same upstream settings keeps the same upstream.
        let store = Store::with_default();
        store
            .apply(
                "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n[models.simple]\nbackend = \"u\"\n[models.iris]\nbackend = \"embedded\"\n",
                crate::policy::Source::Admin { principal: "t".into() },
                None,
            )
            .unwrap();
        let r2 = router.routes(&store.current());
        assert!(!Arc::ptr_eq(&r1, &r2));
        assert_eq!(r2.models().collect::<Vec<_>>(), ["iris", "simple"]);
        let after = router.registry.lock().unwrap().upstreams["u"].1.clone();
        assert!(
            Arc::ptr_eq(&before, &after),
            "connections kept across the swap"
        );
    }

    #[tokio::test]
    async fn versions_outside_the_list_are_not_found() {
        let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
        let snap = snapshot("[models.iris]\nbackend = \"embedded\"\nversions = [\"1\"]\n");
        let routes = router.routes(&snap);
        assert!(routes.route(INFER, "iris", "1", "r").is_ok());
        assert!(routes.route(INFER, "iris", "", "r").is_ok());
        let e = routes.route(INFER, "iris", "2", "r").err().unwrap();
        assert_eq!(
            e.to_string(),
            "model 'iris' has no version '2' (versions: 1)"
        );
        let e = routes.route(INFER, "simple", "", "r").err().unwrap();
        assert_eq!(e.to_string(), "unknown model 'simple'");
    }

    const INFER: &str = "inference.GRPCInferenceService/ModelInfer";

    #[tokio::test]
    async fn breaker_state_survives_a_swap_unless_its_settings_change() {
        let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
        let store = Store::with_default();
        let admin = || crate::policy::Source::Admin {
            principal: "t".into(),
        };
        let route = |router: &Router, store: &Store| {
            router
                .routes(&store.current())
                .route(INFER, "iris", "", "r")
                .unwrap()
        };
        let first = route(&router, &store);
        let breaker = first.target.breaker.clone().unwrap();
        store
            .apply("[defaults]\ntimeout = \"9s\"\n", admin(), None)
            .unwrap();
        let second = route(&router, &store);
        assert_eq!(second.settings.timeout, std::time::Duration::from_secs(9));
        assert!(
            Arc::ptr_eq(&breaker, second.target.breaker.as_ref().unwrap()),
            "kept"
        );
        assert!(Arc::ptr_eq(&first.limiter, &second.limiter), "kept");
        store
            .apply(
                "[defaults]\ntimeout = \"9s\"\n[defaults.breaker]\nconsecutive_failures = 3\n",
                admin(),
                None,
            )
            .unwrap();
        let third = route(&router, &store);
        assert!(
            !Arc::ptr_eq(&breaker, third.target.breaker.as_ref().unwrap()),
            "reset"
        );
        assert!(
            Arc::ptr_eq(&first.limiter, &third.limiter),
            "other state kept"
        );
        store
            .apply("[defaults.breaker]\nenabled = false\n", admin(), None)
            .unwrap();
        assert!(route(&router, &store).target.breaker.is_none());
    }

    #[test]
    fn embedded_routes_must_name_embedded_models() {
        let p = Policy::parse("[models.resnet]\nbackend = \"embedded\"\n").unwrap();
        let e = check(&p, &Embedded::new()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("models.resnet.backend: there is no embedded model named \"resnet\"")
        );
    }
}
