//! Wiring: builds the backends, routes and per-method stacks from a policy, serves them with
//! health and reflection, and drains on shutdown.
//!
//! # Shutdown
//!
//! When the shutdown future completes: health turns NOT_SERVING and ServerReady false,
//! the listener stops accepting, open connections are told to send no new calls (HTTP/2
//! GOAWAY), and in-flight calls finish. Calls still running after `server.drain_timeout`
//! are cut.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tower::ServiceBuilder;
use tower::util::{BoxCloneSyncService, MapResponseLayer};

use crate::api::{CallService, InferenceApi, Stacks, oversize};
use crate::pb;
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::policy::{Policy, PolicyErrors};
use crate::resilience::DeadlineLayer;
use crate::route::{Dispatch, Routes};
use crate::upstream::Operation;
use crate::upstream::embedded::Embedded;

/// Why Keel could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The policy is invalid.
    #[error("invalid configuration:\n{0}")]
    Policy(#[from] PolicyErrors),
    /// Reflection could not load the descriptors (a build problem).
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The listener failed.
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The listener's address could not be read.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// How long cut calls get to deliver their UNAVAILABLE answer before `serve` returns anyway.
const CUT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A Keel ready to serve: backends and routes built from one policy.
pub struct Keel {
    policy: Policy,
    routes: Arc<Routes>,
}

/// The tower stack of one per-model method, outermost layer first.
fn stack<Op: Operation>(routes: &Arc<Routes>) -> CallService<Op> {
    let svc = ServiceBuilder::new()
        // Outermost, so the whole call (and later every retry) shares the client's one
        // deadline, and the client hears DEADLINE_EXCEEDED rather than CANCELLED.
        .layer(DeadlineLayer)
        .service(Dispatch::<Op>::new(routes.clone()));
    BoxCloneSyncService::new(svc)
}

impl Keel {
    /// Builds backends and routes; needs a Tokio runtime (upstream channels are lazy).
    pub fn new(policy: Policy) -> Result<Keel, ServeError> {
        let routes = Arc::new(Routes::build(&policy, Embedded::new())?);
        Ok(Keel { policy, routes })
    }

    /// The served models with a description of their backends, sorted by name.
    pub fn models(&self) -> Vec<(String, String)> {
        self.routes
            .models()
            .map(|(m, b)| (m.to_string(), b.describe()))
            .collect()
    }

    /// The policy this Keel serves.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Serves on `listener` until `shutdown` completes and in-flight calls have drained.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let local: SocketAddr = listener.local_addr()?;
        let max = self.policy.server.max_message_size;
        let drain_timeout = self.policy.server.drain_timeout;

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status("", ServingStatus::Serving).await;
        health
            .set_serving::<GrpcInferenceServiceServer<InferenceApi>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let serving = Arc::new(AtomicBool::new(true));
        let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
        let stacks = Stacks {
            infer: stack(&self.routes),
            ready: stack(&self.routes),
            metadata: stack(&self.routes),
            config: stack(&self.routes),
            statistics: stack(&self.routes),
        };
        let models = self.routes.models().map(|(m, _)| m.to_string()).collect();
        let api = InferenceApi::new(
            stacks,
            models,
            self.policy.defaults.timeout,
            serving.clone(),
            cut_rx,
        );
        let api = GrpcInferenceServiceServer::new(api)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);

        let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            serving.store(false, Ordering::Release);
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health
                .set_not_serving::<GrpcInferenceServiceServer<InferenceApi>>()
                .await;
            tracing::info!(drain_timeout = ?drain_timeout, "shutdown: draining in-flight calls");
            let _ = began_tx.send(());
        };

        tracing::info!(listen = %local, policy_version = ?self.policy.version, "serving");
        let server = Server::builder()
            .layer(MapResponseLayer::new(oversize::fix_response))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(api)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                signal,
            );
        let drain_deadline = async move {
            if began_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(drain_timeout).await;
        };
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => {
                result?;
                tracing::info!("shutdown: drained");
            }
            () = drain_deadline => {
                tracing::warn!(drain_timeout = ?drain_timeout, "shutdown: drain timeout passed; cutting calls still in flight");
                // Calls still running answer UNAVAILABLE, so their connections can close.
                let _ = cut_tx.send(true);
                match tokio::time::timeout(CUT_GRACE, &mut server).await {
                    Ok(result) => result?,
                    Err(_) => tracing::warn!("shutdown: connections still open after the cut; leaving them"),
                }
            }
        }
        Ok(())
    }
}

/// Builds Keel from `policy` and serves on `listener` until `shutdown` completes.
///
/// The entry point for the binary and for black-box tests, which pass a listener bound to
/// `127.0.0.1:0` and their own shutdown signal.
pub async fn serve(
    policy: Policy,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    Keel::new(policy)?.serve(listener, shutdown).await
}
