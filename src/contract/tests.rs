use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt as _;
use tower::{Layer as _, Service, ServiceExt as _};

use super::*;
use crate::call::{Call, CallContext};
use crate::error::Error;
use crate::model::{
    ContentForm, DataType, InferRequest, InferResponse, ModelMetadata, ModelSpec, ModelStats,
    Parameters, Tensor, TensorSpec,
};
use crate::resilience::ValidateLayer;
use crate::upstream::{Attempt, BackendFuture, ConfigQuery, ReadyQuery, StatisticsQuery};

/// A backend whose contract fetches are counted and may be made to fail.
#[derive(Debug, Default)]
struct Fake {
    fetches: AtomicU32,
    failing: std::sync::atomic::AtomicBool,
    /// The model's input `x` has 5 columns instead of 4 (a new version upstream).
    widened: std::sync::atomic::AtomicBool,
}

fn unused<T: Send + 'static>() -> BackendFuture<T> {
    futures::future::pending().boxed()
}

impl Backend for Fake {
    fn infer(&self, _: Attempt<InferRequest>) -> BackendFuture<InferResponse> {
        unused()
    }
    fn model_ready(&self, _: Attempt<ReadyQuery>) -> BackendFuture<bool> {
        unused()
    }
    fn model_metadata(&self, _: Attempt<MetadataQuery>) -> BackendFuture<ModelMetadata> {
        unused()
    }
    fn model_config(&self, _: Attempt<ConfigQuery>) -> BackendFuture<ModelSpec> {
        unused()
    }
    fn model_statistics(&self, _: Attempt<StatisticsQuery>) -> BackendFuture<Vec<ModelStats>> {
        unused()
    }
    fn describe(&self) -> String {
        "fake".into()
    }
    fn contract(&self, _: Attempt<MetadataQuery>) -> BackendFuture<Contract> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let failing = self.failing.load(Ordering::SeqCst);
        let columns = if self.widened.load(Ordering::SeqCst) {
            5
        } else {
            4
        };
        async move {
            // Takes a while, so concurrent first calls overlap.
            tokio::time::sleep(Duration::from_millis(10)).await;
            if failing {
                return Err(Error::UpstreamUnavailable {
                    upstream: "fake".into(),
                    detail: "down".into(),
                    never_sent: true,
                });
            }
            Ok(Contract::of_metadata(
                ModelMetadata {
                    name: "m".into(),
                    versions: vec!["1".into()],
                    platform: "fake".into(),
                    inputs: vec![TensorSpec::new("x", DataType::Fp32, &[-1, columns])],
                    outputs: vec![TensorSpec::new("y", DataType::Fp32, &[-1, 3])],
                },
                None,
            ))
        }
        .boxed()
    }
}

fn cache() -> (Arc<Fake>, Arc<Contracts>) {
    let fake = Arc::new(Fake::default());
    let contracts = Arc::new(Contracts::new(fake.clone(), "m".into()));
    (fake, contracts)
}

async fn get(contracts: &Arc<Contracts>) -> Option<Arc<Contract>> {
    let ctx = crate::testing::call_context("simple", Duration::from_secs(3600)).unwrap();
    match contracts.lookup("", ctx.deadline) {
        Lookup::Known(c) => Some(c),
        Lookup::Unknown => None,
        Lookup::Fetch(f) => f.await,
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_calls_share_one_fetch_and_later_calls_use_the_cache() {
    let (fake, contracts) = cache();
    let (a, b) = futures::future::join(get(&contracts), get(&contracts)).await;
    assert_eq!(a.unwrap().inputs[0].name, "x");
    assert!(b.is_some());
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 1);
    assert!(get(&contracts).await.is_some());
    assert_eq!(
        fake.fetches.load(Ordering::SeqCst),
        1,
        "served from the cache"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stale_contract_keeps_serving_while_it_is_refreshed_in_the_background() {
    let (fake, contracts) = cache();
    get(&contracts).await.unwrap();
    tokio::time::advance(REFRESH).await;
    fake.failing.store(true, Ordering::SeqCst);
    // Due for a refresh: the old contract answers at once, the refresh runs aside.
    assert!(get(&contracts).await.is_some());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 2);
    // The refresh failed: the stale contract still serves, and is tried again after RETRY.
    assert!(get(&contracts).await.is_some());
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 2);
    tokio::time::advance(RETRY).await;
    assert!(get(&contracts).await.is_some());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_failed_fetch_leaves_the_contract_unknown_until_the_retry_is_due() {
    let (fake, contracts) = cache();
    fake.failing.store(true, Ordering::SeqCst);
    assert!(get(&contracts).await.is_none());
    assert!(get(&contracts).await.is_none());
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 1, "no fetch per call");
    fake.failing.store(false, Ordering::SeqCst);
    tokio::time::advance(RETRY).await;
    assert!(get(&contracts).await.is_some());
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 2);
}

/// The inner service of the layer tests: counts the calls that reach it.
#[derive(Clone, Default)]
struct Counting(Arc<AtomicU32>);

impl Service<Call<InferRequest>> for Counting {
    type Response = ();
    type Error = Error;
    type Future = futures::future::Ready<Result<(), Error>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Call<InferRequest>) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        futures::future::ready(Ok(()))
    }
}

fn simple(inputs: &[&str]) -> InferRequest {
    InferRequest {
        model: "simple".into(),
        version: String::new(),
        id: String::new(),
        parameters: Parameters::new(),
        inputs: inputs
            .iter()
            .map(|n| Tensor::from_values(*n, vec![1, 16], &[0i32; 16]).unwrap())
            .collect(),
        outputs: vec![],
        form: ContentForm::Raw,
        wire: Default::default(),
    }
}

#[tokio::test]
async fn a_request_that_breaks_the_contract_never_reaches_the_inner_service() {
    let ctx = crate::testing::call_context("simple", Duration::from_secs(60)).unwrap();
    let inner = Counting::default();
    let mut svc = ValidateLayer.layer(inner.clone());
    let good = Call::new(ctx.clone(), simple(&["INPUT0", "INPUT1"]));
    svc.ready().await.unwrap().call(good).await.unwrap();
    assert_eq!(inner.0.load(Ordering::SeqCst), 1);

    let bad = Call::new(ctx.clone(), simple(&["INPUT0", "INPUT9"]));
    let e = svc.ready().await.unwrap().call(bad).await.unwrap_err();
    let Error::InvalidRequest(r) = &e else {
        panic!("{e}")
    };
    let fields: Vec<&str> = r.violations().iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, ["inputs[1].name", "inputs"]);
    assert_eq!(
        inner.0.load(Ordering::SeqCst),
        1,
        "the inner service was not called"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_request_has_the_contract_fetched_again_at_most_once_per_retry() {
    let (fake, contracts) = cache();
    let ctx = crate::testing::call_context("simple", Duration::from_secs(3600)).unwrap();
    let columns = |c: Option<Arc<Contract>>| c.map(|c| c.inputs[0].dims.clone());
    assert_eq!(columns(get(&contracts).await), Some(vec![-1, 4]));
    fake.widened.store(true, Ordering::SeqCst);

    // Fetched a moment ago: the refusal stands without asking the upstream again.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(contracts.recheck("", ctx.deadline).is_none());
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 1);

    // Older than RETRY: one fetch, shared by every refused request meanwhile.
    tokio::time::advance(RETRY).await;
    let first = contracts.recheck("", ctx.deadline).unwrap();
    let second = contracts.recheck("", ctx.deadline).unwrap();
    let (a, b) = futures::future::join(first, second).await;
    assert_eq!(columns(a), Some(vec![-1, 5]));
    assert_eq!(columns(b), Some(vec![-1, 5]));
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 2);
    assert_eq!(columns(get(&contracts).await), Some(vec![-1, 5]), "cached");
    assert!(contracts.recheck("", ctx.deadline).is_none(), "fresh again");
    assert!(
        contracts.recheck("7", ctx.deadline).is_none(),
        "a version never fetched is not rechecked"
    );
}

#[tokio::test(start_paused = true)]
async fn the_layer_lets_a_request_through_once_the_refetched_contract_takes_it() {
    let (fake, contracts) = cache();
    let base = crate::testing::call_context("simple", Duration::from_secs(3600)).unwrap();
    let mut route = base.route.clone();
    let t = &base.route.target;
    route.target = Arc::new(crate::route::Target {
        backend: t.backend.clone(),
        upstream: t.upstream.clone(),
        breaker: None,
        latency: t.latency.clone(),
        budget: t.budget.clone(),
        contracts,
    });
    let ctx = Arc::new(CallContext {
        request_id: base.request_id.clone(),
        deadline: base.deadline,
        budget: base.budget,
        margin: base.margin,
        metadata: base.metadata.clone(),
        snapshot: base.snapshot.clone(),
        route,
        receipt: Default::default(),
        trace: None,
        pinned: false,
        priority: base.priority,
    });
    let wide = || {
        let mut r = simple(&[]);
        r.inputs = vec![Tensor::from_values("x", vec![1, 5], &[0f32; 5]).unwrap()];
        Call::new(ctx.clone(), r)
    };
    let inner = Counting::default();
    let mut svc = ValidateLayer.layer(inner.clone());
    let mut send = async || svc.ready().await.unwrap().call(wide()).await;

    assert!(send().await.is_err(), "the model takes 4 columns");
    fake.widened.store(true, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(send().await.is_err(), "a fresh contract's refusal stands");
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 1);

    tokio::time::advance(RETRY).await;
    send().await.unwrap();
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 2);
    assert_eq!(
        inner.0.load(Ordering::SeqCst),
        1,
        "only the last call went on"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_metadata_endpoint_is_not_asked_once_per_refused_request() {
    let (fake, contracts) = cache();
    let ctx = crate::testing::call_context("simple", Duration::from_secs(3600)).unwrap();
    get(&contracts).await.unwrap();
    fake.failing.store(true, Ordering::SeqCst);
    tokio::time::advance(RETRY).await;
    let failed = contracts.recheck("", ctx.deadline).unwrap().await;
    assert!(failed.is_some(), "the stale contract still answers");
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 2);
    // Right after a failed attempt: no new fetch, however many requests are refused.
    for _ in 0..5 {
        assert!(contracts.recheck("", ctx.deadline).is_none());
    }
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 2);
    tokio::time::advance(RETRY).await;
    assert!(contracts.recheck("", ctx.deadline).is_some());
}
