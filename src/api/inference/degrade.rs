//! ModelInfer with graceful degradation: a fresh cached answer when the model's cache has
//! one, else the primary call, else the model's fallback ladder, in order, within the time
//! the call had. Every answer says what it is, in the response parameters and the trailing
//! metadata: `keel.degraded`, `keel.tier`, `keel.served_by`, `keel.degraded_reason`,
//! `keel.stale_ms`; a degraded one also tells what happened before it ([`Story`]): the
//! primary's attempts and failure, and the rungs that failed.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;
use tonic::{Response, Status};

use super::{Answer, Edge, Failed, InferenceApi, Leg, Plan, Via};
use crate::api::{receipt, record};
use crate::call::CallContext;
use crate::error::Error;
use crate::model::{InferRequest, InferResponse, Param};
use crate::observe::metrics::{ApiLabels, DegradedLabels};
use crate::policy::Trigger;
use crate::resilience::Failure as _;
use crate::route::cache;
use crate::route::ladder::{self, Rung};

/// What an answer is.
struct Labels<'a> {
    tier: &'static str,
    degraded: bool,
    reason: Option<Trigger>,
    stale: Option<Duration>,
    /// What happened before a degraded answer.
    story: Option<&'a Story>,
}

const PRIMARY: Labels<'static> = Labels {
    tier: "primary",
    degraded: false,
    reason: None,
    stale: None,
    story: None,
};

/// What happened before a degraded answer, so one response tells the whole story: the
/// primary's attempts and its failure, then the rungs that were tried and failed before the
/// one that answered.
struct Story {
    /// Attempts the primary started, as `keel-attempts` counts them (one refused by an open
    /// breaker counts; its class says so); 0 when it was refused before its first (Keel's
    /// own `max_in_flight`, say).
    primary_attempts: u32,
    /// The class of the primary's failure (`transient`, `local_rejection`, ...).
    primary_error: &'static str,
    /// Its gRPC code (`UNAVAILABLE`).
    primary_code: &'static str,
    /// Tiers of the rungs tried before the answering one, in order.
    rungs_failed: Vec<&'static str>,
}

impl Story {
    fn rungs_failed(&self) -> Option<String> {
        (!self.rungs_failed.is_empty()).then(|| self.rungs_failed.join(","))
    }
}

/// Bytes an answer leaves under `server.max_message_size` for its labels: all nine, with
/// `keel.served_by` and `keel.rungs_failed` at their longest ([`MAX_SERVED_BY`],
/// [`MAX_RUNGS_FAILED`]), take at most about 500 encoded (a test measures it).
pub(in crate::api) const LABEL_ROOM: usize = 768;

/// The longest `keel.served_by` written (a longer model name and version are clipped).
const MAX_SERVED_BY: usize = 128;

/// The longest `keel.rungs_failed` written (the tiers of a longer ladder are clipped).
const MAX_RUNGS_FAILED: usize = 64;

impl Labels<'_> {
    fn stale_ms(&self) -> Option<i64> {
        self.stale
            .map(|age| i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
    }

    /// Writes the labels into the answer's parameters; returns what served it.
    fn to_parameters(&self, resp: &mut InferResponse) -> String {
        let served_by = format!("{}:{}", resp.model, resp.version);
        let served_by = crate::model::clip(&served_by, MAX_SERVED_BY).to_string();
        let p = &mut resp.parameters;
        p.insert("keel.degraded".into(), Param::Bool(self.degraded));
        p.insert("keel.tier".into(), Param::String(self.tier.into()));
        p.insert("keel.served_by".into(), Param::String(served_by.clone()));
        if let Some(reason) = self.reason {
            p.insert(
                "keel.degraded_reason".into(),
                Param::String(reason.as_str().into()),
            );
        }
        if let Some(ms) = self.stale_ms() {
            p.insert("keel.stale_ms".into(), Param::Int64(ms));
        }
        if let Some(story) = self.story {
            p.insert(
                "keel.primary_attempts".into(),
                Param::Int64(i64::from(story.primary_attempts)),
            );
            p.insert(
                "keel.primary_error".into(),
                Param::String(story.primary_error.into()),
            );
            p.insert(
                "keel.primary_code".into(),
                Param::String(story.primary_code.into()),
            );
            if let Some(rungs) = story.rungs_failed() {
                let rungs = crate::model::clip(&rungs, MAX_RUNGS_FAILED).to_string();
                p.insert("keel.rungs_failed".into(), Param::String(rungs));
            }
        }
        served_by
    }

    /// Writes the labels into an answer's trailers.
    fn to_trailers(&self, h: &mut HeaderMap, served_by: &str) {
        use receipt::names;
        let degraded = if self.degraded { "true" } else { "false" };
        h.insert(names::DEGRADED, HeaderValue::from_static(degraded));
        h.insert(names::TIER, HeaderValue::from_static(self.tier));
        if let Ok(v) = HeaderValue::from_str(served_by) {
            h.insert(names::SERVED_MODEL, v);
        }
        if let Some(reason) = self.reason {
            h.insert(
                receipt::DEGRADED_REASON,
                HeaderValue::from_static(reason.as_str()),
            );
        }
        if let Some(ms) = self.stale_ms() {
            h.insert(receipt::STALE_MS, HeaderValue::from(ms));
        }
        if let Some(story) = self.story {
            h.insert(
                receipt::PRIMARY_ATTEMPTS,
                HeaderValue::from(story.primary_attempts),
            );
            h.insert(
                receipt::PRIMARY_ERROR,
                HeaderValue::from_static(story.primary_error),
            );
            h.insert(
                receipt::PRIMARY_CODE,
                HeaderValue::from_static(story.primary_code),
            );
            if let Some(v) = story
                .rungs_failed()
                .and_then(|r| HeaderValue::from_str(&r).ok())
            {
                h.insert(receipt::RUNGS_FAILED, v);
            }
        }
    }
}

impl InferenceApi {
    /// Answers an inference request of `method` (ModelInfer, or one request of a
    /// ModelStreamInfer stream), degrading through the model's ladder when it must.
    pub(in crate::api) async fn infer(
        &self,
        edge: &Edge,
        method: &'static str,
        req: InferRequest,
    ) -> Result<Response<InferResponse>, Status> {
        let req = Arc::new(req);
        let routes = self.router.routes(&edge.snapshot);
        // A call of a sequence changes the state its endpoint holds: no cached answer and no
        // fallback may stand in for it.
        let pinned = crate::upstream::Operation::pinned(&*req);
        let cache = routes.cache(&req.model).filter(|_| !pinned).cloned();
        let key = cache.as_ref().map(|_| cache::key(&req));
        if let (Some(c), Some(k)) = (&cache, key)
            && let Some((resp, age)) = c.fresh(k)
        {
            let labels = Labels {
                tier: "cache",
                degraded: false,
                reason: None,
                stale: Some(age),
                story: None,
            };
            self.count(edge, &req.model, "cache", None, Duration::ZERO);
            return self.labelled(edge, resp, &labels, None);
        }
        let started = Instant::now();
        // With a ladder, the request's outcome is known only at its end: counted there.
        let ladder = if pinned {
            &[]
        } else {
            routes.ladder(&req.model)
        };
        let primary = Leg {
            tier: "primary",
            counted: ladder.is_empty(),
        };
        let failure = match self
            .call_via(
                &self.stacks.infer,
                edge,
                method,
                req.clone(),
                Plan {
                    via: Via::Policy,
                    leg: primary,
                    deadline_cap: None,
                    leave_margin: !ladder.is_empty(),
                },
            )
            .await
        {
            Ok(Answer { value, ctx }) => {
                if let (Some(c), Some(k)) = (&cache, key)
                    && ctx.route.settings.idempotent
                {
                    c.insert(k, &value);
                }
                if !primary.counted {
                    self.count(edge, &req.model, "primary", None, started.elapsed());
                }
                return self.labelled(edge, value, &PRIMARY, Some(&ctx));
            }
            Err(Failed::Cut) => return Err(edge.failed(Failed::Cut)),
            Err(Failed::Error(e, ctx)) => (e, ctx),
        };
        let (error, ctx) = failure;
        let budget_exhausted = ctx
            .as_ref()
            .is_some_and(|c| c.receipt.read().budget_exhausted);
        let triggers = ladder::triggers(&error, budget_exhausted);
        // A fallback never gets more time than the call it stands in for.
        let deadline = ctx.as_ref().map_or_else(
            || {
                started
                    + edge
                        .snapshot
                        .policy
                        .resolve(method, Some(&req.model))
                        .timeout
            },
            |c| c.deadline,
        );
        let mut story = Story {
            primary_attempts: ctx.as_ref().map_or(0, |c| c.receipt.read().attempts),
            primary_error: error.class().as_str(),
            primary_code: crate::grpc_code::name(error.code()),
            rungs_failed: Vec::new(),
        };
        for step in ladder {
            let Some(reason) = ladder::answers(step, &triggers) else {
                continue;
            };
            let leg = Leg {
                tier: step.rung.tier(),
                counted: false,
            };
            let answer = match &step.rung {
                Rung::Model(other) => {
                    let mut r = (*req).clone();
                    r.model = other.clone();
                    r.version.clear();
                    let expected = routes
                        .route(method, other, "", &edge.pick())
                        .ok()
                        .and_then(|r| r.target.latency.expected());
                    if !self.may_fall_back(ctx.as_deref(), deadline, expected) {
                        continue;
                    }
                    match self
                        .call_via(
                            &self.stacks.infer,
                            edge,
                            method,
                            Arc::new(r),
                            Plan {
                                via: Via::Policy,
                                leg,
                                deadline_cap: Some(deadline),
                                leave_margin: false,
                            },
                        )
                        .await
                    {
                        Ok(a) => Some((a.value, None, Some(a.ctx))),
                        Err(e) => {
                            rung_failed(edge, step, &e, &mut story);
                            None
                        }
                    }
                }
                Rung::Upstream(target) => {
                    let Some(route) = routes.route_to(method, &req.model, target) else {
                        continue;
                    };
                    if !self.may_fall_back(ctx.as_deref(), deadline, target.latency.expected()) {
                        continue;
                    }
                    match self
                        .call_via(
                            &self.stacks.infer,
                            edge,
                            method,
                            req.clone(),
                            Plan {
                                via: Via::Route(route),
                                leg,
                                deadline_cap: Some(deadline),
                                leave_margin: false,
                            },
                        )
                        .await
                    {
                        Ok(a) => Some((a.value, None, Some(a.ctx))),
                        Err(e) => {
                            rung_failed(edge, step, &e, &mut story);
                            None
                        }
                    }
                }
                Rung::Cache => match (&cache, key) {
                    (Some(c), Some(k)) => c
                        .get(k, c.spec().max_stale)
                        .map(|(resp, age)| (resp, Some(age), None)),
                    _ => None,
                },
                Rung::Static(outputs) => Some((
                    InferResponse {
                        model: req.model.clone(),
                        version: String::new(),
                        id: req.id.clone(),
                        parameters: Default::default(),
                        outputs: outputs.as_ref().clone(),
                        form: crate::model::ContentForm::Raw,
                        wire: Default::default(),
                    },
                    None,
                    None,
                )),
            };
            if let Some((mut resp, stale, answered_by)) = answer {
                let labels = Labels {
                    tier: step.rung.tier(),
                    degraded: true,
                    reason: Some(reason),
                    stale,
                    story: Some(&story),
                };
                resp.id.clone_from(&req.id);
                self.count(edge, &req.model, labels.tier, None, started.elapsed());
                self.router
                    .metrics()
                    .degraded
                    .get_or_create(&DegradedLabels {
                        model: req.model.clone(),
                        tier: labels.tier,
                        reason: reason.as_str(),
                    })
                    .inc();
                tracing::info!(
                    request_id = %edge.ctx.request_id,
                    tenant = edge.tenant().unwrap_or(""),
                    model = %req.model,
                    tier = labels.tier,
                    degraded_reason = reason.as_str(),
                    "degraded answer"
                );
                // The receipt is the answering call's; cache and static rungs make none.
                return self.labelled(edge, resp, &labels, answered_by.as_deref());
            }
        }
        if !primary.counted {
            self.count(edge, &req.model, "primary", Some(&error), started.elapsed());
        }
        Err(edge.status(&error, ctx.as_deref()))
    }

    /// Counts an inference request with a ladder or a cache once, by what answered it
    /// (`error` when nothing did), for its tenant too. `model` is a policy name: only such
    /// models have a ladder or a cache.
    fn count(
        &self,
        edge: &Edge,
        model: &str,
        tier: &'static str,
        error: Option<&Error>,
        took: Duration,
    ) {
        let metrics = self.router.metrics();
        metrics
            .api_requests
            .get_or_create(&ApiLabels { api: edge.api })
            .inc();
        let class = error.map_or("ok", |e| e.class().as_str());
        metrics.observe_call(model, tier, class, took);
        if let Some(tenant) = edge.tenant() {
            let code = error.map_or(tonic::Code::Ok, Error::code);
            record::tenant_request(metrics, tenant, code);
        }
    }

    /// Whether a fallback that takes `expected` fits before `deadline`, and the primary's
    /// retry budget grants it (fallbacks draw on the same budget as retries).
    fn may_fall_back(
        &self,
        primary: Option<&CallContext>,
        deadline: Instant,
        expected: Option<Duration>,
    ) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || expected.is_some_and(|e| e > left) {
            return false;
        }
        primary.is_none_or(|c| c.route.target.budget.withdraw())
    }

    /// A labelled answer, with the receipt of the call that produced it (if any: a cache or
    /// static answer has none of its own).
    fn labelled(
        &self,
        edge: &Edge,
        mut resp: InferResponse,
        labels: &Labels,
        ctx: Option<&CallContext>,
    ) -> Result<Response<InferResponse>, Status> {
        let served_by = labels.to_parameters(&mut resp);
        // The call checked the answer it got left room for its labels (`LABEL_ROOM`): this
        // only holds that bound to account.
        let limit = edge.snapshot.policy.server.max_message_size;
        if let Some(len) = crate::pb::infer_response_len(&resp, limit) {
            let e = Error::AnswerTooLarge {
                upstream: ctx.map_or_else(
                    || labels.tier.to_string(),
                    |c| c.route.target.upstream.to_string(),
                ),
                detail: format!("{len} bytes with Keel's labels; the limit is {limit}"),
            };
            tracing::warn!(request_id = %edge.ctx.request_id, tier = labels.tier, error = %e,
                "answer refused: its labels took it past server.max_message_size");
            return Err(edge.status(&e, ctx));
        }
        // What the upstream sent with its answer goes on with it, under Keel's own.
        let wire = resp.wire.clone();
        let mut out = edge.reply(resp);
        let mut trailers = HeaderMap::with_capacity(16);
        if let Some((headers, upstream)) = wire.metadata() {
            crate::api::passed::add_headers(out.metadata_mut(), headers);
            crate::api::passed::filter_into(&mut trailers, upstream);
        }
        if let Some(ctx) = ctx {
            receipt::write_to(&mut trailers, ctx);
        }
        labels.to_trailers(&mut trailers, &served_by);
        // The revision goes in the trailers too, for clients that read outcomes there.
        trailers.insert(
            receipt::names::POLICY_REVISION,
            HeaderValue::from(edge.snapshot.revision),
        );
        out.extensions_mut().insert(receipt::Trailing(trailers));
        Ok(out)
    }
}

/// A rung that was tried and failed: the ladder goes on, the answer's story and the log say
/// why.
fn rung_failed(edge: &Edge, step: &ladder::Step, failed: &Failed, story: &mut Story) {
    story.rungs_failed.push(step.rung.tier());
    if let Failed::Error(e, _) = failed {
        tracing::debug!(request_id = %edge.ctx.request_id, tenant = edge.tenant().unwrap_or(""),
            tier = step.rung.tier(), error = %e, "fallback rung failed");
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn encoded(resp: &InferResponse) -> usize {
        crate::pb::infer_response_to_pb(resp.clone()).encoded_len()
    }

    #[test]
    fn the_labels_at_their_longest_fit_in_their_room() {
        let mut resp = InferResponse {
            model: "m".repeat(500),
            version: "v".repeat(500),
            id: String::new(),
            parameters: Default::default(),
            outputs: Vec::new(),
            form: crate::model::ContentForm::Raw,
            wire: Default::default(),
        };
        let bare = encoded(&resp);
        let story = Story {
            primary_attempts: u32::MAX,
            primary_error: "local_rejection",
            primary_code: "FAILED_PRECONDITION",
            rungs_failed: vec!["a_long_fallback_tier"; 40],
        };
        let labels = Labels {
            tier: "a_long_fallback_tier_name_of_32b",
            degraded: true,
            reason: Some(Trigger::BudgetExhausted),
            stale: Some(Duration::MAX),
            story: Some(&story),
        };
        labels.to_parameters(&mut resp);
        let added = encoded(&resp) - bare;
        assert!(added <= LABEL_ROOM, "the labels took {added} bytes");
        assert!(added > LABEL_ROOM / 2, "{added}: the room is far too large");
    }
}
