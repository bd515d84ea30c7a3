//! The summary of a run: counts, errors by code and reason, latency percentiles from an
//! HDR histogram, attempts per request and degraded answers by tier.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::Plan;
use super::payload::Outcome;

/// Latency percentiles, in milliseconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// What a run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The plan that ran.
    pub plan: Plan,
    /// Wall time, seconds.
    pub elapsed_s: f64,
    /// Requests answered.
    pub requests: u64,
    /// Of which succeeded.
    pub ok: u64,
    /// Requests per second.
    pub rps: f64,
    /// `ok / requests`.
    pub success_ratio: f64,
    /// Failures by gRPC code name.
    pub errors_by_code: BTreeMap<String, u64>,
    /// Failures by Keel's `ErrorInfo` reason (`none` when the error had none).
    pub errors_by_reason: BTreeMap<String, u64>,
    /// Latency of every request, from its intended send time.
    pub latency_ms: Latency,
    /// Mean `keel-attempts` over the requests that reported it; `None` when none did (not Keel).
    pub attempts_per_request: Option<f64>,
    /// Answers by `keel-tier` (`primary`, `fallback_model`, `cache`, `static`).
    pub tiers: BTreeMap<String, u64>,
}

/// Counts kept while a run goes.
pub(super) struct Tally {
    histogram: Option<Histogram<u64>>,
    requests: u64,
    ok: u64,
    by_code: BTreeMap<String, u64>,
    by_reason: BTreeMap<String, u64>,
    attempts: (u64, u64),
    tiers: BTreeMap<String, u64>,
}

impl Tally {
    pub(super) fn new() -> Tally {
        Tally {
            // Microseconds, 1µs to 1h, 3 significant digits.
            histogram: Histogram::new_with_bounds(1, 3_600_000_000, 3).ok(),
            requests: 0,
            ok: 0,
            by_code: BTreeMap::new(),
            by_reason: BTreeMap::new(),
            attempts: (0, 0),
            tiers: BTreeMap::new(),
        }
    }

    pub(super) fn record(&mut self, took: Duration, outcome: &Outcome) {
        self.requests += 1;
        if let Some(h) = &mut self.histogram {
            let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
            h.saturating_record(us);
        }
        match outcome.code {
            None => self.ok += 1,
            Some(code) => {
                *self
                    .by_code
                    .entry(crate::grpc_code::name(code).to_string())
                    .or_default() += 1;
                let reason = outcome.reason.clone().unwrap_or_else(|| "none".into());
                *self.by_reason.entry(reason).or_default() += 1;
            }
        }
        if let Some(a) = outcome.attempts {
            self.attempts.0 += u64::from(a);
            self.attempts.1 += 1;
        }
        if let Some(t) = &outcome.tier {
            *self.tiers.entry(t.clone()).or_default() += 1;
        }
    }

    pub(super) fn report(&self, plan: Plan, elapsed: Duration) -> Report {
        let ms = |us: u64| us as f64 / 1000.0;
        let latency_ms = match &self.histogram {
            Some(h) if !h.is_empty() => Latency {
                p50: ms(h.value_at_quantile(0.5)),
                p90: ms(h.value_at_quantile(0.9)),
                p99: ms(h.value_at_quantile(0.99)),
                p999: ms(h.value_at_quantile(0.999)),
                max: ms(h.max()),
                mean: h.mean() / 1000.0,
            },
            _ => Latency::default(),
        };
        let secs = elapsed.as_secs_f64().max(1e-9);
        Report {
            plan,
            elapsed_s: elapsed.as_secs_f64(),
            requests: self.requests,
            ok: self.ok,
            rps: self.requests as f64 / secs,
            success_ratio: if self.requests == 0 {
                0.0
            } else {
                self.ok as f64 / self.requests as f64
            },
            errors_by_code: self.by_code.clone(),
            errors_by_reason: self.by_reason.clone(),
            latency_ms,
            attempts_per_request: (self.attempts.1 > 0)
                .then(|| self.attempts.0 as f64 / self.attempts.1 as f64),
            tiers: self.tiers.clone(),
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.latency_ms;
        writeln!(
            f,
            "{} requests in {:.2}s: {:.0} req/s, {:.4}% ok",
            self.requests,
            self.elapsed_s,
            self.rps,
            self.success_ratio * 100.0
        )?;
        writeln!(
            f,
            "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        )?;
        match self.attempts_per_request {
            Some(a) => writeln!(f, "attempts per request: {a:.3}")?,
            None => writeln!(
                f,
                "attempts per request: (no keel-attempts receipts: not Keel?)"
            )?,
        }
        if !self.errors_by_code.is_empty() {
            let codes: Vec<String> = self
                .errors_by_code
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let reasons: Vec<String> = self
                .errors_by_reason
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            writeln!(f, "errors by code: {}", codes.join(", "))?;
            writeln!(f, "errors by reason: {}", reasons.join(", "))?;
        }
        if !self.tiers.is_empty() {
            let total: u64 = self.tiers.values().sum();
            let tiers: Vec<String> = self
                .tiers
                .iter()
                .map(|(k, v)| format!("{k} {:.2}%", *v as f64 * 100.0 / total.max(1) as f64))
                .collect();
            writeln!(f, "answered by tier: {}", tiers.join(", "))?;
        }
        Ok(())
    }
}

/// Serialises a duration as seconds.
pub(super) mod seconds {
    pub(crate) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Serialises an optional duration as seconds.
pub(super) mod seconds_opt {
    pub(crate) fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}
