//! One dispatch owns a client's request, from the message the edge decoded to its answer.
//!
//! The edge (`api/`) decodes, authenticates, converts and tags; everything between is
//! decided here, in this order:
//!
//! - `mod.rs` ([`Dispatch::send`]): one call of the request: its route (the snapshot's
//!   routes, or a fallback's), the version a route sends, Keel's own `max_in_flight` gate,
//!   the call's context with its deadline ([`edge`], computed once), the drain cut, the
//!   answer's size, the slow mark, the canary verdict, and one record of the call
//!   ([`record`]);
//! - [`ladder`]: ModelInfer's degradation: a fresh cached answer, else the primary call,
//!   else the model's fallback ladder within the time the call had, and what the answer
//!   is ([`Labels`]);
//! - [`record`]: what Keel reports of every finished call and refused request (metrics and
//!   the request log line);
//! - [`edge`]: what a request brings (who calls, its metadata, its snapshot) and where a
//!   call's deadline is computed.
//!
//! Below this, each call goes through its method's tower stack ([`Stacks`], assembled in
//! the server), whose innermost service sends each attempt to the route's backend.

use std::sync::Arc;

use opentelemetry::KeyValue;
use tokio::sync::watch;
use tower::ServiceExt as _;
use tower::util::BoxCloneSyncService;

pub mod edge;
pub mod ladder;
pub mod record;

pub use edge::{Cap, Edge, EdgeContext};
pub use ladder::{LABEL_ROOM, Labels, Served, Story};
pub use record::Leg;

use crate::call::{Call, CallContext};
use crate::contract::Lookup;
use crate::error::Error;
use crate::model::{Contract, InferRequest};
use crate::observe::Metrics;
use crate::observe::traces::Tracing;
use crate::policy::ErrorClass;
use crate::resilience::{Failure as _, Slots};
use crate::route::{Route, Router, Routes};
use crate::upstream::{ConfigQuery, MetadataQuery, Operation, ReadyQuery, StatisticsQuery};

/// A method's tower stack, from the dispatch to the backend.
pub type CallService<Op> = BoxCloneSyncService<Call<Op>, <Op as Operation>::Response, Error>;

/// One stack per per-model method.
#[derive(Clone)]
pub struct Stacks {
    /// ModelInfer and each ModelStreamInfer message.
    pub infer: CallService<InferRequest>,
    /// ModelReady and RepositoryIndex.
    pub ready: CallService<ReadyQuery>,
    /// ModelMetadata.
    pub metadata: CallService<MetadataQuery>,
    /// ModelConfig.
    pub config: CallService<ConfigQuery>,
    /// ModelStatistics.
    pub statistics: CallService<StatisticsQuery>,
}

/// Full method names, as policy `[methods."..."]` sections name them.
pub const MODEL_INFER: &str = "inference.GRPCInferenceService/ModelInfer";
/// ModelStreamInfer: each of its requests is dispatched as a ModelInfer is.
pub const MODEL_STREAM_INFER: &str = "inference.GRPCInferenceService/ModelStreamInfer";

/// The dispatch of client requests: shared by the services of both APIs. Cloning it is
/// cheap (shared handles). Built by the edge's services from their parts.
#[derive(Clone)]
pub struct Dispatch {
    /// The tower stack of each per-model method.
    pub(crate) stacks: Stacks,
    /// The routes of each snapshot, and the runtime state (breakers, budgets, canary
    /// analyses) kept across swaps.
    pub(crate) router: Arc<Router>,
    /// Keel's metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// Keel-wide slots for calls in flight (`server.max_in_flight`).
    pub(crate) gate: Arc<Slots>,
    /// Becomes true when the drain timeout passes: calls still running are cut.
    pub(crate) cut: watch::Receiver<bool>,
    /// Span export, when tracing is on.
    pub(crate) tracing: Option<Arc<Tracing>>,
}

/// How one call of a client's request is made.
pub struct Plan {
    /// Where it goes.
    pub via: Via,
    /// What it stands for in the request.
    pub leg: Leg,
    /// The bound on its deadline below the client's and the route's.
    pub cap: Cap,
}

impl Plan {
    /// A call that is the whole request, routed by the policy.
    pub const WHOLE: Plan = Plan {
        via: Via::Policy,
        leg: Leg::WHOLE,
        cap: Cap {
            at: None,
            leave_margin: false,
        },
    };
}

/// How a call is routed.
pub enum Via {
    /// By the policy's routes for its model.
    Policy,
    /// To this route (a fallback upstream).
    Route(Route),
}

/// Why a call produced no answer.
pub enum Failed {
    /// It failed, after getting as far as its context says.
    Error(Error, Option<Arc<CallContext>>),
    /// The drain timeout cut it.
    Cut,
}

/// A successful call's answer and the context that produced it (for its receipt).
pub struct Answer<T> {
    /// The backend's answer.
    pub value: T,
    /// The call's context: its route, deadline and receipt.
    pub ctx: Arc<CallContext>,
}

/// Completes when `cut` becomes true (never, if its sender is dropped without cutting).
async fn cut_off(mut cut: watch::Receiver<bool>) {
    if cut.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Dispatch {
    /// The method stacks.
    pub fn stacks(&self) -> &Stacks {
        &self.stacks
    }

    /// Keel's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The routes of the request's snapshot (compiled once per revision).
    pub fn routes(&self, edge: &Edge) -> Arc<Routes> {
        self.router.routes(&edge.snapshot)
    }

    /// Whether the drain timeout has passed, read when the future is polled (a stream's
    /// end asks when it ends, not when it starts).
    pub fn was_cut(&self) -> impl Future<Output = bool> + use<> {
        let cut = self.cut.clone();
        async move { *cut.borrow() }
    }

    /// Completes when the drain timeout passes.
    pub fn cut(&self) -> impl Future<Output = ()> + use<> {
        cut_off(self.cut.clone())
    }

    /// One call that is the whole of a client's request, routed by the policy.
    pub async fn call<Op: Operation>(
        &self,
        svc: &CallService<Op>,
        edge: &Edge,
        method: &'static str,
        body: Op,
    ) -> Result<Answer<Op::Response>, Failed> {
        self.send(svc, edge, method, Arc::new(body), Plan::WHOLE)
            .await
    }

    /// The contract of the route a ModelInfer for `model` (`version`) takes: fetched on
    /// first use within the call's deadline, `None` while the backend has not described it.
    pub async fn contract(
        &self,
        edge: &Edge,
        model: &str,
        version: &str,
    ) -> Result<Option<Arc<Contract>>, Error> {
        let route = self
            .routes(edge)
            .route(MODEL_INFER, model, version, &edge.pick())?;
        let sent = route.version.as_deref().unwrap_or(version);
        let (deadline, _) = edge.ctx.deadline(&route.settings, Cap::default());
        Ok(match route.target.contracts.lookup(sent, deadline) {
            Lookup::Known(c) => Some(c),
            Lookup::Unknown => None,
            Lookup::Fetch(f) => f.await,
        })
    }

    /// One call, routed by the policy or to a given route, with its deadline capped as its
    /// plan says.
    pub async fn send<Op: Operation>(
        &self,
        svc: &CallService<Op>,
        edge: &Edge,
        method: &'static str,
        body: Arc<Op>,
        plan: Plan,
    ) -> Result<Answer<Op::Response>, Failed> {
        let Plan { via, leg, cap } = plan;
        let start = tokio::time::Instant::now();
        let policy = &edge.snapshot.policy;
        let span = self.tracing.as_ref().map(|t| {
            let mut attrs = vec![
                KeyValue::new("keel.model", body.model().to_string()),
                KeyValue::new("keel.request_id", edge.ctx.request_id.to_string()),
                KeyValue::new("keel.policy.revision", edge.snapshot.revision as i64),
            ];
            if let Some(caller) = &edge.caller {
                attrs.push(KeyValue::new("keel.tenant", caller.name().to_string()));
                attrs.push(KeyValue::new("keel.priority", caller.priority().as_str()));
            }
            t.server_span(method, &edge.ctx.metadata, attrs)
        });
        let finished = |ctx: Option<&CallContext>, error: Option<&Error>| {
            if let Some(span) = &span {
                let receipt = ctx.map(|c| c.receipt.read()).unwrap_or_default();
                let class = error.map_or("ok", |e| e.class().as_str());
                span.set(vec![
                    KeyValue::new("keel.class", class),
                    KeyValue::new("keel.tier", leg.tier),
                    KeyValue::new("keel.attempts", i64::from(receipt.attempts)),
                ]);
                let code = error.map_or(tonic::Code::Ok, Error::code);
                span.end(crate::grpc_code::name(code), code as i64);
            }
            let f = record::Finished {
                method,
                request_id: &edge.ctx.request_id,
                model: body.model(),
                version: body.version(),
                ctx,
                error,
                took: start.elapsed(),
                bytes_in: body.payload_bytes(),
                peer: edge.peer,
                trace_id: edge.trace_id(),
                revision: edge.snapshot.revision,
                policy_version: edge.snapshot.version(),
                success_sample: policy.observability.success_log_sample,
                leg,
                api: edge.api,
                tenant: edge.tenant(),
            };
            record::finish(&self.metrics, &f, || body.summary());
        };
        let route = match via {
            Via::Route(route) => route,
            Via::Policy => {
                match self
                    .routes(edge)
                    .route(method, body.model(), body.version(), &edge.pick())
                {
                    Ok(route) => route,
                    Err(e) => {
                        finished(None, Some(&e));
                        return Err(Failed::Error(e, None));
                    }
                }
            }
        };
        // A route that sends its own version (a canary's, say) replaces the client's.
        let sent = match &route.version {
            Some(v) if **v != *body.version() => Arc::new(body.at_version(v)),
            _ => body.clone(),
        };
        // Keel's own bound, whatever the model: refuse at once rather than queue, batch
        // callers before the slots kept for interactive ones.
        let priority = edge.priority();
        let Some(_gate) = self.gate.try_take(priority) else {
            let e = Error::GatewayOverloaded {
                max_in_flight: self.gate.total(),
                reserved: self.gate.reserved_from(priority),
            };
            finished(None, Some(&e));
            return Err(Failed::Error(e, None));
        };
        let mut call_ctx = edge.ctx.call(&edge.snapshot, route, span.clone(), cap);
        call_ctx.pinned = sent.pinned();
        call_ctx.priority = priority;
        let ctx = Arc::new(call_ctx);
        let result = tokio::select! {
            r = svc.clone().oneshot(Call::shared(ctx.clone(), sent)) => r,
            () = self.cut() => return Err(Failed::Cut),
        };
        // An answer Keel could not send (over `server.max_message_size` once labelled)
        // fails here, so the log line, the metrics and the ladder see it.
        let result = result.and_then(|value| {
            let limit = policy.server.max_message_size;
            match Op::answer_over(&value, limit.saturating_sub(LABEL_ROOM)) {
                None => Ok(value),
                Some(len) => Err(Error::AnswerTooLarge {
                    upstream: ctx.route.target.upstream.to_string(),
                    detail: format!(
                        "{len} bytes, and {LABEL_ROOM} kept for Keel's labels; the limit is {limit}"
                    ),
                }),
            }
        });
        if let (Ok(_), Some(slow)) = (&result, ctx.route.settings.slow_threshold)
            && start.elapsed() > slow
        {
            ctx.receipt.update(|r| r.slow = true);
        }
        finished(Some(&ctx), result.as_ref().err());
        if matches!(method, MODEL_INFER | MODEL_STREAM_INFER)
            && let Some((analysis, side)) = &ctx.route.canary
        {
            // A client's mistake says nothing about the route.
            let ok = match &result {
                Ok(_) => Some(true),
                Err(e) => (e.class() != ErrorClass::ClientError).then_some(false),
            };
            if let Some(verdict) = ok.and_then(|ok| analysis.record(*side, ok, start.elapsed())) {
                self.router.condemn(&verdict);
            }
        }
        match result {
            Ok(value) => Ok(Answer { value, ctx }),
            Err(e) => Err(Failed::Error(e, Some(ctx))),
        }
    }
}
