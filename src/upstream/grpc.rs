//! Forwards calls to an OIP v2 gRPC server (Triton, MLServer, KServe, another Keel).
//!
//! Each attempt carries the client's metadata and request id (the same on every retry, so
//! the upstream can tell retries of one call from new calls), `grpc-previous-rpc-attempts`
//! on retries, and a `grpc-timeout` equal to the time the attempt has: what remains of the
//! call's deadline less the policy's margin, or the per-try timeout if sooner.
//!
//! Which endpoint takes an attempt is the [`Pool`]'s decision (balancing, health checks,
//! ejection, DNS); a refused connection fails the attempt at once with UNAVAILABLE naming the
//! upstream, and counts against that endpoint only.

use std::error::Error as _;
use std::sync::{Arc, LazyLock};

use futures::FutureExt as _;
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::Channel;

use super::forward::NoAnswer;
use super::pool::{self, Pending, Pool, Resolve, SystemResolver, Verdict};
use super::sequence;
use super::{
    Attempt, Backend, BackendFuture, ConfigQuery, MetadataQuery, ReadyQuery, StatisticsQuery,
    Timing,
};
use crate::error::Error;
use crate::headers::{PREVIOUS_ATTEMPTS, RETRY_PUSHBACK};
use crate::model::{InferRequest, InferResponse, ModelMetadata, ModelSpec, ModelStats};
use crate::observe::Metrics;
use crate::observe::metrics::{ClientLabels, RpcSeries};
use crate::pb::{self, inference as proto};
use crate::policy::{Endpoints, UpstreamSpec};
use crate::resilience::{Failure, Handling, Pushback};
use opentelemetry::KeyValue;
use proto::grpc_inference_service_client::GrpcInferenceServiceClient;

/// The service every upstream call is on.
const SERVICE: &str = "inference.GRPCInferenceService";

/// The methods Keel calls on an upstream.
const METHODS: [&str; 5] = [
    "ModelInfer",
    "ModelReady",
    "ModelMetadata",
    "ModelConfig",
    "ModelStatistics",
];

/// The header that carries the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// `id` as the value of [`REQUEST_ID`], marked for HPACK's never-indexed form: a value that
/// differs on every call would otherwise enter the connection's dynamic table each time,
/// evicting the entries that do repeat (callgrind: h2's table lookups per proxied call
/// halved).
pub fn request_id_value(id: &str) -> Option<MetadataValue<tonic::metadata::Ascii>> {
    let mut v = MetadataValue::try_from(id).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// [`REQUEST_ID`] as a metadata key, parsed once (a `&str` key is parsed on every use).
pub static REQUEST_ID_KEY: LazyLock<MetadataKey<Ascii>> =
    LazyLock::new(|| MetadataKey::from_static(REQUEST_ID));

/// Sets `md`'s request id to `id`, never indexed ([`request_id_value`]); an id that cannot
/// be a header value is left out.
pub fn set_request_id(md: &mut MetadataMap, id: &str) {
    if let Some(v) = request_id_value(id) {
        md.insert(REQUEST_ID_KEY.clone(), v);
    }
}

/// A named upstream and its endpoints.
pub struct GrpcUpstream {
    name: Arc<str>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    /// Each method's client series on this upstream.
    series: [Arc<RpcSeries<ClientLabels>>; METHODS.len()],
    /// DNS re-resolution and active checks, stopped when the upstream is dropped.
    maintenance: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        if let Some(task) = self.maintenance.take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for GrpcUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl GrpcUpstream {
    /// Prepares channels to every endpoint without connecting, and starts the pool's
    /// background work (DNS, health checks) where the policy asks for it; must run inside a
    /// Tokio runtime. `changed` is told whenever an endpoint's standing changes.
    pub fn new(
        name: &str,
        spec: &UpstreamSpec,
        max_message_size: usize,
        metrics: Arc<Metrics>,
        changed: crate::resilience::Changed,
    ) -> Arc<Self> {
        let resolver: Arc<dyn Resolve> = Arc::new(SystemResolver);
        let uris = match &spec.endpoints {
            Endpoints::Static(uris) => uris.as_slice(),
            Endpoints::Dns { .. } => &[],
        };
        let pool = Arc::new(Pool::new(name, spec, uris, max_message_size).notifying(changed));
        let background =
            matches!(spec.endpoints, Endpoints::Dns { .. }) || spec.health_check.is_some();
        let maintenance =
            background.then(|| tokio::spawn(pool::maintain(Arc::downgrade(&pool), resolver)));
        let series = METHODS.map(|method| {
            Arc::new(RpcSeries::new(ClientLabels {
                grpc_service: SERVICE,
                grpc_method: method,
                upstream: name.to_string(),
            }))
        });
        Arc::new(GrpcUpstream {
            name: name.into(),
            pool,
            metrics,
            series,
            maintenance,
        })
    }

    /// The endpoint for `attempt`: a retry goes elsewhere than the attempt before it, where
    /// it can.
    fn target<Q>(&self, attempt: &Attempt<Q>) -> Result<Arc<pool::Endpoint>, Error> {
        self.pool.pick(attempt.avoid.as_deref())
    }

    /// Each endpoint with its standing (0 serving, 1 failing checks, 2 ejected), for metrics.
    pub fn endpoint_states(&self) -> Vec<(String, i64)> {
        self.pool.states()
    }

    /// Runs one unary attempt of a tonic-generated method on the next endpoint, with the
    /// call's metadata and deadline.
    fn unary<Q, Req, Resp, Out, F, Fut>(
        &self,
        method: &'static str,
        attempt: Attempt<Q>,
        target: Result<Arc<pool::Endpoint>, Error>,
        body: Req,
        send: F,
        convert: impl FnOnce(Resp) -> Result<Out, String> + Send + 'static,
    ) -> BackendFuture<Out>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
        Out: Send + 'static,
        F: FnOnce(GrpcInferenceServiceClient<Channel>, tonic::Request<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>> + Send + 'static,
    {
        self.attempt(
            method,
            attempt,
            target,
            move |endpoint, md, time| async move {
                let mut req = tonic::Request::new(body);
                *req.metadata_mut() = md;
                // Becomes the upstream's grpc-timeout.
                req.set_timeout(time);
                match send(endpoint.client(), req).await {
                    Ok(resp) => convert(resp.into_inner()).map_err(NoAnswer::Protocol),
                    Err(status) => Err(NoAnswer::Status(status)),
                }
            },
        )
    }

    /// Runs one attempt on `target`: `send` gets the endpoint, the metadata to send (the
    /// client's, the request id, the retry's number, the trace) and the time the attempt
    /// has, and the rest is the same for every method: the receipt, metrics, the span, the
    /// failure's class and what it says of the endpoint.
    fn attempt<Q, Out, F, Fut>(
        &self,
        method: &'static str,
        attempt: Attempt<Q>,
        target: Result<Arc<pool::Endpoint>, Error>,
        send: F,
    ) -> BackendFuture<Out>
    where
        Out: Send + 'static,
        F: FnOnce(Arc<pool::Endpoint>, MetadataMap, std::time::Duration) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Out, NoAnswer>> + Send + 'static,
    {
        let name = self.name.clone();
        let pool = self.pool.clone();
        let Attempt {
            request_id,
            metadata,
            number,
            timing,
            trace,
            receipt,
            ..
        } = attempt;
        let time = timing.left();
        let metrics = self.metrics.clone();
        let series = match METHODS.iter().position(|m| *m == method) {
            Some(i) => self.series[i].clone(),
            None => {
                debug_assert!(false, "{method} is missing from METHODS");
                Arc::new(RpcSeries::new(ClientLabels {
                    grpc_service: SERVICE,
                    grpc_method: method,
                    upstream: self.name.to_string(),
                }))
            }
        };
        async move {
            let target = target?;
            let _pending = Pending::start(&target);
            if time.is_zero() {
                return Err(Error::DeadlineExceeded {
                    budget: timing.budget,
                });
            }
            receipt.served(target.served_by.clone(), Some(target.addr.clone()));
            let mut md = Arc::unwrap_or_clone(metadata);
            set_request_id(&mut md, &request_id);
            if number > 1 {
                md.insert(PREVIOUS_ATTEMPTS, MetadataValue::from(number - 1));
            }
            series.started(&metrics).inc();
            let span = trace.as_ref().map(|trace| {
                let r = receipt.read();
                let (host, port) = target.addr.rsplit_once(':').unwrap_or((&target.addr, ""));
                let mut attrs = vec![
                    KeyValue::new("keel.attempt", i64::from(number)),
                    KeyValue::new("keel.upstream", name.to_string()),
                    KeyValue::new("server.address", host.to_string()),
                    KeyValue::new("server.port", port.parse::<i64>().unwrap_or(0)),
                ];
                if number > 1 {
                    if let Some(reason) = r.retry_reasons.last() {
                        attrs.push(KeyValue::new("keel.retry_reason", *reason));
                    }
                    if let Some(wait) = r.delays.last() {
                        attrs.push(KeyValue::new("keel.backoff_ms", wait.as_millis() as i64));
                    }
                }
                trace.attempt(&format!("{SERVICE}/{method}"), attrs, &mut md)
            });
            let start = Instant::now();
            let answer = send(target.clone(), md, time).await;
            let code = answer
                .as_ref()
                .map_or_else(NoAnswer::code, |_| tonic::Code::Ok);
            if let Some(span) = span {
                span.end(crate::grpc_code::name(code), code as i64);
            }
            series.handled(&metrics, code).inc();
            series
                .handling(&metrics)
                .observe(start.elapsed().as_secs_f64());
            let result =
                answer.map_err(|failure| failure_error(&name, &target.addr, &timing, failure));
            // A server without ModelConfig (a KServe runtime) answers UNIMPLEMENTED: it is
            // up, and Keel asks for the config to learn batching. A refused connection says
            // the endpoint is down, whatever else it says.
            let verdict = match &result {
                Ok(_) => Verdict::Healthy,
                Err(Error::UpstreamStatus {
                    code: tonic::Code::Unimplemented,
                    ..
                }) if method == "ModelConfig" => Verdict::Healthy,
                Err(e) if e.never_sent() => Verdict::Unreachable,
                Err(e) if e.class().trips_breaker() => Verdict::Failed,
                Err(_) => Verdict::Healthy,
            };
            pool.record(&target, verdict);
            result
        }
        .boxed()
    }
}

impl NoAnswer {
    /// The gRPC code the attempt ended with, for the client metrics and the span.
    fn code(&self) -> tonic::Code {
        match self {
            NoAnswer::Status(s) => s.code(),
            NoAnswer::Transport { .. } => tonic::Code::Unavailable,
            NoAnswer::TimedOut => tonic::Code::DeadlineExceeded,
            NoAnswer::TooLarge(_) => tonic::Code::ResourceExhausted,
            NoAnswer::Protocol(_) => tonic::Code::Internal,
        }
    }
}

/// Classifies an attempt's failure, once.
fn failure_error(name: &str, addr: &str, timing: &Timing, failure: NoAnswer) -> Error {
    match failure {
        NoAnswer::Status(status) => status_error(name, addr, timing, status),
        NoAnswer::TimedOut => status_error(
            name,
            addr,
            timing,
            tonic::Status::deadline_exceeded("the attempt's time ran out"),
        ),
        NoAnswer::Transport { detail, never_sent } => Error::UpstreamUnavailable {
            upstream: name.to_string(),
            detail,
            never_sent,
        },
        NoAnswer::TooLarge(detail) => Error::AnswerTooLarge {
            upstream: name.to_string(),
            detail,
        },
        NoAnswer::Protocol(detail) => Error::UpstreamProtocol {
            upstream: name.to_string(),
            detail,
        },
    }
}

/// Whether a transport failure happened before the request was sent: a refused connection.
fn refused(status: &tonic::Status) -> bool {
    let mut source = status.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Classifies an upstream's status: unreachable, out of time, or its own answer passed on.
fn status_error(name: &str, addr: &str, timing: &Timing, status: tonic::Status) -> Error {
    // Keel's own client-side timeout: the attempt was given the call's time less the margin,
    // or the per-try timeout, and it ran out.
    let now = Instant::now();
    let timed_out = matches!(
        status.code(),
        tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
    );
    if timed_out && timing.call_ran_out(now) {
        return Error::DeadlineExceeded {
            budget: timing.budget,
        };
    }
    if timed_out && let Some(after) = timing.try_ran_out(now) {
        return Error::AttemptTimeout(crate::resilience::AttemptTimedOut { after });
    }
    let pushback = Pushback::parse(
        status
            .metadata()
            .get(RETRY_PUSHBACK)
            .and_then(|v| v.to_str().ok()),
    );
    // A status tonic made from a transport failure (a connection reset or closed mid-call,
    // an HTTP/2 error) carries its cause; one the upstream answered does not. The former
    // says nothing of the model, whatever code tonic chose for it.
    let transport = status.source().is_some();
    if crate::grpc_code::is_too_large(status.code(), status.message()) {
        return Error::AnswerTooLarge {
            upstream: name.to_string(),
            detail: status.message().to_string(),
        };
    }
    match status.code() {
        _ if transport && pushback == Pushback::None => Error::UpstreamUnavailable {
            upstream: name.to_string(),
            detail: format!("{addr}: {}", status.message()),
            never_sent: refused(&status),
        },
        tonic::Code::Unavailable if pushback == Pushback::None => Error::UpstreamUnavailable {
            upstream: name.to_string(),
            detail: format!("{addr}: {}", status.message()),
            never_sent: refused(&status),
        },
        code => Error::UpstreamStatus {
            upstream: name.to_string(),
            code,
            message: status.message().to_string(),
            pushback,
        },
    }
}

impl Backend for GrpcUpstream {
    fn infer(&self, attempt: Attempt<InferRequest>) -> BackendFuture<InferResponse> {
        // The client's bytes, as they came where nothing changed them.
        let body = pb::wire::request(&attempt.body);
        // A sequence's calls go where its first call went.
        let marks = sequence::of(&attempt.body);
        let target = match &marks {
            Some(m) => self.pool.pick_for_sequence(&attempt.body.model, m),
            None => self.target(&attempt),
        };
        let endpoint = target.as_ref().ok().map(|e| e.addr.to_string());
        let model = marks.as_ref().map(|_| attempt.body.model.clone());
        let answer = self.attempt(
            "ModelInfer",
            attempt,
            target,
            |endpoint, md, time| async move {
                let answered = endpoint
                    .forwarder()
                    .infer(body, md.into_headers(), time)
                    .await?;
                pb::wire::decode_response(answered.message, answered.headers, answered.trailers)
                    .map_err(NoAnswer::Protocol)
            },
        );
        let (Some(marks), Some(model)) = (marks, model) else {
            return answer;
        };
        // An endpoint that refuses a sequence's later call has lost the sequence's state.
        let pool = self.pool.clone();
        Box::pin(async move {
            match answer.await {
                Err(Error::UpstreamUnavailable {
                    upstream,
                    never_sent: true,
                    ..
                }) if !marks.start && endpoint.is_some() => {
                    pool.forget_sequence(&model, &marks);
                    Err(Error::SequenceBroken {
                        upstream,
                        model,
                        sequence: marks.id,
                        endpoint: endpoint.unwrap_or_default(),
                        why: "refuses connections",
                    })
                }
                other => other,
            }
        })
    }

    fn model_ready(&self, attempt: Attempt<ReadyQuery>) -> BackendFuture<bool> {
        let body = proto::ModelReadyRequest {
            name: attempt.body.0.name.clone(),
            version: attempt.body.0.version.clone(),
        };
        let target = self.target(&attempt);
        self.unary(
            "ModelReady",
            attempt,
            target,
            body,
            |mut c, r| async move { c.model_ready(r).await },
            |r| Ok(r.ready),
        )
    }

    fn model_metadata(&self, attempt: Attempt<MetadataQuery>) -> BackendFuture<ModelMetadata> {
        let body = proto::ModelMetadataRequest {
            name: attempt.body.0.name.clone(),
            version: attempt.body.0.version.clone(),
        };
        let target = self.target(&attempt);
        self.unary(
            "ModelMetadata",
            attempt,
            target,
            body,
            |mut c, r| async move { c.model_metadata(r).await },
            pb::metadata_from_pb,
        )
    }

    fn model_config(&self, attempt: Attempt<ConfigQuery>) -> BackendFuture<ModelSpec> {
        let body = proto::ModelConfigRequest {
            name: attempt.body.0.name.clone(),
            version: attempt.body.0.version.clone(),
        };
        let target = self.target(&attempt);
        self.unary(
            "ModelConfig",
            attempt,
            target,
            body,
            |mut c, r| async move { c.model_config(r).await },
            |r| {
                r.config
                    .ok_or_else(|| "ModelConfigResponse has no config".to_string())
                    .and_then(pb::spec_from_pb)
            },
        )
    }

    fn model_statistics(
        &self,
        attempt: Attempt<StatisticsQuery>,
    ) -> BackendFuture<Vec<ModelStats>> {
        let body = proto::ModelStatisticsRequest {
            name: attempt.body.0.name.clone(),
            version: attempt.body.0.version.clone(),
        };
        let target = self.target(&attempt);
        self.unary(
            "ModelStatistics",
            attempt,
            target,
            body,
            |mut c, r| async move { c.model_statistics(r).await },
            |r| Ok(r.model_stats.into_iter().map(pb::stats_from_pb).collect()),
        )
    }

    fn healthy(&self) -> bool {
        self.pool.healthy()
    }

    fn describe(&self) -> String {
        let addrs: Vec<String> = match &self.pool.spec().endpoints {
            Endpoints::Dns { host, port, .. } => vec![format!("dns {host}:{port}")],
            Endpoints::Static(_) => self
                .pool
                .endpoints()
                .iter()
                .map(|e| e.addr.to_string())
                .collect(),
        };
        format!("upstream {} ({})", self.name, addrs.join(", "))
    }
}
