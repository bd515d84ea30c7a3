//! Forwards calls to an OIP v2 gRPC server (Triton, MLServer, KServe, another Keel).
//!
//! Each attempt carries the client's metadata and request id (the same on every retry, so
//! the upstream can tell retries of one call from new calls), `grpc-previous-rpc-attempts`
//! on retries, and a `grpc-timeout` equal to the time the attempt has: what remains of the
//! call's deadline less the policy's margin, or the per-try timeout if sooner.
//!
//! Endpoints are used in turn, one lazily connected HTTP/2 channel each; a refused connection
//! fails the attempt at once with UNAVAILABLE naming the upstream. Each endpoint has its own
//! circuit breaker, so a sick endpoint is skipped while the others answer. (Balancing by load,
//! active health checks and ejection are the pool's job in a later step.)

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt as _;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::{Backend, BackendFuture, ConfigQuery, MetadataQuery, ReadyQuery, StatisticsQuery};
use crate::call::Call;
use crate::error::Error;
use crate::model::{InferRequest, InferResponse, ModelMetadata, ModelSpec, ModelStats};
use crate::observe::Metrics;
use crate::observe::metrics::{ClientCodeLabels, ClientLabels};
use crate::pb::{self, inference as proto};
use crate::policy::Breaker;
use crate::policy::UpstreamSpec;
use crate::resilience::{Admission, BreakerCell, BreakerOpen, Failure, Handling, Pushback};
use opentelemetry::KeyValue;
use proto::grpc_inference_service_client::GrpcInferenceServiceClient;

/// The service every upstream call is on.
const SERVICE: &str = "inference.GRPCInferenceService";

/// The header that carries the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// The header gRPC's retry design uses to number retries.
const PREVIOUS_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

/// The header an upstream uses to ask for a wait before a retry, or for none.
const PUSHBACK: &str = "grpc-retry-pushback-ms";

#[derive(Clone)]
struct Target {
    addr: Arc<str>,
    client: GrpcInferenceServiceClient<Channel>,
    /// This endpoint's own breaker: an open one is skipped while others can answer.
    breaker: Option<Arc<BreakerCell>>,
    /// Attempts sent here and not yet answered: the load the balancer compares.
    pending: Arc<AtomicUsize>,
}

/// Counts an attempt as pending on its endpoint until dropped.
struct Pending(Arc<AtomicUsize>);

impl Pending {
    fn start(counter: &Arc<AtomicUsize>) -> Pending {
        counter.fetch_add(1, Ordering::Relaxed);
        Pending(counter.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A named upstream and its endpoints.
pub struct GrpcUpstream {
    name: Arc<str>,
    targets: Vec<Target>,
    next: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for GrpcUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl GrpcUpstream {
    /// Prepares channels to every endpoint without connecting; must run inside a Tokio
    /// runtime. Each endpoint gets a breaker with `breaker` settings when they are enabled.
    pub fn new(
        name: &str,
        spec: &UpstreamSpec,
        max_message_size: usize,
        breaker: &Breaker,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let targets = spec
            .endpoints
            .iter()
            .map(|uri| {
                let channel = Endpoint::from(uri.clone())
                    .connect_timeout(spec.connect_timeout)
                    .tcp_nodelay(true)
                    .connect_lazy();
                let client = GrpcInferenceServiceClient::new(channel)
                    .max_decoding_message_size(max_message_size)
                    .max_encoding_message_size(max_message_size);
                let addr = uri
                    .authority()
                    .map_or_else(|| uri.to_string(), ToString::to_string);
                let cell = breaker.enabled.then(|| {
                    Arc::new(BreakerCell::named(
                        breaker.clone(),
                        format!("{name}/{addr}"),
                    ))
                });
                Target {
                    addr: addr.into(),
                    client,
                    breaker: cell,
                    pending: Arc::new(AtomicUsize::new(0)),
                }
            })
            .collect();
        Arc::new(GrpcUpstream {
            name: name.into(),
            targets,
            next: AtomicUsize::new(0),
            metrics,
        })
    }

    /// Each endpoint with its breaker's state (0 closed, 1 half-open, 2 open), for metrics.
    pub fn endpoint_states(&self) -> Vec<(String, i64)> {
        self.targets
            .iter()
            .filter_map(|t| {
                let state = t.breaker.as_ref()?.state();
                Some((t.addr.to_string(), state as i64))
            })
            .collect()
    }

    /// The next endpoint in turn whose breaker lets the call through, other than `avoid`
    /// (the endpoint that just failed this call) unless no other can take it.
    fn pick(&self, avoid: Option<&str>) -> Result<(Target, Option<Admission>), Error> {
        let n = self.targets.len();
        if n == 0 {
            return Err(Error::UpstreamUnavailable {
                upstream: self.name.to_string(),
                detail: "no endpoints".into(),
                never_sent: true,
            });
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut soonest: Option<BreakerOpen> = None;
        let order = (0..n).map(|k| (start + k) % n);
        // The endpoint to avoid goes last, so it is tried only when every other is refused.
        let mut order: Vec<usize> = order
            .clone()
            .filter(|&i| Some(&*self.targets[i].addr) != avoid)
            .chain(order.filter(|&i| Some(&*self.targets[i].addr) == avoid))
            .collect();
        // Power of two choices: of the next two endpoints in turn that are not open (and not
        // to be avoided), the one with fewer attempts pending goes first, so a slow or stuck
        // endpoint gets less traffic. Taking them in turn keeps the choice deterministic.
        let takes = |i: &usize| {
            let t = &self.targets[*i];
            Some(&*t.addr) != avoid
                && t.breaker
                    .as_ref()
                    .is_none_or(|b| b.state() != crate::resilience::BreakerState::Open)
        };
        let mut pair = order.iter().copied().filter(takes).take(2);
        if let (Some(a), Some(b)) = (pair.next(), pair.next()) {
            let load = |i: usize| self.targets[i].pending.load(Ordering::Relaxed);
            if load(b) < load(a)
                && let Some(at) = order.iter().position(|&i| i == b)
            {
                order.remove(at);
                order.insert(0, b);
            }
        }
        for i in order {
            let target = &self.targets[i];
            match target.breaker.as_ref().map(|b| b.admit()) {
                None => return Ok((target.clone(), None)),
                Some(Ok(admission)) => return Ok((target.clone(), Some(admission))),
                Some(Err(open)) => {
                    if soonest.is_none_or(|s| open.retry_after < s.retry_after) {
                        soonest = Some(open);
                    }
                }
            }
        }
        // Every endpoint's breaker is open.
        Err(Error::BreakerOpen(soonest.unwrap_or(BreakerOpen {
            retry_after: std::time::Duration::ZERO,
        })))
    }

    /// Runs one unary attempt on the next endpoint with the call's metadata and deadline.
    fn unary<Q, Req, Resp, Out, F, Fut>(
        &self,
        method: &'static str,
        call: &Call<Q>,
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
        let name = self.name.clone();
        // A retry goes elsewhere than the attempt before it, where it can.
        let previous = (call.attempt > 1)
            .then(|| call.ctx.receipt.read().served_by)
            .flatten();
        let avoid = previous
            .as_deref()
            .and_then(|s| s.strip_prefix(&*self.name)?.strip_prefix('@'));
        let target = self.pick(avoid);
        let ctx = call.ctx.clone();
        let attempt = call.attempt;
        let attempt_deadline = call.attempt_deadline;
        let time = call.attempt_budget();
        let metrics = self.metrics.clone();
        async move {
            let (target, admission) = target?;
            let _pending = Pending::start(&target.pending);
            if time.is_zero() {
                return Err(Error::DeadlineExceeded { budget: ctx.budget });
            }
            ctx.receipt
                .update(|r| r.served_by = Some(format!("{name}@{}", target.addr)));
            let mut req = tonic::Request::new(body);
            *req.metadata_mut() = ctx.metadata.clone();
            let md = req.metadata_mut();
            if let Ok(v) = MetadataValue::try_from(&*ctx.request_id) {
                md.insert(REQUEST_ID, v);
            }
            if attempt > 1 {
                md.insert(PREVIOUS_ATTEMPTS, MetadataValue::from(attempt - 1));
            }
            // Becomes the upstream's grpc-timeout.
            req.set_timeout(time);
            let labels = ClientLabels {
                grpc_service: SERVICE,
                grpc_method: method,
                upstream: name.to_string(),
            };
            metrics.client_started.get_or_create(&labels).inc();
            let span = ctx.trace.as_ref().map(|trace| {
                let r = ctx.receipt.read();
                let (host, port) = target.addr.rsplit_once(':').unwrap_or((&target.addr, ""));
                let mut attrs = vec![
                    KeyValue::new("keel.attempt", i64::from(attempt)),
                    KeyValue::new("keel.upstream", name.to_string()),
                    KeyValue::new("server.address", host.to_string()),
                    KeyValue::new("server.port", port.parse::<i64>().unwrap_or(0)),
                ];
                if attempt > 1 {
                    if let Some(reason) = r.retry_reasons.last() {
                        attrs.push(KeyValue::new("keel.retry_reason", *reason));
                    }
                    if let Some(wait) = r.delays.last() {
                        attrs.push(KeyValue::new("keel.backoff_ms", wait.as_millis() as i64));
                    }
                }
                trace.attempt(&format!("{SERVICE}/{method}"), attrs, req.metadata_mut())
            });
            let start = Instant::now();
            let answer = send(target.client, req).await;
            let code = answer
                .as_ref()
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
            if let Some(span) = span {
                span.end(crate::grpc_code::name(code), code as i64);
            }
            metrics
                .client_handled
                .get_or_create(&ClientCodeLabels {
                    grpc_service: SERVICE,
                    grpc_method: method,
                    upstream: name.to_string(),
                    grpc_code: crate::grpc_code::name(code),
                })
                .inc();
            metrics
                .client_handling
                .get_or_create(&labels)
                .observe(start.elapsed().as_secs_f64());
            let result = match answer {
                Ok(resp) => convert(resp.into_inner()).map_err(|detail| Error::UpstreamProtocol {
                    upstream: name.to_string(),
                    detail,
                }),
                Err(status) => Err(status_error(
                    &name,
                    &target.addr,
                    &ctx,
                    attempt_deadline,
                    status,
                )),
            };
            if let (Some(breaker), Some(admission)) = (&target.breaker, admission) {
                // A server without ModelConfig (a KServe runtime) answers UNIMPLEMENTED: it
                // is up, and Keel asks for the config to learn batching.
                let healthy = match &result {
                    Ok(_) => true,
                    Err(Error::UpstreamStatus {
                        code: tonic::Code::Unimplemented,
                        ..
                    }) if method == "ModelConfig" => true,
                    Err(e) => !e.class().trips_breaker(),
                };
                breaker.record(admission, healthy);
            }
            result
        }
        .boxed()
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
fn status_error(
    name: &str,
    addr: &str,
    ctx: &crate::call::CallContext,
    attempt_deadline: Option<Instant>,
    status: tonic::Status,
) -> Error {
    // Keel's own client-side timeout: the attempt was given the call's time less the margin,
    // or the per-try timeout, and it ran out.
    let now = Instant::now();
    let timed_out = matches!(
        status.code(),
        tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
    );
    let margin = ctx.route.settings.deadline_margin;
    if timed_out && now + margin >= ctx.deadline {
        return Error::DeadlineExceeded { budget: ctx.budget };
    }
    if timed_out
        && let Some(at) = attempt_deadline
        && now >= at
    {
        let per_try = ctx.route.settings.retry.per_try_timeout.unwrap_or_default();
        return Error::AttemptTimeout(crate::resilience::AttemptTimedOut { after: per_try });
    }
    let pushback = Pushback::parse(
        status
            .metadata()
            .get(PUSHBACK)
            .and_then(|v| v.to_str().ok()),
    );
    // A status tonic made from a transport failure (a connection reset or closed mid-call,
    // an HTTP/2 error) carries its cause; one the upstream answered does not. The former
    // says nothing of the model, whatever code tonic chose for it.
    let transport = status.source().is_some();
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
    fn infer(&self, call: Call<InferRequest>) -> BackendFuture<InferResponse> {
        let body = pb::infer_request_to_pb(&call.body);
        self.unary(
            "ModelInfer",
            &call,
            body,
            |mut c, r| async move { c.model_infer(r).await },
            pb::infer_response_from_pb,
        )
    }

    fn model_ready(&self, call: Call<ReadyQuery>) -> BackendFuture<bool> {
        let body = proto::ModelReadyRequest {
            name: call.body.0.name.clone(),
            version: call.body.0.version.clone(),
        };
        self.unary(
            "ModelReady",
            &call,
            body,
            |mut c, r| async move { c.model_ready(r).await },
            |r| Ok(r.ready),
        )
    }

    fn model_metadata(&self, call: Call<MetadataQuery>) -> BackendFuture<ModelMetadata> {
        let body = proto::ModelMetadataRequest {
            name: call.body.0.name.clone(),
            version: call.body.0.version.clone(),
        };
        self.unary(
            "ModelMetadata",
            &call,
            body,
            |mut c, r| async move { c.model_metadata(r).await },
            pb::metadata_from_pb,
        )
    }

    fn model_config(&self, call: Call<ConfigQuery>) -> BackendFuture<ModelSpec> {
        let body = proto::ModelConfigRequest {
            name: call.body.0.name.clone(),
            version: call.body.0.version.clone(),
        };
        self.unary(
            "ModelConfig",
            &call,
            body,
            |mut c, r| async move { c.model_config(r).await },
            |r| {
                r.config
                    .ok_or_else(|| "ModelConfigResponse has no config".to_string())
                    .and_then(pb::spec_from_pb)
            },
        )
    }

    fn model_statistics(&self, call: Call<StatisticsQuery>) -> BackendFuture<Vec<ModelStats>> {
        let body = proto::ModelStatisticsRequest {
            name: call.body.0.name.clone(),
            version: call.body.0.version.clone(),
        };
        self.unary(
            "ModelStatistics",
            &call,
            body,
            |mut c, r| async move { c.model_statistics(r).await },
            |r| Ok(r.model_stats.into_iter().map(pb::stats_from_pb).collect()),
        )
    }

    fn healthy(&self) -> bool {
        self.targets.iter().any(|t| {
            t.breaker
                .as_ref()
                .is_none_or(|b| b.state() != crate::resilience::BreakerState::Open)
        })
    }

    fn describe(&self) -> String {
        let addrs: Vec<&str> = self.targets.iter().map(|t| &*t.addr).collect();
        format!("upstream {} ({})", self.name, addrs.join(", "))
    }
}
