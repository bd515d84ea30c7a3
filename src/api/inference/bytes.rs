//! ModelInfer served from the request's bytes: the message is decoded for what Keel
//! decides on (routing, admission, validation read the domain request; tensor data stays
//! in the received bytes), and the same bytes go upstream unless something changes the
//! message ([`crate::model::Wire`]). The answer goes back as the upstream's bytes with
//! Keel's parameters appended.
//!
//! tonic's generated server would decode the message into its proto type and encode the
//! answer again; [`InferenceRoutes`] takes ModelInfer's path before it and leaves every
//! other method to it. ModelInfer's gRPC framing is Keel's own ([`unary`]): tonic's would
//! copy the answer into a buffer of its own, and grow its request buffer as frames arrive.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use tonic::body::Body as TonicBody;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use super::{InferenceApi, MODEL_INFER};
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::pb::wire::Encoded;
use crate::upstream::forward::MODEL_INFER_PATH;

mod unary;

impl InferenceApi {
    /// One ModelInfer from its bytes.
    async fn model_infer_bytes(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<Encoded>, Status> {
        // As tonic's decoder says it, so the edge answers it as it answers every
        // unreadable request (`unreadable::fix_response`).
        let msg = crate::pb::wire::decode_request(request.get_ref())
            .map_err(|e| Status::internal(e.to_string()))?;
        let edge = self.begin(&request, "v2")?;
        let bytes = request.into_inner();
        let resp = self
            .infer_message(&edge, MODEL_INFER, msg, Some(bytes))
            .await?;
        Ok(resp.map(crate::pb::wire::response))
    }
}

/// The OIP service, with ModelInfer served from bytes.
#[derive(Clone)]
pub struct InferenceRoutes {
    api: Arc<InferenceApi>,
    generated: GrpcInferenceServiceServer<InferenceApi>,
    max_message_size: usize,
}

impl InferenceRoutes {
    /// The service over `api`, taking and sending messages up to `max_message_size`.
    pub fn new(api: Arc<InferenceApi>, max_message_size: usize) -> Self {
        let generated = GrpcInferenceServiceServer::from_arc(api.clone())
            .max_decoding_message_size(max_message_size)
            .max_encoding_message_size(max_message_size);
        InferenceRoutes {
            api,
            generated,
            max_message_size,
        }
    }
}

/// A router with ModelInfer's path taken before it.
///
/// tonic's router matches every call's path against every service's (axum's router and
/// its futures: about 4,000 instructions a call, callgrind); the one path that carries nearly all
/// the traffic is compared first, and everything else goes on to the router.
#[derive(Clone)]
pub struct ModelInferFirst<R> {
    infer: InferenceRoutes,
    rest: R,
}

impl InferenceRoutes {
    /// `rest` (a router that also holds these routes), with ModelInfer taken first.
    pub fn in_front_of<R>(self, rest: R) -> ModelInferFirst<R> {
        ModelInferFirst { infer: self, rest }
    }
}

impl<B, R> tower::Service<http::Request<B>> for ModelInferFirst<R>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    R: tower::Service<http::Request<B>, Response = http::Response<TonicBody>, Error = Infallible>,
{
    type Response = http::Response<TonicBody>;
    type Error = Infallible;
    type Future =
        futures::future::Either<BoxFuture<'static, Result<Self::Response, Infallible>>, R::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.rest.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use futures::future::Either;
        if req.uri().path() == MODEL_INFER_PATH {
            Either::Left(self.infer.call(req))
        } else {
            Either::Right(self.rest.call(req))
        }
    }
}

impl NamedService for InferenceRoutes {
    const NAME: &'static str = <GrpcInferenceServiceServer<InferenceApi> as NamedService>::NAME;
}

impl<B> tower::Service<http::Request<B>> for InferenceRoutes
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<TonicBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != MODEL_INFER_PATH {
            return self.generated.call(req);
        }
        let api = self.api.clone();
        let max = self.max_message_size;
        Box::pin(async move { Ok(unary::serve(req, max, |r| api.model_infer_bytes(r)).await) })
    }
}
