//! The traffic listener (`server.listen`): what it serves, behind the edge layers, and
//! where it runs: one worker in the caller's runtime, or a worker thread per listener.
//!
//! Traffic is served by Keel's own HTTP/2 connection loop ([`transport::serve`]), so a
//! call's deadline is Keel's from its first byte: a client whose `grpc-timeout` passes
//! before Keel answered, its body still arriving or its call waiting for a slot, hears
//! DEADLINE_EXCEEDED with Keel's `ErrorInfo` ([`crate::api::deadline`]), never CANCELLED.
//!
//! [`transport::serve`]: crate::transport::serve

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tonic_health::pb::health_server::HealthServer;
use tower::util::MapResponseLayer;
use tower::{BoxError, Service, ServiceBuilder};

use super::ServeError;
use super::health::DrainingHealth;
use super::services::{self, Listener};
use crate::api::deadline::EdgeDeadlineLayer;
use crate::api::legacy::LegacyApi;
use crate::api::{InferenceApi, InferenceRoutes, receipt, unreadable};
use crate::observe::Metrics;
use crate::observe::edge::EdgeMetricsLayer;
use crate::pb::keel_inference_v1::prediction_service_server::PredictionServiceServer;
use crate::policy::Store;
use crate::resilience::Slots;

/// Where traffic is served: by one worker in the caller's runtime, or by a worker thread
/// per listener.
pub(super) enum Traffic {
    Here(TcpListener),
    Threads(Vec<std::net::TcpListener>),
}

impl Traffic {
    /// The traffic address (the first listener's, with several).
    pub(super) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Traffic::Here(l) => l.local_addr(),
            Traffic::Threads(ls) => ls.first().map_or_else(
                || Err(std::io::Error::from(std::io::ErrorKind::InvalidInput)),
                std::net::TcpListener::local_addr,
            ),
        }
    }

    pub(super) fn workers(&self) -> usize {
        match self {
            Traffic::Here(_) => 1,
            Traffic::Threads(ls) => ls.len(),
        }
    }
}

/// The traffic listener's service: OIP v2 (ModelInfer taken first, from its bytes), legacy
/// v1, health and reflection, behind the edge layers, outermost first. `max`: the largest
/// message taken or sent.
pub(super) fn service(
    api: InferenceApi,
    max: usize,
    health: HealthServer<DrainingHealth>,
    store: Arc<Store>,
    gate: Arc<Slots>,
    metrics: Arc<Metrics>,
) -> Result<
    impl Service<
        http::Request<Incoming>,
        Response = http::Response<
            impl http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static,
        >,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static,
    ServeError,
> {
    // The legacy v1 API shares the v2 service's state: after its upgrade, a v1 call is a
    // v2 call.
    let api = Arc::new(api);
    let legacy = PredictionServiceServer::new(LegacyApi::new(api.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    // ModelInfer is served from its bytes; the other methods by tonic's generated code.
    let api = InferenceRoutes::new(api, max);
    let (reflection, reflection_alpha) = services::reflection(Listener::Traffic)?;
    let routes = api.clone().in_front_of(
        tonic::service::Routes::new(health)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(api)
            .add_service(legacy)
            .prepare(),
    );
    Ok(ServiceBuilder::new()
        // Outermost: it sees the status the client gets, the edge deadline's included.
        .layer(EdgeMetricsLayer::new(metrics, services::known_methods()))
        // As the headers arrive: the client's deadline counts from here, and a call
        // still unanswered at it (its body still arriving, say) hears Keel's
        // DEADLINE_EXCEEDED. Nothing of tonic's times the call outside it. Its bodies
        // are bounded from here too: a body still arriving holds one of `gate`'s slots
        // and its bytes from the connection's budget, and must finish within the
        // policy's longest timeout; an answer not taken is dropped at the deadline.
        .layer(EdgeDeadlineLayer::new(store.clone(), gate))
        .layer(MapResponseLayer::new(move |res| {
            unreadable::fix_response(res, store.current().revision)
        }))
        .layer(MapResponseLayer::new(receipt::move_to_trailers))
        .service(routes))
}
