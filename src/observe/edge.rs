//! Counts every RPC the server handles, under gRPC's conventional names
//! (`grpc_server_started_total`, `grpc_server_handled_total`, `grpc_server_handling_seconds`),
//! at the HTTP level so calls tonic answers itself (unknown methods, oversized messages)
//! count too.
//!
//! The status is read from the response headers of a trailers-only answer, or from the
//! trailers at the end of the body; a body dropped before its trailers counts as CANCELLED.
//! The `grpc_code` label is go-grpc-prometheus's spelling (`OK`, `NotFound`,
//! `Unavailable`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use tonic::Code;

use super::frames::{Polled, Watch, Watched};
use super::metrics::{Metrics, RpcSeries, ServerLabels};
use crate::grpc_code;

/// The methods the server knows, with their gRPC type; other paths count as `unknown`, so
/// client input never creates a label.
#[derive(Clone, Debug, Default)]
pub struct KnownMethods(Arc<HashMap<String, &'static str>>);

impl KnownMethods {
    /// From `(service, method, client_streaming, server_streaming)` entries.
    pub fn new(methods: impl IntoIterator<Item = (String, String, bool, bool)>) -> Self {
        KnownMethods(Arc::new(
            methods
                .into_iter()
                .map(|(s, m, cs, ss)| {
                    let kind = match (cs, ss) {
                        (false, false) => "unary",
                        (true, false) => "client_stream",
                        (false, true) => "server_stream",
                        (true, true) => "bidi_stream",
                    };
                    (format!("/{s}/{m}"), kind)
                })
                .collect(),
        ))
    }

    fn labels(&self, path: &str) -> ServerLabels {
        match self.0.get(path) {
            Some(kind) => {
                let (service, method) = path[1..].split_once('/').unwrap_or(("unknown", "unknown"));
                ServerLabels {
                    grpc_type: kind,
                    grpc_service: service.to_string(),
                    grpc_method: method.to_string(),
                }
            }
            None => ServerLabels {
                grpc_type: "unknown",
                grpc_service: "unknown".into(),
                grpc_method: "unknown".into(),
            },
        }
    }
}

/// A method's series at the edge.
type Series = RpcSeries<ServerLabels>;

/// The series of every known method, and of `unknown`, for one [`Metrics`].
#[derive(Debug)]
struct Methods {
    known: HashMap<String, Arc<Series>>,
    unknown: Arc<Series>,
}

impl Methods {
    fn new(known: &KnownMethods) -> Methods {
        Methods {
            known: known
                .0
                .keys()
                .map(|path| (path.clone(), Arc::new(Series::new(known.labels(path)))))
                .collect(),
            unknown: Arc::new(Series::new(known.labels(""))),
        }
    }

    fn of(&self, path: &str) -> &Arc<Series> {
        self.known.get(path).unwrap_or(&self.unknown)
    }
}

/// Applies [`EdgeMetrics`].
#[derive(Clone, Debug)]
pub struct EdgeMetricsLayer {
    metrics: Arc<Metrics>,
    methods: Arc<Methods>,
}

impl EdgeMetricsLayer {
    /// Counts into `metrics`, labelling the `known` methods.
    pub fn new(metrics: Arc<Metrics>, known: KnownMethods) -> Self {
        EdgeMetricsLayer {
            metrics,
            methods: Arc::new(Methods::new(&known)),
        }
    }
}

impl<S> Layer<S> for EdgeMetricsLayer {
    type Service = EdgeMetrics<S>;
    fn layer(&self, inner: S) -> EdgeMetrics<S> {
        EdgeMetrics {
            inner,
            metrics: self.metrics.clone(),
            methods: self.methods.clone(),
        }
    }
}

/// Counts RPCs and their outcomes.
#[derive(Clone, Debug)]
pub struct EdgeMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
    methods: Arc<Methods>,
}

/// What a finished RPC records.
struct Record {
    metrics: Arc<Metrics>,
    series: Arc<Series>,
    start: Instant,
}

impl Record {
    fn finish(self, code: Code) {
        self.series.handled(&self.metrics, code).inc();
        self.series
            .handling(&self.metrics)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl<S, B, RB> Service<http::Request<B>> for EdgeMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<Observed<RB>>;
    type Error = S::Error;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let series = self.methods.of(req.uri().path()).clone();
        series.started(&self.metrics).inc();
        EdgeFuture {
            fut: self.inner.call(req),
            record: Some(Record {
                metrics: self.metrics.clone(),
                series,
                start: Instant::now(),
            }),
        }
    }
}

pin_project! {
    /// The response future of [`EdgeMetrics`].
    pub struct EdgeFuture<F> {
        #[pin]
        fut: F,
        record: Option<Record>,
    }
}

impl<F, RB, E> std::future::Future for EdgeFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = Result<http::Response<Observed<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.fut.poll(cx));
        let record = this.record.take();
        Poll::Ready(out.map(|res| {
            let (parts, body) = res.into_parts();
            // A trailers-only answer: the status is in the headers.
            let record = match (record, parts.headers.get(grpc_code::GRPC_STATUS)) {
                (Some(r), Some(status)) => {
                    r.finish(grpc_code::code_of_status(status.as_bytes()));
                    None
                }
                (r, _) => r,
            };
            http::Response::from_parts(parts, Watched::new(body, Recording(record)))
        }))
    }
}

/// A response body that records its RPC when its trailers pass, or when dropped.
pub type Observed<B> = Watched<B, Recording>;

/// The record of one RPC, finished by the first frame that tells its outcome.
pub struct Recording(Option<Record>);

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.finish(Code::Cancelled);
        }
    }
}

impl<B: Body> Watch<B> for Recording {
    fn frame(&mut self, frame: Polled<B>) -> Polled<B> {
        match &frame {
            Some(Ok(f)) => {
                if let Some(status) = f.trailers_ref().and_then(|t| t.get(grpc_code::GRPC_STATUS))
                    && let Some(r) = self.0.take()
                {
                    r.finish(grpc_code::code_of_status(status.as_bytes()));
                }
            }
            Some(Err(_)) | None => {
                if let Some(r) = self.0.take() {
                    r.finish(if frame.is_none() {
                        Code::Ok
                    } else {
                        Code::Unknown
                    });
                }
            }
        }
        frame
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use tower::ServiceExt;

    use super::*;
    use http_body::Frame;

    type Frames = Vec<Result<Frame<Bytes>, Infallible>>;
    type TestBody =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    /// Answers `/s/M` with the status header `header` (a trailers-only answer) and `frames`.
    async fn call(
        metrics: &Arc<Metrics>,
        header: Option<&'static str>,
        frames: Frames,
    ) -> http::Response<Observed<TestBody>> {
        let mut res = http::Response::new(StreamBody::new(futures::stream::iter(frames)));
        if let Some(code) = header {
            res.headers_mut()
                .insert("grpc-status", code.parse().unwrap());
        }
        let res = Arc::new(Mutex::new(Some(res)));
        let known = KnownMethods::new([("s".to_string(), "M".to_string(), false, false)]);
        let svc = EdgeMetricsLayer::new(metrics.clone(), known).layer(tower::service_fn(
            move |_: http::Request<()>| {
                let res = res.lock().unwrap().take().unwrap();
                async move { Ok::<_, Infallible>(res) }
            },
        ));
        let req = http::Request::builder().uri("/s/M").body(()).unwrap();
        svc.oneshot(req).await.unwrap()
    }

    fn trailers(code: &str) -> Frames {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", code.parse().unwrap());
        vec![
            Ok(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(t)),
        ]
    }

    fn handled(metrics: &Metrics, code: &str) -> bool {
        metrics.render().contains(&format!(
            "grpc_server_handled_total{{grpc_type=\"unary\",grpc_service=\"s\",grpc_method=\"M\",grpc_code=\"{code}\"}} 1"
        ))
    }

    #[tokio::test]
    async fn codes_are_counted_in_go_grpc_prometheus_spelling() {
        let metrics = Metrics::new();
        // A trailers-only answer: the status is in the headers.
        drop(call(&metrics, Some("5"), vec![]).await);
        // A status in the trailers, read to the end.
        let body = call(&metrics, None, trailers("14")).await.into_body();
        body.collect().await.unwrap();
        // A body that ends without trailers.
        let body = call(&metrics, None, vec![]).await.into_body();
        body.collect().await.unwrap();
        // A body dropped before its trailers: the client went away.
        drop(call(&metrics, None, trailers("0")).await);
        for code in ["NotFound", "Unavailable", "OK", "Canceled"] {
            assert!(handled(&metrics, code), "{code} in\n{}", metrics.render());
        }
        assert!(!metrics.render().contains("CANCELLED"));
    }
}
