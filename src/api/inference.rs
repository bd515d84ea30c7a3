//! `inference.GRPCInferenceService`: the Open Inference Protocol v2 with Triton's extensions.
//!
//! Each handler reads the call's context from the metadata, converts the message to domain
//! types, sends it through the method's tower stack, and converts the answer back. Every
//! answer, success or error, carries the call's `x-request-id`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};
use tower::ServiceExt as _;
use tower::util::BoxCloneSyncService;

use super::context::EdgeContext;
use super::{oversize, status};
use crate::call::{Call, ModelRef};
use crate::error::Error;
use crate::model::InferRequest;
use crate::pb::{self, inference as proto};
use crate::upstream::grpc::REQUEST_ID;
use crate::upstream::{ConfigQuery, MetadataQuery, Operation, ReadyQuery, StatisticsQuery};
use proto::grpc_inference_service_server::GrpcInferenceService;

/// A method's tower stack, from the edge to the backend.
pub type CallService<Op> = BoxCloneSyncService<Call<Op>, <Op as Operation>::Response, Error>;

/// One stack per per-model method.
#[derive(Clone)]
pub struct Stacks {
    /// ModelInfer and each ModelStreamInfer message.
    pub infer: CallService<InferRequest>,
    /// ModelReady and RepositoryIndex.
    pub ready: CallService<ReadyQuery>,
    /// ModelMetadata.
    pub metadata: CallService<MetadataQuery>,
    /// ModelConfig.
    pub config: CallService<ConfigQuery>,
    /// ModelStatistics.
    pub statistics: CallService<StatisticsQuery>,
}

/// The response parameter Triton sets on the last answer to a streamed request.
const FINAL_RESPONSE: &str = "triton_final_response";

/// Streamed requests of one ModelStreamInfer call in flight at once; answers keep the order
/// of the requests.
const STREAM_CONCURRENCY: usize = 16;

/// The service.
pub struct InferenceApi {
    stacks: Stacks,
    /// Every served model, for RepositoryIndex and ModelStatistics without a name.
    models: Arc<[String]>,
    default_timeout: Duration,
    /// False once shutdown begins: ServerReady answers false.
    serving: Arc<AtomicBool>,
    /// Becomes true when the drain timeout passes: calls still running are cut.
    cut: watch::Receiver<bool>,
}

/// Completes when `cut` becomes true (never, if its sender is dropped without cutting).
async fn cut_off(mut cut: watch::Receiver<bool>) {
    if cut.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Whether the drain timeout has passed.
async fn cut_check(cut: watch::Receiver<bool>) -> bool {
    *cut.borrow()
}

fn cut_status() -> Status {
    Status::unavailable(
        "Keel is shutting down and the drain timeout passed; retry on another instance",
    )
}

impl InferenceApi {
    /// The service over `stacks`, serving `models`.
    pub fn new(
        stacks: Stacks,
        models: Vec<String>,
        default_timeout: Duration,
        serving: Arc<AtomicBool>,
        cut: watch::Receiver<bool>,
    ) -> Self {
        InferenceApi {
            stacks,
            models: models.into(),
            default_timeout,
            serving,
            cut,
        }
    }

    /// Sends one call through `svc`; errors become statuses tagged with the request id.
    async fn call<Op: Operation>(
        &self,
        svc: &CallService<Op>,
        edge: &EdgeContext,
        body: Op,
    ) -> Result<Op::Response, Status> {
        let ctx = edge.call(self.default_timeout);
        tokio::select! {
            r = svc.clone().oneshot(Call { ctx, body }) => {
                r.map_err(|e| status::to_status(&e, &edge.request_id))
            }
            () = cut_off(self.cut.clone()) => {
                let mut s = cut_status();
                status::with_request_id(&mut s, &edge.request_id);
                Err(s)
            }
        }
    }
}

/// A successful answer with the request id in its metadata.
fn reply<T>(value: T, request_id: &str) -> Response<T> {
    let mut resp = Response::new(value);
    if let Ok(v) = MetadataValue::try_from(request_id) {
        resp.metadata_mut().insert(REQUEST_ID, v);
    }
    resp
}

fn model_ref(name: String, version: String) -> ModelRef {
    ModelRef { name, version }
}

fn unsupported(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not supported by Keel: it is a gateway, so models are managed on its upstreams and tensors travel in the request"
    ))
}

type StreamOut =
    Pin<Box<dyn Stream<Item = Result<proto::ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for InferenceApi {
    async fn server_live(
        &self,
        request: Request<proto::ServerLiveRequest>,
    ) -> Result<Response<proto::ServerLiveResponse>, Status> {
        let edge = EdgeContext::from_metadata(request.metadata());
        Ok(reply(
            proto::ServerLiveResponse { live: true },
            &edge.request_id,
        ))
    }

    async fn server_ready(
        &self,
        request: Request<proto::ServerReadyRequest>,
    ) -> Result<Response<proto::ServerReadyResponse>, Status> {
        let edge = EdgeContext::from_metadata(request.metadata());
        let ready = self.serving.load(Ordering::Acquire);
        Ok(reply(
            proto::ServerReadyResponse { ready },
            &edge.request_id,
        ))
    }

    async fn model_ready(
        &self,
        request: Request<proto::ModelReadyRequest>,
    ) -> Result<Response<proto::ModelReadyResponse>, Status> {
        let edge = EdgeContext::from_metadata(request.metadata());
        let proto::ModelReadyRequest { name, version } = request.into_inner();
        let q = ReadyQuery(model_ref(name, version));
        // As Triton does, an unknown model is simply not ready.
        let ready = match self.call(&self.stacks.ready, &edge, q).await {
            Ok(r) => r,
            Err(s) if s.code() == tonic::Code::NotFound => false,
            Err(s) => return Err(s),
        };
        Ok(reply(proto::ModelReadyResponse { ready }, &edge.request_id))
    }

    async fn server_metadata(
        &self,
        request: Request<proto::ServerMetadataRequest>,
    ) -> Result<Response<proto::ServerMetadataResponse>, Status> {
        let edge = EdgeContext::from_metadata(request.metadata());
        let resp = proto::ServerMetadataResponse {
            name: "keel".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: ["model_configuration", "statistics", "parameters"]
                .map(String::from)
                .to_vec(),
        };
        Ok(reply(resp, &edge.request_id))
    }

    async fn model_metadata(
        &self,
        request: Request<proto::ModelMetadataRequest>,
    ) -> Result<Response<proto::ModelMetadataResponse>, Status> {
        let edge = EdgeContext::from_metadata(request.metadata());
        let proto::ModelMetadataRequest { name, version } = request.into_inner();
        let meta = self
            .call(
                &self.stacks.metadata,
                &edge,
                MetadataQuery(model_ref(name, version)),
            )
            .await?;
        Ok(reply(pb::metadata_to_pb(meta), &edge.request_id))
    }

    async fn model_infer(
        &self,
        request: Request<proto::ModelInferRequest>,
    ) -> Result<Response<proto::ModelInferResponse>, Status> {
        let edge = EdgeContext::from_metadata(request.metadata());
        let req = pb::infer_request_from_pb(request.into_inner())
            .map_err(|e| status::to_status(&e.into(), &edge.request_id))?;
        let form = req.form;
        let resp = self.call(&self.stacks.infer, &edge, req).await?;
        Ok(reply(
            pb::infer_response_to_pb(resp, form),
            &edge.request_id,
        ))
    }

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<proto::ModelInferRequest>>,
    ) -> Result<Response<StreamOut>, Status> {
        let edge = EdgeContext::from_metadata(request.metadata());
        let request_id = edge.request_id.clone();
        let infer = self.stacks.infer.clone();
        let default_timeout = self.default_timeout;
        // One unary call per streamed request, so upstreams need not speak Triton's stream
        // dialect; `buffered` keeps answers in request order.
        let answers = request
            .into_inner()
            .map(move |item| {
                let infer = infer.clone();
                let ctx = edge.call(default_timeout);
                async move {
                    let msg = item.map_err(oversize::fix_status)?;
                    let (id, model, version) = (
                        msg.id.clone(),
                        msg.model_name.clone(),
                        msg.model_version.clone(),
                    );
                    let result = match pb::infer_request_from_pb(msg) {
                        Ok(req) => {
                            let form = req.form;
                            infer
                                .oneshot(Call { ctx, body: req })
                                .await
                                .map(|resp| pb::infer_response_to_pb(resp, form))
                        }
                        Err(e) => Err(Error::from(e)),
                    };
                    let (error_message, mut resp) = match result {
                        Ok(resp) => (String::new(), resp),
                        // The stream goes on; the error names the request it belongs to.
                        Err(e) => (
                            e.to_string(),
                            proto::ModelInferResponse {
                                model_name: model,
                                model_version: version,
                                id,
                                ..Default::default()
                            },
                        ),
                    };
                    // Each request gets exactly one answer, flagged final as Triton does,
                    // for clients that read until the final response.
                    resp.parameters.insert(
                        FINAL_RESPONSE.to_string(),
                        proto::InferParameter {
                            parameter_choice: Some(
                                proto::infer_parameter::ParameterChoice::BoolParam(true),
                            ),
                        },
                    );
                    Ok(proto::ModelStreamInferResponse {
                        error_message,
                        infer_response: Some(resp),
                    })
                }
            })
            .buffered(STREAM_CONCURRENCY)
            // At the drain timeout the stream ends with UNAVAILABLE.
            .take_until(cut_off(self.cut.clone()))
            .chain(
                futures::stream::once(cut_check(self.cut.clone()))
                    .filter_map(|cut| async move { cut.then(|| Err(cut_status())) }),
            );
        Ok(reply(Box::pin(answers) as StreamOut, &request_id))
    }

    async fn model_config(
        &self,
        request: Request<proto::ModelConfigRequest>,
    ) -> Result<Response<proto::ModelConfigResponse>, Status> {
        let edge = EdgeContext::from_metadata(request.metadata());
        let proto::ModelConfigRequest { name, version } = request.into_inner();
        let spec = self
            .call(
                &self.stacks.config,
                &edge,
                ConfigQuery(model_ref(name, version)),
            )
            .await?;
        let resp = proto::ModelConfigResponse {
            config: Some(pb::spec_to_pb(spec)),
        };
        Ok(reply(resp, &edge.request_id))
    }

    async fn model_statistics(
        &self,
        request: Request<proto::ModelStatisticsRequest>,
    ) -> Result<Response<proto::ModelStatisticsResponse>, Status> {
        let edge = EdgeContext::from_metadata(request.metadata());
        let proto::ModelStatisticsRequest { name, version } = request.into_inner();
        let mut model_stats = Vec::new();
        if name.is_empty() {
            for model in self.models.iter() {
                let q = StatisticsQuery(model_ref(model.clone(), version.clone()));
                match self.call(&self.stacks.statistics, &edge, q).await {
                    Ok(stats) => model_stats.extend(stats),
                    // One unreachable upstream must not hide every other model's numbers.
                    Err(s) => tracing::warn!(
                        model = %model,
                        code = ?s.code(),
                        error = %s.message(),
                        "statistics unavailable for one model"
                    ),
                }
            }
        } else {
            let q = StatisticsQuery(model_ref(name, version));
            model_stats = self.call(&self.stacks.statistics, &edge, q).await?;
        }
        let resp = proto::ModelStatisticsResponse {
            model_stats: model_stats.into_iter().map(pb::stats_to_pb).collect(),
        };
        Ok(reply(resp, &edge.request_id))
    }

    async fn repository_index(
        &self,
        request: Request<proto::RepositoryIndexRequest>,
    ) -> Result<Response<proto::RepositoryIndexResponse>, Status> {
        let edge = EdgeContext::from_metadata(request.metadata());
        let only_ready = request.get_ref().ready;
        let mut models = Vec::with_capacity(self.models.len());
        for model in self.models.iter() {
            let q = ReadyQuery(model_ref(model.clone(), String::new()));
            let (state, reason) = match self.call(&self.stacks.ready, &edge, q).await {
                Ok(true) => ("READY", String::new()),
                Ok(false) => (
                    "UNAVAILABLE",
                    "the backend reports the model not ready".into(),
                ),
                Err(s) => ("UNAVAILABLE", s.message().to_string()),
            };
            if only_ready && state != "READY" {
                continue;
            }
            models.push(proto::repository_index_response::ModelIndex {
                name: model.clone(),
                version: String::new(),
                state: state.to_string(),
                reason,
            });
        }
        Ok(reply(
            proto::RepositoryIndexResponse { models },
            &edge.request_id,
        ))
    }

    async fn repository_model_load(
        &self,
        _request: Request<proto::RepositoryModelLoadRequest>,
    ) -> Result<Response<proto::RepositoryModelLoadResponse>, Status> {
        Err(unsupported("RepositoryModelLoad"))
    }

    async fn repository_model_unload(
        &self,
        _request: Request<proto::RepositoryModelUnloadRequest>,
    ) -> Result<Response<proto::RepositoryModelUnloadResponse>, Status> {
        Err(unsupported("RepositoryModelUnload"))
    }

    async fn system_shared_memory_status(
        &self,
        _request: Request<proto::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<proto::SystemSharedMemoryStatusResponse>, Status> {
        Err(unsupported("System shared memory"))
    }

    async fn system_shared_memory_register(
        &self,
        _request: Request<proto::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<proto::SystemSharedMemoryRegisterResponse>, Status> {
        Err(unsupported("System shared memory"))
    }

    async fn system_shared_memory_unregister(
        &self,
        _request: Request<proto::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<proto::SystemSharedMemoryUnregisterResponse>, Status> {
        Err(unsupported("System shared memory"))
    }

    async fn cuda_shared_memory_status(
        &self,
        _request: Request<proto::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<proto::CudaSharedMemoryStatusResponse>, Status> {
        Err(unsupported("CUDA shared memory"))
    }

    async fn cuda_shared_memory_register(
        &self,
        _request: Request<proto::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<proto::CudaSharedMemoryRegisterResponse>, Status> {
        Err(unsupported("CUDA shared memory"))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _request: Request<proto::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<proto::CudaSharedMemoryUnregisterResponse>, Status> {
        Err(unsupported("CUDA shared memory"))
    }

    async fn trace_setting(
        &self,
        _request: Request<proto::TraceSettingRequest>,
    ) -> Result<Response<proto::TraceSettingResponse>, Status> {
        Err(unsupported("TraceSetting"))
    }

    async fn log_settings(
        &self,
        _request: Request<proto::LogSettingsRequest>,
    ) -> Result<Response<proto::LogSettingsResponse>, Status> {
        Err(unsupported("LogSettings"))
    }
}
