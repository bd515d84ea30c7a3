//! Forwards calls to an OIP v2 gRPC server (Triton, MLServer, KServe, another Keel).
//!
//! Each call carries the client's metadata and request id, and a `grpc-timeout` equal to
//! the time left before the call's deadline, so the upstream never works past the point
//! where the client stopped waiting.
//!
//! Endpoints are used in turn, one lazily connected HTTP/2 channel each; a refused connection
//! fails the call at once with UNAVAILABLE naming the upstream. (Balancing by load, health
//! checks and ejection are the pool's job in a later step.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt as _;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::{Backend, BackendFuture};
use crate::call::{Call, CallContext, ModelRef};
use crate::error::Error;
use crate::model::{InferRequest, InferResponse, ModelMetadata, ModelSpec, ModelStats};
use crate::pb::{self, inference as proto};
use crate::policy::UpstreamSpec;
use proto::grpc_inference_service_client::GrpcInferenceServiceClient;

/// The header that carries the request id.
pub const REQUEST_ID: &str = "x-request-id";

#[derive(Clone)]
struct Target {
    addr: Arc<str>,
    client: GrpcInferenceServiceClient<Channel>,
}

/// A named upstream and its endpoints.
pub struct GrpcUpstream {
    name: Arc<str>,
    targets: Vec<Target>,
    next: AtomicUsize,
}

impl GrpcUpstream {
    /// Prepares channels to every endpoint without connecting; must run inside a Tokio runtime.
    pub fn new(name: &str, spec: &UpstreamSpec, max_message_size: usize) -> Arc<Self> {
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
                Target {
                    addr: addr.into(),
                    client,
                }
            })
            .collect();
        Arc::new(GrpcUpstream {
            name: name.into(),
            targets,
            next: AtomicUsize::new(0),
        })
    }

    fn pick(&self) -> Result<Target, Error> {
        if self.targets.is_empty() {
            return Err(Error::UpstreamUnavailable {
                upstream: self.name.to_string(),
                detail: "no endpoints".into(),
            });
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        Ok(self.targets[i].clone())
    }

    /// Runs one unary call on the next endpoint with the context's metadata and deadline.
    fn unary<Req, Resp, Out, F, Fut>(
        &self,
        ctx: CallContext,
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
        let target = self.pick();
        async move {
            let target = target?;
            let remaining = ctx.remaining();
            if remaining.is_zero() {
                return Err(Error::DeadlineExceeded { budget: ctx.budget });
            }
            let mut req = tonic::Request::new(body);
            *req.metadata_mut() = ctx.metadata.clone();
            if let Ok(v) = MetadataValue::try_from(&*ctx.request_id) {
                req.metadata_mut().insert(REQUEST_ID, v);
            }
            // Becomes the upstream's grpc-timeout: what remains of the client's deadline.
            req.set_timeout(remaining);
            match send(target.client, req).await {
                Ok(resp) => convert(resp.into_inner()).map_err(|detail| Error::UpstreamProtocol {
                    upstream: name.to_string(),
                    detail,
                }),
                Err(status) => Err(status_error(&name, &target.addr, &ctx, status)),
            }
        }
        .boxed()
    }
}

/// Classifies an upstream's status: unreachable, out of time, or its own answer passed on.
fn status_error(name: &str, addr: &str, ctx: &CallContext, status: tonic::Status) -> Error {
    match status.code() {
        tonic::Code::Cancelled | tonic::Code::DeadlineExceeded if ctx.remaining().is_zero() => {
            Error::DeadlineExceeded { budget: ctx.budget }
        }
        tonic::Code::Unavailable => Error::UpstreamUnavailable {
            upstream: name.to_string(),
            detail: format!("{addr}: {}", status.message()),
        },
        code => Error::UpstreamStatus {
            upstream: name.to_string(),
            code,
            message: status.message().to_string(),
        },
    }
}

impl Backend for GrpcUpstream {
    fn infer(&self, call: Call<InferRequest>) -> BackendFuture<InferResponse> {
        let body = pb::infer_request_to_pb(call.body);
        self.unary(
            call.ctx,
            body,
            |mut c, r| async move { c.model_infer(r).await },
            pb::infer_response_from_pb,
        )
    }

    fn model_ready(&self, call: Call<ModelRef>) -> BackendFuture<bool> {
        let body = proto::ModelReadyRequest {
            name: call.body.name,
            version: call.body.version,
        };
        self.unary(
            call.ctx,
            body,
            |mut c, r| async move { c.model_ready(r).await },
            |r| Ok(r.ready),
        )
    }

    fn model_metadata(&self, call: Call<ModelRef>) -> BackendFuture<ModelMetadata> {
        let body = proto::ModelMetadataRequest {
            name: call.body.name,
            version: call.body.version,
        };
        self.unary(
            call.ctx,
            body,
            |mut c, r| async move { c.model_metadata(r).await },
            pb::metadata_from_pb,
        )
    }

    fn model_config(&self, call: Call<ModelRef>) -> BackendFuture<ModelSpec> {
        let body = proto::ModelConfigRequest {
            name: call.body.name,
            version: call.body.version,
        };
        self.unary(
            call.ctx,
            body,
            |mut c, r| async move { c.model_config(r).await },
            |r| {
                r.config
                    .ok_or_else(|| "ModelConfigResponse has no config".to_string())
                    .and_then(pb::spec_from_pb)
            },
        )
    }

    fn model_statistics(&self, call: Call<ModelRef>) -> BackendFuture<Vec<ModelStats>> {
        let body = proto::ModelStatisticsRequest {
            name: call.body.name,
            version: call.body.version,
        };
        self.unary(
            call.ctx,
            body,
            |mut c, r| async move { c.model_statistics(r).await },
            |r| Ok(r.model_stats.into_iter().map(pb::stats_from_pb).collect()),
        )
    }

    fn describe(&self) -> String {
        let addrs: Vec<&str> = self.targets.iter().map(|t| &*t.addr).collect();
        format!("upstream {} ({})", self.name, addrs.join(", "))
    }
}
