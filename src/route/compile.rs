//! Compiling a snapshot's routes: each model's settings, routes, fallback ladder, cache and
//! canary analysis, with the state kept in the registry across swaps.
//!
//! A model is compiled in steps, one function each: its settings per method and its
//! limiter ([`Router::settings`]), its routes ([`Router::entries`]), its ladder
//! ([`Router::ladder`]), then its cache and canary analysis ([`Router::analysis`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::registry::{Registry, keep};
use super::select::{Entry, ModelRoutes, Routes};
use super::{Router, Target, cache, canary, ladder};
use crate::contract::Contracts;
use crate::policy::{BackendRef, Budget, METHODS, ModelPolicy, Policy, Settings, Tier, Trigger};
use crate::resilience::{BreakerCell, Latency, Limiter, RetryBudget};
use crate::upstream::Backend;

/// One model being compiled: what its routes and rungs are built from.
struct Compiling<'a> {
    policy: &'a Policy,
    name: &'a str,
    model: &'a ModelPolicy,
    /// The infer method's effective settings for the model: they govern the state shared
    /// by every method of a model.
    infer: Arc<Settings>,
    /// The retry budget of the defaults, shared by every model on an upstream.
    budget: Budget,
}

impl Router {
    /// The routes of `policy`: every model it names, or every embedded model when it names
    /// none. Drops from the registry what the policy no longer uses.
    pub(super) fn compile(&self, policy: &Policy) -> Routes {
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
        let (settings, limiter) = self.settings(registry, policy, name);
        let this = Compiling {
            policy,
            name,
            model,
            infer: settings.get(METHODS[0]).cloned().unwrap_or_default(),
            budget: policy.resolve(METHODS[0], None).budget,
        };
        let entries = self.entries(registry, &this);
        let ladder = self.ladder(registry, &this);
        let cache = model.cache.as_ref().map(|spec| {
            keep(
                &mut registry.caches,
                name.to_string(),
                |c| c.spec() == spec,
                || cache::ResponseCache::new(spec.clone()),
            )
        });
        let analysis = self.analysis(registry, name, model, &entries);
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

    /// Step 1: the model's effective settings per method, resolved once per revision, and
    /// its limiter, kept while its concurrency settings hold.
    fn settings(
        &self,
        registry: &mut Registry,
        policy: &Policy,
        name: &str,
    ) -> (BTreeMap<&'static str, Arc<Settings>>, Arc<Limiter>) {
        let settings: BTreeMap<&'static str, Arc<Settings>> = METHODS
            .iter()
            .map(|m| (*m, Arc::new(policy.resolve(m, Some(name)))))
            .collect();
        let infer_settings = settings.get(METHODS[0]).cloned().unwrap_or_default();
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
        (settings, limiter)
    }

    /// Step 2: the model's routes, in policy order, those that are off at weight 0; a route
    /// to an upstream the policy does not name is left out.
    fn entries(&self, registry: &mut Registry, this: &Compiling<'_>) -> Vec<Entry> {
        let Compiling { policy, model, .. } = *this;
        let mut entries = Vec::new();
        for r in &model.routes {
            if let Some(t) = self.target(registry, this, &r.backend) {
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
        entries
    }

    /// Step 3: the model's fallback ladder, rungs whose flags are off left out; a cache
    /// that serves stale answers on error adds a cache rung before the static answer.
    fn ladder(&self, registry: &mut Registry, this: &Compiling<'_>) -> Vec<ladder::Step> {
        let Compiling { policy, model, .. } = *this;
        let mut ladder = model
            .fallback
            .iter()
            .filter(|f| f.when.as_ref().is_none_or(|w| w.holds(&policy.flags)))
            .filter_map(|f| {
                let rung = match &f.tier {
                    Tier::Model(other) => ladder::Rung::Model(other.clone()),
                    Tier::Upstream(u) => {
                        let backend = BackendRef::Upstream(u.clone());
                        ladder::Rung::Upstream(self.target(registry, this, &backend)?)
                    }
                    Tier::Cache => ladder::Rung::Cache,
                    // Checked when the policy was applied (`policy::builtin::check`).
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
                    on: Trigger::ALL.to_vec(),
                },
            );
        }
        ladder
    }

    /// Step 4: the canary analysis of a model with a rollback spec, while its canary takes
    /// calls; kept while the spec and the canary route hold.
    fn analysis(
        &self,
        registry: &mut Registry,
        name: &str,
        model: &ModelPolicy,
        entries: &[Entry],
    ) -> Option<Arc<canary::Analysis>> {
        let canary_on = entries.iter().find(|e| e.canary && e.weight > 0);
        model.rollback.as_ref().zip(canary_on).map(|(spec, c)| {
            keep(
                &mut registry.analyses,
                name.to_string(),
                |a| a.spec() == spec && a.route() == &c.name,
                || canary::Analysis::new(name.into(), c.name.clone(), spec.clone()),
            )
        })
    }

    /// The target of `model` on `backend`, with its resilience state from the registry.
    fn target(
        &self,
        registry: &mut Registry,
        this: &Compiling<'_>,
        backend: &BackendRef,
    ) -> Option<Arc<Target>> {
        let Compiling {
            policy,
            name: model,
            ..
        } = *this;
        let (upstream, backend) = match backend {
            BackendRef::Embedded => (
                "embedded".to_string(),
                Some(self.embedded.clone() as Arc<dyn Backend>),
            ),
            BackendRef::Upstream(u) => (u.clone(), registry.upstream(u, policy, &self.handles)),
        };
        let backend = backend?;
        let budget = keep(
            &mut registry.budgets,
            upstream.clone(),
            |b| b.settings() == &this.budget,
            || RetryBudget::new(this.budget.clone()),
        );
        let key = (model.to_string(), upstream.clone());
        let breaker = this.infer.breaker.enabled.then(|| {
            keep(
                &mut registry.breakers,
                key.clone(),
                |b| b.settings() == &this.infer.breaker,
                || {
                    BreakerCell::named(this.infer.breaker.clone(), format!("{model}@{upstream}"))
                        .notifying(self.handles.changed.clone())
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
}
