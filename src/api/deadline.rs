//! The client's deadline at the edge, and what a call's bodies may cost before its handler
//! answers: stamps each call's arrival, answers DEADLINE_EXCEEDED when the client's
//! `grpc-timeout` passes before the service answered, and bounds the request body still
//! arriving ([`Inbound`]) and the answer not taken yet ([`Outbound`]).
//!
//! # Why at the edge
//!
//! A call's `DeadlineLayer` starts with its handler, which runs once the whole request body
//! was read. A call whose body is still arriving at its deadline is answered here instead,
//! in Keel's words: the deadline error as [`to_status`](super::status::to_status) renders
//! it, with the request id and the policy revision every Keel answer carries.
//!
//! # One instant
//!
//! The [`Arrival`] this layer puts in the request's extensions is what
//! [`EdgeContext`](super::context::EdgeContext) counts the client's deadline from, through
//! the same [`client_deadline`], so this layer and the call's `DeadlineLayer` fire at the
//! same instant. The inner service is polled first: at a tie its answer, with the call's
//! receipt, wins.
//!
//! # The window
//!
//! A call without a `grpc-timeout` still has a bound on its body, its *window*: the longest
//! deadline the policy gives any call (each method's and model's `timeout`, capped by its
//! `max_timeout`; 30 s by default). Which model a call is for is only known once its
//! message is decoded, so the window is the one bound that can hold from the headers
//! without cutting a call its model's `timeout` would allow. It is computed once per
//! policy revision. A body not finished within it fails DEADLINE_EXCEEDED ([`Inbound`]);
//! an answer not taken within it (or the client's deadline) is dropped ([`Outbound`]).
//!
//! # Request id
//!
//! A call without a usable `x-request-id` is given a generated one here, in its headers, so
//! the handler and this layer's answers name the same id.

mod inbound;
mod outbound;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{Either, Empty};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::metadata::MetadataValue;
use tower::{Layer, Service};

pub use inbound::Inbound;
pub use outbound::Outbound;

use super::POLICY_REVISION;
use super::context::{GRPC_TIMEOUT, client_deadline, is_usable_request_id, new_request_id};
use crate::error::Error;
use crate::policy::{Policy, Snapshot, Store};
use crate::resilience::{Failure as _, Slots};
use crate::transport::{ConnectionBuffers, Peer};
use crate::upstream::grpc::REQUEST_ID;

/// When a call's request headers arrived, in its extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival(pub Instant);

/// Applies [`EdgeDeadline`].
#[derive(Clone)]
pub struct EdgeDeadlineLayer {
    store: Arc<Store>,
    gate: Arc<Slots>,
    windows: Arc<ArcSwapOption<Window>>,
}

impl EdgeDeadlineLayer {
    /// Answers report the revision current in `store`; unfinished bodies take `gate`'s
    /// slots (Keel's `max_in_flight`).
    pub fn new(store: Arc<Store>, gate: Arc<Slots>) -> Self {
        EdgeDeadlineLayer {
            store,
            gate,
            windows: Arc::default(),
        }
    }
}

impl<S> Layer<S> for EdgeDeadlineLayer {
    type Service = EdgeDeadline<S>;
    fn layer(&self, inner: S) -> EdgeDeadline<S> {
        EdgeDeadline {
            inner,
            store: self.store.clone(),
            gate: self.gate.clone(),
            windows: self.windows.clone(),
        }
    }
}

/// Races the inner service against the client's deadline, counted from arrival, and bounds
/// the call's bodies.
#[derive(Clone)]
pub struct EdgeDeadline<S> {
    inner: S,
    store: Arc<Store>,
    gate: Arc<Slots>,
    windows: Arc<ArcSwapOption<Window>>,
}

/// The window of one policy revision (see the module docs), and the most entries any of
/// its models takes in one request.
#[derive(Debug)]
struct Window {
    revision: u64,
    window: Duration,
    caps: inbound::Caps,
}

impl<S> EdgeDeadline<S> {
    /// The window and the entry caps under `snapshot`, computed once per revision.
    fn window(&self, snapshot: &Snapshot) -> (Duration, inbound::Caps) {
        if let Some(w) = &*self.windows.load()
            && w.revision == snapshot.revision
        {
            return (w.window, w.caps);
        }
        let (window, caps) = bounds(&snapshot.policy);
        self.windows.store(Some(Arc::new(Window {
            revision: snapshot.revision,
            window,
            caps,
        })));
        (window, caps)
    }
}

/// The longest deadline `policy` gives any call (every method's and model's `timeout`,
/// each capped by its `max_timeout`), and the most inputs and outputs it lets any call
/// carry. Resolves each (method, model) pair once.
fn bounds(policy: &Policy) -> (Duration, inbound::Caps) {
    let methods: Vec<&str> = std::iter::once("")
        .chain(policy.methods.keys().map(String::as_str))
        .collect();
    let models: Vec<Option<&str>> = std::iter::once(None)
        .chain(
            policy
                .models
                .iter()
                .flatten()
                .map(|(name, _)| Some(name.as_str())),
        )
        .collect();
    let mut longest = Duration::ZERO;
    let mut caps = inbound::Caps {
        inputs: 0,
        outputs: 0,
    };
    for method in &methods {
        for model in &models {
            let s = policy.resolve(method, *model);
            longest = longest.max(s.timeout.min(s.max_timeout));
            caps.inputs = caps.inputs.max(s.limits.max_inputs as usize);
            caps.outputs = caps.outputs.max(s.limits.max_outputs as usize);
        }
    }
    (longest, caps)
}

impl<S, B, RB> Service<http::Request<B>> for EdgeDeadline<S>
where
    S: Service<http::Request<Inbound<B>>, Response = http::Response<RB>>,
{
    type Response = http::Response<Either<Outbound<RB>, Empty<Bytes>>>;
    type Error = S::Error;
    type Future = EdgeDeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let arrival = Instant::now();
        req.extensions_mut().insert(Arrival(arrival));
        let snapshot = self.store.current();
        let (window, caps) = self.window(&snapshot);
        let call = Arc::new(Call {
            arrival,
            answered: AtomicBool::new(false),
            request_id: request_id(&mut req),
            method: req.uri().path_and_query().cloned(),
            peer: req.extensions().get::<Peer>().and_then(|p| p.remote),
            revision: snapshot.revision,
        });
        let buffers = req.extensions().get::<Arc<ConnectionBuffers>>().cloned();
        let timeout = req
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok());
        let deadline = client_deadline(arrival, timeout);
        let answer = outbound::Terms {
            buffers: buffers.clone(),
            client_deadline: deadline.map(|(at, _)| at),
            window,
        };
        let server = &snapshot.policy.server;
        let metadata = header_list_size(&req);
        let terms = inbound::Terms {
            window,
            gate: self.gate.clone(),
            buffers,
            max_message_size: server.max_message_size,
            one_message: !STREAMED_REQUESTS.contains(&req.uri().path()),
            caps: INFERENCE.contains(&req.uri().path()).then_some(caps),
            refusal: (metadata > server.max_metadata_size as usize).then_some(
                Error::MetadataTooLarge {
                    size: metadata,
                    limit: server.max_metadata_size as usize,
                },
            ),
        };
        let req = req.map(|body| Inbound::new(body, call.clone(), terms));
        EdgeDeadlineFuture {
            inner: self.inner.call(req),
            sleep: deadline.map(|(at, _)| tokio::time::sleep_until(at)),
            budget: deadline.map(|(_, budget)| budget),
            answer: Some(answer),
            call,
        }
    }
}

/// The methods of the traffic listener whose request is a stream of messages; every other
/// call's body is one message.
const STREAMED_REQUESTS: &[&str] = &[
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The methods whose messages are ModelInferRequests, which [`inbound::Caps`] bound.
const INFERENCE: &[&str] = &[
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelStreamInfer",
];

/// The size of a request's header block as HTTP/2 counts it against
/// `SETTINGS_MAX_HEADER_LIST_SIZE` (RFC 9113 §6.5.2): each field's name and value plus 32
/// bytes, the pseudo-headers included.
fn header_list_size<B>(req: &http::Request<B>) -> usize {
    const ENTRY: usize = 32;
    let uri = req.uri();
    let pseudo = [
        (":method", req.method().as_str().len()),
        (":scheme", uri.scheme_str().map_or(0, str::len)),
        (
            ":authority",
            uri.authority().map_or(0, |a| a.as_str().len()),
        ),
        (
            ":path",
            uri.path_and_query().map_or(0, |p| p.as_str().len()),
        ),
    ];
    let pseudo: usize = pseudo.iter().map(|(n, v)| n.len() + v + ENTRY).sum();
    pseudo
        + req
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + ENTRY)
            .sum::<usize>()
}

/// The client's usable `x-request-id`, else a generated one written into the request.
fn request_id<B>(req: &mut http::Request<B>) -> Option<HeaderValue> {
    if let Some(id) = req.headers().get(REQUEST_ID)
        && id.to_str().is_ok_and(is_usable_request_id)
    {
        return Some(id.clone());
    }
    // A UUID is always a valid header value.
    let id = HeaderValue::try_from(new_request_id()).ok()?;
    req.headers_mut().insert(REQUEST_ID, id.clone());
    Some(id)
}

/// One call as the edge knows it: shared by its future and its bodies.
struct Call {
    /// When its headers arrived.
    arrival: Instant,
    /// Set once the service answered: a stream's body is timed per message from then.
    answered: AtomicBool,
    request_id: Option<HeaderValue>,
    method: Option<http::uri::PathAndQuery>,
    peer: Option<SocketAddr>,
    revision: u64,
}

impl Call {
    /// Keel's status for refusing the call with `e`, tagged with the request id and the
    /// revision; logged as the handler logs a call.
    fn refuse(&self, e: &Error, client_deadline: Option<Duration>) -> tonic::Status {
        self.log(e, client_deadline);
        let mut status = super::status::to_status(e, None, self.revision);
        let md = status.metadata_mut();
        if let Some(id) = self
            .request_id
            .as_ref()
            .and_then(|id| id.to_str().ok())
            .and_then(|id| MetadataValue::try_from(id).ok())
        {
            md.insert(REQUEST_ID, id);
        }
        md.insert(POLICY_REVISION, MetadataValue::from(self.revision));
        status
    }

    /// Logs the call as refused with `e`, as the handler logs a call.
    fn log(&self, e: &Error, client_deadline: Option<Duration>) {
        tracing::info!(
            request_id = self.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
            method = self.method.as_ref().map_or("", |m| m.path().trim_start_matches('/')),
            class = e.class().as_str(),
            grpc_code = crate::grpc_code::name(e.code()),
            policy_revision = self.revision,
            client_deadline_ms = client_deadline.map(|b| b.as_millis() as u64),
            peer = %self.peer.map(|p| p.to_string()).unwrap_or_default(),
            error = crate::model::clip(&e.to_string(), super::status::MAX_MESSAGE),
            "request"
        );
    }

    /// Keel's DEADLINE_EXCEEDED for a call unanswered at the client's deadline,
    /// trailers-only.
    fn expired<RB>(&self, budget: Duration) -> http::Response<Either<RB, Empty<Bytes>>> {
        let e = Error::DeadlineExceeded { budget };
        let (parts, ()) = self.refuse(&e, Some(budget)).into_http::<()>().into_parts();
        http::Response::from_parts(parts, Either::Right(Empty::new()))
    }
}

#[cfg(test)]
impl Call {
    /// A call arriving now, with request id `r1` at revision 1.
    fn arriving() -> Arc<Call> {
        Arc::new(Call {
            arrival: Instant::now(),
            answered: AtomicBool::new(false),
            request_id: Some(HeaderValue::from_static("r1")),
            method: Some(http::uri::PathAndQuery::from_static(
                "/inference.GRPCInferenceService/ModelInfer",
            )),
            peer: None,
            revision: 1,
        })
    }
}

pin_project! {
    /// The response future of [`EdgeDeadline`]; without a client deadline, only the inner
    /// future.
    pub struct EdgeDeadlineFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        budget: Option<Duration>,
        // Taken when the service answers.
        answer: Option<outbound::Terms>,
        call: Arc<Call>,
    }
}

impl<F, RB, E> Future for EdgeDeadlineFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = Result<http::Response<Either<Outbound<RB>, Empty<Bytes>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The inner call first: an answer ready at the deadline still counts.
        if let Poll::Ready(out) = this.inner.poll(cx) {
            this.call.answered.store(true, Ordering::Release);
            // A request tonic's decoder refused never reached a handler to log it.
            if let Ok(res) = &out
                && let Some(super::unreadable::Refused(e)) = res.extensions().get()
            {
                this.call.log(e, *this.budget);
            }
            let Some(terms) = this.answer.take() else {
                // Polled again after answering.
                return Poll::Pending;
            };
            let call = this.call.clone();
            return Poll::Ready(
                out.map(|res| res.map(|body| Either::Left(Outbound::new(body, call, terms)))),
            );
        }
        let Some(sleep) = this.sleep.as_pin_mut() else {
            return Poll::Pending;
        };
        ready!(sleep.poll(cx));
        match (this.budget.take(), this.answer.take()) {
            (Some(budget), Some(_)) => Poll::Ready(Ok(this.call.expired(budget))),
            // Polled again after answering.
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::Mutex;
    use tonic_types::StatusExt as _;
    use tower::{ServiceExt as _, service_fn};

    type Seen = Arc<Mutex<Option<http::Request<()>>>>;
    type Body = Inbound<Empty<Bytes>>;

    /// A service that keeps the request it was given and answers OK after `work`.
    fn inner(
        work: Duration,
        seen: Seen,
    ) -> impl Service<
        http::Request<Body>,
        Response = http::Response<&'static str>,
        Error = Infallible,
        Future: Send,
    > + Clone {
        service_fn(move |req: http::Request<Body>| {
            *seen.lock().unwrap() = Some(req.map(|_| ()));
            async move {
                tokio::time::sleep(work).await;
                Ok(http::Response::builder()
                    .header("grpc-status", "0")
                    .body("answer")
                    .unwrap())
            }
        })
    }

    fn request(headers: &[(&str, &str)]) -> http::Request<Empty<Bytes>> {
        let mut b = http::Request::post("/inference.GRPCInferenceService/ModelInfer");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Empty::new()).unwrap()
    }

    fn layer() -> EdgeDeadlineLayer {
        EdgeDeadlineLayer::new(
            Arc::new(Store::with_default()),
            Arc::new(Slots::new(10, 0.0)),
        )
    }

    /// Whether the answer is the service's, with this body.
    fn answered<RB: PartialEq>(
        res: &http::Response<Either<Outbound<RB>, Empty<Bytes>>>,
        body: RB,
    ) -> bool {
        matches!(res.body(), Either::Left(o) if *o.get_ref() == body)
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_answered_in_time_is_the_services_answer_and_knows_its_arrival() {
        let seen = Seen::default();
        let svc = layer().layer(inner(Duration::from_millis(99), seen.clone()));
        let arrived = Instant::now();
        let res = svc
            .oneshot(request(&[("grpc-timeout", "100m"), ("x-request-id", "r1")]))
            .await
            .unwrap();
        assert!(answered(&res, "answer"));
        let req = seen.lock().unwrap().take().unwrap();
        assert_eq!(req.extensions().get::<Arrival>(), Some(&Arrival(arrived)));
        assert_eq!(req.headers()["x-request-id"], "r1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_unanswered_at_its_deadline_gets_keels_deadline_exceeded_then() {
        let svc = layer().layer(inner(Duration::from_secs(3600), Seen::default()));
        let start = Instant::now();
        let res = svc
            .oneshot(request(&[("grpc-timeout", "100m"), ("x-request-id", "r2")]))
            .await
            .unwrap();
        assert_eq!(Instant::now() - start, Duration::from_millis(100));
        assert!(matches!(res.body(), Either::Right(_)));
        let h = res.headers();
        assert_eq!(h["grpc-status"], "4");
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["x-request-id"], "r2");
        assert_eq!(h["keel-policy-revision"], "1");
        let s = tonic::Status::from_header_map(h).unwrap();
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(s.message(), "deadline of 100ms exceeded");
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "DEADLINE_EXCEEDED");
        assert_eq!(info.domain, "keel");
        assert_eq!(info.metadata["class"], "deadline_exceeded");
        assert_eq!(info.metadata["policy_revision"], "1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_generated_request_id_is_the_handlers_and_the_answers() {
        for sent in [None, Some(""), Some(&*"x".repeat(129))] {
            let seen = Seen::default();
            let svc = layer().layer(inner(Duration::from_secs(3600), seen.clone()));
            let mut headers = vec![("grpc-timeout", "5m")];
            headers.extend(sent.map(|id| ("x-request-id", id)));
            let res = svc.oneshot(request(&headers)).await.unwrap();
            let given = seen.lock().unwrap().take().unwrap().headers()["x-request-id"].clone();
            assert_eq!(given.len(), 36, "a UUID instead of {sent:?}");
            assert_eq!(res.headers()["x-request-id"], given);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadline_the_call_is_not_timed_and_still_gets_an_id() {
        for timeout in [None, Some("soon")] {
            let seen = Seen::default();
            let svc = layer().layer(inner(Duration::from_secs(3600), seen.clone()));
            let headers: Vec<_> = timeout.map(|t| ("grpc-timeout", t)).into_iter().collect();
            let res = svc.oneshot(request(&headers)).await.unwrap();
            assert!(answered(&res, "answer"), "{timeout:?}");
            let req = seen.lock().unwrap().take().unwrap();
            assert!(req.extensions().get::<Arrival>().is_some());
            assert_eq!(req.headers()["x-request-id"].len(), 36);
        }
    }

    #[test]
    fn the_window_is_the_longest_deadline_any_call_may_get_and_the_caps_the_largest_limits() {
        let policy = |text: &str| Policy::parse(text).unwrap();
        let defaults = inbound::Caps {
            inputs: 1024,
            outputs: 1024,
        };
        assert_eq!(bounds(&policy("")), (Duration::from_secs(30), defaults));
        let p = policy(
            "[defaults]\ntimeout = \"10s\"\n\
             [methods.\"inference.GRPCInferenceService/ModelInfer\"]\ntimeout = \"20s\"\n\
             [models.slow]\nbackend = \"embedded\"\ntimeout = \"90s\"\n\
             [models.slow.limits]\nmax_inputs = 5000\n\
             [models.quick]\nbackend = \"embedded\"\ntimeout = \"1s\"\n\
             [models.quick.limits]\nmax_outputs = 8\n",
        );
        // The slow model's, though the model is only known once a message is decoded.
        let (window, caps) = bounds(&p);
        assert_eq!(window, Duration::from_secs(90));
        assert_eq!((caps.inputs, caps.outputs), (5000, 1024));
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_same_instant_the_calls_own_deadline_answer_wins() {
        // The call's side, as the handler computes it: the client's deadline from the
        // arrival, answered by the call itself when it passes.
        let call = service_fn(|req: http::Request<Body>| async move {
            let Arrival(at) = *req.extensions().get::<Arrival>().unwrap();
            let timeout = req.headers()["grpc-timeout"].to_str().unwrap();
            let (deadline, _) = client_deadline(at, Some(timeout)).unwrap();
            tokio::time::sleep_until(deadline).await;
            Ok::<_, Infallible>(
                http::Response::builder()
                    .header("grpc-status", "4")
                    .body("the call's own answer, with its receipt")
                    .unwrap(),
            )
        });
        let svc = layer().layer(call);
        let start = Instant::now();
        let res = svc
            .oneshot(request(&[("grpc-timeout", "250m")]))
            .await
            .unwrap();
        assert_eq!(Instant::now() - start, Duration::from_millis(250));
        assert!(answered(&res, "the call's own answer, with its receipt"));
    }
}
