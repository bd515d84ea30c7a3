//! Micro-benchmarks of the resilience stack: the overhead of every layer on the success
//! path over an in-process no-op service, and the cost of one retry decision.
//!
//! `cargo bench --bench resilience`; figures are recorded in docs/benchmarks.md.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keel::Error;
use keel::call::Call;
use keel::model::{ContentForm, InferRequest, Parameters};
use keel::resilience::{
    AttemptLayer, BreakerLayer, DeadlineLayer, HedgeLayer, LimitLayer, RetryLayer, decide,
};
use tower::{ServiceBuilder, ServiceExt, service_fn};

fn request() -> InferRequest {
    InferRequest {
        model: "simple".into(),
        version: String::new(),
        id: String::new(),
        parameters: Parameters::new(),
        inputs: vec![],
        outputs: vec![],
        form: ContentForm::Raw,
        wire: Default::default(),
    }
}

fn stack(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let ctx = keel::testing::call_context("simple", Duration::from_secs(3600)).unwrap();
    let call = Call::new(ctx, request());
    let noop = service_fn(|_: Call<InferRequest>| std::future::ready(Ok::<_, Error>(())));
    let layered = ServiceBuilder::new()
        .layer(DeadlineLayer)
        .layer(LimitLayer)
        .layer(RetryLayer)
        .layer(HedgeLayer)
        .layer(BreakerLayer)
        .layer(AttemptLayer)
        .service(noop);
    let bare = noop;
    c.bench_function("no-op service alone", |b| {
        b.to_async(&rt).iter(|| {
            let (call, svc) = (call.clone(), bare);
            async move { black_box(svc.oneshot(call).await) }
        })
    });
    c.bench_function("no-op service under the whole resilience stack", |b| {
        b.to_async(&rt).iter(|| {
            let (call, svc) = (call.clone(), layered.clone());
            async move { black_box(svc.oneshot(call).await) }
        })
    });
}

fn retry_decision(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let ctx = keel::testing::call_context("simple", Duration::from_secs(3600)).unwrap();
    let call = Call::new(ctx, request());
    let error = Error::UpstreamUnavailable {
        upstream: "triton".into(),
        detail: "connection reset".into(),
        never_sent: false,
    };
    c.bench_function("one retry decision (backoff, deadline, budget)", |b| {
        b.iter(|| black_box(decide(&call, 1, &error)))
    });
}

criterion_group!(benches, stack, retry_decision);
criterion_main!(benches);
