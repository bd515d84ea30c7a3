//! The resilience layers add no heap allocation per call on the success path: every
//! layer's state is reached through the call's shared context, and their futures are
//! named, not boxed.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keel::Error;
use keel::call::Call;
use keel::model::{ContentForm, InferRequest, Parameters};
use keel::resilience::{
    AttemptLayer, BreakerLayer, DeadlineLayer, HedgeLayer, LimitLayer, RetryLayer,
};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[tokio::test(flavor = "current_thread")]
async fn the_success_path_through_every_layer_allocates_nothing() {
    let ctx = keel::testing::call_context("simple", Duration::from_secs(3600)).unwrap();
    let call = Call::new(
        ctx,
        InferRequest {
            model: "simple".into(),
            version: String::new(),
            id: String::new(),
            parameters: Parameters::new(),
            inputs: vec![],
            outputs: vec![],
            form: ContentForm::Raw,
            wire: Default::default(),
        },
    );
    let noop = service_fn(|_: Call<InferRequest>| std::future::ready(Ok::<_, Error>(())));
    let mut svc = ServiceBuilder::new()
        .layer(DeadlineLayer)
        .layer(LimitLayer)
        .layer(RetryLayer)
        .layer(HedgeLayer)
        .layer(BreakerLayer)
        .layer(AttemptLayer)
        .service(noop);
    // Warm up: the timer wheel and first-use structures allocate once.
    for _ in 0..10 {
        svc.ready().await.unwrap().call(call.clone()).await.unwrap();
    }
    let _profiler = dhat::Profiler::builder().testing().build();
    let before = dhat::HeapStats::get();
    for _ in 0..1000 {
        svc.ready().await.unwrap().call(call.clone()).await.unwrap();
    }
    let after = dhat::HeapStats::get();
    let blocks = after.total_blocks - before.total_blocks;
    assert_eq!(
        blocks, 0,
        "{blocks} allocations in 1000 calls through the stack"
    );
}
