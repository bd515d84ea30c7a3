//! ModelInfer with graceful degradation: a fresh cached answer when the model's cache has
//! one, else the primary call, else the model's fallback ladder (compiled per revision in
//! `route/ladder.rs`), in order, within the time the call had. Every answer says what it
//! is ([`Labels`]), which the edge writes in the response parameters and the trailing
//! metadata: `keel.degraded`, `keel.tier`, `keel.served_by`, `keel.degraded_reason`,
//! `keel.stale_ms`; a degraded one also tells what happened before it ([`Story`]): the
//! primary's attempts and failure, and the rungs that failed.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Answer, Cap, Dispatch, Edge, Failed, Leg, Plan, Via, record};
use crate::call::CallContext;
use crate::error::Error;
use crate::model::{InferRequest, InferResponse, Param};
use crate::observe::metrics::{ApiLabels, DegradedLabels};
use crate::policy::Trigger;
use crate::resilience::Failure as _;
use crate::route::ladder::{self, Rung};
use crate::route::{Routes, cache};

/// What an answer is.
pub struct Labels {
    /// What answered: `primary`, `cache`, `fallback_model`, `static`.
    pub tier: &'static str,
    /// Whether it stands in for the primary's answer.
    pub degraded: bool,
    /// The failure that let a fallback answer.
    pub reason: Option<Trigger>,
    /// The age of a cached answer.
    pub stale: Option<Duration>,
    /// What happened before a degraded answer.
    pub story: Option<Story>,
}

const PRIMARY: Labels = Labels {
    tier: "primary",
    degraded: false,
    reason: None,
    stale: None,
    story: None,
};

/// What happened before a degraded answer, so one response tells the whole story: the
/// primary's attempts and its failure, then the rungs that were tried and failed before the
/// one that answered.
pub struct Story {
    /// Attempts the primary started, as `keel-attempts` counts them (one refused by an open
    /// breaker counts; its class says so); 0 when it was refused before its first (Keel's
    /// own `max_in_flight`, say).
    pub primary_attempts: u32,
    /// The class of the primary's failure (`transient`, `local_rejection`, ...).
    pub primary_error: &'static str,
    /// Its gRPC code (`UNAVAILABLE`).
    pub primary_code: &'static str,
    /// Tiers of the rungs tried before the answering one, in order.
    pub rungs_failed: Vec<&'static str>,
}

impl Story {
    /// The failed rungs' tiers, comma-separated; `None` when none failed.
    pub fn rungs_failed(&self) -> Option<String> {
        (!self.rungs_failed.is_empty()).then(|| self.rungs_failed.join(","))
    }
}

/// Bytes an answer leaves under `server.max_message_size` for its labels: all nine, with
/// `keel.served_by` and `keel.rungs_failed` at their longest ([`MAX_SERVED_BY`],
/// [`MAX_RUNGS_FAILED`]), take at most about 500 encoded (a test measures it).
pub const LABEL_ROOM: usize = 768;

/// The longest `keel.served_by` written (a longer model name and version are clipped).
const MAX_SERVED_BY: usize = 128;

/// The longest `keel.rungs_failed` written (the tiers of a longer ladder are clipped).
const MAX_RUNGS_FAILED: usize = 64;

impl Labels {
    /// The age of a cached answer in milliseconds.
    pub fn stale_ms(&self) -> Option<i64> {
        self.stale
            .map(|age| i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
    }

    /// Writes the labels into the answer's parameters; returns what served it.
    pub fn to_parameters(&self, resp: &mut InferResponse) -> String {
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
        if let Some(story) = &self.story {
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
}

/// An answer to a ModelInfer and what it is.
pub struct Served {
    /// The answer, its labels not yet written.
    pub resp: InferResponse,
    /// What answered.
    pub labels: Labels,
    /// The context of the call that produced it; a cache or static answer has none.
    pub ctx: Option<Arc<CallContext>>,
}

impl Dispatch {
    /// Answers an inference request of `method` (ModelInfer, or one request of a
    /// ModelStreamInfer stream), degrading through the model's ladder when it must.
    pub async fn infer(
        &self,
        edge: &Edge,
        method: &'static str,
        req: InferRequest,
    ) -> Result<Served, Failed> {
        let req = Arc::new(req);
        let routes = self.routes(edge);
        // A call of a sequence changes the state its endpoint holds: no cached answer and no
        // fallback may stand in for it.
        let pinned = crate::upstream::Operation::pinned(&*req);
        let cache = routes.cache(&req.model).filter(|_| !pinned).cloned();
        let key = cache.as_ref().map(|_| cache::key(&req));
        if let (Some(c), Some(k)) = (&cache, key)
            && let Some((resp, age)) = c.fresh(k)
        {
            self.count(edge, &req.model, "cache", None, Duration::ZERO);
            return Ok(Served {
                resp,
                labels: Labels {
                    tier: "cache",
                    degraded: false,
                    reason: None,
                    stale: Some(age),
                    story: None,
                },
                ctx: None,
            });
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
        let plan = Plan {
            via: Via::Policy,
            leg: primary,
            cap: Cap {
                at: None,
                leave_margin: !ladder.is_empty(),
            },
        };
        let (error, ctx) = match self
            .send(&self.stacks.infer, edge, method, req.clone(), plan)
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
                return Ok(Served {
                    resp: value,
                    labels: PRIMARY,
                    ctx: Some(ctx),
                });
            }
            Err(Failed::Cut) => return Err(Failed::Cut),
            Err(Failed::Error(e, ctx)) => (e, ctx),
        };
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
            let answer = match &step.rung {
                Rung::Model(_) | Rung::Upstream(_) => {
                    let Some((body, via, expected)) = rung_call(&routes, edge, method, &req, step)
                    else {
                        continue;
                    };
                    if !may_fall_back(ctx.as_deref(), deadline, expected) {
                        continue;
                    }
                    let plan = Plan {
                        via,
                        leg: Leg {
                            tier: step.rung.tier(),
                            counted: false,
                        },
                        cap: Cap {
                            at: Some(deadline),
                            leave_margin: false,
                        },
                    };
                    match self
                        .send(&self.stacks.infer, edge, method, body, plan)
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
                let tier = step.rung.tier();
                resp.id.clone_from(&req.id);
                self.count(edge, &req.model, tier, None, started.elapsed());
                self.metrics
                    .degraded
                    .get_or_create(&DegradedLabels {
                        model: req.model.clone(),
                        tier,
                        reason: reason.as_str(),
                    })
                    .inc();
                tracing::info!(
                    request_id = %edge.ctx.request_id,
                    tenant = edge.tenant().unwrap_or(""),
                    model = %req.model,
                    tier,
                    degraded_reason = reason.as_str(),
                    "degraded answer"
                );
                // The receipt is the answering call's; cache and static rungs make none.
                return Ok(Served {
                    resp,
                    labels: Labels {
                        tier,
                        degraded: true,
                        reason: Some(reason),
                        stale,
                        story: Some(story),
                    },
                    ctx: answered_by,
                });
            }
        }
        if !primary.counted {
            self.count(edge, &req.model, "primary", Some(&error), started.elapsed());
        }
        Err(Failed::Error(error, ctx))
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
        let metrics = &self.metrics;
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
}

/// The request, route and expected latency of a rung that calls another model or
/// upstream; `None` when the rung's upstream has no route for the model.
fn rung_call(
    routes: &Routes,
    edge: &Edge,
    method: &'static str,
    req: &Arc<InferRequest>,
    step: &ladder::Step,
) -> Option<(Arc<InferRequest>, Via, Option<Duration>)> {
    match &step.rung {
        Rung::Model(other) => {
            let mut r = (**req).clone();
            r.model = other.clone();
            r.version.clear();
            let expected = routes
                .route(method, other, "", &edge.pick())
                .ok()
                .and_then(|r| r.target.latency.expected());
            Some((Arc::new(r), Via::Policy, expected))
        }
        Rung::Upstream(target) => {
            let route = routes.route_to(method, &req.model, target)?;
            Some((req.clone(), Via::Route(route), target.latency.expected()))
        }
        Rung::Cache | Rung::Static(_) => None,
    }
}

/// Whether a fallback that takes `expected` fits before `deadline`, and the primary's
/// retry budget grants it (fallbacks draw on the same budget as retries).
fn may_fall_back(
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

/// A rung that was tried and failed: the ladder goes on, the answer's story and the log say
/// why.
fn rung_failed(edge: &Edge, step: &ladder::Step, failed: &Failed, story: &mut Story) {
    story.rungs_failed.push(step.rung.tier());
    if let Failed::Error(e, _) = failed {
        tracing::debug!(request_id = %edge.ctx.request_id, tenant = edge.tenant().unwrap_or(""),
            tier = step.rung.tier(), error = %e, "fallback rung failed");
    }
}
