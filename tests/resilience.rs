//! The resilience stack, black box over loopback against a scripted upstream whose answers
//! each test scripts per request id: transient failures are retried away, client errors are
//! not retried, a hung upstream gives DEADLINE_EXCEEDED on time, a failing one opens the
//! breaker and recovers, pushback and budgets are honoured, and load is shed.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use tonic::{Code, Request};
use tonic_types::StatusExt;

fn request(id: &str) -> Request<keel::pb::inference::ModelInferRequest> {
    let mut req = Request::new(simple_request());
    req.metadata_mut()
        .insert("x-request-id", id.parse().unwrap());
    req
}

#[tokio::test]
async fn transient_failures_are_retried_and_the_receipt_says_so() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(addr, "")).await;
    let mut client = keel.client().await;
    up.plan(
        "t1",
        vec![
            Step::Fail(Code::Unavailable, None),
            Step::Fail(Code::Unavailable, None),
        ],
    );
    let resp = client.model_infer(request("t1")).await.unwrap();
    assert_eq!(number(&resp, "keel-attempts"), 3);
    let delays = resp
        .metadata()
        .get("keel-retry-delays-ms")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(delays.split(',').count(), 2, "{delays}");
    assert!(
        resp.metadata()
            .get("keel-served-by")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("up@127.0.0.1:")
    );
    let seen = up.seen_for("t1");
    assert_eq!(seen.len(), 3, "one call, three attempts, one request id");
    let previous: Vec<Option<&str>> = seen
        .iter()
        .map(|s| {
            s.metadata
                .get("grpc-previous-rpc-attempts")
                .map(|v| v.to_str().unwrap())
        })
        .collect();
    assert_eq!(previous, [None, Some("1"), Some("2")]);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_error_is_answered_at_once_with_one_attempt() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(addr, "")).await;
    let mut client = keel.client().await;
    up.plan("c1", vec![Step::Fail(Code::InvalidArgument, None)]);
    let s = client.model_infer(request("c1")).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(up.seen_for("c1").len(), 1);
    let info = s.get_details_error_info().unwrap();
    assert_eq!(info.metadata["class"], "client_error");
    assert_eq!(info.metadata["attempts"], "1");
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_hung_upstream_gives_deadline_exceeded_on_time_with_what_was_tried() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(addr, "[defaults]\ntimeout = \"300ms\"")).await;
    let mut client = keel.client().await;
    up.plan(
        "h1",
        vec![
            Step::Fail(Code::Unavailable, None),
            Step::Delay(Duration::from_secs(60)),
        ],
    );
    let start = tokio::time::Instant::now();
    let s = client.model_infer(request("h1")).await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(s.code(), Code::DeadlineExceeded);
    assert!(
        took < Duration::from_secs(5),
        "answered at the deadline, not after the hang: {took:?}"
    );
    assert!(
        s.message()
            .starts_with("deadline of 300ms exceeded after 2 attempt(s); last error:"),
        "{}",
        s.message()
    );
    let info = s.get_details_error_info().unwrap();
    assert_eq!(info.reason, "DEADLINE_EXCEEDED");
    assert_eq!(info.metadata["attempts"], "2");
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn the_breaker_opens_after_the_threshold_and_closes_after_recovery() {
    let up = ScriptedUpstream::new(Script::failing(Code::Unavailable, "down"));
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(
        addr,
        "[defaults.retry]\nmax_attempts = 1\n[defaults.breaker]\nconsecutive_failures = 3\nopen_for = \"200ms\"\nhalf_open_probes = 1",
    ))
    .await;
    let mut client = keel.client().await;
    for i in 0..3 {
        let s = client
            .model_infer(request(&format!("b{i}")))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "UPSTREAM_UNAVAILABLE"
        );
    }
    let s = client.model_infer(request("b3")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    let info = s.get_details_error_info().unwrap();
    assert_eq!(info.reason, "BREAKER_OPEN", "{s:?}");
    assert!(
        s.message()
            .starts_with("model 'simple' on upstream 'up': circuit breaker open"),
        "{}",
        s.message()
    );
    assert!(s.get_details_retry_info().unwrap().retry_delay.unwrap() <= Duration::from_millis(200));
    assert!(
        up.seen_for("b3").is_empty(),
        "refused without calling the upstream"
    );

    // The upstream recovers; after the open time a probe succeeds and the breaker closes.
    up.script.lock().unwrap().fail = None;
    let mut recovered = false;
    for i in 0..200 {
        if client.model_infer(request(&format!("r{i}"))).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(recovered, "success again within 2s of recovery");
    for i in 0..5 {
        client
            .model_infer(request(&format!("ok{i}")))
            .await
            .unwrap();
    }
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn pushback_sets_the_wait_and_a_negative_pushback_stops_retries() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(addr, "")).await;
    let mut client = keel.client().await;
    up.plan("p1", vec![Step::Fail(Code::ResourceExhausted, Some("40"))]);
    let resp = client.model_infer(request("p1")).await.unwrap();
    assert_eq!(resp.metadata().get("keel-retry-delays-ms").unwrap(), "40");
    up.plan("p2", vec![Step::Fail(Code::Unavailable, Some("-1"))]);
    let s = client.model_infer(request("p2")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(up.seen_for("p2").len(), 1, "the upstream said do not retry");
    assert_eq!(
        s.get_details_error_info().unwrap().metadata["class"],
        "overloaded"
    );
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn non_idempotent_calls_are_retried_only_when_the_request_never_left() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // The first attempt goes to the dead endpoint (refused: never sent), the retry to the
    // live one.
    let keel = Keel::with_config(&format!(
        "[upstreams.up]\nendpoints = [\"{dead}\", \"{addr}\"]\n[models.simple]\nbackend = \"up\"\nidempotent = false\n"
    ))
    .await;
    let mut client = keel.client().await;
    let resp = client.model_infer(request("n1")).await.unwrap();
    assert_eq!(number(&resp, "keel-attempts"), 2);
    // Endpoints alternate, so the next call also starts on the dead endpoint and is retried
    // on the live one; there the upstream answers UNAVAILABLE itself, which is not retried
    // for a non-idempotent call.
    up.plan("n2", vec![Step::Fail(Code::Unavailable, None)]);
    let s = client.model_infer(request("n2")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(
        s.get_details_error_info().unwrap().metadata["attempts"],
        "2"
    );
    assert_eq!(up.seen_for("n2").len(), 1, "the upstream saw it once");
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn the_retry_budget_caps_retries_against_an_upstream_that_always_fails() {
    let up = ScriptedUpstream::new(Script::failing(Code::Unavailable, "down"));
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(
        addr,
        "[defaults.retry]\nmax_attempts = 5\ninitial_backoff = \"1ms\"\nmax_backoff = \"1ms\"\n[defaults.retry.budget]\nratio = 0.1\nmin_per_sec = 0\n[defaults.breaker]\nenabled = false\n[upstreams.up.outlier]\nenabled = false",
    ))
    .await;
    let mut client = keel.client().await;
    let calls = 60;
    let mut exhausted = 0;
    for i in 0..calls {
        let s = client
            .model_infer(request(&format!("x{i}")))
            .await
            .unwrap_err();
        let info = s.get_details_error_info().unwrap();
        if info
            .metadata
            .get("retry_budget_exhausted")
            .map(String::as_str)
            == Some("true")
        {
            exhausted += 1;
            assert!(
                s.message()
                    .ends_with("(retries stopped: retry budget exhausted)"),
                "{}",
                s.message()
            );
        }
    }
    let attempts = up.seen().len();
    assert!(
        attempts as f64 <= calls as f64 * 1.1 + 1.0,
        "{attempts} attempts for {calls} calls"
    );
    assert!(
        exhausted > calls / 2,
        "most calls hit the exhausted budget: {exhausted}"
    );
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn calls_beyond_the_models_limit_are_shed_at_once() {
    let up = ScriptedUpstream::new(Script::slow(Duration::from_secs(30)));
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(
        addr,
        "[defaults.limits]\nmax_in_flight = 1\nmax_queue = 0",
    ))
    .await;
    let client = keel.client().await;
    let _held = up.call_in_flight(client.clone()).await;
    let mut other = client.clone();
    let s = other.model_infer(request("s2")).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert_eq!(s.get_details_error_info().unwrap().reason, "OVERLOADED");
    assert!(s.get_details_retry_info().is_some());
    assert!(
        s.message().starts_with("model 'simple' is overloaded"),
        "{}",
        s.message()
    );
    assert!(up.seen_for("s2").is_empty());
    drop(keel);
}

#[tokio::test]
async fn a_slow_endpoint_is_hedged_on_the_next_one() {
    let slow = ScriptedUpstream::new(Script::default());
    let fast = ScriptedUpstream::new(Script::default());
    let (a, _sa) = slow.serve().await;
    let (b, _sb) = fast.serve().await;
    let keel = Keel::with_config(&format!(
        "[upstreams.up]\nendpoints = [\"{a}\", \"{b}\"]\n[models.simple]\nbackend = \"up\"\n[models.simple.retry]\nhedge_delay = \"50ms\"\n"
    ))
    .await;
    let mut client = keel.client().await;
    slow.plan("hg", vec![Step::Delay(Duration::from_secs(30))]);
    let start = tokio::time::Instant::now();
    let resp = client.model_infer(request("hg")).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "not held by the slow endpoint"
    );
    assert_eq!(number(&resp, "keel-attempts"), 2);
    assert_eq!(
        resp.metadata()
            .get("keel-served-by")
            .unwrap()
            .to_str()
            .unwrap(),
        format!("up@{b}")
    );
    assert_eq!(slow.seen_for("hg").len(), 1);
    assert_eq!(fast.seen_for("hg").len(), 1);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_while_the_other_answers() {
    let sick = ScriptedUpstream::new(Script::failing(Code::Internal, "broken"));
    let healthy = ScriptedUpstream::new(Script::default());
    let (a, _sa) = sick.serve().await;
    let (b, _sb) = healthy.serve().await;
    let keel = Keel::with_config(&format!(
        "[defaults.retry]\nmax_attempts = 1\n[defaults.breaker]\nenabled = false\n[upstreams.up]\nendpoints = [\"{a}\", \"{b}\"]\n[upstreams.up.outlier]\nconsecutive_failures = 2\nbase_ejection = \"1m\"\n[models.simple]\nbackend = \"up\"\n"
    ))
    .await;
    let mut client = keel.client().await;
    // Endpoints alternate: the sick one fails twice, then it is ejected.
    let mut outcomes = Vec::new();
    for i in 0..10 {
        outcomes.push(client.model_infer(request(&format!("e{i}"))).await.is_ok());
    }
    assert_eq!(outcomes[..4], [false, true, false, true]);
    assert!(outcomes[4..].iter().all(|ok| *ok), "{outcomes:?}");
    assert_eq!(sick.seen().len(), 2, "no calls after its ejection");
    keel.stop().await.unwrap();
}
