//! The client's deadline at the edge: stamps each call's arrival, and answers
//! DEADLINE_EXCEEDED when the client's `grpc-timeout` passes before the service answered.
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
//! # Request id
//!
//! A call with a deadline and no usable `x-request-id` is given a generated one here, in
//! its headers, so the handler and this layer's answer name the same id. A call without a
//! deadline only gets its arrival.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{Either, Empty};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use super::POLICY_REVISION;
use super::context::{GRPC_TIMEOUT, client_deadline, is_usable_request_id, new_request_id};
use crate::error::Error;
use crate::policy::Store;
use crate::resilience::Failure as _;
use crate::transport::Peer;
use crate::upstream::grpc::REQUEST_ID;

/// When a call's request headers arrived, in its extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival(pub Instant);

/// Applies [`EdgeDeadline`].
#[derive(Clone)]
pub struct EdgeDeadlineLayer {
    store: Arc<Store>,
}

impl EdgeDeadlineLayer {
    /// Answers report the revision current in `store`.
    pub fn new(store: Arc<Store>) -> Self {
        EdgeDeadlineLayer { store }
    }
}

impl<S> Layer<S> for EdgeDeadlineLayer {
    type Service = EdgeDeadline<S>;
    fn layer(&self, inner: S) -> EdgeDeadline<S> {
        EdgeDeadline {
            inner,
            store: self.store.clone(),
        }
    }
}

/// Races the inner service against the client's deadline, counted from arrival.
#[derive(Clone)]
pub struct EdgeDeadline<S> {
    inner: S,
    store: Arc<Store>,
}

impl<S, B, RB> Service<http::Request<B>> for EdgeDeadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<Either<RB, Empty<Bytes>>>;
    type Error = S::Error;
    type Future = EdgeDeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let arrival = Instant::now();
        req.extensions_mut().insert(Arrival(arrival));
        let timeout = req
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok());
        let Some((deadline, budget)) = client_deadline(arrival, timeout) else {
            return EdgeDeadlineFuture {
                inner: self.inner.call(req),
                sleep: None,
                expiry: None,
            };
        };
        let expiry = Expiry {
            budget,
            request_id: request_id(&mut req),
            method: req.uri().path_and_query().cloned(),
            peer: req.extensions().get::<Peer>().and_then(|p| p.remote),
            store: self.store.clone(),
        };
        EdgeDeadlineFuture {
            inner: self.inner.call(req),
            sleep: Some(tokio::time::sleep_until(deadline)),
            expiry: Some(expiry),
        }
    }
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

/// What answering a call at its deadline needs.
struct Expiry {
    budget: Duration,
    request_id: Option<HeaderValue>,
    method: Option<http::uri::PathAndQuery>,
    peer: Option<std::net::SocketAddr>,
    store: Arc<Store>,
}

impl Expiry {
    /// Keel's DEADLINE_EXCEEDED, trailers-only, tagged; logged as the handler logs a call.
    fn answer<RB>(self) -> http::Response<Either<RB, Empty<Bytes>>> {
        let revision = self.store.current().revision;
        let e = Error::DeadlineExceeded {
            budget: self.budget,
        };
        tracing::info!(
            request_id = self.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
            method = self.method.as_ref().map_or("", |m| m.path().trim_start_matches('/')),
            class = e.class().as_str(),
            grpc_code = crate::grpc_code::name(e.code()),
            policy_revision = revision,
            client_deadline_ms = self.budget.as_millis() as u64,
            peer = %self.peer.map(|p| p.to_string()).unwrap_or_default(),
            error = %e,
            "request"
        );
        let status = super::status::to_status(&e, None, revision);
        let (mut parts, ()) = status.into_http::<()>().into_parts();
        if let Some(id) = self.request_id {
            parts.headers.insert(REQUEST_ID, id);
        }
        parts
            .headers
            .insert(POLICY_REVISION, HeaderValue::from(revision));
        http::Response::from_parts(parts, Either::Right(Empty::new()))
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
        expiry: Option<Expiry>,
    }
}

impl<F, RB, E> Future for EdgeDeadlineFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = Result<http::Response<Either<RB, Empty<Bytes>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The inner call first: an answer ready at the deadline still counts.
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out.map(|res| res.map(Either::Left)));
        }
        let Some(sleep) = this.sleep.as_pin_mut() else {
            return Poll::Pending;
        };
        ready!(sleep.poll(cx));
        match this.expiry.take() {
            Some(expiry) => Poll::Ready(Ok(expiry.answer())),
            // Polled again after answering.
            None => Poll::Pending,
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

    /// A service that keeps the request it was given and answers OK after `work`.
    fn inner(
        work: Duration,
        seen: Seen,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<&'static str>,
        Error = Infallible,
        Future: Send,
    > + Clone {
        service_fn(move |req: http::Request<()>| {
            *seen.lock().unwrap() = Some(req);
            async move {
                tokio::time::sleep(work).await;
                Ok(http::Response::builder()
                    .header("grpc-status", "0")
                    .body("answer")
                    .unwrap())
            }
        })
    }

    fn request(headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::post("/inference.GRPCInferenceService/ModelInfer");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn layer() -> EdgeDeadlineLayer {
        EdgeDeadlineLayer::new(Arc::new(Store::with_default()))
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
        assert!(matches!(res.body(), Either::Left("answer")));
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
    async fn without_a_deadline_nothing_is_timed_or_added_but_the_arrival() {
        for timeout in [None, Some("soon")] {
            let seen = Seen::default();
            let svc = layer().layer(inner(Duration::from_secs(3600), seen.clone()));
            let headers: Vec<_> = timeout.map(|t| ("grpc-timeout", t)).into_iter().collect();
            let res = svc.oneshot(request(&headers)).await.unwrap();
            assert!(matches!(res.body(), Either::Left("answer")), "{timeout:?}");
            let req = seen.lock().unwrap().take().unwrap();
            assert!(req.extensions().get::<Arrival>().is_some());
            assert!(req.headers().get("x-request-id").is_none());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_same_instant_the_calls_own_deadline_answer_wins() {
        // The call's side, as the handler computes it: the client's deadline from the
        // arrival, answered by the call itself when it passes.
        let call = service_fn(|req: http::Request<()>| async move {
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
        assert!(matches!(
            res.body(),
            Either::Left("the call's own answer, with its receipt")
        ));
    }
}
