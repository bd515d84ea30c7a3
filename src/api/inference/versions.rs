//! Requests for a model version the policy adapts: the client's request is turned into one
//! for the version that answers, and the answer back (see [`crate::adapt::version`]).

use std::sync::Arc;

use tonic::{Response, Status};

use super::{Edge, InferenceApi, MODEL_INFER};
use crate::adapt::version;
use crate::contract::Lookup;
use crate::error::Error;
use crate::model::{Contract, InferRequest, InferResponse};
use crate::policy::VersionAdapter;

impl Edge {
    /// The policy's adapter for clients of `model` that ask for `version`.
    pub(in crate::api) fn adapter(&self, model: &str, version: &str) -> Option<VersionAdapter> {
        self.snapshot
            .policy
            .models
            .as_ref()?
            .get(model)?
            .adapters
            .get(version)
            .cloned()
    }
}

impl InferenceApi {
    /// The contract of the route a call for `model` (`version`) takes: fetched on first use,
    /// `None` while the backend has not described it.
    pub(in crate::api) async fn contract_for(
        &self,
        edge: &Edge,
        model: &str,
        version: &str,
    ) -> Result<Option<Arc<Contract>>, Error> {
        let routes = self.router.routes(&edge.snapshot);
        let route = routes.route(MODEL_INFER, model, version, &edge.pick())?;
        let sent = route.version.as_deref().unwrap_or(version).to_string();
        let contracts = route.target.contracts.clone();
        let ctx = edge.ctx.call(&edge.snapshot, route, None);
        Ok(match contracts.lookup(&sent, ctx.deadline) {
            Lookup::Known(c) => Some(c),
            Lookup::Unknown => None,
            Lookup::Fetch(f) => f.await,
        })
    }

    /// Serves `req` (a request of `method`), through the policy's adapter when the client asks for a version that
    /// has one. An adapter that does not fit the model refuses the call
    /// (FAILED_PRECONDITION) rather than send the model a request it cannot take.
    pub(in crate::api) async fn infer_adapted(
        &self,
        edge: &Edge,
        method: &'static str,
        req: InferRequest,
    ) -> Result<Response<InferResponse>, Status> {
        let Some(adapter) = edge.adapter(&req.model, &req.version) else {
            return self.infer(edge, method, req).await;
        };
        let (model, asked) = (req.model.clone(), req.version.clone());
        let mismatch = |problems: Vec<String>| Error::AdapterMismatch {
            model: model.clone(),
            version: asked.clone(),
            problems,
        };
        let at = format!("models.{model}.adapters.{asked:?}");
        match self.contract_for(edge, &req.model, &adapter.to).await {
            Ok(Some(contract)) => {
                let problems = version::check(&adapter, &contract, &at);
                if !problems.is_empty() {
                    let e = mismatch(
                        problems
                            .into_iter()
                            .map(|(path, message)| format!("{path}: {message}"))
                            .collect(),
                    );
                    tracing::warn!(model = %req.model, error = %e, "version adapter refused: fix the policy");
                    return Err(edge.status(&e, None));
                }
            }
            // Unknown yet: adapt anyway; the contract check of the call says what is wrong.
            Ok(None) => {}
            Err(e) => return Err(edge.status(&e, None)),
        }
        let adapted = version::request(req, &adapter).map_err(|r| {
            self.rejected(edge, &model, &r);
            edge.status(&r.into(), None)
        })?;
        let (md, answer, ext) = self.infer(edge, method, adapted).await?.into_parts();
        match version::response(answer, &adapter) {
            Ok(answer) => Ok(Response::from_parts(md, answer, ext)),
            Err(problem) => Err(edge.status(&mismatch(vec![format!("{at}: {problem}")]), None)),
        }
    }
}
