//! The retry layer on paused time against a scripted mock service.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};

use super::*;
use crate::policy::{Budget, ErrorClass};
use crate::resilience::RetryBudget;
use crate::resilience::test_support::{E, Req, e};

/// A service answering from a script, recording the attempt numbers it saw.
fn scripted(
    answers: Vec<Result<&'static str, E>>,
) -> (
    impl Service<Req, Response = &'static str, Error = E, Future: Send> + Clone,
    Arc<Mutex<Vec<u32>>>,
) {
    let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let svc = service_fn(move |r: Req| {
        log.lock().unwrap().push(r.attempt);
        let a = answers.lock().unwrap().pop_front().unwrap_or(Ok("ok"));
        async move { a }
    });
    (svc, seen)
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_until_success_with_growing_waits() {
    let (svc, seen) = scripted(vec![
        Err(e(ErrorClass::Transient)),
        Err(e(ErrorClass::Overloaded)),
    ]);
    let req = Req::new("r1", Duration::from_secs(10));
    let receipt = req.receipt.clone();
    let out = RetryLayer.layer(svc).oneshot(req).await;
    assert_eq!(out, Ok("ok"));
    assert_eq!(
        *seen.lock().unwrap(),
        [1, 2, 3],
        "every attempt is numbered"
    );
    let r = receipt.read();
    assert_eq!(r.attempts, 3);
    assert_eq!(r.delays.len(), 2);
    assert!(r.delays[0] <= Duration::from_millis(25));
    assert!(r.delays[1] <= Duration::from_millis(50));
}

#[tokio::test(start_paused = true)]
async fn the_same_request_id_waits_the_same() {
    let run = |id| async move {
        let (svc, _) = scripted(vec![Err(e(ErrorClass::Transient)); 3]);
        let req = Req::new(id, Duration::from_secs(10));
        let receipt = req.receipt.clone();
        let _ = RetryLayer.layer(svc).oneshot(req).await;
        receipt.read().delays
    };
    let a = run("same").await;
    assert_eq!(a.len(), 3);
    assert_eq!(a, run("same").await);
    assert_ne!(a, run("other").await);
}

#[tokio::test(start_paused = true)]
async fn client_errors_and_exhausted_attempts_are_not_retried() {
    let (svc, seen) = scripted(vec![Err(e(ErrorClass::ClientError))]);
    let out = RetryLayer
        .layer(svc)
        .oneshot(Req::new("r", Duration::from_secs(10)))
        .await;
    assert_eq!(out, Err(e(ErrorClass::ClientError)));
    assert_eq!(seen.lock().unwrap().len(), 1, "exactly one attempt");

    let (svc, seen) = scripted(vec![Err(e(ErrorClass::Transient)); 10]);
    let out = RetryLayer
        .layer(svc)
        .oneshot(Req::new("r", Duration::from_secs(10)))
        .await;
    assert_eq!(out, Err(e(ErrorClass::Transient)));
    assert_eq!(seen.lock().unwrap().len(), 4, "max_attempts");
}

#[tokio::test(start_paused = true)]
async fn a_retry_never_sleeps_past_the_deadline() {
    let (svc, seen) = scripted(vec![Err(e(ErrorClass::Transient)); 10]);
    let mut req = Req::new("r", Duration::from_millis(100));
    req.retry.initial_backoff = Duration::from_millis(80);
    req.retry.max_backoff = Duration::from_millis(80);
    req.retry.jitter = crate::policy::Jitter::None;
    let deadline = req.deadline;
    let out = RetryLayer.layer(svc).oneshot(req).await;
    assert!(out.is_err());
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "80ms fits once in 100ms, not twice"
    );
    assert!(Instant::now() <= deadline);
}

#[tokio::test(start_paused = true)]
async fn no_retry_is_started_that_the_expected_latency_cannot_finish() {
    let (svc, seen) = scripted(vec![Err(e(ErrorClass::Transient)); 10]);
    let req = Req::new("r", Duration::from_millis(100));
    req.latency.observe(Duration::from_millis(200));
    let _ = RetryLayer.layer(svc).oneshot(req).await;
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "a 200ms attempt cannot fit in 100ms"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hopeless_call_is_refused_up_front_when_asked() {
    let (svc, seen) = scripted(vec![]);
    let mut req = Req::new("r", Duration::from_millis(10));
    req.latency.observe(Duration::from_millis(50));
    req.hopeless = true;
    let out = RetryLayer.layer(svc.clone()).oneshot(req.clone()).await;
    assert_eq!(out, Err(e(ErrorClass::DeadlineExceeded)));
    assert!(seen.lock().unwrap().is_empty(), "not even one attempt");
    req.hopeless = false;
    assert_eq!(RetryLayer.layer(svc).oneshot(req).await, Ok("ok"));
}

#[tokio::test(start_paused = true)]
async fn pushback_replaces_the_backoff_and_a_negative_one_stops() {
    let mut pushed = e(ErrorClass::Overloaded);
    pushed.pushback = Pushback::After(Duration::from_millis(300));
    let (svc, _) = scripted(vec![Err(pushed)]);
    let req = Req::new("r", Duration::from_secs(10));
    let receipt = req.receipt.clone();
    assert_eq!(RetryLayer.layer(svc).oneshot(req).await, Ok("ok"));
    assert_eq!(receipt.read().delays, [Duration::from_millis(300)]);

    let mut stop = e(ErrorClass::Overloaded);
    stop.pushback = Pushback::Stop;
    let (svc, seen) = scripted(vec![Err(stop.clone())]);
    assert_eq!(
        RetryLayer
            .layer(svc)
            .oneshot(Req::new("r", Duration::from_secs(10)))
            .await,
        Err(stop)
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_calls_are_retried_only_when_never_sent() {
    let (svc, seen) = scripted(vec![Err(e(ErrorClass::Transient))]);
    let mut req = Req::new("r", Duration::from_secs(10));
    req.idempotent = false;
    assert!(RetryLayer.layer(svc).oneshot(req.clone()).await.is_err());
    assert_eq!(seen.lock().unwrap().len(), 1);

    let mut refused = e(ErrorClass::Transient);
    refused.never_sent = true;
    let (svc, seen) = scripted(vec![Err(refused)]);
    assert_eq!(RetryLayer.layer(svc).oneshot(req).await, Ok("ok"));
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn against_an_always_failing_upstream_the_budget_caps_attempts_per_call() {
    let budget = Arc::new(RetryBudget::new(Budget {
        ratio: 0.2,
        min_per_sec: 1,
        window: Duration::from_secs(10),
    }));
    let failing = service_fn(|_: Req| async { Err::<&str, _>(e(ErrorClass::Transient)) });
    let calls = 500;
    let mut attempts = 0;
    let mut exhausted = 0;
    for _ in 0..calls {
        let mut req = Req::new("r", Duration::from_secs(10));
        req.budget = budget.clone();
        let receipt = req.receipt.clone();
        let _ = RetryLayer.layer(failing).oneshot(req).await;
        let r = receipt.read();
        attempts += r.attempts;
        exhausted += u32::from(r.budget_exhausted);
        // Calls keep arriving while the window moves.
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    let per_call = f64::from(attempts) / f64::from(calls);
    // 1 + ratio, plus the floor (1/s over the 5s the calls took, spread over 500 calls).
    assert!(per_call <= 1.0 + 0.2 + 0.05, "attempts per call {per_call}");
    assert!(exhausted > 0, "the budget said no and the receipt shows it");
}
