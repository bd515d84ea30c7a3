//! The pool's decisions, with paused time and lazy connections (nothing is dialled).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use super::*;
use crate::error::Error;
use crate::policy::{CheckKind, Endpoints, HealthCheck, Outlier, Policy};

fn spec(endpoints: usize, outlier: Outlier) -> UpstreamSpec {
    let list: Vec<String> = (0..endpoints)
        .map(|i| format!("\"127.0.0.1:{}\"", 9001 + i))
        .collect();
    let p = Policy::parse(&format!(
        "[upstreams.up]\nendpoints = [{}]\n",
        list.join(", ")
    ))
    .unwrap();
    UpstreamSpec {
        outlier,
        ..p.upstreams["up"].clone()
    }
}

fn pool(endpoints: usize, outlier: Outlier) -> Pool {
    let spec = spec(endpoints, outlier);
    let Endpoints::Static(uris) = spec.endpoints.clone() else {
        unreachable!()
    };
    Pool::new("up", &spec, &uris, 1 << 20)
}

fn outlier(consecutive_failures: u32, max_ejection_percent: u32) -> Outlier {
    Outlier {
        consecutive_failures,
        base_ejection: Duration::from_secs(10),
        max_ejection: Duration::from_secs(25),
        max_ejection_percent,
        ..Outlier::default()
    }
}

fn standings(p: &Pool) -> Vec<i64> {
    p.states().into_iter().map(|(_, s)| s).collect()
}

#[tokio::test(start_paused = true)]
async fn failures_in_a_row_eject_for_longer_each_time() {
    let p = pool(2, outlier(3, 50));
    let bad = p.endpoints()[0].clone();
    p.record(&bad, Verdict::Failed);
    p.record(&bad, Verdict::Failed);
    // A success in between resets the count.
    p.record(&bad, Verdict::Healthy);
    p.record(&bad, Verdict::Failed);
    p.record(&bad, Verdict::Failed);
    assert_eq!(standings(&p), [0, 0]);
    p.record(&bad, Verdict::Failed);
    assert_eq!(standings(&p), [2, 0]);
    // While it is out, every call goes to the other endpoint.
    for _ in 0..4 {
        assert_eq!(&*p.pick(None).unwrap().addr, "127.0.0.1:9002");
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(standings(&p), [0, 0], "back after base_ejection");
    // On probation: one failure ejects it again, for twice as long.
    p.record(&bad, Verdict::Failed);
    assert_eq!(standings(&p), [2, 0]);
    tokio::time::advance(Duration::from_secs(19)).await;
    assert_eq!(standings(&p), [2, 0]);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(standings(&p), [0, 0]);
    // A success ends the probation: the next ejection is the first again.
    p.record(&bad, Verdict::Healthy);
    for _ in 0..3 {
        p.record(&bad, Verdict::Failed);
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(standings(&p), [0, 0]);
}

#[tokio::test(start_paused = true)]
async fn never_more_than_the_allowed_share_is_ejected() {
    let p = pool(4, outlier(1, 50));
    let all = p.endpoints();
    for e in all.iter() {
        p.record(e, Verdict::Failed);
    }
    assert_eq!(standings(&p).iter().filter(|&&s| s == 2).count(), 2);
    // At least one may always go, even at 0%, while another endpoint serves...
    let two = pool(2, outlier(1, 0));
    two.record(&two.endpoints()[0], Verdict::Failed);
    assert_eq!(standings(&two), [2, 0]);
    // ...but never the last serving one, whatever the share allows.
    let two = pool(2, outlier(1, 100));
    for e in two.endpoints().iter() {
        two.record(e, Verdict::Failed);
    }
    assert_eq!(standings(&two), [2, 0]);
    let one = pool(1, outlier(1, 100));
    for _ in 0..3 {
        one.record(&one.endpoints()[0], Verdict::Failed);
    }
    assert_eq!(
        standings(&one),
        [0],
        "ejecting it would only fail every call"
    );
    assert!(one.pick(None).is_ok());
    assert!(one.healthy());
    // An endpoint that refuses connections is down either way: the last one goes too.
    one.record(&one.endpoints()[0], Verdict::Unreachable);
    assert_eq!(standings(&one), [2]);
    match one.pick(None) {
        Err(Error::NoEndpoint { retry_after, .. }) => {
            assert_eq!(retry_after, Duration::from_secs(10))
        }
        other => panic!("expected every endpoint out, got {other:?}"),
    }
    assert!(!one.healthy());
}

#[tokio::test(start_paused = true)]
async fn ejection_can_be_switched_off() {
    let p = pool(
        2,
        Outlier {
            enabled: false,
            ..outlier(1, 100)
        },
    );
    for _ in 0..10 {
        p.record(&p.endpoints()[0], Verdict::Failed);
    }
    assert_eq!(standings(&p), [0, 0]);
}

#[tokio::test(start_paused = true)]
async fn checks_take_an_endpoint_out_and_back_by_their_thresholds() {
    let p = pool(2, Outlier::default());
    let check = checks(3);
    let e = p.endpoints()[1].clone();
    let fail = || Err("down".to_string());
    p.record_check(&e, &check, e.begin_check(), fail());
    assert_eq!(standings(&p), [0, 0]);
    p.record_check(&e, &check, e.begin_check(), fail());
    assert_eq!(standings(&p), [0, 1]);
    for _ in 0..8 {
        assert_eq!(&*p.pick(None).unwrap().addr, "127.0.0.1:9001");
    }
    p.record_check(&e, &check, e.begin_check(), Ok(()));
    p.record_check(&e, &check, e.begin_check(), Ok(()));
    p.record_check(&e, &check, e.begin_check(), fail());
    p.record_check(&e, &check, e.begin_check(), Ok(()));
    p.record_check(&e, &check, e.begin_check(), Ok(()));
    assert_eq!(standings(&p), [0, 1], "passes must be in a row");
    p.record_check(&e, &check, e.begin_check(), Ok(()));
    assert_eq!(standings(&p), [0, 0]);
}

fn checks(healthy_threshold: u32) -> HealthCheck {
    HealthCheck {
        kind: CheckKind::ServerReady,
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(100),
        unhealthy_threshold: 2,
        healthy_threshold,
    }
}

/// Whether `changed` was told since it was last asked.
fn told(changed: &tokio::sync::Notify) -> bool {
    use futures::FutureExt as _;
    changed.notified().now_or_never().is_some()
}

#[tokio::test(start_paused = true)]
async fn passing_checks_begun_after_an_ejection_end_it_early_on_probation() {
    let changed = Arc::new(tokio::sync::Notify::new());
    let p = pool(2, outlier(1, 50)).notifying(Changed::to(changed.clone()));
    let check = checks(3);
    let e = p.endpoints()[0].clone();
    let pass = |begun| p.record_check(&e, &check, begun, Ok(()));
    // A check in flight when the calls start failing: it passed, but says nothing after.
    let before = e.begin_check();
    p.record(&e, Verdict::Unreachable);
    assert_eq!(standings(&p), [2, 0]);
    assert!(told(&changed));
    pass(before);
    for _ in 0..2 {
        tokio::time::advance(Duration::from_secs(1)).await;
        pass(e.begin_check());
    }
    assert_eq!(
        standings(&p),
        [2, 0],
        "the check begun before does not count"
    );
    // A failure in between: the passes must be in a row.
    tokio::time::advance(Duration::from_secs(1)).await;
    p.record_check(&e, &check, e.begin_check(), Err("down".into()));
    for _ in 0..2 {
        tokio::time::advance(Duration::from_secs(1)).await;
        pass(e.begin_check());
    }
    assert_eq!(
        standings(&p),
        [2, 0],
        "two passes in a row since the failure"
    );
    assert!(!told(&changed));
    tokio::time::advance(Duration::from_secs(1)).await;
    pass(e.begin_check());
    assert_eq!(
        standings(&p),
        [0, 0],
        "back after 3 passes, 6s into a 10s ejection"
    );
    assert!(told(&changed), "readiness is told at once");
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..4 {
        served.insert(p.pick(None).unwrap().addr.to_string());
    }
    assert_eq!(served.len(), 2, "both endpoints take calls: {served:?}");
    // On probation: one failure ejects it again, for twice as long.
    p.record(&e, Verdict::Failed);
    let now = Instant::now();
    assert_eq!(
        e.standing(now),
        Standing::Ejected {
            until: now + Duration::from_secs(20)
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_restarted_endpoint_failing_its_checks_and_ejected_returns_by_its_checks() {
    let p = pool(2, outlier(1, 50));
    let check = checks(2);
    let e = p.endpoints()[1].clone();
    // Killed: its calls are refused and its checks fail.
    p.record(&e, Verdict::Unreachable);
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(1)).await;
        p.record_check(&e, &check, e.begin_check(), Err("refused".into()));
    }
    assert_eq!(standings(&p), [0, 2]);
    // Restarted: two passes bring it back in both respects at once.
    tokio::time::advance(Duration::from_secs(1)).await;
    p.record_check(&e, &check, e.begin_check(), Ok(()));
    assert_eq!(standings(&p), [0, 2]);
    tokio::time::advance(Duration::from_secs(1)).await;
    p.record_check(&e, &check, e.begin_check(), Ok(()));
    assert_eq!(standings(&p), [0, 0]);
}

#[tokio::test(start_paused = true)]
async fn with_uneject_on_health_check_off_an_ejection_runs_its_course() {
    let p = pool(
        2,
        Outlier {
            uneject_on_health_check: false,
            ..outlier(1, 50)
        },
    );
    let check = checks(1);
    let e = p.endpoints()[0].clone();
    p.record(&e, Verdict::Failed);
    for _ in 0..9 {
        tokio::time::advance(Duration::from_secs(1)).await;
        p.record_check(&e, &check, e.begin_check(), Ok(()));
        assert_eq!(standings(&p), [2, 0]);
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(standings(&p), [0, 0], "back after base_ejection");
}

#[tokio::test(start_paused = true)]
async fn every_endpoint_failing_checks_is_unavailable_not_open() {
    let p = pool(1, Outlier::default());
    let check = HealthCheck {
        kind: CheckKind::ServerReady,
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(100),
        unhealthy_threshold: 1,
        healthy_threshold: 1,
    };
    let e = p.endpoints()[0].clone();
    p.record_check(&e, &check, e.begin_check(), Err("down".into()));
    match p.pick(None) {
        Err(Error::UpstreamUnavailable {
            detail, never_sent, ..
        }) => {
            assert!(never_sent);
            assert!(detail.contains("health checks"), "{detail}");
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_avoids_the_endpoint_that_just_failed_unless_it_is_the_only_one() {
    let p = pool(3, Outlier::default());
    for _ in 0..9 {
        assert_ne!(
            &*p.pick(Some("127.0.0.1:9002")).unwrap().addr,
            "127.0.0.1:9002"
        );
    }
    let one = pool(1, Outlier::default());
    assert_eq!(
        &*one.pick(Some("127.0.0.1:9001")).unwrap().addr,
        "127.0.0.1:9001"
    );
}

#[tokio::test(start_paused = true)]
async fn the_less_loaded_of_two_in_turn_is_chosen() {
    let p = pool(2, Outlier::default());
    let busy = p.endpoints()[0].clone();
    let _held: Vec<Pending> = (0..3).map(|_| Pending::start(&busy)).collect();
    for _ in 0..6 {
        assert_eq!(&*p.pick(None).unwrap().addr, "127.0.0.1:9002");
    }
}

/// Answers what the test last set.
struct Stub(Mutex<std::io::Result<Vec<SocketAddr>>>);

impl Resolve for Stub {
    fn resolve(&self, _: &str, _: u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let answer = match &*self.0.lock().unwrap() {
            Ok(a) => Ok(a.clone()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        };
        Box::pin(async move { answer })
    }
}

#[tokio::test(start_paused = true)]
async fn dns_adds_and_removes_endpoints_and_a_removed_one_finishes_its_calls() {
    let p = Policy::parse("[upstreams.up]\ndns = \"models.test:8001\"\n").unwrap();
    let pool = Pool::new("up", &p.upstreams["up"], &[], 1 << 20);
    let addrs =
        |list: &[&str]| -> Vec<SocketAddr> { list.iter().map(|a| a.parse().unwrap()).collect() };
    let stub = Stub(Mutex::new(Ok(addrs(&["127.0.0.2:8001", "127.0.0.1:8001"]))));
    // Before the first answer, calls fail clearly.
    match pool.pick(None) {
        Err(Error::UpstreamUnavailable { detail, .. }) => {
            assert!(detail.contains("models.test"), "{detail}")
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    pool.resolve_once(&stub).await;
    let names =
        |p: &Pool| -> Vec<String> { p.endpoints().iter().map(|e| e.addr.to_string()).collect() };
    assert_eq!(names(&pool), ["127.0.0.1:8001", "127.0.0.2:8001"]);
    // An attempt in flight on the endpoint about to go.
    let leaving = pool.endpoints()[1].clone();
    let in_flight = Pending::start(&leaving);
    let kept = pool.endpoints()[0].clone();
    *stub.0.lock().unwrap() = Ok(addrs(&["127.0.0.1:8001", "127.0.0.3:8001"]));
    pool.resolve_once(&stub).await;
    assert_eq!(names(&pool), ["127.0.0.1:8001", "127.0.0.3:8001"]);
    // The staying endpoint is the same one (its connection and health carry over).
    assert!(Arc::ptr_eq(&kept, &pool.endpoints()[0]));
    // The removed endpoint still holds its attempt, and gets no new one.
    assert_eq!(leaving.pending.load(Ordering::Relaxed), 1);
    for _ in 0..6 {
        assert_ne!(&*pool.pick(None).unwrap().addr, "127.0.0.2:8001");
    }
    drop(in_flight);
    // A failed lookup keeps what there is.
    *stub.0.lock().unwrap() = Err(std::io::Error::other("SERVFAIL"));
    pool.resolve_once(&stub).await;
    assert_eq!(names(&pool), ["127.0.0.1:8001", "127.0.0.3:8001"]);
}
