//! `inference.GRPCInferenceService`: the Open Inference Protocol v2 with Triton's extensions.
//!
//! Each handler reads the call's context from the metadata, converts the message to domain
//! types, sends it through the method's tower stack, and converts the answer back. Every
//! answer, success or error, carries the call's `x-request-id`.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use tokio::sync::watch;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};

mod bytes;
mod labels;
mod versions;

pub use bytes::InferenceRoutes;

use super::{keys, receipt, status, unreadable};
use crate::auth::{AUTHORIZATION, Guard, Pass};
use crate::call::CallContext;
use crate::dispatch::{Answer, Dispatch, Edge, EdgeContext, Failed, record};
use crate::dispatch::{CallService, Stacks};
use crate::dispatch::{MODEL_INFER, MODEL_STREAM_INFER};
use crate::error::Error;
use crate::model::{InferRequest, InferResponse, ModelRef};
use crate::observe::traces::Tracing;
use crate::pb::{self, inference as proto};
use crate::policy::Store;
use crate::resilience::Slots;
use crate::route::Router;
use crate::upstream::grpc::set_request_id;
use crate::upstream::{ConfigQuery, MetadataQuery, ReadyQuery, StatisticsQuery};
use proto::grpc_inference_service_server::GrpcInferenceService;

/// The response metadata that says which policy revision answered.
pub const POLICY_REVISION: &str = "keel-policy-revision";

/// Full method names, as policy `[methods."..."]` sections name them.
const MODEL_READY: &str = "inference.GRPCInferenceService/ModelReady";
const MODEL_METADATA: &str = "inference.GRPCInferenceService/ModelMetadata";
const MODEL_CONFIG: &str = "inference.GRPCInferenceService/ModelConfig";
const MODEL_STATISTICS: &str = "inference.GRPCInferenceService/ModelStatistics";

/// The response parameter Triton sets on the last answer to a streamed request.
const FINAL_RESPONSE: &str = "triton_final_response";

/// The response parameter that names a streamed request's own request id (the stream's
/// `x-request-id` names only the stream).
const REQUEST_ID_PARAM: &str = "keel.request_id";

/// Streamed requests of one ModelStreamInfer call in flight at once; answers keep the order
/// of the requests.
const STREAM_CONCURRENCY: usize = 16;

/// What the server shares with the service about its life: readiness, the drain cut, and
/// Keel-wide slots.
pub struct Lifecycle {
    /// Whether Keel is ready (no shutdown, every required model can answer): ServerReady.
    pub readiness: Arc<crate::server::health::Readiness>,
    /// Becomes true when the drain timeout passes.
    pub cut: watch::Receiver<bool>,
    /// Keel-wide slots for calls in flight (`server.max_in_flight`), some kept for
    /// interactive callers.
    pub gate: Arc<Slots>,
}

/// The service. Cloning it is cheap (shared handles): a stream's requests outlive `&self`.
#[derive(Clone)]
pub struct InferenceApi {
    /// Where each request is routed, degraded, bounded and recorded.
    dispatch: Dispatch,
    /// The policy; each call takes one snapshot at its start.
    store: Arc<Store>,
    /// Whether Keel is ready: ServerReady.
    readiness: Arc<crate::server::health::Readiness>,
    /// Tenants' buckets and slots, kept across policy swaps.
    guard: Arc<Guard>,
}

impl InferenceApi {
    /// The service over `stacks`, with policy from `store`, routes from `router`, and the
    /// server's `lifecycle`.
    pub fn new(
        stacks: Stacks,
        store: Arc<Store>,
        router: Arc<Router>,
        lifecycle: Lifecycle,
        tracing: Option<Arc<Tracing>>,
    ) -> Self {
        let Lifecycle {
            readiness,
            cut,
            gate,
        } = lifecycle;
        let metrics = router.metrics().clone();
        InferenceApi {
            dispatch: Dispatch {
                stacks,
                router,
                metrics,
                gate,
                cut,
                tracing,
            },
            store,
            readiness,
            guard: Arc::new(Guard::new()),
        }
    }

    /// Where requests are routed, degraded, bounded and recorded.
    pub(super) fn dispatch(&self) -> &Dispatch {
        &self.dispatch
    }

    /// Reads the edge context and takes the policy snapshot for one call of `api`, without
    /// asking who calls (ServerLive and ServerReady, which probes call without a key).
    fn open<T>(&self, request: &Request<T>, api: &'static str) -> Edge {
        Edge {
            ctx: EdgeContext::from_request(request),
            snapshot: self.store.current(),
            peer: crate::transport::Peer::addr_of(request),
            api,
            caller: None,
        }
    }

    /// [`Self::open`], then authenticates the caller when the policy defines tenants:
    /// UNAUTHENTICATED without a valid key. The key is Keel's, so it is not forwarded.
    pub(super) fn begin<T>(&self, request: &Request<T>, api: &'static str) -> Result<Edge, Status> {
        let mut edge = self.open(request, api);
        let presented = request.metadata().get(AUTHORIZATION).map(|v| v.as_bytes());
        let identity = crate::transport::Peer::identity_of(request);
        let policy = &edge.snapshot.policy;
        match self
            .guard
            .authenticate(policy, edge.snapshot.revision, presented, identity)
        {
            Ok(None) => Ok(edge),
            Ok(Some(caller)) => {
                Arc::make_mut(&mut edge.ctx.metadata).remove(AUTHORIZATION);
                edge.caller = Some(caller);
                Ok(edge)
            }
            Err(e) => {
                let reason = e.reason();
                self.dispatch
                    .metrics()
                    .auth_failures
                    .get_or_create(&crate::observe::metrics::AuthFailureLabels { reason })
                    .inc();
                tracing::info!(
                    request_id = %edge.ctx.request_id,
                    api,
                    peer = %edge.peer.map(|p| p.to_string()).unwrap_or_default(),
                    reason,
                    "call refused: no valid API key"
                );
                Err(edge.status(&e.into(), None))
            }
        }
    }

    /// Lets one request of the edge's tenant in (for `model` when it names one), or refuses
    /// it with the status to answer; `method` says whether it counts as an inference
    /// request in `keel_tenant_requests_total`.
    pub(super) fn admit(
        &self,
        edge: &Edge,
        method: &'static str,
        model: Option<&str>,
    ) -> Result<Option<Pass>, Error> {
        let Some(caller) = &edge.caller else {
            return Ok(None);
        };
        caller.admit(model).map(Some).map_err(|refused| {
            let e = Error::from(refused);
            if is_inference(method) {
                record::tenant_request(self.dispatch.metrics(), caller.name(), e.code());
            }
            tracing::info!(
                request_id = %edge.ctx.request_id,
                api = edge.api,
                tenant = caller.name(),
                method,
                model = model.unwrap_or(""),
                error = %e,
                "call refused for its tenant"
            );
            e
        })
    }

    /// Routes one call to `method` under the edge's snapshot and sends it through `svc`;
    /// errors become tagged statuses with the call's receipt.
    async fn call<Op: crate::upstream::Operation>(
        &self,
        svc: &CallService<Op>,
        edge: &Edge,
        method: &'static str,
        body: Op,
    ) -> Result<Answer<Op::Response>, Status> {
        self.dispatch
            .call(svc, edge, method, body)
            .await
            .map_err(|f| edge.failed(f))
    }

    /// Answers an inference request of `method` (ModelInfer, or one request of a
    /// ModelStreamInfer stream) as the dispatch decides, labelled.
    pub(in crate::api) async fn infer(
        &self,
        edge: &Edge,
        method: &'static str,
        req: InferRequest,
    ) -> Result<Response<InferResponse>, Status> {
        match self.dispatch.infer(edge, method, req).await {
            Ok(served) => labels::labelled(edge, served),
            Err(f) => Err(edge.failed(f)),
        }
    }
}

impl InferenceApi {
    /// Whether `name` (`version`) is ready; as Triton does, an unknown model is simply not
    /// ready.
    pub(super) async fn ready<T>(
        &self,
        edge: &Edge,
        name: String,
        version: String,
        answer: impl FnOnce(bool) -> T,
    ) -> Result<Response<T>, Status> {
        // A model hidden from the tenant is not ready, exactly as an unknown one.
        let _pass = match self.admit(edge, MODEL_READY, Some(&name)) {
            Ok(pass) => pass,
            Err(Error::ModelNotFound { .. }) => return Ok(edge.reply(answer(false))),
            Err(e) => return Err(edge.status(&e, None)),
        };
        let q = ReadyQuery(model_ref(name, version));
        match self
            .call(&self.dispatch.stacks().ready, edge, MODEL_READY, q)
            .await
        {
            Ok(a) => Ok(edge.answer(a, answer)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(edge.reply(answer(false))),
            Err(s) => Err(s),
        }
    }

    /// The versions clients may ask `model` for under the edge's policy (none for a model
    /// the tenant may not call).
    pub(super) fn versions(&self, edge: &Edge, model: &str) -> Vec<String> {
        if !edge.may_call(model) {
            return Vec::new();
        }
        self.dispatch.routes(edge).versions(model)
    }

    /// Records a request refused before it was routed.
    pub(super) fn rejected(&self, edge: &Edge, model: &str, r: &crate::model::Rejection) {
        let known = self.dispatch.routes(edge).has(model);
        let label = if known { model } else { "unknown" };
        let from = record::Sender {
            api: edge.api,
            request_id: &edge.ctx.request_id,
            tenant: edge.tenant(),
        };
        record::rejected(self.dispatch.metrics(), &from, label, r);
    }

    /// Serves one inference request of `method` from its wire form: the tenant's admission,
    /// validation, version adapters, the fallback ladder. ModelInfer and every request of a
    /// ModelStreamInfer stream take this one path, so a streamed request is treated as a
    /// unary one would be.
    async fn infer_pb(
        &self,
        edge: &Edge,
        method: &'static str,
        msg: proto::ModelInferRequest,
    ) -> Result<Response<proto::ModelInferResponse>, Status> {
        let resp = self.infer_message(edge, method, msg, None).await?;
        Ok(resp.map(pb::infer_response_to_pb))
    }

    /// [`Self::infer_pb`] to the domain answer; `bytes`, when given, are what `msg` was
    /// decoded from, kept to send upstream as they came.
    async fn infer_message(
        &self,
        edge: &Edge,
        method: &'static str,
        msg: proto::ModelInferRequest,
        bytes: Option<::bytes::Bytes>,
    ) -> Result<Response<crate::model::InferResponse>, Status> {
        let model = msg.model_name.clone();
        let _pass = self
            .admit(edge, method, Some(&model))
            .map_err(|e| edge.status(&e, None))?;
        let req = match bytes {
            Some(bytes) => pb::wire::request_from(msg, bytes),
            None => pb::infer_request_from_pb(msg),
        }
        .map_err(|invalid| {
            self.rejected(edge, &model, &invalid);
            edge.status(&invalid.into(), None)
        })?;
        self.infer_adapted(edge, method, req).await
    }

    /// The answer to one request of a ModelStreamInfer stream. An error becomes the
    /// message's `error_message` and the stream goes on; each request gets exactly one
    /// answer, flagged final as Triton does, for clients that read until the final response.
    async fn stream_answer(
        &self,
        edge: &Edge,
        msg: proto::ModelInferRequest,
    ) -> proto::ModelStreamInferResponse {
        let blank = proto::ModelInferResponse {
            model_name: msg.model_name.clone(),
            model_version: msg.model_version.clone(),
            id: msg.id.clone(),
            ..Default::default()
        };
        let (error_message, mut resp) = match self.infer_pb(edge, MODEL_STREAM_INFER, msg).await {
            Ok(answer) => (String::new(), answer.into_inner()),
            Err(status) => (status.message().to_string(), blank),
        };
        resp.parameters.insert(
            FINAL_RESPONSE.to_string(),
            proto::InferParameter {
                parameter_choice: Some(proto::infer_parameter::ParameterChoice::BoolParam(true)),
            },
        );
        resp.parameters.insert(
            REQUEST_ID_PARAM.to_string(),
            proto::InferParameter {
                parameter_choice: Some(proto::infer_parameter::ParameterChoice::StringParam(
                    edge.ctx.request_id.to_string(),
                )),
            },
        );
        proto::ModelStreamInferResponse {
            error_message,
            infer_response: Some(resp),
        }
    }
}

impl Edge {
    /// The edge of the `index`-th request of this stream, whose OIP id is `id`: the same
    /// caller, snapshot and deadline, its own request id
    /// ([`streamed_request_id`](super::context::streamed_request_id)).
    fn streamed(&self, index: usize, id: &str) -> Edge {
        let mut ctx = self.ctx.clone();
        ctx.request_id = super::context::streamed_request_id(&self.ctx.request_id, index, id);
        Edge {
            ctx,
            snapshot: self.snapshot.clone(),
            peer: self.peer,
            api: self.api,
            caller: self.caller.clone(),
        }
    }

    /// A successful answer, tagged.
    pub(super) fn reply<T>(&self, value: T) -> Response<T> {
        let mut resp = Response::new(value);
        // Room for Keel's names, an upstream's few and the content type, made once rather
        // than grown (and rehashed) as they are added.
        *resp.metadata_mut() = MetadataMap::with_capacity(REPLY_HEADERS);
        tag(
            resp.metadata_mut(),
            &self.ctx.request_id,
            self.snapshot.revision,
        );
        resp
    }

    /// A call's answer, converted, tagged, with its receipt.
    fn answer<T, U>(&self, answer: Answer<T>, convert: impl FnOnce(T) -> U) -> Response<U> {
        let mut resp = self.reply(convert(answer.value));
        receipt::write(resp.metadata_mut(), &answer.ctx);
        resp
    }

    /// A status, tagged.
    fn tag(&self, mut status: Status) -> Status {
        tag(
            status.metadata_mut(),
            &self.ctx.request_id,
            self.snapshot.revision,
        );
        status
    }

    /// The status of a call that produced no answer.
    pub(super) fn failed(&self, f: Failed) -> Status {
        match f {
            Failed::Error(e, ctx) => self.status(&e, ctx.as_deref()),
            Failed::Cut => self.status(&Error::DrainTimeout, None),
        }
    }

    /// The status for an error, tagged, with the call's receipt when it got that far.
    pub(in crate::api) fn status(&self, e: &Error, ctx: Option<&CallContext>) -> Status {
        let mut s = self.tag(status::to_status(e, ctx, self.snapshot.revision));
        if let Some(ctx) = ctx {
            receipt::write(s.metadata_mut(), ctx);
        }
        s
    }
}

/// The headers an answer has room for from the start ([`Edge::reply`]).
const REPLY_HEADERS: usize = 12;

/// Adds the request id and the policy revision to an answer's metadata.
fn tag(md: &mut MetadataMap, request_id: &str, revision: u64) {
    set_request_id(md, request_id);
    md.insert(keys::POLICY_REVISION.clone(), MetadataValue::from(revision));
}

/// Whether `method` is an inference request (counted per tenant).
fn is_inference(method: &str) -> bool {
    matches!(method, MODEL_INFER | MODEL_STREAM_INFER | PREDICT)
}

/// The legacy API's inference method, for the tenant counter.
pub(super) const PREDICT: &str = "keel.inference.v1.PredictionService/Predict";

fn model_ref(name: String, version: String) -> ModelRef {
    ModelRef { name, version }
}

type StreamOut =
    Pin<Box<dyn Stream<Item = Result<proto::ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for InferenceApi {
    async fn server_live(
        &self,
        request: Request<proto::ServerLiveRequest>,
    ) -> Result<Response<proto::ServerLiveResponse>, Status> {
        // Open to probes: it says nothing but that Keel answers.
        let edge = self.open(&request, "v2");
        Ok(edge.reply(proto::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        request: Request<proto::ServerReadyRequest>,
    ) -> Result<Response<proto::ServerReadyResponse>, Status> {
        // Open to probes and load balancers, as ServerLive.
        let edge = self.open(&request, "v2");
        let ready = self.readiness.ready();
        Ok(edge.reply(proto::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<proto::ModelReadyRequest>,
    ) -> Result<Response<proto::ModelReadyResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        let proto::ModelReadyRequest { name, version } = request.into_inner();
        self.ready(&edge, name, version, |ready| proto::ModelReadyResponse {
            ready,
        })
        .await
    }

    async fn server_metadata(
        &self,
        request: Request<proto::ServerMetadataRequest>,
    ) -> Result<Response<proto::ServerMetadataResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        let _pass = self
            .admit(&edge, "ServerMetadata", None)
            .map_err(|e| edge.status(&e, None))?;
        Ok(edge.reply(proto::ServerMetadataResponse {
            name: "keel".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: ["model_configuration", "statistics", "parameters"]
                .map(String::from)
                .to_vec(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<proto::ModelMetadataRequest>,
    ) -> Result<Response<proto::ModelMetadataResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        let proto::ModelMetadataRequest { name, version } = request.into_inner();
        let _pass = self
            .admit(&edge, MODEL_METADATA, Some(&name))
            .map_err(|e| edge.status(&e, None))?;
        let q = MetadataQuery(model_ref(name, version));
        let a = self
            .call(&self.dispatch.stacks().metadata, &edge, MODEL_METADATA, q)
            .await?;
        Ok(edge.answer(a, pb::metadata_to_pb))
    }

    async fn model_infer(
        &self,
        request: Request<proto::ModelInferRequest>,
    ) -> Result<Response<proto::ModelInferResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        self.infer_pb(&edge, MODEL_INFER, request.into_inner())
            .await
    }

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<proto::ModelInferRequest>>,
    ) -> Result<Response<StreamOut>, Status> {
        // One snapshot for the whole stream: it is one call, and its revision is reported
        // once, in the response headers.
        let edge = Arc::new(self.begin(&request, "v2")?);
        let api = Arc::new(self.clone());
        let (per_request, at_cut) = (edge.clone(), edge.clone());
        // Each streamed request is one unary call upstream, so upstreams need not speak
        // Triton's stream dialect; `buffered` keeps answers in request order. Each is a
        // request of its own, with its own request id.
        let answers = request
            .into_inner()
            .enumerate()
            .map(move |(index, item)| {
                let (api, stream) = (api.clone(), per_request.clone());
                async move {
                    let revision = stream.snapshot.revision;
                    let msg = item.map_err(|s| stream.tag(unreadable::fix_status(s, revision)))?;
                    let edge = stream.streamed(index, &msg.id);
                    Ok(api.stream_answer(&edge, msg).await)
                }
            })
            .buffered(STREAM_CONCURRENCY)
            // At the drain timeout the stream ends with UNAVAILABLE.
            .take_until(self.dispatch.cut())
            .chain(
                futures::stream::once(self.dispatch.was_cut()).filter_map(move |cut| {
                    let end = cut.then(|| Err(at_cut.failed(Failed::Cut)));
                    async move { end }
                }),
            );
        Ok(edge.reply(Box::pin(answers) as StreamOut))
    }

    async fn model_config(
        &self,
        request: Request<proto::ModelConfigRequest>,
    ) -> Result<Response<proto::ModelConfigResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        let proto::ModelConfigRequest { name, version } = request.into_inner();
        let _pass = self
            .admit(&edge, MODEL_CONFIG, Some(&name))
            .map_err(|e| edge.status(&e, None))?;
        let q = ConfigQuery(model_ref(name, version));
        let a = self
            .call(&self.dispatch.stacks().config, &edge, MODEL_CONFIG, q)
            .await?;
        Ok(edge.answer(a, |spec| proto::ModelConfigResponse {
            config: Some(pb::spec_to_pb(spec)),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<proto::ModelStatisticsRequest>,
    ) -> Result<Response<proto::ModelStatisticsResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        let proto::ModelStatisticsRequest { name, version } = request.into_inner();
        let named = (!name.is_empty()).then_some(name.as_str());
        let _pass = self
            .admit(&edge, MODEL_STATISTICS, named)
            .map_err(|e| edge.status(&e, None))?;
        let mut model_stats = Vec::new();
        if name.is_empty() {
            let routes = self.dispatch.routes(&edge);
            for model in routes.models().filter(|m| edge.may_call(m)) {
                let q = StatisticsQuery(model_ref(model.to_string(), version.clone()));
                match self
                    .call(
                        &self.dispatch.stacks().statistics,
                        &edge,
                        MODEL_STATISTICS,
                        q,
                    )
                    .await
                {
                    Ok(a) => model_stats.extend(a.value),
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
            model_stats = self
                .call(
                    &self.dispatch.stacks().statistics,
                    &edge,
                    MODEL_STATISTICS,
                    q,
                )
                .await?
                .value;
        }
        Ok(edge.reply(proto::ModelStatisticsResponse {
            model_stats: model_stats.into_iter().map(pb::stats_to_pb).collect(),
        }))
    }

    async fn repository_index(
        &self,
        request: Request<proto::RepositoryIndexRequest>,
    ) -> Result<Response<proto::RepositoryIndexResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        let _pass = self
            .admit(&edge, "RepositoryIndex", None)
            .map_err(|e| edge.status(&e, None))?;
        let only_ready = request.get_ref().ready;
        let routes = self.dispatch.routes(&edge);
        let mut models = Vec::new();
        // A tenant's index lists the models it may call.
        for model in routes.models().filter(|m| edge.may_call(m)) {
            let q = ReadyQuery(model_ref(model.to_string(), String::new()));
            let answer = self
                .call(&self.dispatch.stacks().ready, &edge, MODEL_READY, q)
                .await;
            let (state, reason) = match answer.map(|a| a.value) {
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
                name: model.to_string(),
                version: String::new(),
                state: state.to_string(),
                reason,
            });
        }
        Ok(edge.reply(proto::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<proto::RepositoryModelLoadRequest>,
    ) -> Result<Response<proto::RepositoryModelLoadResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        Err(edge.status(
            &Error::Unsupported {
                what: "RepositoryModelLoad",
            },
            None,
        ))
    }

    async fn repository_model_unload(
        &self,
        request: Request<proto::RepositoryModelUnloadRequest>,
    ) -> Result<Response<proto::RepositoryModelUnloadResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        Err(edge.status(
            &Error::Unsupported {
                what: "RepositoryModelUnload",
            },
            None,
        ))
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<proto::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<proto::SystemSharedMemoryStatusResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        Err(edge.status(
            &Error::Unsupported {
                what: "System shared memory",
            },
            None,
        ))
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<proto::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<proto::SystemSharedMemoryRegisterResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        Err(edge.status(
            &Error::Unsupported {
                what: "System shared memory",
            },
            None,
        ))
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<proto::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<proto::SystemSharedMemoryUnregisterResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        Err(edge.status(
            &Error::Unsupported {
                what: "System shared memory",
            },
            None,
        ))
    }

    async fn cuda_shared_memory_status(
        &self,
        request: Request<proto::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<proto::CudaSharedMemoryStatusResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        Err(edge.status(
            &Error::Unsupported {
                what: "CUDA shared memory",
            },
            None,
        ))
    }

    async fn cuda_shared_memory_register(
        &self,
        request: Request<proto::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<proto::CudaSharedMemoryRegisterResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        Err(edge.status(
            &Error::Unsupported {
                what: "CUDA shared memory",
            },
            None,
        ))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        request: Request<proto::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<proto::CudaSharedMemoryUnregisterResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        Err(edge.status(
            &Error::Unsupported {
                what: "CUDA shared memory",
            },
            None,
        ))
    }

    async fn trace_setting(
        &self,
        request: Request<proto::TraceSettingRequest>,
    ) -> Result<Response<proto::TraceSettingResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        Err(edge.status(
            &Error::Unsupported {
                what: "TraceSetting",
            },
            None,
        ))
    }

    async fn log_settings(
        &self,
        request: Request<proto::LogSettingsRequest>,
    ) -> Result<Response<proto::LogSettingsResponse>, Status> {
        let edge = self.begin(&request, "v2")?;
        Err(edge.status(
            &Error::Unsupported {
                what: "LogSettings",
            },
            None,
        ))
    }
}
