//! The breaker's states on paused time, alone and as a layer over a mock service.

use std::time::Duration;

use tower::{Service, ServiceExt, service_fn};

use super::*;
use crate::policy::{ErrorClass, Settings};
use crate::resilience::failure::Failure;

fn settings() -> Breaker {
    Breaker {
        consecutive_failures: 5,
        min_requests: 1000,
        open_for: Duration::from_secs(5),
        max_open_for: Duration::from_secs(20),
        half_open_probes: 2,
        ..Settings::default().breaker
    }
}

fn fail(cell: &BreakerCell, n: u32) {
    for _ in 0..n {
        let a = cell.admit().unwrap();
        cell.record(a, false);
    }
}

#[tokio::test(start_paused = true)]
async fn opens_after_five_consecutive_failures_then_half_opens_and_closes() {
    let cell = BreakerCell::new(settings());
    fail(&cell, 4);
    assert_eq!(cell.state(), BreakerState::Closed);
    let ok = cell.admit().unwrap();
    cell.record(ok, true);
    fail(&cell, 4);
    assert_eq!(
        cell.state(),
        BreakerState::Closed,
        "a success resets the count"
    );
    fail(&cell, 1);
    assert_eq!(cell.state(), BreakerState::Open);
    assert_eq!(cell.trips_total(), 1);
    let refused = cell.admit().unwrap_err();
    assert_eq!(refused.retry_after, Duration::from_secs(5));

    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(cell.state(), BreakerState::HalfOpen);
    let p1 = cell.admit().unwrap();
    let p2 = cell.admit().unwrap();
    assert!(cell.admit().is_err(), "only two probes at once");
    cell.record(p1, true);
    assert_eq!(cell.state(), BreakerState::HalfOpen);
    cell.record(p2, true);
    assert_eq!(cell.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
    let cell = BreakerCell::new(settings());
    fail(&cell, 5);
    let mut expected = [5, 10, 20, 20].into_iter();
    for _ in 0..4 {
        let open = cell.admit().unwrap_err().retry_after;
        assert_eq!(open, Duration::from_secs(expected.next().unwrap()));
        tokio::time::advance(open).await;
        let probe = cell.admit().unwrap();
        cell.record(probe, false);
        assert_eq!(cell.state(), BreakerState::Open);
    }
    assert_eq!(
        cell.trips_total(),
        5,
        "the first trip and four failed probes"
    );
}

#[tokio::test(start_paused = true)]
async fn trips_on_the_failure_ratio_once_min_requests_is_reached() {
    let cell = BreakerCell::new(Breaker {
        consecutive_failures: 1000,
        min_requests: 10,
        failure_ratio: 0.5,
        ..settings()
    });
    for i in 0..9 {
        let a = cell.admit().unwrap();
        cell.record(a, i % 2 == 0);
    }
    assert_eq!(
        cell.state(),
        BreakerState::Closed,
        "9 calls: below min_requests"
    );
    let a = cell.admit().unwrap();
    cell.record(a, false);
    assert_eq!(cell.state(), BreakerState::Open, "5 of 10 failed");
}

#[tokio::test(start_paused = true)]
async fn old_failures_leave_the_window() {
    let cell = BreakerCell::new(Breaker {
        consecutive_failures: 1000,
        min_requests: 4,
        failure_ratio: 0.5,
        window: Duration::from_secs(10),
        ..settings()
    });
    fail(&cell, 3);
    tokio::time::advance(Duration::from_secs(11)).await;
    for _ in 0..3 {
        let a = cell.admit().unwrap();
        cell.record(a, true);
    }
    fail(&cell, 1);
    assert_eq!(
        cell.state(),
        BreakerState::Closed,
        "1 failure of 4 in the window"
    );
}

#[derive(Debug, PartialEq)]
enum E {
    Upstream(ErrorClass),
    Open(BreakerOpen),
    /// A refused connection: transient, and the upstream never saw it.
    Refused,
}

impl std::fmt::Display for E {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl Failure for E {
    fn class(&self) -> ErrorClass {
        match self {
            E::Upstream(c) => *c,
            E::Open(_) => ErrorClass::LocalRejection,
            E::Refused => ErrorClass::Transient,
        }
    }
    fn code(&self) -> tonic::Code {
        tonic::Code::Unavailable
    }
    fn never_sent(&self) -> bool {
        matches!(self, E::Refused)
    }
}

impl From<BreakerOpen> for E {
    fn from(o: BreakerOpen) -> Self {
        E::Open(o)
    }
}

struct Req(Option<Arc<BreakerCell>>, Breaker);

impl HasBreaker for Req {
    fn breaker(&self) -> Option<&Arc<BreakerCell>> {
        self.0.as_ref()
    }
    fn breaker_settings(&self) -> &Breaker {
        &self.1
    }
}

#[tokio::test(start_paused = true)]
async fn the_layer_fails_fast_when_open_and_client_errors_do_not_count() {
    let cell = Arc::new(BreakerCell::new(settings()));
    let mut answers = vec![
        Err(E::Upstream(ErrorClass::ClientError)),
        Err(E::Upstream(ErrorClass::Transient)),
    ];
    let mut svc = BreakerLayer.layer(service_fn(move |_r: Req| {
        let a = answers.pop().unwrap_or(Ok("ok"));
        async move { a }
    }));
    // Answers are popped from the end: a transient failure, a client error, then success.
    let req = || Req(Some(cell.clone()), settings());
    assert_eq!(
        svc.ready().await.unwrap().call(req()).await,
        Err(E::Upstream(ErrorClass::Transient))
    );
    assert_eq!(
        svc.ready().await.unwrap().call(req()).await,
        Err(E::Upstream(ErrorClass::ClientError))
    );
    assert_eq!(cell.state(), BreakerState::Closed);

    let mut failing = BreakerLayer.layer(service_fn(|_r: Req| async {
        Err::<&str, _>(E::Upstream(ErrorClass::ServerBug))
    }));
    for _ in 0..5 {
        let _ = failing.ready().await.unwrap().call(req()).await;
    }
    assert_eq!(cell.state(), BreakerState::Open);
    let out = failing.ready().await.unwrap().call(req()).await;
    assert!(matches!(out, Err(E::Open(BreakerOpen { .. }))), "{out:?}");

    let mut client_errors = BreakerLayer.layer(service_fn(|_r: Req| async {
        Err::<&str, _>(E::Upstream(ErrorClass::ClientError))
    }));
    tokio::time::advance(Duration::from_secs(5)).await;
    for _ in 0..2 {
        let _ = client_errors.ready().await.unwrap().call(req()).await;
    }
    assert_eq!(
        cell.state(),
        BreakerState::Closed,
        "client errors are healthy answers"
    );
    let none = client_errors
        .ready()
        .await
        .unwrap()
        .call(Req(None, settings()))
        .await;
    assert_eq!(
        none,
        Err(E::Upstream(ErrorClass::ClientError)),
        "no breaker: passes"
    );
}

#[tokio::test(start_paused = true)]
async fn refused_connections_do_not_open_the_models_breaker() {
    let cell = Arc::new(BreakerCell::new(settings()));
    let mut refused =
        BreakerLayer.layer(service_fn(|_r: Req| async { Err::<&str, _>(E::Refused) }));
    for _ in 0..20 {
        let out = refused
            .ready()
            .await
            .unwrap()
            .call(Req(Some(cell.clone()), settings()))
            .await;
        assert_eq!(out, Err(E::Refused));
    }
    assert_eq!(
        cell.state(),
        BreakerState::Closed,
        "one endpoint down is the pool's business (ejection)"
    );
}

fn slow_settings() -> Breaker {
    Breaker {
        consecutive_failures: 1000,
        min_requests: 4,
        slow_call_duration: Some(Duration::from_secs(1)),
        slow_call_ratio: 0.5,
        ..settings()
    }
}

#[tokio::test(start_paused = true)]
async fn trips_on_the_slow_share_and_a_slow_probe_reopens() {
    let cell = BreakerCell::new(slow_settings());
    for outcome in [Outcome::Healthy, Outcome::Slow, Outcome::Healthy] {
        let a = cell.admit().unwrap();
        cell.record(a, outcome);
    }
    assert_eq!(cell.state(), BreakerState::Closed, "below min_requests");
    let a = cell.admit().unwrap();
    cell.record(a, Outcome::Slow);
    assert_eq!(cell.state(), BreakerState::Open, "2 of 4 slow");

    tokio::time::advance(Duration::from_secs(5)).await;
    let probe = cell.admit().unwrap();
    cell.record(probe, Outcome::Slow);
    assert_eq!(cell.state(), BreakerState::Open, "a slow probe reopens");
    assert_eq!(cell.trips_total(), 2);
}

#[tokio::test(start_paused = true)]
async fn without_a_slow_call_duration_slowness_never_trips() {
    let cell = BreakerCell::new(Breaker {
        slow_call_duration: None,
        ..slow_settings()
    });
    for _ in 0..10 {
        let a = cell.admit().unwrap();
        cell.record(a, Outcome::Slow);
    }
    assert_eq!(cell.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn the_layer_times_each_call_against_slow_call_duration() {
    let cell = Arc::new(BreakerCell::new(slow_settings()));
    let mut svc = BreakerLayer.layer(service_fn(|r: TimedReq| async move {
        tokio::time::sleep(r.1).await;
        Ok::<_, E>("ok")
    }));
    let mut call = async |wait: Duration| {
        svc.ready()
            .await
            .unwrap()
            .call(TimedReq(cell.clone(), wait))
            .await
    };
    // Two fast, one just at the limit (not slower than it), then two slow: 2 of 5.
    for ms in [10, 20, 1000] {
        assert_eq!(call(Duration::from_millis(ms)).await, Ok("ok"));
    }
    assert_eq!(call(Duration::from_secs(3)).await, Ok("ok"));
    assert_eq!(cell.state(), BreakerState::Closed, "1 of 4 slow");
    assert_eq!(call(Duration::from_secs(3)).await, Ok("ok"));
    assert_eq!(cell.state(), BreakerState::Closed, "2 of 5 slow");
    assert_eq!(call(Duration::from_secs(3)).await, Ok("ok"));
    assert_eq!(cell.state(), BreakerState::Open, "3 of 6 slow");
    let out = call(Duration::ZERO).await;
    assert!(matches!(out, Err(E::Open(_))), "{out:?}");
}

/// A call that takes `.1` to answer, under breaker `.0`.
struct TimedReq(Arc<BreakerCell>, Duration);

impl HasBreaker for TimedReq {
    fn breaker(&self) -> Option<&Arc<BreakerCell>> {
        Some(&self.0)
    }
    fn breaker_settings(&self) -> &Breaker {
        self.0.settings()
    }
}
