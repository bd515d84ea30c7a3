//! Wiring: builds the backends, routes and per-method stacks from a policy, serves them with
//! health and reflection on the traffic listener, serves the policy admin API on the admin
//! listener, and drains on shutdown.
//!
//! # Listeners
//!
//! Traffic (`server.listen`) serves `inference.GRPCInferenceService`; the admin listener
//! (`server.admin_listen`), when given, serves `keel.admin.v1.PolicyAdmin`. Both serve
//! health and reflection, and reflection lists only the services of its own listener.
//!
//! Traffic is served by Keel's own HTTP/2 connection loop ([`transport::serve`]), so a
//! call's deadline is Keel's from its first byte: a client whose `grpc-timeout` passes
//! before Keel answered, its body still arriving or its call waiting for a slot, hears
//! DEADLINE_EXCEEDED with Keel's `ErrorInfo` ([`crate::api::deadline`]), never CANCELLED.
//! The admin listener is served by tonic's server, which also speaks HTTP/1.1 for
//! `/metrics`.
//!
//! # Shutdown
//!
//! When the shutdown future completes: health turns NOT_SERVING and ServerReady false,
//! both listeners stop accepting, open connections are told to send no new calls (HTTP/2
//! GOAWAY), and in-flight calls finish. Calls still running after `server.drain_timeout`
//! are cut (UNAVAILABLE); traffic connections still open a moment later are closed, admin
//! ones are left behind.
//!
//! # Workers
//!
//! [`Keel::serve`] serves traffic in the caller's runtime; [`Keel::serve_workers`] on a
//! worker thread per listener ([`crate::worker`]), all sharing one traffic stack and its
//! state. Everything above runs once, in the caller's runtime; the drain reaches every
//! worker, and `serve_workers` returns when all have drained (or the cut passed).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::Either;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tower::ServiceBuilder;
use tower::util::{BoxCloneSyncService, MapResponseLayer};

use crate::api::admin::{self as admin_api, AdminService, AdminToken, AdminTokenError};
use crate::api::deadline::EdgeDeadlineLayer;
use crate::api::legacy::LegacyApi;
use crate::api::{
    CallService, InferenceApi, InferenceRoutes, Lifecycle, Stacks, receipt, unreadable,
};
use crate::observe::Metrics;
use crate::observe::edge::{EdgeMetricsLayer, KnownMethods};
use crate::observe::metrics::{ReloadLabels, RuntimeState, TlsReloadLabels};
use crate::observe::traces::Tracing;
use crate::pb;
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::pb::keel_inference_v1::prediction_service_server::PredictionServiceServer;
use crate::policy::{AuditLog, Policy, PolicyErrors, Source, Store, TlsSettings, read_file, watch};
use crate::resilience::{AttemptLayer, BreakerLayer, HedgeLayer, LimitLayer, RetryLayer};
use crate::resilience::{DeadlineLayer, FaultLayer, ValidateLayer};
use crate::route::{self, Deliver, Router};
use crate::transport::{self, Accept, Http2, Tls};
use crate::upstream::Operation;
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

/// The `grpc.health.v1` name a liveness probe asks for: SERVING while the process answers.
pub const LIVENESS: &str = "liveness";
/// The `grpc.health.v1` name a readiness probe asks for: SERVING while Keel takes new calls.
pub const READINESS: &str = "readiness";

/// How long cut calls get to deliver their UNAVAILABLE answer before `serve` returns anyway.
const CUT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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

/// Where traffic is served: by one worker in the caller's runtime, or by a worker thread
/// per listener.
enum Traffic {
    Here(TcpListener),
    Threads(Vec<std::net::TcpListener>),
}

impl Traffic {
    /// The traffic address (the first listener's, with several).
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Traffic::Here(l) => l.local_addr(),
            Traffic::Threads(ls) => ls.first().map_or_else(
                || Err(std::io::Error::from(std::io::ErrorKind::InvalidInput)),
                std::net::TcpListener::local_addr,
            ),
        }
    }

    fn workers(&self) -> usize {
        match self {
            Traffic::Here(_) => 1,
            Traffic::Threads(ls) => ls.len(),
        }
    }
}

/// The tower stack of one per-model method, outermost layer first.
fn stack<Op: Operation>() -> CallService<Op> {
    let svc = ServiceBuilder::new()
        // Outermost, so the whole call (queueing, every attempt and every wait) shares the
        // client's one deadline, counted from the call's arrival: it fires at the instant
        // the edge deadline does, and answers with the call's receipt.
        .layer(DeadlineLayer)
        // Before anything is spent on it: a request that breaks its model's contract or the
        // size limits never takes a slot, an attempt or a breaker's count. Inside the
        // deadline, which bounds the first fetch of a model's contract.
        .layer(ValidateLayer)
        // A slot of the model is held across retries: retries never add concurrency.
        .layer(LimitLayer)
        // Retry sees BreakerOpen as a local rejection and does not retry it.
        .layer(RetryLayer)
        // Inside retry: a slow attempt may be hedged, and the pair counts as one attempt's
        // outcome for the retry decision.
        .layer(HedgeLayer)
        // Per attempt, so each attempt's outcome feeds the breaker.
        .layer(BreakerLayer)
        // Bounds one attempt and measures it for the latency estimate.
        .layer(AttemptLayer)
        // Innermost: an injected fault looks to every layer above like the backend's answer.
        .layer(FaultLayer)
        .service(Deliver::<Op>::new());
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
            Box::new(move |p| route::check(p, &checked)),
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
        let metrics = Metrics::new();
        let listener = metrics.clone();
        store.listen(Box::new(move |source, result| {
            listener
                .policy_reloads
                .get_or_create(&ReloadLabels { source, result })
                .inc();
        }));
        let load = |t: Option<&TlsSettings>, alpn: &[&[u8]]| {
            t.map(|t| Tls::load(t, alpn).map(Arc::new)).transpose()
        };
        let tls = load(server.tls.as_ref(), &[b"h2"])?;
        // The admin listener also serves /metrics, /livez and /readyz over HTTP/1.1.
        let admin_tls = load(server.admin_tls.as_ref(), &[b"h2", b"http/1.1"])?;
        {
            // Every reload (file, SIGHUP, admin, rollback; accepted, refused or unchanged)
            // re-reads the certificate files the current policy names, so rotating them
            // needs no restart.
            let (weak, tls, admin_tls, metrics) = (
                Arc::downgrade(&store),
                tls.clone(),
                admin_tls.clone(),
                metrics.clone(),
            );
            store.listen(Box::new(move |_, _| {
                let Some(store) = weak.upgrade() else {
                    return;
                };
                let server = &store.current().policy.server;
                reload_tls("traffic", tls.as_deref(), server.tls.as_ref(), &metrics);
                reload_tls(
                    "admin",
                    admin_tls.as_deref(),
                    server.admin_tls.as_ref(),
                    &metrics,
                );
            }));
        }
        {
            // The workers start once: a swap that changes `server.workers` is accepted
            // (nothing else depends on it) and says when it applies.
            let (weak, started) = (Arc::downgrade(&store), server.workers);
            store.listen(Box::new(move |_, result| {
                let Some(store) = weak.upgrade().filter(|_| result == "accepted") else {
                    return;
                };
                let workers = store.current().policy.server.workers;
                if workers != started {
                    tracing::warn!(
                        workers,
                        started,
                        "server.workers changed; it applies at the next start"
                    );
                }
            }));
        }
        metrics
            .policy_reloads
            .get_or_create(&ReloadLabels {
                source: "startup",
                result: "accepted",
            })
            .inc();
        let router = Router::new(embedded, server.max_message_size, metrics);
        // A new policy may change which models are required, or their routes: the health
        // view recomputes at once.
        let changed = router.health_changed().clone();
        store.listen(Box::new(move |_, _| changed.notify_one()));
        let rollback_store = store.clone();
        router.on_rollback(Box::new(move |verdict| {
            match rollback_store.roll_back_canary(&verdict.model, &verdict.route) {
                Ok(applied) => tracing::warn!(
                    model = %verdict.model,
                    route = %verdict.route,
                    revision = applied.snapshot().revision,
                    "canary rolled back: its weight is 0 in the new revision; apply policy to bring it back"
                ),
                Err(e) => tracing::error!(
                    model = %verdict.model,
                    route = %verdict.route,
                    error = %e,
                    "canary rollback refused"
                ),
            }
        }));
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

        // One health service for both listeners, so both turn NOT_SERVING together.
        // `liveness` stays SERVING while the process answers (a drain is not a reason to
        // restart it); `readiness` and `""` follow whether Keel takes new calls.
        // Set when the drain begins, to the drain timeout: both listeners and the health
        // Watch streams follow it.
        let (began_tx, began_rx) = tokio::sync::watch::channel::<Option<Duration>>(None);
        let health = tonic_health::server::HealthReporter::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            crate::health::DrainingHealth::new(health.clone(), began_rx.clone()),
        );
        for name in ["", LIVENESS, READINESS] {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        health
            .set_serving::<GrpcInferenceServiceServer<InferenceApi>>()
            .await;
        health
            .set_serving::<PredictionServiceServer<LegacyApi>>()
            .await;
        let has_admin = admin.is_some();
        if has_admin {
            health.set_serving::<AdminService>().await;
        }
        let health_name = name_of(&health_service);

        let serving = Arc::new(AtomicBool::new(true));
        let readiness = crate::health::Readiness::new(serving.clone());
        let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
        let stacks = Stacks {
            infer: stack(),
            ready: stack(),
            metadata: stack(),
            config: stack(),
            statistics: stack(),
        };
        let gate = Arc::new(crate::resilience::Slots::new(
            first.policy.server.max_in_flight,
            first.policy.server.interactive_reserve,
        ));
        let buffers = transport::Buffers::new(first.policy.server.max_buffered);
        let metrics = self.router.metrics().clone();
        {
            let (router, store, readiness_for_metrics, gate, buffers) = (
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
                    ready: i64::from(readiness_for_metrics.ready()),
                    ..RuntimeState::default()
                };
                router.runtime_state(&mut state);
                state
            }));
        }
        let api = InferenceApi::new(
            stacks,
            self.store.clone(),
            self.router.clone(),
            Lifecycle {
                readiness: readiness.clone(),
                cut: cut_rx,
                gate: gate.clone(),
            },
            self.tracing.clone(),
        );
        // The legacy v1 API shares the v2 service's state: after its upgrade, a v1 call is a
        // v2 call.
        let api = Arc::new(api);
        let legacy = PredictionServiceServer::new(LegacyApi::new(api.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        // ModelInfer is served from its bytes; the other methods by tonic's generated code.
        let api = InferenceRoutes::new(api, max);
        let (reflection, reflection_alpha) =
            reflection_for(&[name_of(&api), name_of(&legacy), health_name])?;

        let store = self.store.clone();
        let readiness_for_admin = readiness.clone();
        // The health view: per-model names, and readiness from the required models. The
        // first refresh happens before any listener accepts, so no name is ever missing.
        let mut publisher = crate::health::Publisher::new(
            readiness.clone(),
            self.router.clone(),
            self.store.clone(),
            health.clone(),
            vec![
                String::new(),
                READINESS.to_string(),
                name_of(&api).to_string(),
                name_of(&legacy).to_string(),
            ],
        );
        publisher.refresh().await;
        let _health_watch = AbortOnDrop(Some(tokio::spawn(publisher.run())));
        let signal = async move {
            shutdown.await;
            serving.store(false, Ordering::Release);
            for name in ["", READINESS] {
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            health
                .set_not_serving::<GrpcInferenceServiceServer<InferenceApi>>()
                .await;
            health
                .set_not_serving::<PredictionServiceServer<LegacyApi>>()
                .await;
            if has_admin {
                health.set_not_serving::<AdminService>().await;
            }
            // Not ready, but still serving: load balancers take a moment to stop sending.
            let grace = store.current().policy.server.drain_grace;
            if !grace.is_zero() {
                tracing::info!(drain_grace = ?grace, "shutdown: readiness is NOT_SERVING; still taking calls for drain_grace");
                tokio::time::sleep(grace).await;
            }
            // Read now: drain_timeout may have changed since startup.
            let drain_timeout = store.current().policy.server.drain_timeout;
            tracing::info!(drain_timeout = ?drain_timeout, "shutdown: draining in-flight calls");
            let _ = began_tx.send(Some(drain_timeout));
        };

        let limits = &first.policy.server;
        let accept = Accept {
            name: "traffic",
            max_connections: limits.max_connections,
            reports_use: true,
            tls: self.tls.clone(),
            tls_handshake_timeout: limits.tls_handshake_timeout,
            handshake_timeout: limits.handshake_timeout,
            metrics: metrics.clone(),
        };
        let admin_server = match admin {
            Some(listener) => {
                let service = admin_api::service(self.store.clone(), self.admin_token.clone());
                let (reflection, reflection_alpha) =
                    reflection_for(&[name_of(&service), health_name])?;
                let stop = shutdown_began(began_rx.clone());
                let routes = tonic::service::Routes::new(health_service.clone())
                    .add_service(reflection)
                    .add_service(reflection_alpha)
                    .add_service(service);
                let http = http_routes(metrics.clone(), readiness_for_admin);
                let routes = tonic::service::Routes::from(routes.into_axum_router().merge(http));
                let accept = Accept {
                    name: "admin",
                    // tonic's server does not say which connections made a call.
                    reports_use: false,
                    tls: self.admin_tls.clone(),
                    ..accept.clone()
                };
                Some(
                    admin_builder(&Http2::from_settings(&first.policy.server))
                        // /metrics, /livez and /readyz are plain HTTP/1.1.
                        .accept_http1(true)
                        .add_routes(routes)
                        .serve_with_incoming_shutdown(
                            transport::incoming(listener, accept),
                            async move {
                                stop.await;
                            },
                        ),
                )
            }
            None => None,
        };

        tracing::info!(
            listen = %local,
            workers,
            admin_listen = %admin_local.map_or_else(|| "none".to_string(), |a| a.to_string()),
            admin_token = self.admin_token.is_some(),
            policy_revision = first.revision,
            policy_version = first.version().unwrap_or(""),
            "serving"
        );
        warn_if_exposed(
            &first.policy,
            local,
            admin_local,
            self.admin_token.is_some(),
        );
        let routes = api.clone().in_front_of(
            tonic::service::Routes::new(health_service)
                .add_service(reflection)
                .add_service(reflection_alpha)
                .add_service(api)
                .add_service(legacy)
                .prepare(),
        );
        let traffic_service = ServiceBuilder::new()
            // Outermost: it sees the status the client gets, the edge deadline's included.
            .layer(EdgeMetricsLayer::new(metrics.clone(), known_methods()))
            // As the headers arrive: the client's deadline counts from here, and a call
            // still unanswered at it (its body still arriving, say) hears Keel's
            // DEADLINE_EXCEEDED. Nothing of tonic's times the call outside it. Its bodies
            // are bounded from here too: a body still arriving holds one of `gate`'s slots
            // and its bytes from the connection's budget, and must finish within the
            // policy's longest timeout; an answer not taken is dropped at the deadline.
            .layer(EdgeDeadlineLayer::new(self.store.clone(), gate))
            .layer(MapResponseLayer::new({
                let store = self.store.clone();
                move |res| unreadable::fix_response(res, store.current().revision)
            }))
            .layer(MapResponseLayer::new(receipt::move_to_trailers))
            .service(routes);
        // True once the drain begins: every worker stops accepting and drains.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let work = worker::Traffic {
            service: traffic_service,
            open: transport::Connections::new(&accept),
            accept,
            http2: Http2::from_settings(&first.policy.server),
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
        // The drain sequence runs here, once, whatever the number of workers; when it
        // ends, every worker stops accepting. Dropped unfinished when the workers ended on
        // their own.
        let server = async move {
            let mut drained = std::pin::pin!(drained);
            let mut signal = std::pin::pin!(signal);
            let mut signalled = false;
            loop {
                tokio::select! {
                    () = &mut drained => return,
                    () = &mut signal, if !signalled => {
                        signalled = true;
                        let _ = stop_tx.send(true);
                    }
                }
            }
        };
        let began = began_rx.clone();
        let drain_deadline = async move {
            match shutdown_began(began).await {
                Some(drain_timeout) => tokio::time::sleep(drain_timeout).await,
                None => std::future::pending::<()>().await,
            }
        };
        let traffic = async move {
            // Boxed, once per serve, so it can be dropped before the workers end.
            let mut server = Box::pin(server);
            tokio::select! {
                () = &mut server => tracing::info!("shutdown: drained"),
                () = drain_deadline => {
                    tracing::warn!("shutdown: drain timeout passed; cutting calls still in flight");
                    // Calls still running answer UNAVAILABLE, so their connections can close.
                    let _ = cut_tx.send(true);
                    if tokio::time::timeout(CUT_GRACE, &mut server).await.is_err() {
                        tracing::warn!("shutdown: connections still open after the cut; closing them");
                    }
                }
            }
            // One worker here: its connections still open close with `server`. Worker
            // threads: their runtimes end, closing theirs.
            drop(server);
            exit.now(CUT_GRACE).await;
            Ok::<(), ServeError>(())
        };
        let (traffic, admin) = tokio::join!(traffic, run_admin(admin_server, began_rx));
        // Drained: send the spans still buffered before returning.
        if let Some(t) = &self.tracing {
            let t = t.clone();
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
        traffic?;
        admin
    }
}

/// Runs the admin server, if any, until it has shut down, or until the drain timeout (plus
/// the cut grace) has passed since shutdown began: an admin connection left open (a health
/// Watch) must not hold Keel up.
async fn run_admin(
    server: Option<impl Future<Output = Result<(), tonic::transport::Error>>>,
    began: tokio::sync::watch::Receiver<Option<Duration>>,
) -> Result<(), ServeError> {
    let Some(server) = server else {
        return Ok(());
    };
    let give_up = async move {
        // No drain timeout: the traffic server ended without a shutdown (it failed).
        let drain_timeout = shutdown_began(began).await.unwrap_or_default();
        tokio::time::sleep(drain_timeout + CUT_GRACE).await;
    };
    tokio::select! {
        result = server => {
            if let Err(e) = &result {
                tracing::error!(error = %e, "the admin listener failed");
            }
            result?;
        }
        () = give_up => tracing::warn!("shutdown: admin connections still open after the drain timeout; leaving them"),
    }
    Ok(())
}

/// Completes when shutdown begins, with its drain timeout, or with `None` when the sender
/// goes away without a shutdown (the traffic server ended on its own).
async fn shutdown_began(
    mut began: tokio::sync::watch::Receiver<Option<Duration>>,
) -> Option<Duration> {
    began.wait_for(Option::is_some).await.ok().and_then(|d| *d)
}

/// The gRPC name of a service.
fn name_of<S: NamedService>(_: &S) -> &'static str {
    S::NAME
}

/// Reflection (v1 and v1alpha) over every Keel proto, listing only `services` (and itself):
/// each listener lists what it serves.
fn reflection_for(
    services: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServeError,
> {
    let builder = || {
        services.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(*name),
        )
    };
    let v1 = builder()
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()?;
    let v1alpha = builder()
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()?;
    Ok((v1, v1alpha))
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

/// Every method of the services Keel serves, from their descriptors, so metrics label only
/// methods that exist.
fn known_methods() -> KnownMethods {
    use prost::Message as _;
    let mut methods = Vec::new();
    for set in [
        pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(fds) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in fds.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = format!("{package}.{}", service.name.unwrap_or_default());
                for m in service.method {
                    methods.push((
                        name.clone(),
                        m.name.unwrap_or_default(),
                        m.client_streaming.unwrap_or(false),
                        m.server_streaming.unwrap_or(false),
                    ));
                }
            }
        }
    }
    KnownMethods::new(methods)
}

/// The admin listener's plain HTTP endpoints: `/metrics` (Prometheus), `/livez`, `/readyz`.
fn http_routes(metrics: Arc<Metrics>, readiness: Arc<crate::health::Readiness>) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = metrics.render();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route("/livez", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let reasons = readiness.reasons();
                async move {
                    if reasons.is_empty() {
                        (StatusCode::OK, "ready\n".to_string())
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, reasons.join("\n") + "\n")
                    }
                }
            }),
        )
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

/// The admin listener's server (tonic's: it also speaks HTTP/1.1), with the HTTP/2
/// settings of the traffic listener.
fn admin_builder(h: &Http2) -> Server {
    let b = Server::builder()
        .http2_max_header_list_size(h.max_header_list_size)
        .max_concurrent_streams(h.max_concurrent_streams)
        .http2_keepalive_interval(Some(h.keepalive_interval))
        .http2_keepalive_timeout(Some(h.keepalive_timeout))
        .http2_max_local_error_reset_streams(Some(transport::MAX_LOCAL_ERROR_RESETS));
    match h.max_connection_age {
        Some(age) => b
            .max_connection_age(age)
            .max_connection_age_grace(h.max_connection_age_grace),
        None => b,
    }
}

/// Re-reads one listener's certificate files; on a problem the current ones keep serving.
fn reload_tls(
    listener: &'static str,
    tls: Option<&Tls>,
    settings: Option<&TlsSettings>,
    metrics: &Metrics,
) {
    let (Some(tls), Some(settings)) = (tls, settings) else {
        return;
    };
    let result = match tls.reload(settings) {
        Ok(()) => {
            tracing::debug!(listener, "certificate files re-read");
            "accepted"
        }
        Err(e) => {
            tracing::warn!(listener, error = %e, "certificate reload refused; the current certificates keep serving");
            "rejected"
        }
    };
    metrics
        .tls_reloads
        .get_or_create(&TlsReloadLabels { listener, result })
        .inc();
}

/// Warns at startup about listeners reachable from the network in plaintext, and about an
/// admin listener on which no one may change the policy.
fn warn_if_exposed(
    policy: &Policy,
    traffic: SocketAddr,
    admin: Option<SocketAddr>,
    admin_token: bool,
) {
    let s = &policy.server;
    if !traffic.ip().is_loopback() && s.tls.is_none() {
        tracing::warn!(listen = %traffic, "the traffic listener is not on loopback and speaks plaintext: API keys and tensors cross the network in clear text; set [server.tls]");
    }
    if let Some(admin) = admin {
        if !admin.ip().is_loopback() && s.admin_tls.is_none() {
            tracing::warn!(admin_listen = %admin, admin_token, "the admin listener is not on loopback and speaks plaintext: the admin token and policies cross the network in clear text; set [server.admin_tls]");
        }
        if s.admin_tls.as_ref().is_some_and(|t| t.mutual())
            && policy.auth.admin_identities.is_empty()
        {
            tracing::warn!(
                "the admin listener requires client certificates and auth.admin_identities is empty: no one may change the policy over the admin API"
            );
        }
    }
}
