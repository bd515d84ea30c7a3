//! Keel's own health, one view for every way it is asked: `grpc.health.v1` (`readiness`,
//! `""`, the service names, and `keel.model.<name>` per model), OIP ServerReady and the admin
//! `/readyz`.
//!
//! Keel is ready while it takes new calls (no shutdown has begun) and every model marked
//! `required` can answer: a route whose upstream has an endpoint whose breaker is not open
//! (half-open counts: it lets probes through), or a fallback ladder. `liveness` does not
//! depend on any of this. The view is recomputed when a breaker opens, turns half-open or
//! closes, an endpoint's standing changes or a policy is applied, and every second besides.
//!
//! # Names
//!
//! [`Health`] sets them, for both listeners at once:
//!
//! - `liveness`: SERVING while the process answers (a drain is no reason to restart it);
//! - `readiness`, `""` and the traffic services' names: the view above;
//! - the admin service's name: SERVING until the drain, whatever the models can do
//!   (the list of services says which name follows what).
//!
//! [`DrainingHealth`] serves the view: tonic-health's service, except that Watch streams end
//! when the drain begins.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::StreamExt as _;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health as GrpcHealth, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use super::AbortOnDrop;
use super::services::{Follows, Listener, SERVICES, Service};
use crate::policy::Store;
use crate::route::Router;

/// How often the view is recomputed.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The `grpc.health.v1` name a liveness probe asks for: SERVING while the process answers.
pub const LIVENESS: &str = "liveness";
/// The `grpc.health.v1` name a readiness probe asks for: SERVING while Keel takes new calls.
pub const READINESS: &str = "readiness";

/// Keel's health on both listeners: the names' statuses, the `grpc.health.v1` service that
/// serves them, and the readiness view that decides them.
pub(super) struct Health {
    reporter: HealthReporter,
    /// One service for both listeners, so both turn NOT_SERVING together.
    service: HealthServer<DrainingHealth>,
    readiness: Arc<Readiness>,
    /// False from the drain on.
    serving: Arc<AtomicBool>,
    /// The services with a health name, of the listeners served.
    services: Vec<&'static Service>,
}

impl Health {
    /// Every name SERVING; Watch streams end when `draining` becomes `Some` (the drain
    /// timeout). `admin`: whether the admin listener is served, and so its service's name.
    pub(super) async fn start(
        draining: tokio::sync::watch::Receiver<Option<Duration>>,
        admin: bool,
    ) -> Health {
        let reporter = HealthReporter::new();
        let service = HealthServer::new(DrainingHealth::new(reporter.clone(), draining));
        let served = |l: &Listener| *l == Listener::Traffic || admin;
        let services: Vec<&'static Service> = SERVICES
            .iter()
            .filter(|s| s.health != Follows::Nothing && s.on.iter().any(served))
            .collect();
        let names = ["", LIVENESS, READINESS].into_iter();
        for name in names.chain(services.iter().map(|s| s.name)) {
            reporter
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let serving = Arc::new(AtomicBool::new(true));
        Health {
            readiness: Readiness::new(serving.clone()),
            reporter,
            service,
            serving,
            services,
        }
    }

    /// The `grpc.health.v1` service, for a listener's routes.
    pub(super) fn service(&self) -> HealthServer<DrainingHealth> {
        self.service.clone()
    }

    /// Whether Keel is ready, and why not.
    pub(super) fn readiness(&self) -> &Arc<Readiness> {
        &self.readiness
    }

    /// Publishes the view once (before any listener accepts, so no name is ever missing),
    /// then keeps it current until the returned guard is dropped.
    pub(super) async fn publish(&self, router: Arc<Router>, store: Arc<Store>) -> AbortOnDrop {
        let ready = self
            .services
            .iter()
            .filter(|s| s.health == Follows::Readiness);
        let ready_names = ["", READINESS]
            .into_iter()
            .chain(ready.map(|s| s.name))
            .map(str::to_string)
            .collect();
        let mut publisher = Publisher::new(
            self.readiness.clone(),
            router,
            store,
            self.reporter.clone(),
            ready_names,
        );
        publisher.refresh().await;
        AbortOnDrop(Some(tokio::spawn(publisher.run())))
    }

    /// The drain begins: Keel no longer takes new calls, and every name but `liveness` turns
    /// NOT_SERVING.
    pub(super) async fn drain(&self) {
        self.serving.store(false, Ordering::Release);
        let names = ["", READINESS].into_iter();
        for name in names.chain(self.services.iter().map(|s| s.name)) {
            self.reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    }
}

/// The health name of one model.
pub fn model_service(model: &str) -> String {
    format!("keel.model.{model}")
}

/// `grpc.health.v1.Health` over a [`HealthReporter`]'s statuses, whose Watch streams end
/// once the drain begins, after one last status. gRPC clients that check health keep a
/// Watch open on their connection, and an open stream would hold the drain open until its
/// timeout.
pub struct DrainingHealth {
    reporter: HealthReporter,
    /// `Some` (the drain timeout) once the drain has begun.
    draining: tokio::sync::watch::Receiver<Option<Duration>>,
}

impl DrainingHealth {
    /// The statuses of `reporter`; Watch streams end when `draining` becomes `Some`.
    pub fn new(
        reporter: HealthReporter,
        draining: tokio::sync::watch::Receiver<Option<Duration>>,
    ) -> Self {
        DrainingHealth { reporter, draining }
    }

    fn service(&self) -> HealthService {
        HealthService::from_health_reporter(self.reporter.clone())
    }
}

/// A Watch stream of health statuses.
pub type WatchStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl GrpcHealth for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.service().check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let service = request.get_ref().service.clone();
        let statuses = self.service().watch(request).await?.into_inner();
        let mut draining = self.draining.clone();
        let drained = async move {
            // A dropped sender means no drain is coming: the stream lives on.
            if draining.wait_for(Option::is_some).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        // The status at the end, so a client never misses the last change however close
        // it came to the drain (NOT_SERVING, for readiness).
        let at_end = self.service();
        let last = async move {
            let check = Request::new(HealthCheckRequest { service });
            at_end.check(check).await.map(Response::into_inner)
        };
        let stream = statuses
            .take_until(drained)
            .chain(futures::stream::once(last));
        Ok(Response::new(Box::pin(stream) as WatchStream))
    }
}

/// Whether Keel is ready, and why not.
pub struct Readiness {
    serving: Arc<AtomicBool>,
    failing: ArcSwap<Vec<String>>,
}

impl Readiness {
    /// Ready, taking calls while `serving` holds.
    pub fn new(serving: Arc<AtomicBool>) -> Arc<Readiness> {
        Arc::new(Readiness {
            serving,
            failing: ArcSwap::from_pointee(Vec::new()),
        })
    }

    /// Whether Keel takes new calls and every required model can answer.
    pub fn ready(&self) -> bool {
        self.serving.load(Ordering::Acquire) && self.failing.load().is_empty()
    }

    /// One line per reason Keel is not ready; empty when it is.
    pub fn reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.serving.load(Ordering::Acquire) {
            out.push("draining: shutdown has begun".to_string());
        }
        out.extend(self.failing.load().iter().cloned());
        out
    }
}

/// Publishes the view to a [`HealthReporter`]: the per-model names and the readiness names.
pub struct Publisher {
    readiness: Arc<Readiness>,
    router: Arc<Router>,
    store: Arc<Store>,
    reporter: HealthReporter,
    ready_names: Vec<String>,
    published: HashMap<String, ServingStatus>,
}

impl Publisher {
    /// A publisher for `reporter`, where the server has already set `ready_names` SERVING.
    pub fn new(
        readiness: Arc<Readiness>,
        router: Arc<Router>,
        store: Arc<Store>,
        reporter: HealthReporter,
        ready_names: Vec<String>,
    ) -> Publisher {
        let published = ready_names
            .iter()
            .map(|n| (n.clone(), ServingStatus::Serving))
            .collect();
        Publisher {
            readiness,
            router,
            store,
            reporter,
            ready_names,
            published,
        }
    }

    /// Recomputes the view once and publishes what changed. The server calls it before it
    /// accepts a connection, so every model's name is known from the first call. After
    /// shutdown begins it leaves the readiness names alone (the shutdown sets them
    /// NOT_SERVING) and keeps the per-model names current.
    pub async fn refresh(&mut self) {
        let routes = self.router.routes(&self.store.current());
        let health = routes.health();
        let failing: Vec<String> = health
            .iter()
            .filter(|h| h.required)
            .filter_map(|h| {
                h.problem
                    .as_ref()
                    .map(|p| format!("model {}: {p}", h.model))
            })
            .collect();
        for h in &health {
            let status = if h.problem.is_none() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            publish(
                &self.reporter,
                &mut self.published,
                &model_service(&h.model),
                status,
            )
            .await;
        }
        self.readiness.failing.store(Arc::new(failing));
        if !self.readiness.serving.load(Ordering::Acquire) {
            return;
        }
        let ready = self.readiness.ready();
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        let was = self.ready_names.first().and_then(|n| self.published.get(n));
        if was != Some(&status) {
            if ready {
                tracing::info!("ready: every required model can answer");
            } else {
                tracing::warn!(reasons = ?self.readiness.reasons(), "not ready");
            }
        }
        for name in &self.ready_names {
            publish(&self.reporter, &mut self.published, name, status).await;
        }
        // Shutdown may have begun meanwhile; its NOT_SERVING must be the last word.
        if !self.readiness.serving.load(Ordering::Acquire) {
            for name in &self.ready_names {
                self.reporter
                    .set_service_status(name.as_str(), ServingStatus::NotServing)
                    .await;
            }
        }
    }

    /// Refreshes when the router says a breaker, an endpoint or the policy changed (time-driven
    /// changes included: breakers and pools say when those fall due), and every [`INTERVAL`]
    /// as a safety net, until the task is dropped.
    pub async fn run(mut self) {
        let changed = self.router.health_changed().clone();
        let mut ticker = tokio::time::interval(INTERVAL);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = changed.notified() => {}
            }
            self.refresh().await;
        }
    }
}

/// Sets `name` to `status` unless that is what was last published, so Watch streams hear of
/// changes only.
async fn publish(
    reporter: &HealthReporter,
    published: &mut HashMap<String, ServingStatus>,
    name: &str,
    status: ServingStatus,
) {
    if published.get(name) != Some(&status) {
        reporter.set_service_status(name, status).await;
        published.insert(name.to_string(), status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::BreakerCell;
    use crate::route::Pick;

    async fn status(reporter: &HealthReporter, service: &str) -> i32 {
        HealthService::from_health_reporter(reporter.clone())
            .check(Request::new(HealthCheckRequest {
                service: service.into(),
            }))
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or(-1)
    }

    /// A publisher of the health of the embedded models under `policy`, and the breaker of
    /// `simple`.
    async fn publishing(policy: &str) -> (HealthReporter, Arc<BreakerCell>, Publisher) {
        let store = Store::new(
            Some(policy.to_string()),
            crate::policy::Source::Startup(None),
            crate::policy::AuditLog::disabled(),
            Box::new(|_| Ok(())),
            Box::new(|_| {}),
        )
        .map(Arc::new)
        .unwrap();
        let router = Router::new(
            crate::upstream::embedded::Embedded::new(),
            1 << 20,
            crate::observe::Metrics::new(),
        );
        let reporter = HealthReporter::new();
        let readiness = Readiness::new(Arc::new(AtomicBool::new(true)));
        let mut publisher = Publisher::new(
            readiness,
            router.clone(),
            store.clone(),
            reporter.clone(),
            vec![],
        );
        publisher.refresh().await;
        let route = router
            .routes(&store.current())
            .route(crate::policy::METHODS[0], "simple", "", &Pick::by_id("t"))
            .unwrap();
        let breaker = route.target.breaker.clone().unwrap();
        (reporter, breaker, publisher)
    }

    fn trip(breaker: &BreakerCell) {
        for _ in 0..5 {
            let a = breaker.admit().unwrap();
            breaker.record(a, false);
        }
    }

    /// Lets the publisher run without time passing.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_breaker_that_opens_is_published_without_waiting_for_the_tick() {
        let (reporter, breaker, publisher) = publishing("").await;
        let serving = ServingStatus::Serving as i32;
        assert_eq!(status(&reporter, "keel.model.simple").await, serving);
        let task = tokio::spawn(publisher.run());

        let start = tokio::time::Instant::now();
        trip(&breaker);
        settle().await;
        assert_eq!(
            status(&reporter, "keel.model.simple").await,
            ServingStatus::NotServing as i32
        );
        assert!(start.elapsed() < INTERVAL, "no tick was needed");
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_breaker_turning_half_open_is_published_when_it_does() {
        // Half-open at 1.5 s, between the ticks at 1 s and 2 s.
        let (reporter, breaker, publisher) =
            publishing("[defaults.breaker]\nopen_for = \"1500ms\"\n").await;
        let task = tokio::spawn(publisher.run());
        trip(&breaker);
        settle().await;
        let not_serving = ServingStatus::NotServing as i32;
        assert_eq!(status(&reporter, "keel.model.simple").await, not_serving);

        tokio::time::advance(Duration::from_millis(1499)).await;
        settle().await;
        assert_eq!(status(&reporter, "keel.model.simple").await, not_serving);
        tokio::time::advance(Duration::from_millis(2)).await;
        settle().await;
        assert_eq!(
            status(&reporter, "keel.model.simple").await,
            ServingStatus::Serving as i32,
            "probes may go through: the model can answer"
        );
        task.abort();
    }
}
