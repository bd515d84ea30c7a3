//! Active health checks: each endpoint asked on an interval whether it is ready.
//!
//! `unhealthy_threshold` failed checks in a row take an endpoint out of traffic;
//! `healthy_threshold` passed checks in a row bring it back.
//!
//! # Ending an ejection early
//!
//! With active checks on (and `outlier.uneject_on_health_check`, on by default), an
//! ejection also ends when the endpoint passes `healthy_threshold` checks in a row that
//! all began after the ejection did, as Envoy's `successful_active_health_check_uneject_host`
//! does: a restarted endpoint is back within `interval × healthy_threshold`, not after
//! `base_ejection × n`. A check begun before the ejection (in flight while the calls
//! failed) does not count, so what the endpoint said before its failures cannot undo them.
//! It comes back on probation, as from an ejection that ran its course.

use tokio::time::Instant;

use super::{Endpoint, Pool};
use crate::pb::inference as proto;
use crate::policy::{CheckKind, HealthCheck};

/// Which ejection (if any) stood when a check of an endpoint began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Begun(u64);

impl Endpoint {
    /// Marks the start of an active check, for [`Pool::record_check`].
    pub(super) fn begin_check(&self) -> Begun {
        Begun(self.lock().epoch)
    }
}

impl Pool {
    /// Records the outcome of an active check of `endpoint` that began at `begun`.
    ///
    /// 1. A pass counts toward `healthy_threshold` in a row; reaching it makes an
    ///    endpoint that failed its checks healthy again.
    /// 2. A pass of a check begun during the endpoint's current ejection also counts
    ///    toward ending that ejection; at `healthy_threshold` in a row (and with
    ///    `uneject_on_health_check`) the endpoint is back, on probation.
    /// 3. A failure resets both counts, and `unhealthy_threshold` in a row take the
    ///    endpoint out.
    pub(super) fn record_check(
        &self,
        endpoint: &Endpoint,
        check: &HealthCheck,
        begun: Begun,
        passed: Result<(), String>,
    ) {
        let now = Instant::now();
        let mut h = endpoint.lock();
        let was = h.checked_healthy;
        let mut cut_short = None;
        match passed {
            Ok(()) => {
                h.fails = 0;
                h.passes = h.passes.saturating_add(1);
                if !h.checked_healthy && h.passes >= check.healthy_threshold {
                    h.checked_healthy = true;
                    tracing::info!(upstream = %self.name, endpoint = %endpoint.addr,
                        "endpoint passes its health checks again");
                }
                if let Some(until) = h.ejected_until.filter(|&u| u > now)
                    && begun == Begun(h.epoch)
                {
                    h.passes_ejected = h.passes_ejected.saturating_add(1);
                    if self.spec.outlier.uneject_on_health_check
                        && h.passes_ejected >= check.healthy_threshold
                    {
                        h.ejected_until = None;
                        h.probation = true;
                        h.passes_ejected = 0;
                        cut_short = Some(until - now);
                    }
                }
            }
            Err(why) => {
                h.passes = 0;
                h.passes_ejected = 0;
                h.fails = h.fails.saturating_add(1);
                if h.checked_healthy && h.fails >= check.unhealthy_threshold {
                    h.checked_healthy = false;
                    tracing::warn!(upstream = %self.name, endpoint = %endpoint.addr,
                        reason = %why, "endpoint fails its health checks");
                }
            }
        }
        let changed = h.checked_healthy != was || cut_short.is_some();
        if let Some(left) = cut_short {
            tracing::info!(upstream = %self.name, endpoint = %endpoint.addr,
                ejections = h.ejections, passes = check.healthy_threshold, ejection_left = ?left,
                "endpoint ejection ended early: it passes its health checks");
        }
        drop(h);
        if changed {
            self.on_change.tell();
        }
    }

    /// Checks every endpoint once, concurrently, each within the check's timeout.
    pub async fn check_all(&self, check: &HealthCheck) {
        let endpoints = self.endpoints();
        let begun: Vec<Begun> = endpoints.iter().map(|e| e.begin_check()).collect();
        let outcomes = futures::future::join_all(endpoints.iter().map(|e| probe(e, check))).await;
        for ((e, begun), outcome) in endpoints.iter().zip(begun).zip(outcomes) {
            self.record_check(e, check, begun, outcome);
        }
    }
}

/// One active check of `endpoint`: `Ok` if it answered that it is ready in time.
async fn probe(endpoint: &Endpoint, check: &HealthCheck) -> Result<(), String> {
    let ask = async {
        match &check.kind {
            CheckKind::ServerReady => {
                let r = endpoint
                    .client()
                    .server_ready(proto::ServerReadyRequest {})
                    .await
                    .map_err(|s| format!("ServerReady: {}", s.message()))?;
                r.into_inner()
                    .ready
                    .then_some(())
                    .ok_or_else(|| "ServerReady: not ready".to_string())
            }
            CheckKind::ModelReady { model, version } => {
                let r = endpoint
                    .client()
                    .model_ready(proto::ModelReadyRequest {
                        name: model.clone(),
                        version: version.clone(),
                    })
                    .await
                    .map_err(|s| format!("ModelReady {model}: {}", s.message()))?;
                r.into_inner()
                    .ready
                    .then_some(())
                    .ok_or_else(|| format!("ModelReady {model}: not ready"))
            }
            CheckKind::GrpcHealth { service } => {
                use tonic_health::pb::health_check_response::ServingStatus;
                let mut client =
                    tonic_health::pb::health_client::HealthClient::new(endpoint.channel.clone());
                let r = client
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: service.clone(),
                    })
                    .await
                    .map_err(|s| format!("Health/Check {service:?}: {}", s.message()))?;
                let status = r.into_inner().status;
                (status == ServingStatus::Serving as i32)
                    .then_some(())
                    .ok_or_else(|| format!("Health/Check {service:?}: status {status}"))
            }
        }
    };
    match tokio::time::timeout(check.timeout, ask).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}
