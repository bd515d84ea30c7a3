//! Requests for a model version the policy adapts: the client's request is turned into one
//! for the version that answers, and the answer back (see [`crate::adapt::version`]).

use tonic::{Response, Status};

use super::{Edge, InferenceApi};
use crate::adapt::version;
use crate::error::Error;
use crate::model::{InferRequest, InferResponse};
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
        match self.dispatch.contract(edge, &req.model, &adapter.to).await {
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
