//! What each request of a run carries, built once and cloned cheaply per request.

use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use super::{Api, LoadError, Plan};
use crate::pb::inference::ModelInferRequest;
use crate::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::pb::inference::model_infer_request::InferInputTensor;
use crate::pb::keel_inference_v1::PredictRequest;
use crate::pb::keel_inference_v1::prediction_service_client::PredictionServiceClient;

/// The request body of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    /// `simple`: two [1,16] INT32 inputs.
    Simple,
    /// `identity`: one FP32 input of about this many bytes.
    Identity(usize),
    /// `iris`: one [1,4] FP32 row.
    Iris,
}

impl FromStr for Payload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "simple" => Ok(Payload::Simple),
            "iris" => Ok(Payload::Iris),
            _ => match s.strip_prefix("identity:") {
                Some(size) => crate::policy::parse_size(size)
                    .map(|n| Payload::Identity(n.max(4)))
                    .map_err(|e| format!("identity:BYTES: {e}")),
                None => Err(format!(
                    "{s:?} is not a payload: simple, iris or identity:BYTES (identity:4MiB)"
                )),
            },
        }
    }
}

impl Payload {
    /// The model the payload is made for.
    pub fn model(self) -> &'static str {
        match self {
            Payload::Simple => "simple",
            Payload::Identity(_) => "identity",
            Payload::Iris => "iris",
        }
    }
}

/// What happened to one request.
#[derive(Clone, Debug, Default)]
pub(super) struct Outcome {
    /// The error's code; `None` on success.
    pub code: Option<tonic::Code>,
    /// Keel's `ErrorInfo` reason, when the error has one.
    pub reason: Option<String>,
    /// Keel's `keel-attempts` receipt.
    pub attempts: Option<u32>,
    /// Keel's `keel-tier` label.
    pub tier: Option<String>,
}

fn read<T: FromStr>(md: &tonic::metadata::MetadataMap, key: &str) -> Option<T> {
    md.get(key)?.to_str().ok()?.parse().ok()
}

/// A prebuilt request for one API.
pub(super) enum Request {
    V2(ModelInferRequest),
    V1(PredictRequest),
}

fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn le<T: Copy, const N: usize>(values: &[T], bytes: impl Fn(T) -> [u8; N]) -> Bytes {
    values
        .iter()
        .flat_map(|v| bytes(*v))
        .collect::<Vec<u8>>()
        .into()
}

fn number(x: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(x)),
    }
}

fn list(xs: impl IntoIterator<Item = f64>) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::ListValue(
            prost_types::ListValue {
                values: xs.into_iter().map(number).collect(),
            },
        )),
    }
}

const IRIS: [f32; 4] = [5.1, 3.5, 1.4, 0.2];

impl Request {
    pub(super) fn build(plan: &Plan) -> Result<Request, LoadError> {
        let model = plan.model.clone();
        Ok(match (plan.api, plan.payload) {
            (Api::V2, Payload::Simple) => {
                let a: Vec<i32> = (0..16).collect();
                Request::V2(ModelInferRequest {
                    model_name: model,
                    inputs: vec![
                        input("INPUT0", "INT32", &[1, 16]),
                        input("INPUT1", "INT32", &[1, 16]),
                    ],
                    raw_input_contents: vec![
                        le(&a, i32::to_le_bytes),
                        le(&[1i32; 16], i32::to_le_bytes),
                    ],
                    ..Default::default()
                })
            }
            (Api::V2, Payload::Identity(bytes)) => {
                let n = bytes / 4;
                Request::V2(ModelInferRequest {
                    model_name: model,
                    inputs: vec![input("INPUT0", "FP32", &[1, n as i64])],
                    raw_input_contents: vec![Bytes::from(vec![0u8; n * 4])],
                    ..Default::default()
                })
            }
            (Api::V2, Payload::Iris) => Request::V2(ModelInferRequest {
                model_name: model,
                inputs: vec![input("features", "FP32", &[1, 4])],
                raw_input_contents: vec![le(&IRIS, f32::to_le_bytes)],
                ..Default::default()
            }),
            (Api::V1, Payload::Simple) => {
                let instance = prost_types::Value {
                    kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                        fields: [
                            ("INPUT0".to_string(), list((0..16).map(f64::from))),
                            ("INPUT1".to_string(), list([1.0; 16])),
                        ]
                        .into_iter()
                        .collect(),
                    })),
                };
                Request::V1(PredictRequest {
                    model_name: model,
                    instances: vec![instance],
                    ..Default::default()
                })
            }
            (Api::V1, Payload::Iris) => Request::V1(PredictRequest {
                model_name: model,
                instances: vec![list(IRIS.map(f64::from))],
                ..Default::default()
            }),
            (Api::V1, Payload::Identity(_)) => {
                return Err(LoadError::BadPlan(
                    "--api v1 takes --payload simple or iris (identity tensors are v2 only)".into(),
                ));
            }
        })
    }

    /// Sends request `n` on `channel` with its own request id.
    pub(super) async fn send(
        &self,
        channel: Channel,
        n: u64,
        deadline: Option<Duration>,
    ) -> Outcome {
        fn prepare<T>(body: T, n: u64, deadline: Option<Duration>) -> tonic::Request<T> {
            let mut req = tonic::Request::new(body);
            if let Ok(id) = format!("load-{n}").parse() {
                req.metadata_mut().insert("x-request-id", id);
            }
            if let Some(d) = deadline {
                req.set_timeout(d);
            }
            req
        }
        let result = match self {
            Request::V2(body) => GrpcInferenceServiceClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX)
                .model_infer(prepare(body.clone(), n, deadline))
                .await
                .map(|r| r.metadata().clone()),
            Request::V1(body) => PredictionServiceClient::new(channel)
                .predict(prepare(body.clone(), n, deadline))
                .await
                .map(|r| r.metadata().clone()),
        };
        match result {
            Ok(md) => Outcome {
                code: None,
                reason: None,
                attempts: read(&md, "keel-attempts"),
                tier: md
                    .get("keel-tier")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from),
            },
            Err(status) => Outcome {
                code: Some(status.code()),
                reason: status.get_details_error_info().map(|i| i.reason),
                attempts: read(status.metadata(), "keel-attempts"),
                tier: None,
            },
        }
    }
}
