//! The admin listener (`server.admin_listen`): PolicyAdmin, health and reflection over
//! gRPC, and `/metrics`, `/livez`, `/readyz` over HTTP/1.1, on tonic's server; and the
//! startup warnings about listeners exposed in plaintext.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;

use super::health::{Health, Readiness};
use super::services::{self, Listener};
use super::shutdown::{CUT_GRACE, shutdown_began};
use super::{Keel, ServeError};
use crate::api::admin as admin_api;
use crate::observe::Metrics;
use crate::policy::Policy;
use crate::transport::{self, Accept, Http2};

impl Keel {
    /// The admin server on `listener`, accepting as the traffic listener does (`traffic`)
    /// but with the admin TLS, until the drain begins (`began`).
    pub(super) fn admin_server(
        &self,
        listener: TcpListener,
        health: &Health,
        traffic: &Accept,
        http2: &Http2,
        began: tokio::sync::watch::Receiver<Option<Duration>>,
    ) -> Result<impl Future<Output = Result<(), tonic::transport::Error>> + use<>, ServeError> {
        let service = admin_api::service(self.store.clone(), self.admin_token.clone());
        let (reflection, reflection_alpha) = services::reflection(Listener::Admin)?;
        let stop = shutdown_began(began);
        let routes = tonic::service::Routes::new(health.service())
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(service);
        let http = http_routes(self.router.metrics().clone(), health.readiness().clone());
        let routes = tonic::service::Routes::from(routes.into_axum_router().merge(http));
        let accept = Accept {
            name: "admin",
            // tonic's server does not say which connections made a call.
            reports_use: false,
            tls: self.admin_tls.clone(),
            ..traffic.clone()
        };
        Ok(admin_builder(http2)
            // /metrics, /livez and /readyz are plain HTTP/1.1.
            .accept_http1(true)
            .add_routes(routes)
            .serve_with_incoming_shutdown(transport::incoming(listener, accept), async move {
                stop.await;
            }))
    }
}

/// Runs the admin server, if any, until it has shut down, or until the drain timeout (plus
/// the cut grace) has passed since shutdown began: an admin connection left open (a health
/// Watch) must not hold Keel up.
pub(super) async fn run_admin(
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

/// The admin listener's plain HTTP endpoints: `/metrics` (Prometheus), `/livez`, `/readyz`.
fn http_routes(metrics: Arc<Metrics>, readiness: Arc<Readiness>) -> axum::Router {
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

/// Warns at startup about listeners reachable from the network in plaintext, and about an
/// admin listener on which no one may change the policy.
pub(super) fn warn_if_exposed(
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
