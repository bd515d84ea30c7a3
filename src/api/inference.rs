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
use tower::ServiceExt as _;
use tower::util::BoxCloneSyncService;

mod bytes;
mod degrade;
mod versions;

pub use bytes::InferenceRoutes;

use super::context::EdgeContext;
use super::record::Leg;
use super::{keys, receipt, record, status, unreadable};
use crate::auth::{AUTHORIZATION, Caller, Guard, Pass};
use crate::call::{Call, CallContext};
use crate::error::Error;
use crate::model::InferRequest;
use crate::model::ModelRef;
use crate::observe::traces::Tracing;
use crate::pb::{self, inference as proto};
use crate::policy::{ErrorClass, Priority, Snapshot, Store};
use crate::resilience::{Failure as _, Slots};
use crate::route::{Route, Router};
use crate::upstream::grpc::set_request_id;
use crate::upstream::{ConfigQuery, MetadataQuery, Operation, ReadyQuery, StatisticsQuery};
use opentelemetry::KeyValue;
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

/// The response metadata that says which policy revision answered.
pub const POLICY_REVISION: &str = "keel-policy-revision";

/// Full method names, as policy `[methods."..."]` sections name them.
pub(super) const MODEL_INFER: &str = "inference.GRPCInferenceService/ModelInfer";
const MODEL_STREAM_INFER: &str = "inference.GRPCInferenceService/ModelStreamInfer";
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
    stacks: Stacks,
    /// The policy; each call takes one snapshot at its start.
    store: Arc<Store>,
    /// Routes of each snapshot, for RepositoryIndex and ModelStatistics without a name.
    router: Arc<Router>,
    /// Whether Keel is ready: ServerReady.
    readiness: Arc<crate::server::health::Readiness>,
    /// Becomes true when the drain timeout passes: calls still running are cut.
    cut: watch::Receiver<bool>,
    /// Keel-wide slots for calls in flight (`server.max_in_flight`).
    gate: Arc<Slots>,
    /// Span export, when tracing is on.
    tracing: Option<Arc<Tracing>>,
    /// Tenants' buckets and slots, kept across policy swaps.
    guard: Arc<Guard>,
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
        InferenceApi {
            stacks,
            store,
            router,
            readiness,
            cut,
            gate,
            tracing,
            guard: Arc::new(Guard::new()),
        }
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
                self.router
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
                record::tenant_request(self.router.metrics(), caller.name(), e.code());
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
    async fn call<Op: Operation>(
        &self,
        svc: &CallService<Op>,
        edge: &Edge,
        method: &'static str,
        body: Op,
    ) -> Result<Answer<Op::Response>, Status> {
        self.call_via(svc, edge, method, Arc::new(body), Plan::WHOLE)
            .await
            .map_err(|f| edge.failed(f))
    }

    /// One call, routed by the policy or to a given route, with its deadline capped (a
    /// fallback never gets more time than the call it stands in for).
    pub(super) async fn call_via<Op: Operation>(
        &self,
        svc: &CallService<Op>,
        edge: &Edge,
        method: &'static str,
        body: Arc<Op>,
        plan: Plan,
    ) -> Result<Answer<Op::Response>, Failed> {
        let Plan {
            via,
            leg,
            deadline_cap,
            leave_margin,
        } = plan;
        let start = tokio::time::Instant::now();
        let metrics = self.router.metrics();
        let policy = &edge.snapshot.policy;
        let span = self.tracing.as_ref().map(|t| {
            let mut attrs = vec![
                KeyValue::new("keel.model", body.model().to_string()),
                KeyValue::new("keel.request_id", edge.ctx.request_id.to_string()),
                KeyValue::new("keel.policy.revision", edge.snapshot.revision as i64),
            ];
            if let Some(caller) = &edge.caller {
                attrs.push(KeyValue::new("keel.tenant", caller.name().to_string()));
                attrs.push(KeyValue::new("keel.priority", caller.priority().as_str()));
            }
            t.server_span(method, &edge.ctx.metadata, attrs)
        });
        let finished = |ctx: Option<&CallContext>, error: Option<&Error>| {
            if let Some(span) = &span {
                let receipt = ctx.map(|c| c.receipt.read()).unwrap_or_default();
                let class = error.map_or("ok", |e| e.class().as_str());
                span.set(vec![
                    KeyValue::new("keel.class", class),
                    KeyValue::new("keel.tier", leg.tier),
                    KeyValue::new("keel.attempts", i64::from(receipt.attempts)),
                ]);
                let code = error.map_or(tonic::Code::Ok, Error::code);
                span.end(crate::grpc_code::name(code), code as i64);
            }
            let f = record::Finished {
                method,
                request_id: &edge.ctx.request_id,
                model: body.model(),
                version: body.version(),
                ctx,
                error,
                took: start.elapsed(),
                bytes_in: body.payload_bytes(),
                peer: edge.peer,
                trace_id: edge.trace_id(),
                revision: edge.snapshot.revision,
                policy_version: edge.snapshot.version(),
                success_sample: policy.observability.success_log_sample,
                leg,
                api: edge.api,
                tenant: edge.tenant(),
            };
            record::finish(metrics, &f, || body.summary());
        };
        let route = match via {
            Via::Route(route) => route,
            Via::Policy => {
                let routes = self.router.routes(&edge.snapshot);
                match routes.route(method, body.model(), body.version(), &edge.pick()) {
                    Ok(route) => route,
                    Err(e) => {
                        finished(None, Some(&e));
                        return Err(Failed::Error(e, None));
                    }
                }
            }
        };
        // A route that sends its own version (a canary's, say) replaces the client's.
        let sent = match &route.version {
            Some(v) if **v != *body.version() => Arc::new(body.at_version(v)),
            _ => body.clone(),
        };
        // Keel's own bound, whatever the model: refuse at once rather than queue, batch
        // callers before the slots kept for interactive ones.
        let priority = edge.priority();
        let Some(_gate) = self.gate.try_take(priority) else {
            let e = Error::GatewayOverloaded {
                max_in_flight: self.gate.total(),
                reserved: self.gate.reserved_from(priority),
            };
            finished(None, Some(&e));
            return Err(Failed::Error(e, None));
        };
        let mut call_ctx = edge.ctx.call(&edge.snapshot, route, span.clone());
        call_ctx.pinned = sent.pinned();
        call_ctx.priority = priority;
        let margin = call_ctx.route.settings.deadline_margin;
        let mut cap = deadline_cap.unwrap_or(call_ctx.deadline);
        if leave_margin {
            cap = cap.checked_sub(margin).unwrap_or(cap);
        }
        if cap < call_ctx.deadline {
            let now = tokio::time::Instant::now();
            call_ctx.deadline = cap.max(now);
            call_ctx.budget = cap.saturating_duration_since(now);
        }
        let ctx = Arc::new(call_ctx);
        let result = tokio::select! {
            r = svc.clone().oneshot(Call::shared(ctx.clone(), sent)) => r,
            () = cut_off(self.cut.clone()) => return Err(Failed::Cut),
        };
        // An answer Keel could not send (over `server.max_message_size` once labelled)
        // fails here, so the log line, the metrics and the ladder see it.
        let result = result.and_then(|value| {
            let limit = policy.server.max_message_size;
            let room = degrade::LABEL_ROOM;
            match Op::answer_over(&value, limit.saturating_sub(room)) {
                None => Ok(value),
                Some(len) => Err(Error::AnswerTooLarge {
                    upstream: ctx.route.target.upstream.to_string(),
                    detail: format!(
                        "{len} bytes, and {room} kept for Keel's labels; the limit is {limit}"
                    ),
                }),
            }
        });
        if let (Ok(_), Some(slow)) = (&result, ctx.route.settings.slow_threshold)
            && start.elapsed() > slow
        {
            ctx.receipt.update(|r| r.slow = true);
        }
        finished(Some(&ctx), result.as_ref().err());
        if matches!(method, MODEL_INFER | MODEL_STREAM_INFER)
            && let Some((analysis, side)) = &ctx.route.canary
        {
            // A client's mistake says nothing about the route.
            let ok = match &result {
                Ok(_) => Some(true),
                Err(e) => (e.class() != ErrorClass::ClientError).then_some(false),
            };
            if let Some(verdict) = ok.and_then(|ok| analysis.record(*side, ok, start.elapsed())) {
                self.router.condemn(&verdict);
            }
        }
        match result {
            Ok(value) => Ok(Answer { value, ctx }),
            Err(e) => Err(Failed::Error(e, Some(ctx))),
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
        match self.call(&self.stacks.ready, edge, MODEL_READY, q).await {
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
        self.router.routes(&edge.snapshot).versions(model)
    }

    /// Records a request refused before it was routed.
    pub(super) fn rejected(&self, edge: &Edge, model: &str, r: &crate::model::Rejection) {
        let known = self.router.routes(&edge.snapshot).has(model);
        let label = if known { model } else { "unknown" };
        let from = record::Sender {
            api: edge.api,
            request_id: &edge.ctx.request_id,
            tenant: edge.tenant(),
        };
        record::rejected(self.router.metrics(), &from, label, r);
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

/// How one call of a client's request is made.
pub(super) struct Plan {
    /// Where it goes.
    pub(super) via: Via,
    /// What it stands for in the request.
    pub(super) leg: Leg,
    /// A deadline it must not pass (a fallback never gets more time than the call it
    /// stands in for).
    pub(super) deadline_cap: Option<tokio::time::Instant>,
    /// Give up `deadline_margin` before the deadline, so a fallback's answer still reaches
    /// the client in time.
    pub(super) leave_margin: bool,
}

impl Plan {
    /// A call that is the whole request, routed by the policy.
    const WHOLE: Plan = Plan {
        via: Via::Policy,
        leg: Leg::WHOLE,
        deadline_cap: None,
        leave_margin: false,
    };
}

/// How a call is routed.
pub(super) enum Via {
    /// By the policy's routes for its model.
    Policy,
    /// To this route (a fallback upstream).
    Route(Route),
}

/// Why a call produced no answer.
pub(super) enum Failed {
    /// It failed, after getting as far as its context says.
    Error(Error, Option<Arc<CallContext>>),
    /// The drain timeout cut it.
    Cut,
}

/// A successful call's answer and the context that produced it (for its receipt).
pub(super) struct Answer<T> {
    pub(super) value: T,
    pub(super) ctx: Arc<CallContext>,
}

/// What one call keeps from its start: its edge context, its policy snapshot and its peer.
pub(super) struct Edge {
    pub(super) ctx: EdgeContext,
    pub(super) snapshot: Arc<Snapshot>,
    peer: Option<std::net::SocketAddr>,
    /// The API the client used: `v2`, or `v1` for the legacy PredictionService.
    pub(super) api: &'static str,
    /// The authenticated tenant; `None` when the policy defines no tenants.
    pub(super) caller: Option<Caller>,
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

    /// The calling tenant's name, when the policy defines tenants.
    pub(super) fn tenant(&self) -> Option<&str> {
        self.caller.as_ref().map(Caller::name)
    }

    /// The caller's priority class; interactive without tenants.
    pub(super) fn priority(&self) -> Priority {
        self.caller
            .as_ref()
            .map_or(Priority::Interactive, Caller::priority)
    }

    /// Whether the caller may see and call `model` (anyone may without tenants).
    pub(super) fn may_call(&self, model: &str) -> bool {
        self.caller.as_ref().is_none_or(|c| c.may_call(model))
    }

    /// What picks the call's route: its request id and metadata.
    pub(super) fn pick(&self) -> crate::route::Pick<'_> {
        crate::route::Pick {
            request_id: &self.ctx.request_id,
            metadata: Some(&self.ctx.metadata),
        }
    }

    /// The trace id of the client's W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
    fn trace_id(&self) -> Option<&str> {
        let tp = self.ctx.metadata.get(&*keys::TRACEPARENT)?.to_str().ok()?;
        tp.split('-').nth(1).filter(|t| t.len() == 32)
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
            .call(&self.stacks.metadata, &edge, MODEL_METADATA, q)
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
            .take_until(cut_off(self.cut.clone()))
            .chain(
                futures::stream::once(cut_check(self.cut.clone())).filter_map(move |cut| {
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
            .call(&self.stacks.config, &edge, MODEL_CONFIG, q)
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
            let routes = self.router.routes(&edge.snapshot);
            for model in routes.models().filter(|m| edge.may_call(m)) {
                let q = StatisticsQuery(model_ref(model.to_string(), version.clone()));
                match self
                    .call(&self.stacks.statistics, &edge, MODEL_STATISTICS, q)
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
                .call(&self.stacks.statistics, &edge, MODEL_STATISTICS, q)
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
        let routes = self.router.routes(&edge.snapshot);
        let mut models = Vec::new();
        // A tenant's index lists the models it may call.
        for model in routes.models().filter(|m| edge.may_call(m)) {
            let q = ReadyQuery(model_ref(model.to_string(), String::new()));
            let answer = self.call(&self.stacks.ready, &edge, MODEL_READY, q).await;
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
        self.begin(&request, "v2")?;
        Err(unsupported("RepositoryModelLoad"))
    }

    async fn repository_model_unload(
        &self,
        request: Request<proto::RepositoryModelUnloadRequest>,
    ) -> Result<Response<proto::RepositoryModelUnloadResponse>, Status> {
        self.begin(&request, "v2")?;
        Err(unsupported("RepositoryModelUnload"))
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<proto::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<proto::SystemSharedMemoryStatusResponse>, Status> {
        self.begin(&request, "v2")?;
        Err(unsupported("System shared memory"))
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<proto::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<proto::SystemSharedMemoryRegisterResponse>, Status> {
        self.begin(&request, "v2")?;
        Err(unsupported("System shared memory"))
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<proto::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<proto::SystemSharedMemoryUnregisterResponse>, Status> {
        self.begin(&request, "v2")?;
        Err(unsupported("System shared memory"))
    }

    async fn cuda_shared_memory_status(
        &self,
        request: Request<proto::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<proto::CudaSharedMemoryStatusResponse>, Status> {
        self.begin(&request, "v2")?;
        Err(unsupported("CUDA shared memory"))
    }

    async fn cuda_shared_memory_register(
        &self,
        request: Request<proto::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<proto::CudaSharedMemoryRegisterResponse>, Status> {
        self.begin(&request, "v2")?;
        Err(unsupported("CUDA shared memory"))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        request: Request<proto::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<proto::CudaSharedMemoryUnregisterResponse>, Status> {
        self.begin(&request, "v2")?;
        Err(unsupported("CUDA shared memory"))
    }

    async fn trace_setting(
        &self,
        request: Request<proto::TraceSettingRequest>,
    ) -> Result<Response<proto::TraceSettingResponse>, Status> {
        self.begin(&request, "v2")?;
        Err(unsupported("TraceSetting"))
    }

    async fn log_settings(
        &self,
        request: Request<proto::LogSettingsRequest>,
    ) -> Result<Response<proto::LogSettingsResponse>, Status> {
        self.begin(&request, "v2")?;
        Err(unsupported("LogSettings"))
    }
}
