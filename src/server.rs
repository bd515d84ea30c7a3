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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tower::ServiceBuilder;
use tower::util::{BoxCloneSyncService, MapResponseLayer};

use crate::api::{CallService, InferenceApi, Stacks, oversize};
use crate::pb;
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::policy::{AuditLog, Policy, PolicyErrors, Source, Store, read_file, watch};
use crate::resilience::DeadlineLayer;
use crate::route::{self, Dispatch, Router};
use crate::upstream::Operation;
use crate::upstream::embedded::Embedded;

/// What to serve and where: the inputs of [`Keel::new`].
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The policy file, watched and re-read on SIGHUP. `None`: the embedded default (or
    /// `text`).
    pub config: Option<PathBuf>,
    /// The policy document itself, instead of a file (tests, embedding).
    pub text: Option<String>,
    /// Overrides `server.listen` (the `--listen` flag), for every policy loaded.
    pub listen: Option<SocketAddr>,
    /// Overrides `server.admin_listen` (the `--admin-listen` flag), for every policy loaded.
    pub admin_listen: Option<SocketAddr>,
}

impl Options {
    /// Serve this policy document.
    pub fn text(text: impl Into<String>) -> Options {
        Options {
            text: Some(text.into()),
            ..Options::default()
        }
    }
}

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

/// A Keel ready to serve: the policy store, and the router that compiles each snapshot's
/// routes over the embedded models and upstream connections.
pub struct Keel {
    store: Arc<Store>,
    router: Arc<Router>,
    config: Option<PathBuf>,
}

/// The tower stack of one per-model method, outermost layer first.
fn stack<Op: Operation>(router: &Arc<Router>) -> CallService<Op> {
    let svc = ServiceBuilder::new()
        // Outermost, so the whole call (and later every retry) shares the client's one
        // deadline, and the client hears DEADLINE_EXCEEDED rather than CANCELLED.
        .layer(DeadlineLayer)
        .service(Dispatch::<Op>::new(router.clone()));
    BoxCloneSyncService::new(svc)
}

/// Where the audit log goes: the policy's `server.audit_log`, else next to the policy file
/// (`policy.toml.audit.jsonl`), else nowhere.
fn audit_log(policy: &Policy, config: Option<&Path>) -> AuditLog {
    let path = policy.server.audit_log.clone().or_else(|| {
        config.map(|c| {
            let mut name = c.file_name().unwrap_or_default().to_os_string();
            name.push(".audit.jsonl");
            c.with_file_name(name)
        })
    });
    match path {
        Some(p) => AuditLog::open(Some(&p)),
        None => AuditLog::disabled(),
    }
}

impl Keel {
    /// Loads the policy and builds the store and router; needs a Tokio runtime (upstream
    /// channels are created lazily).
    pub fn new(options: Options) -> Result<Keel, ServeError> {
        let text = match (&options.text, &options.config) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(read_file(path)?),
            (None, None) => None,
        };
        let first = Policy::parse(text.as_deref().unwrap_or_default())?;
        let audit = audit_log(&first, options.config.as_deref());
        let embedded = Embedded::new();
        let checked = embedded.clone();
        let (listen, admin_listen) = (options.listen, options.admin_listen);
        let store = Store::new(
            text,
            Source::Startup(options.config.clone()),
            audit,
            Box::new(move |p| route::check(p, &checked)),
            Box::new(move |p| {
                if let Some(a) = listen {
                    p.server.listen = a;
                }
                if let Some(a) = admin_listen {
                    p.server.admin_listen = a;
                }
            }),
        )?;
        let store = Arc::new(store);
        let router = Router::new(embedded, store.current().policy.server.max_message_size);
        Ok(Keel {
            store,
            router,
            config: options.config,
        })
    }

    /// The served models with a description of their backends, sorted by name.
    pub fn models(&self) -> Vec<(String, String)> {
        self.router.routes(&self.store.current()).describe()
    }

    /// The policy store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Serves on `listener` until `shutdown` completes and in-flight calls have drained.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let local: SocketAddr = listener.local_addr()?;
        let first = self.store.current();
        let max = first.policy.server.max_message_size;
        // File watch and SIGHUP live as long as `serve`.
        let _watch = match (&self.config, first.policy.server.watch) {
            (Some(path), true) => match watch::watch_file(self.store.clone(), path.clone()) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot watch the policy file; SIGHUP still reloads it");
                    None
                }
            },
            _ => None,
        };
        let _sighup = self
            .config
            .clone()
            .map(|path| AbortOnDrop(watch::reload_on_sighup(self.store.clone(), path).ok()));

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
            infer: stack(&self.router),
            ready: stack(&self.router),
            metadata: stack(&self.router),
            config: stack(&self.router),
            statistics: stack(&self.router),
        };
        let api = InferenceApi::new(
            stacks,
            self.store.clone(),
            self.router.clone(),
            serving.clone(),
            cut_rx,
        );
        let api = GrpcInferenceServiceServer::new(api)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);

        let (began_tx, began_rx) = tokio::sync::oneshot::channel::<Duration>();
        let store = self.store.clone();
        let signal = async move {
            shutdown.await;
            serving.store(false, Ordering::Release);
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health
                .set_not_serving::<GrpcInferenceServiceServer<InferenceApi>>()
                .await;
            // Read now: drain_timeout may have changed since startup.
            let drain_timeout = store.current().policy.server.drain_timeout;
            tracing::info!(drain_timeout = ?drain_timeout, "shutdown: draining in-flight calls");
            let _ = began_tx.send(drain_timeout);
        };

        tracing::info!(
            listen = %local,
            policy_revision = first.revision,
            policy_version = first.version().unwrap_or(""),
            "serving"
        );
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
            match began_rx.await {
                Ok(drain_timeout) => tokio::time::sleep(drain_timeout).await,
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => {
                result?;
                tracing::info!("shutdown: drained");
            }
            () = drain_deadline => {
                tracing::warn!("shutdown: drain timeout passed; cutting calls still in flight");
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

/// Builds Keel from `options` and serves on `listener` until `shutdown` completes.
///
/// The entry point for the binary and for black-box tests, which pass a listener bound to
/// `127.0.0.1:0` and their own shutdown signal.
pub async fn serve(
    options: Options,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    Keel::new(options)?.serve(listener, shutdown).await
}

/// Aborts a background task when dropped.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}
