//! `keel.inference.v1.PredictionService`: the legacy API, upgraded to the v2 path.
//!
//! A Predict call is turned into one OIP request ([`crate::adapt::v1::upgrade`]) using the
//! contract of the route it takes and the policy's `[models.<name>.v1]` mapping; from there
//! it is a v2 call like any other (adapters, routing, retries, breakers, fallbacks, logs),
//! counted as `api="v1"`. The answer is turned back into predictions, with the response
//! parameters (degradation labels among them) and, when the policy deprecates v1, the
//! `keel-deprecation` trailer.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost_types::value::Kind;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use super::inference::InferenceApi;
use super::receipt::DEPRECATION;
use crate::adapt::v1::{self, Value};
use crate::adapt::version;
use crate::dispatch::Edge;
use crate::error::Error;
use crate::model::Parameters;
use crate::pb::keel_inference_v1 as proto;
use crate::policy::V1Mapping;
use proto::prediction_service_server::PredictionService;

/// The service, sharing the v2 service's state.
pub struct LegacyApi {
    api: Arc<InferenceApi>,
}

impl LegacyApi {
    /// The legacy API over `api`.
    pub fn new(api: Arc<InferenceApi>) -> Self {
        LegacyApi { api }
    }
}

fn from_pb(v: prost_types::Value) -> Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => Value::Number(n),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(l)) => Value::List(l.values.into_iter().map(from_pb).collect()),
        Some(Kind::StructValue(s)) => {
            Value::Struct(s.fields.into_iter().map(|(k, v)| (k, from_pb(v))).collect())
        }
    }
}

fn to_pb(v: Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n),
        Value::String(s) => Kind::StringValue(s),
        Value::List(l) => Kind::ListValue(prost_types::ListValue {
            values: l.into_iter().map(to_pb).collect(),
        }),
        Value::Struct(s) => Kind::StructValue(prost_types::Struct {
            fields: s.into_iter().map(|(k, v)| (k, to_pb(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Request parameters: every field that is a string, number or boolean.
fn parameters(s: Option<prost_types::Struct>) -> Parameters {
    s.map(|s| {
        s.fields
            .into_iter()
            .filter_map(|(k, v)| v1::parameter(&from_pb(v)).map(|p| (k, p)))
            .collect()
    })
    .unwrap_or_default()
}

impl Edge {
    /// The policy's v1 mapping of `model` (the defaults when it has none).
    fn v1_mapping(&self, model: &str) -> V1Mapping {
        self.snapshot
            .policy
            .models
            .as_ref()
            .and_then(|m| m.get(model))
            .and_then(|m| m.v1.clone())
            .unwrap_or_default()
    }

    /// Adds the deprecation trailer when the policy deprecates v1.
    fn deprecate<T>(&self, mut resp: Response<T>) -> Response<T> {
        if let Some(text) = self.snapshot.policy.api.deprecation()
            && let Ok(v) = MetadataValue::try_from(text)
        {
            resp.metadata_mut().insert(DEPRECATION, v);
        }
        resp
    }

    /// The same for an error.
    fn deprecate_status(&self, mut status: Status) -> Status {
        if let Some(text) = self.snapshot.policy.api.deprecation()
            && let Ok(v) = MetadataValue::try_from(text)
        {
            status.metadata_mut().insert(DEPRECATION, v);
        }
        status
    }
}

#[tonic::async_trait]
impl PredictionService for LegacyApi {
    async fn predict(
        &self,
        request: Request<proto::PredictRequest>,
    ) -> Result<Response<proto::PredictResponse>, Status> {
        let edge = self.api.begin(&request, "v1")?;
        let msg = request.into_inner();
        let _pass = self
            .api
            .admit(&edge, super::inference::PREDICT, Some(&msg.model_name))
            .map_err(|e| edge.deprecate_status(edge.status(&e, None)))?;
        let req = v1::Request {
            model: msg.model_name,
            version: msg.model_version,
            id: msg.id,
            instances: msg.instances.into_iter().map(from_pb).collect(),
            parameters: parameters(msg.parameters),
        };
        let (model, instances) = (req.model.clone(), req.instances.len());
        let map = edge.v1_mapping(&model);
        // A version the policy adapts is built against the contract its clients know.
        let adapter = edge.adapter(&model, &req.version);
        let target = adapter
            .as_ref()
            .map_or(req.version.as_str(), |a| a.to.as_str());
        let contract = match self.api.dispatch().contract(&edge, &model, target).await {
            Ok(Some(c)) => match &adapter {
                Some(a) => Arc::new(version::client_contract(a, &c)),
                None => c,
            },
            Ok(None) => {
                let e = Error::ContractUnknown { model };
                return Err(edge.deprecate_status(edge.status(&e, None)));
            }
            Err(e) => return Err(edge.deprecate_status(edge.status(&e, None))),
        };
        let oip = v1::upgrade(req, &contract, &map).map_err(|r| {
            self.api.rejected(&edge, &model, &r);
            edge.deprecate_status(edge.status(&Error::from(r), None))
        })?;
        let resp = self
            .api
            .infer_adapted(&edge, crate::dispatch::MODEL_INFER, oip)
            .await
            .map_err(|s| edge.deprecate_status(s))?;
        let (md, answer, ext) = resp.into_parts();
        let predictions = v1::downgrade(&answer, instances, &map).map_err(|problem| {
            let e = Error::AnswerNotV1 { model, problem };
            edge.deprecate_status(edge.status(&e, None))
        })?;
        let parameters: BTreeMap<String, prost_types::Value> = answer
            .parameters
            .iter()
            .map(|(k, p)| (k.clone(), to_pb(v1::parameter_value(p))))
            .collect();
        let out = proto::PredictResponse {
            model_name: answer.model,
            model_version: answer.version,
            predictions: predictions.into_iter().map(to_pb).collect(),
            parameters: (!parameters.is_empty())
                .then_some(prost_types::Struct { fields: parameters }),
            id: answer.id,
        };
        Ok(edge.deprecate(Response::from_parts(md, out, ext)))
    }

    async fn model_status(
        &self,
        request: Request<proto::ModelStatusRequest>,
    ) -> Result<Response<proto::ModelStatusResponse>, Status> {
        let edge = self.api.begin(&request, "v1")?;
        let proto::ModelStatusRequest {
            model_name,
            model_version,
        } = request.into_inner();
        let versions = self.api.versions(&edge, &model_name);
        let name = model_name.clone();
        let resp = self
            .api
            .ready(&edge, model_name, model_version, |ready| {
                proto::ModelStatusResponse {
                    model_name: name,
                    ready,
                    versions,
                }
            })
            .await
            .map_err(|s| edge.deprecate_status(s))?;
        Ok(edge.deprecate(resp))
    }
}
