//! What Keel reports about every finished call: Keel's metrics, and one structured log
//! line (always for failures and slow calls, sampled for successes).
//!
//! Labels come from the policy (the routed model and upstream) or are fixed words, never
//! client input: a call for a model the policy does not name is recorded as `unknown`.

use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64;

use crate::call::CallContext;
use crate::error::Error;
use crate::model::{Rejection, clip};
use crate::observe::Metrics;
use crate::observe::metrics::{
    ApiLabels, CodeLabel, ModelLabels, ModelUpstreamLabels, Name, RetryLabels, RuleLabels,
    TenantCodeLabels, UpstreamLabels,
};
use crate::resilience::Failure;

/// A finished call, as its dispatch saw it.
pub struct Finished<'a> {
    /// The full gRPC method.
    pub method: &'static str,
    /// The request id.
    pub request_id: &'a str,
    /// The model asked for (as the client spelled it; logged, never a label).
    pub model: &'a str,
    /// The version asked for.
    pub version: &'a str,
    /// The call's context, when it was routed.
    pub ctx: Option<&'a CallContext>,
    /// The error, if it failed.
    pub error: Option<&'a Error>,
    /// How long it took at the edge.
    pub took: Duration,
    /// Tensor bytes sent.
    pub bytes_in: usize,
    /// The client's peer address.
    pub peer: Option<std::net::SocketAddr>,
    /// The W3C trace id from the client's `traceparent`, if any.
    pub trace_id: Option<&'a str>,
    /// The policy revision and its author's label.
    pub revision: u64,
    /// The policy's `policy_version`.
    pub policy_version: Option<&'a str>,
    /// Share of successes to log.
    pub success_sample: f64,
    /// What the call stands for in the client's request, and whether it is the whole of it.
    pub leg: Leg,
    /// The API the client used (`v2`, `v1`), for `keel_api_requests_total`.
    pub api: &'static str,
    /// The calling tenant, when the policy defines tenants.
    pub tenant: Option<&'a str>,
}

/// What one routed call is to the client's request: the tier it stands for, and whether its
/// outcome is the request's (then it is counted in `keel_requests_total`) or one step of a
/// request the caller counts once, at its end (the primary and rungs of a fallback ladder).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leg {
    /// `primary` or `fallback_model` (a rung's call to another model or upstream).
    pub tier: &'static str,
    /// Whether this call's outcome is the request's.
    pub counted: bool,
}

impl Leg {
    /// A call that is the whole request.
    pub const WHOLE: Leg = Leg {
        tier: "primary",
        counted: true,
    };
}

/// Who sent a request refused at the edge, for its log line.
pub struct Sender<'a> {
    /// The API the client used.
    pub api: &'static str,
    /// The request id.
    pub request_id: &'a str,
    /// The calling tenant, when the policy defines tenants.
    pub tenant: Option<&'a str>,
}

/// Records a request refused at the edge before it could be routed (it did not decode into
/// a valid request); `model` is the routed model's name or `unknown`.
pub fn rejected(metrics: &Metrics, from: &Sender<'_>, model: &str, invalid: &Rejection) {
    let Sender {
        api,
        request_id,
        tenant,
    } = *from;
    let rule = invalid.first().rule();
    metrics
        .validation_rejections
        .get_or_create(&RuleLabels { rule })
        .inc();
    metrics.api_requests.get_or_create(&ApiLabels { api }).inc();
    metrics.observe_call(model, "primary", "client_error", Duration::ZERO);
    if let Some(tenant) = tenant {
        tenant_request(metrics, tenant, tonic::Code::InvalidArgument);
    }
    // Clipped as every field that quotes a client is (see `finish`).
    let error = invalid.to_string();
    tracing::info!(
        request_id,
        api,
        tenant = tenant.unwrap_or(""),
        model = model,
        rule,
        error = clip(&error, crate::model::MAX_MESSAGE),
        "request rejected"
    );
}

/// Counts one inference request of `tenant` (a policy name, so a bounded label).
pub fn tenant_request(metrics: &Metrics, tenant: &str, code: tonic::Code) {
    metrics
        .tenant_requests
        .get_or_create(&TenantCodeLabels {
            tenant: tenant.to_string(),
            code: CodeLabel(code),
        })
        .inc();
}

/// Whether a successful call with this request id is in the log sample.
fn sampled(request_id: &str, rate: f64) -> bool {
    rate >= 1.0 || (xxh3_64(request_id.as_bytes()) as f64 / u64::MAX as f64) < rate
}

/// Records a finished call in the metrics and, when due, the log; `inputs` describes the
/// request's inputs and is only asked for when the line is logged.
pub fn finish(metrics: &Metrics, f: &Finished<'_>, inputs: impl FnOnce() -> String) {
    let class = f.error.map_or("ok", |e| e.class().as_str());
    let model_label = f
        .ctx
        .map_or_else(Name::unknown, |c| Name::from(&c.route.model));
    if f.leg.counted
        && (f.method.ends_with("/ModelInfer") || f.method.ends_with("/ModelStreamInfer"))
    {
        metrics
            .api_requests
            .get_or_create(&ApiLabels { api: f.api })
            .inc();
        metrics.observe_call(model_label, f.leg.tier, class, f.took);
        if let Some(tenant) = f.tenant {
            let code = f.error.map_or(tonic::Code::Ok, Error::code);
            tenant_request(metrics, tenant, code);
        }
    }
    if let Some(Error::InvalidRequest(invalid)) = f.error {
        metrics
            .validation_rejections
            .get_or_create(&RuleLabels {
                rule: invalid.first().rule(),
            })
            .inc();
    }
    let receipt = f.ctx.map(|c| c.receipt.read()).unwrap_or_default();
    if let Some(ctx) = f.ctx {
        let model = Name::from(&ctx.route.model);
        let upstream = Name::from(&ctx.route.target.upstream);
        let mu = ModelUpstreamLabels {
            model: model.clone(),
            upstream: upstream.clone(),
        };
        metrics
            .attempts
            .get_or_create(&mu)
            .inc_by(u64::from(receipt.attempts.max(1)));
        for reason in &receipt.retry_reasons {
            metrics
                .retries
                .get_or_create(&RetryLabels {
                    model: model.clone(),
                    upstream: upstream.clone(),
                    reason,
                })
                .inc();
        }
        if receipt.hedges > 0 {
            metrics
                .hedges
                .get_or_create(&mu)
                .inc_by(u64::from(receipt.hedges));
        }
        if receipt.budget_exhausted {
            metrics
                .budget_exhausted
                .get_or_create(&UpstreamLabels { upstream })
                .inc();
        }
        if matches!(f.error, Some(Error::Overloaded(_))) {
            metrics
                .shed
                .get_or_create(&ModelLabels {
                    model: model.clone(),
                })
                .inc();
        }
        if receipt.slow {
            metrics.slow.get_or_create(&ModelLabels { model }).inc();
        }
    }
    if f.error.is_none() && !receipt.slow && !sampled(f.request_id, f.success_sample) {
        return;
    }
    // The log spells the code canonically (`UNAVAILABLE`), as policies and docs do; only
    // metric labels take go-grpc-prometheus's `Unavailable`.
    let code = f.error.map_or("OK", |e| crate::grpc_code::name(e.code()));
    let delays = receipt.delays_ms();
    let served_by = receipt.served_by.as_deref().unwrap_or("");
    let upstream = f.ctx.map_or("", |c| &*c.route.target.upstream);
    // Every field that quotes a client is clipped: a log line has a fixed upper size.
    let error = f.error.map(ToString::to_string).unwrap_or_default();
    let error = clip(&error, crate::model::MAX_MESSAGE);
    let (model, version) = (clip(f.model, 256), clip(f.version, 64));
    let deadline_ms = f.ctx.map_or(0, |c| c.budget.as_millis() as u64);
    let peer = f.peer.map(|p| p.to_string()).unwrap_or_default();
    let inputs = inputs();
    tracing::info!(
                request_id = f.request_id,
                trace_id = f.trace_id.unwrap_or(""),
                api = f.api,
                tenant = f.tenant.unwrap_or(""),
                method = f.method,
                model,
                version,
                tier = f.leg.tier,
                upstream,
                served_by,
                inputs = %inputs,
                bytes_in = f.bytes_in,
                attempts = receipt.attempts.max(u32::from(f.ctx.is_some())),
                retry_delays_ms = %delays,
                class,
                grpc_code = code,
                latency_ms = f.took.as_secs_f64() * 1000.0,
                slow = receipt.slow,
                policy_revision = f.revision,
                policy_version = f.policy_version.unwrap_or(""),
                client_deadline_ms = deadline_ms,
                peer = %peer,
                error = %error,
                "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_by_request_id_and_close_to_the_rate() {
        assert!(sampled("x", 1.0));
        assert!(!sampled("x", 0.0));
        let n = (0..10_000)
            .filter(|i| sampled(&format!("req-{i}"), 0.1))
            .count();
        assert!((800..1200).contains(&n), "{n}");
        assert_eq!(sampled("req-7", 0.1), sampled("req-7", 0.1));
    }
}
