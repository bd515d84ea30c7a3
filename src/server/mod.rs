//! Wiring: builds the backends, routes and per-method stacks from a policy, serves them with
//! health and reflection on the traffic listener, serves the policy admin API on the admin
//! listener, and drains on shutdown. Each step lives in the module named for it.
//!
//! # Listeners
//!
//! Traffic (`server.listen`, [`traffic`]) serves `inference.GRPCInferenceService` and the
//! legacy `keel.inference.v1.PredictionService`; the admin listener (`server.admin_listen`,
//! [`admin`]), when given, serves `keel.admin.v1.PolicyAdmin`. Both serve health
//! ([`health`]) and reflection, and reflection lists only the services of its own listener
//! ([`services`]). The admin listener is served by tonic's server, which also speaks
//! HTTP/1.1 for `/metrics`.
//!
//! # Shutdown
//!
//! Readiness first, then the drain, then the cut: [`shutdown`].
//!
//! # Workers
//!
//! [`Keel::serve`] serves traffic in the caller's runtime; [`Keel::serve_workers`] on a
//! worker thread per listener ([`crate::worker`]), all sharing one traffic stack and its
//! state. Everything else runs once, in the caller's runtime; the drain reaches every
//! worker, and `serve_workers` returns when all have drained (or the cut passed).

mod admin;
pub mod health;
mod reload;
mod services;
mod shutdown;
mod stack;
mod traffic;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::Either;
use tokio::net::TcpListener;

pub use health::{LIVENESS, READINESS};

use self::health::{Health, Readiness};
use self::traffic::Traffic;
use crate::api::admin::{AdminToken, AdminTokenError};
use crate::api::{InferenceApi, Lifecycle};
use crate::observe::Metrics;
use crate::observe::metrics::RuntimeState;
use crate::observe::traces::Tracing;
use crate::policy::{AuditLog, Policy, PolicyErrors, Source, Store, TlsSettings, read_file};
use crate::resilience::Slots;
use crate::route::Router;
use crate::transport::{self, Accept, Buffers, Http2, Tls};
use crate::upstream::embedded::Embedded;
use crate::worker;

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
    /// Where to export spans over OTLP/gRPC (`OTEL_EXPORTER_OTLP_ENDPOINT`); `None`: no
    /// tracing.
    pub otlp_endpoint: Option<String>,
    /// The service name spans carry (`OTEL_SERVICE_NAME`); default `keel`.
    pub service_name: Option<String>,
    /// Also emit the pre-stable RPC span attributes (`OTEL_SEMCONV_STABILITY_OPT_IN=rpc/dup`).
    pub old_span_names: bool,
    /// Overrides `server.drain_grace`, for every policy loaded (tests that stop Keel often).
    pub drain_grace: Option<Duration>,
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
    /// The OTLP exporter could not be built.
    #[error("tracing: {0}")]
    Tracing(String),
    /// `server.admin_token_env` names a variable that holds no usable token.
    #[error("{0}")]
    AdminToken(#[from] AdminTokenError),
}

/// A Keel ready to serve: the policy store, and the router that compiles each snapshot's
/// routes over the embedded models and upstream connections.
pub struct Keel {
    store: Arc<Store>,
    router: Arc<Router>,
    config: Option<PathBuf>,
    /// Read once at startup: `server.admin_token_env` cannot change without a restart.
    admin_token: Option<AdminToken>,
    /// Span export, when tracing is on.
    tracing: Option<Arc<Tracing>>,
    /// The traffic listener's TLS, when `[server.tls]` is set; re-read on every reload.
    tls: Option<Arc<Tls>>,
    /// The admin listener's TLS, when `[server.admin_tls]` is set; re-read likewise.
    admin_tls: Option<Arc<Tls>>,
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
    /// channels are created lazily). Reads the admin token when `server.admin_token_env` is
    /// set, and fails naming the variable if it holds none.
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
        let (listen, admin_listen, drain_grace) =
            (options.listen, options.admin_listen, options.drain_grace);
        let store = Store::new(
            text,
            Source::Startup(options.config.clone()),
            audit,
            Box::new(move |p| crate::policy::builtin::check(p, &*checked)),
            Box::new(move |p| {
                if let Some(a) = listen {
                    p.server.listen = a;
                }
                if let Some(a) = admin_listen {
                    p.server.admin_listen = a;
                }
                if let Some(g) = drain_grace {
                    p.server.drain_grace = g;
                }
            }),
        )?;
        let store = Arc::new(store);
        let server = store.current().policy.server.clone();
        let admin_token = server
            .admin_token_env
            .as_deref()
            .map(AdminToken::from_env)
            .transpose()?;
        let load = |t: Option<&TlsSettings>, alpn: &[&[u8]]| {
            t.map(|t| Tls::load(t, alpn).map(Arc::new)).transpose()
        };
        let tls = load(server.tls.as_ref(), &[b"h2"])?;
        // The admin listener also serves /metrics, /livez and /readyz over HTTP/1.1.
        let admin_tls = load(server.admin_tls.as_ref(), &[b"h2", b"http/1.1"])?;
        let router = Router::new(embedded, server.max_message_size, Metrics::new());
        reload::on_every_reload(&store, &router, tls.clone(), admin_tls.clone());
        reload::roll_back_failing_canaries(&router, &store);
        let tracing = match &options.otlp_endpoint {
            None => None,
            Some(endpoint) => {
                let name = options.service_name.as_deref().unwrap_or("keel");
                Some(
                    Tracing::otlp(endpoint, name, options.old_span_names)
                        .map_err(ServeError::Tracing)?,
                )
            }
        };
        Ok(Keel {
            store,
            router,
            config: options.config,
            admin_token,
            tracing,
            tls,
            admin_tls,
        })
    }

    /// The served models, sorted by name.
    pub fn models(&self) -> Vec<String> {
        let routes = self.router.routes(&self.store.current());
        routes.models().map(str::to_string).collect()
    }

    /// The policy store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Serves traffic on `listener` and, when given, the admin API on `admin`, until
    /// `shutdown` completes and in-flight calls have drained. Traffic is served by one
    /// worker, in the caller's runtime.
    pub async fn serve(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        self.run(Traffic::Here(listener), admin, shutdown).await
    }

    /// As [`Keel::serve`], with one traffic worker per listener: each an OS thread with a
    /// `current_thread` runtime of its own, serving the connections of its listener
    /// ([`crate::worker`]). The binary passes `server.workers` sockets bound to one
    /// address with `SO_REUSEPORT` ([`crate::worker::bind`]); a test may pass listeners
    /// on distinct ports, to know which worker each connection reaches. The admin
    /// listener, the policy watch, health and the drain run in the caller's runtime.
    ///
    /// # Errors
    ///
    /// As [`Keel::serve`]; also when `listeners` is empty, or a worker's thread or runtime
    /// cannot be made.
    pub async fn serve_workers(
        self,
        listeners: Vec<std::net::TcpListener>,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        if listeners.is_empty() {
            return Err(ServeError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no traffic listener for the workers",
            )));
        }
        self.run(Traffic::Threads(listeners), admin, shutdown).await
    }

    async fn run(
        self,
        traffic: Traffic,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let local: SocketAddr = traffic.local_addr()?;
        let workers = traffic.workers();
        let admin_local = admin.as_ref().map(TcpListener::local_addr).transpose()?;
        let first = self.store.current();
        let limits = &first.policy.server;
        // File watch and SIGHUP live as long as `serve`.
        let _following = reload::follow(&self.store, self.config.as_deref(), limits.watch);
        // Set when the drain begins, to the drain timeout: both listeners and the health
        // Watch streams follow it.
        let (began_tx, began_rx) = tokio::sync::watch::channel(None);
        let health = Health::start(began_rx.clone(), admin.is_some()).await;
        // True at the cut: calls still running answer UNAVAILABLE.
        let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
        let gate = Arc::new(Slots::new(limits.max_in_flight, limits.interactive_reserve));
        let buffers = Buffers::new(limits.max_buffered);
        let metrics = self.router.metrics().clone();
        self.report_runtime(&metrics, health.readiness(), &gate, &buffers);
        let api = InferenceApi::new(
            stack::stacks(),
            self.store.clone(),
            self.router.clone(),
            Lifecycle {
                readiness: health.readiness().clone(),
                cut: cut_rx,
                gate: gate.clone(),
            },
            self.tracing.clone(),
        );
        let service = traffic::service(
            api,
            limits.max_message_size,
            health.service(),
            self.store.clone(),
            gate,
            metrics.clone(),
        )?;
        let _health_watch = health
            .publish(self.router.clone(), self.store.clone())
            .await;
        let accept = Accept {
            name: "traffic",
            max_connections: limits.max_connections,
            reports_use: true,
            tls: self.tls.clone(),
            tls_handshake_timeout: limits.tls_handshake_timeout,
            handshake_timeout: limits.handshake_timeout,
            metrics,
        };
        let http2 = Http2::from_settings(limits);
        let admin_server = match admin {
            Some(listener) => {
                Some(self.admin_server(listener, &health, &accept, &http2, began_rx.clone())?)
            }
            None => None,
        };
        let signal = shutdown::begin(shutdown, health, self.store.clone(), began_tx);

        tracing::info!(
            listen = %local,
            workers,
            admin_listen = %admin_local.map_or_else(|| "none".to_string(), |a| a.to_string()),
            admin_token = self.admin_token.is_some(),
            policy_revision = first.revision,
            policy_version = first.version().unwrap_or(""),
            "serving"
        );
        admin::warn_if_exposed(
            &first.policy,
            local,
            admin_local,
            self.admin_token.is_some(),
        );
        // True once the drain begins: every worker stops accepting and drains.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let work = worker::Traffic {
            service,
            open: transport::Connections::new(&accept),
            accept,
            http2,
            buffers,
        };
        let (drained, exit) = match traffic {
            Traffic::Here(listener) => {
                let incoming = transport::incoming_counted(listener, work.accept, work.open);
                let mut stop = stop_rx;
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                let served =
                    transport::serve(incoming, work.service, work.http2, work.buffers, stopped);
                (Either::Left(served), worker::Exit::none())
            }
            Traffic::Threads(listeners) => {
                let (drained, exit) = worker::spawn(listeners, &work, &stop_rx).await?;
                (Either::Right(drained), exit)
            }
        };
        let traffic = shutdown::drain(drained, signal, stop_tx, began_rx.clone(), cut_tx, exit);
        let ((), admin) = tokio::join!(traffic, admin::run_admin(admin_server, began_rx));
        // Drained: send the spans still buffered before returning.
        if let Some(t) = &self.tracing {
            let t = t.clone();
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
        admin
    }

    /// Reports the gauges read at each scrape: calls in flight, bytes buffered, the policy
    /// revision, readiness, and the router's own.
    fn report_runtime(
        &self,
        metrics: &Metrics,
        readiness: &Arc<Readiness>,
        gate: &Arc<Slots>,
        buffers: &Arc<Buffers>,
    ) {
        let (router, store, readiness, gate, buffers) = (
            self.router.clone(),
            self.store.clone(),
            readiness.clone(),
            gate.clone(),
            buffers.clone(),
        );
        metrics.set_runtime(Box::new(move || {
            let mut state = RuntimeState {
                gateway_in_flight: i64::from(gate.in_flight()),
                buffered_bytes: i64::try_from(buffers.used()).unwrap_or(i64::MAX),
                policy_revision: store.current().revision as i64,
                ready: i64::from(readiness.ready()),
                ..RuntimeState::default()
            };
            router.runtime_state(&mut state);
            state
        }));
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
    Keel::new(options)?.serve(listener, None, shutdown).await
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
