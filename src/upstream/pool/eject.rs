//! Outlier ejection: when failing real traffic takes an endpoint out, and how it stands.
//!
//! An endpoint stands in one of three ways ([`Standing`]): serving; failing its active
//! health checks (no traffic until it passes `healthy_threshold` checks in a row; see
//! `probe.rs`); or ejected for failing real traffic (`consecutive_failures`
//! health-relevant failures in a row eject it for `base_ejection × n`, capped, never more
//! than `max_ejection_percent` of the pool at once). An endpoint back from an ejection is
//! on probation: one failure ejects it again, for longer. Passing active checks can end an
//! ejection early (`probe.rs`, "Ending an ejection early").

use tokio::time::Instant;

use super::{Endpoint, Pool};

/// What one call said about its endpoint, for outlier ejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It answered, or failed in a way that says nothing about it (a client error).
    Healthy,
    /// It answered with a failure that says it is sick: transient, overloaded, timed out,
    /// a server bug.
    Failed,
    /// The connection was refused: the endpoint is down.
    Unreachable,
}

/// How an endpoint stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// It takes calls.
    Serving,
    /// It failed its active health checks and has not yet passed enough again.
    Unhealthy,
    /// It failed real traffic and is out until `until`.
    Ejected {
        /// When it comes back (on probation).
        until: Instant,
    },
}

impl Standing {
    /// As a metric: 0 serving, 1 failing health checks, 2 ejected.
    pub fn as_gauge(self) -> i64 {
        match self {
            Standing::Serving => 0,
            Standing::Unhealthy => 1,
            Standing::Ejected { .. } => 2,
        }
    }
}

impl Endpoint {
    /// How the endpoint stands at `now`.
    pub fn standing(&self, now: Instant) -> Standing {
        let mut h = self.lock();
        if let Some(until) = h.ejected_until {
            if until > now {
                return Standing::Ejected { until };
            }
            // Back, on probation.
            h.ejected_until = None;
            h.probation = true;
        }
        if h.checked_healthy {
            Standing::Serving
        } else {
            Standing::Unhealthy
        }
    }
}

impl Pool {
    /// Records what a call said about `endpoint`. Enough failures in a row eject it.
    pub fn record(&self, endpoint: &Endpoint, verdict: Verdict) {
        let o = &self.spec.outlier;
        let now = Instant::now();
        {
            let mut h = endpoint.lock();
            if verdict == Verdict::Healthy {
                h.consecutive = 0;
                h.probation = false;
                return;
            }
            h.consecutive = h.consecutive.saturating_add(1);
            let threshold = if h.probation {
                1
            } else {
                o.consecutive_failures
            };
            if !o.enabled || h.consecutive < threshold || h.ejected_until.is_some_and(|u| u > now) {
                return;
            }
        }
        let endpoints = self.endpoints();
        let out = endpoints
            .iter()
            .filter(|e| matches!(e.standing(now), Standing::Ejected { .. }))
            .count();
        if out >= o.max_ejected(endpoints.len()) {
            tracing::debug!(upstream = %self.name, endpoint = %endpoint.addr,
                "not ejected: max_ejection_percent of the pool is out already");
            return;
        }
        // Ejection moves calls to the other endpoints. With none left serving, an endpoint
        // that still answers stays: ejecting it would turn some failed calls into all of
        // them (a sick upstream is the breaker's to stop). One that refuses connections is
        // down either way, and goes.
        let others_serving = endpoints
            .iter()
            .any(|e| e.addr != endpoint.addr && e.standing(now) == Standing::Serving);
        if !others_serving && verdict != Verdict::Unreachable {
            tracing::debug!(upstream = %self.name, endpoint = %endpoint.addr,
                "not ejected: no other endpoint of the pool is serving");
            return;
        }
        let mut h = endpoint.lock();
        if !h.probation {
            // A first ejection after a quiet spell starts the count again.
            h.ejections = 0;
        }
        h.ejections = h.ejections.saturating_add(1);
        let length = o.ejection(h.ejections);
        h.ejected_until = Some(now + length);
        h.consecutive = 0;
        h.probation = false;
        h.epoch = h.epoch.wrapping_add(1);
        h.passes_ejected = 0;
        tracing::warn!(upstream = %self.name, endpoint = %endpoint.addr,
            ejections = h.ejections, ejected_for = ?length, "endpoint ejected");
        drop(h);
        self.on_change.tell();
        self.on_change.tell_at(now + length);
    }
}
