//! Which backend answers each model, and the tower service that sends a call there.
//!
//! Routes are built once from the policy: every model is mapped to the embedded backend or
//! to a named upstream. Canary weights, flags and fallbacks will choose among targets here.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::FutureExt as _;
use tower::Service;

use crate::call::Call;
use crate::error::Error;
use crate::policy::{BackendRef, Policy, PolicyError, PolicyErrors};
use crate::upstream::embedded::Embedded;
use crate::upstream::grpc::GrpcUpstream;
use crate::upstream::{Backend, BackendFuture, Operation};

/// The model → backend table.
pub struct Routes {
    models: BTreeMap<String, Arc<dyn Backend>>,
}

/// Checks the parts of a policy that depend on what Keel has built in: every model routed
/// to `embedded` must be an embedded model. Opens nothing, so `keel validate` can use it.
pub fn check(policy: &Policy, embedded: &Embedded) -> Result<(), PolicyErrors> {
    let Some(models) = &policy.models else {
        return Ok(());
    };
    let problems: Vec<PolicyError> = models
        .iter()
        .filter(|(name, r)| r.backend == BackendRef::Embedded && !embedded.has_model(name))
        .map(|(name, _)| PolicyError {
            path: format!("models.{name}.backend"),
            message: format!(
                "there is no embedded model named {name:?} (embedded models: {})",
                embedded.model_names().collect::<Vec<_>>().join(", ")
            ),
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PolicyErrors(problems))
    }
}

impl Routes {
    /// Builds the table; upstream channels are created lazily, so this needs a Tokio runtime
    /// but no reachable upstream.
    pub fn build(policy: &Policy, embedded: Arc<Embedded>) -> Result<Routes, PolicyErrors> {
        check(policy, &embedded)?;
        let upstreams: BTreeMap<&str, Arc<dyn Backend>> = policy
            .upstreams
            .iter()
            .map(|(name, spec)| {
                let b: Arc<dyn Backend> =
                    GrpcUpstream::new(name, spec, policy.server.max_message_size);
                (name.as_str(), b)
            })
            .collect();
        let embedded_backend: Arc<dyn Backend> = embedded.clone();
        let models = match &policy.models {
            None => embedded
                .model_names()
                .map(|m| (m.to_string(), embedded_backend.clone()))
                .collect(),
            Some(models) => {
                let mut out = BTreeMap::new();
                for (name, route) in models {
                    let backend = match &route.backend {
                        BackendRef::Embedded => embedded_backend.clone(),
                        BackendRef::Upstream(u) => {
                            upstreams.get(u.as_str()).cloned().ok_or_else(|| {
                                PolicyErrors::one(
                                    format!("models.{name}.backend"),
                                    format!("unknown upstream {u:?}"),
                                )
                            })?
                        }
                    };
                    out.insert(name.clone(), backend);
                }
                out
            }
        };
        Ok(Routes { models })
    }

    /// The backend serving `model`.
    pub fn backend(&self, model: &str) -> Option<&Arc<dyn Backend>> {
        self.models.get(model)
    }

    /// Every routed model with its backend, sorted by model name.
    pub fn models(&self) -> impl Iterator<Item = (&str, &Arc<dyn Backend>)> {
        self.models.iter().map(|(m, b)| (m.as_str(), b))
    }
}

/// Sends each call to the backend of its model; an unknown model is NOT_FOUND.
pub struct Dispatch<Op> {
    routes: Arc<Routes>,
    _op: PhantomData<fn(Op)>,
}

impl<Op> Dispatch<Op> {
    /// Dispatches over `routes`.
    pub fn new(routes: Arc<Routes>) -> Self {
        Dispatch {
            routes,
            _op: PhantomData,
        }
    }
}

impl<Op> Clone for Dispatch<Op> {
    fn clone(&self) -> Self {
        Dispatch::new(self.routes.clone())
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
        match self.routes.backend(call.body.model()) {
            Some(backend) => Op::send(backend.as_ref(), call),
            None => {
                let model = call.body.model().to_string();
                futures::future::ready(Err(Error::ModelNotFound { model })).boxed()
            }
        }
    }
}
