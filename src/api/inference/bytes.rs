//! ModelInfer served from the request's bytes: the message is decoded for what Keel
//! decides on (routing, admission, validation read the domain request; tensor data stays
//! in the received bytes), and the same bytes go upstream unless something changes the
//! message ([`crate::model::Wire`]). The answer goes back as the upstream's bytes with
//! Keel's parameters appended.
//!
//! tonic's generated server would decode the message into its proto type and encode the
//! answer again; [`InferenceRoutes`] takes ModelInfer's path before it and leaves every
//! other method to it.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use tonic::body::Body as TonicBody;
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};

use super::{InferenceApi, MODEL_INFER};
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::pb::wire::{BytesCodec, Encoded};
use crate::upstream::forward::MODEL_INFER_PATH;

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

impl NamedService for InferenceRoutes {
    const NAME: &'static str = <GrpcInferenceServiceServer<InferenceApi> as NamedService>::NAME;
}

struct ModelInfer(Arc<InferenceApi>);

impl UnaryService<Bytes> for ModelInfer {
    type Response = Encoded;
    type Future = BoxFuture<'static, Result<Response<Encoded>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.model_infer_bytes(request).await })
    }
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
        let method = ModelInfer(self.api.clone());
        let max = self.max_message_size;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(BytesCodec)
                .apply_max_message_size_config(Some(max), Some(max));
            Ok(grpc.unary(method, req).await)
        })
    }
}
