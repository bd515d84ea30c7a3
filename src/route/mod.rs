//! Which backend answers each call, decided from the call's policy snapshot, and the tower
//! service that sends it there.
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

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use futures::FutureExt as _;
use tower::Service;

use crate::call::Call;
use crate::error::Error;
use crate::policy::{BackendRef, Policy, PolicyError, PolicyErrors, Snapshot, UpstreamSpec};
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
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PolicyErrors(problems))
    }
}

/// One target of a model and its share of calls.
struct Target {
    backend: Arc<dyn Backend>,
    weight: u8,
}

/// How one model's calls are routed.
struct ModelRoutes {
    targets: Vec<Target>,
    /// Versions clients may ask for; empty allows any.
    versions: Vec<String>,
}

/// The model → backend table of one policy revision.
pub struct Routes {
    models: BTreeMap<String, ModelRoutes>,
}

impl Routes {
    /// The backend for a call to `model` (`version`) with `request_id`.
    pub fn pick(
        &self,
        model: &str,
        version: &str,
        request_id: &str,
    ) -> Result<&Arc<dyn Backend>, Error> {
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
        let mut point = (fnv1a(request_id.as_bytes()) % 100) as u8;
        for t in &routes.targets {
            if point < t.weight {
                return Ok(&t.backend);
            }
            point -= t.weight;
        }
        // Unreachable while weights sum to 100, as validation ensures.
        Err(Error::ModelNotFound {
            model: model.to_string(),
        })
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
                    .map(|t| {
                        if r.targets.len() == 1 {
                            t.backend.describe()
                        } else {
                            format!("{}% {}", t.weight, t.backend.describe())
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

/// Compiles and caches the routes of each snapshot; owns the upstream registry.
pub struct Router {
    embedded: Arc<Embedded>,
    max_message_size: usize,
    /// Upstreams by name with the spec they were built from; kept across swaps.
    upstreams: Mutex<BTreeMap<String, (UpstreamSpec, Arc<GrpcUpstream>)>>,
    compiled: ArcSwapOption<Compiled>,
}

impl Router {
    /// A router over `embedded`; upstream channels are created lazily, in a Tokio runtime.
    pub fn new(embedded: Arc<Embedded>, max_message_size: usize) -> Arc<Router> {
        Arc::new(Router {
            embedded,
            max_message_size,
            upstreams: Mutex::new(BTreeMap::new()),
            compiled: ArcSwapOption::empty(),
        })
    }

    /// The embedded backend.
    pub fn embedded(&self) -> &Arc<Embedded> {
        &self.embedded
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

    fn upstream(&self, name: &str, policy: &Policy) -> Option<Arc<dyn Backend>> {
        let spec = policy.upstreams.get(name)?;
        let mut registry = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((built_from, up)) = registry.get(name)
            && built_from == spec
        {
            return Some(up.clone());
        }
        let up = GrpcUpstream::new(name, spec, self.max_message_size);
        registry.insert(name.to_string(), (spec.clone(), up.clone()));
        Some(up)
    }

    fn compile(&self, policy: &Policy) -> Routes {
        let embedded: Arc<dyn Backend> = self.embedded.clone();
        let models = match &policy.models {
            None => self
                .embedded
                .model_names()
                .map(|m| {
                    let targets = vec![Target {
                        backend: embedded.clone(),
                        weight: 100,
                    }];
                    (
                        m.to_string(),
                        ModelRoutes {
                            targets,
                            versions: vec![],
                        },
                    )
                })
                .collect(),
            Some(models) => models
                .iter()
                .map(|(name, m)| {
                    let targets = m
                        .routes
                        .iter()
                        .filter_map(|r| {
                            let backend = match &r.backend {
                                BackendRef::Embedded => Some(embedded.clone()),
                                BackendRef::Upstream(u) => self.upstream(u, policy),
                            }?;
                            Some(Target {
                                backend,
                                weight: r.weight,
                            })
                        })
                        .collect();
                    let routes = ModelRoutes {
                        targets,
                        versions: m.versions.clone(),
                    };
                    (name.clone(), routes)
                })
                .collect(),
        };
        // Upstreams no longer named are dropped from the registry; calls still using them
        // hold their own reference until they finish.
        self.upstreams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| policy.upstreams.contains_key(name));
        Routes { models }
    }
}

/// Sends each call to the backend its snapshot's routes choose; an unknown model is
/// NOT_FOUND.
pub struct Dispatch<Op> {
    router: Arc<Router>,
    _op: PhantomData<fn(Op)>,
}

impl<Op> Dispatch<Op> {
    /// Dispatches with `router`.
    pub fn new(router: Arc<Router>) -> Self {
        Dispatch {
            router,
            _op: PhantomData,
        }
    }
}

impl<Op> Clone for Dispatch<Op> {
    fn clone(&self) -> Self {
        Dispatch::new(self.router.clone())
    }
}

impl<Op: Operation> Service<Call<Op>> for Dispatch<Op> {
    type Response = Op::Response;
    type Error = Error;
    type Future = BackendFuture<Op::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call<Op>) -> Self::Future {
        let routes = self.router.routes(&call.ctx.snapshot);
        match routes.pick(call.body.model(), call.body.version(), &call.ctx.request_id) {
            Ok(backend) => Op::send(backend.as_ref(), call),
            Err(e) => futures::future::ready(Err(e)).boxed(),
        }
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
        let router = Router::new(Embedded::new(), 1 << 20);
        let snap = snapshot(
            "[upstreams.canary]\nendpoints = [\"127.0.0.1:1\"]\n[models.simple]\nroutes = [{ backend = \"embedded\", weight = 90 }, { backend = \"canary\", weight = 10 }]\n",
        );
        let routes = router.routes(&snap);
        let mut canary = 0;
        for i in 0..1000 {
            let id = format!("req-{i}");
            let b = routes.pick("simple", "", &id).unwrap();
            let again = routes.pick("simple", "", &id).unwrap();
            assert!(Arc::ptr_eq(b, again), "the same id takes the same route");
            if b.describe().starts_with("upstream canary") {
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
        let router = Router::new(Embedded::new(), 1 << 20);
        let a = snapshot(
            "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n[models.simple]\nbackend = \"u\"\n",
        );
        let r1 = router.routes(&a);
        assert!(
            Arc::ptr_eq(&r1, &router.routes(&a)),
            "cached for the revision"
        );
        let before = router.upstreams.lock().unwrap()["u"].1.clone();
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
        let after = router.upstreams.lock().unwrap()["u"].1.clone();
        assert!(
            Arc::ptr_eq(&before, &after),
            "connections kept across the swap"
        );
    }

    #[tokio::test]
    async fn versions_outside_the_list_are_not_found() {
        let router = Router::new(Embedded::new(), 1 << 20);
        let snap = snapshot("[models.iris]\nbackend = \"embedded\"\nversions = [\"1\"]\n");
        let routes = router.routes(&snap);
        assert!(routes.pick("iris", "1", "r").is_ok());
        assert!(routes.pick("iris", "", "r").is_ok());
        let e = routes.pick("iris", "2", "r").err().unwrap();
        assert_eq!(
            e.to_string(),
            "model 'iris' has no version '2' (versions: 1)"
        );
        let e = routes.pick("simple", "", "r").err().unwrap();
        assert_eq!(e.to_string(), "unknown model 'simple'");
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
