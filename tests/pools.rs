//! Upstream pools over loopback: an endpoint lost mid-load costs no call, is taken out, and
//! comes back after it passes its checks (an ejection included, long before it would end);
//! the last endpoint that still answers is never ejected; a DNS name becomes endpoints.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use tonic_types::StatusExt as _;

fn served_by<T>(resp: &tonic::Response<T>) -> String {
    resp.metadata()
        .get("keel-served-by")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn endpoint_state(admin: SocketAddr, endpoint: SocketAddr) -> Option<f64> {
    let (_, scrape) = get(admin, "/metrics").await;
    value(
        &scrape,
        &format!("keel_endpoint_state{{upstream=\"up\",endpoint=\"{endpoint}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_lost_mid_load_costs_no_call_and_returns_after_its_checks() {
    let a_addr = free_port();
    let a = Keel::start_on(keel::Options::default(), a_addr).await;
    let b = Keel::embedded().await;
    let keel = Keel::with_admin(&format!(
        "[upstreams.up]\nendpoints = [\"{a_addr}\", \"{}\"]\n\
         [upstreams.up.health_check]\nkind = \"server_ready\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n\
         unhealthy_threshold = 1\nhealthy_threshold = 2\n\
         [upstreams.up.outlier]\nconsecutive_failures = 2\nbase_ejection = \"200ms\"\n\
         [models.simple]\nbackend = \"up\"\n",
        b.addr
    ))
    .await;
    let client = keel.client().await;

    // Four callers, bounded by count; the test stops endpoint A while they run.
    let done = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let (mut client, done, calls) = (client.clone(), done.clone(), calls.clone());
        callers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..2_000 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                if let Err(s) = client.model_infer(simple_request()).await {
                    failures.push(format!("{:?}: {}", s.code(), s.message()));
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    let wait_for_calls = |n: usize| {
        let calls = calls.clone();
        async move {
            for _ in 0..1_000 {
                if calls.load(Ordering::Relaxed) >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the callers made fewer than {n} calls in 10s");
        }
    };
    wait_for_calls(50).await;
    a.stop().await.unwrap();
    let stopped_at = calls.load(Ordering::Relaxed);
    wait_for_calls(stopped_at + 200).await;
    done.store(true, Ordering::Relaxed);
    for caller in callers {
        let failures = caller.await.unwrap();
        assert!(failures.is_empty(), "failed calls: {failures:?}");
    }

    // A is out of the pool (failing checks or ejected), and every call goes to B.
    let admin = keel.admin.unwrap();
    let mut state = None;
    for _ in 0..100 {
        state = endpoint_state(admin, a_addr).await;
        if matches!(state, Some(s) if s > 0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(state, Some(s) if s > 0.0), "A stands at {state:?}");
    let mut c = client.clone();
    for _ in 0..10 {
        let resp = c.model_infer(simple_request()).await.unwrap();
        assert_eq!(served_by(&resp), format!("up@{}", b.addr));
    }

    // A comes back; after two passed checks it takes calls again.
    let a = Keel::start_on(keel::Options::default(), a_addr).await;
    let mut back = false;
    for _ in 0..300 {
        let resp = c.model_infer(simple_request()).await.unwrap();
        if served_by(&resp) == format!("up@{a_addr}") {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "A was not re-admitted within 15s");
    assert_eq!(endpoint_state(admin, a_addr).await, Some(0.0));
    keel.stop().await.unwrap();
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_endpoint_is_back_when_its_checks_pass_not_when_its_ejection_ends() {
    let a_addr = free_port();
    let a = Keel::start_on(keel::Options::default(), a_addr).await;
    let b = Keel::embedded().await;
    // One refused call ejects A for 60 s: only passing checks can bring it back within the
    // test's bounds. Three failed checks (200 ms or more) take A out by its checks too, long
    // after the next call to it has ejected it.
    let keel = Keel::with_admin(&format!(
        "[upstreams.up]\nendpoints = [\"{a_addr}\", \"{}\"]\n\
         [upstreams.up.health_check]\nkind = \"server_ready\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n\
         unhealthy_threshold = 3\nhealthy_threshold = 2\n\
         [upstreams.up.outlier]\nconsecutive_failures = 1\nbase_ejection = \"60s\"\n\
         [models.simple]\nbackend = \"up\"\n",
        b.addr
    ))
    .await;
    let admin = keel.admin.unwrap();
    let mut c = keel.client().await;
    let (on_a, on_b) = (format!("up@{a_addr}"), format!("up@{}", b.addr));
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..100 {
        served.insert(served_by(&c.model_infer(simple_request()).await.unwrap()));
        if served.len() == 2 {
            break;
        }
    }
    assert_eq!(served, [on_a.clone(), on_b.clone()].into(), "both serve");

    // A stops: the next call to it is refused (and retried on B), which ejects it.
    a.stop().await.unwrap();
    let mut state = None;
    for _ in 0..200 {
        let resp = c.model_infer(simple_request()).await.unwrap();
        assert_eq!(served_by(&resp), on_b, "no call is lost while A is down");
        state = endpoint_state(admin, a_addr).await;
        if state == Some(2.0) {
            break;
        }
    }
    assert_eq!(state, Some(2.0), "A is ejected");

    // A restarts on its port. Two passed checks (200 ms) end the 60 s ejection: poll,
    // bounded by 300 calls 20 ms apart (6 s), for a call that A serves.
    let a = Keel::start_on(keel::Options::default(), a_addr).await;
    let mut calls_until_back = None;
    for n in 1..=300 {
        if served_by(&c.model_infer(simple_request()).await.unwrap()) == on_a {
            calls_until_back = Some(n);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        calls_until_back.is_some(),
        "A was not back within 300 calls; it stands at {:?}",
        endpoint_state(admin, a_addr).await
    );
    assert_eq!(endpoint_state(admin, a_addr).await, Some(0.0));
    // Back in rotation: the two share the calls again.
    let mut count = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..20 {
        let resp = c.model_infer(simple_request()).await.unwrap();
        *count.entry(served_by(&resp)).or_default() += 1;
    }
    assert!(
        count.get(&on_a).is_some_and(|&n| n >= 5) && count.get(&on_b).is_some_and(|&n| n >= 5),
        "{count:?}"
    );
    keel.stop().await.unwrap();
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn the_last_endpoint_that_answers_is_not_ejected_for_its_failures() {
    // Every call fails, but the endpoint answers: ejecting the pool's only endpoint would
    // turn a partial failure into a total one, so its calls keep reaching it.
    let up = ScriptedUpstream::new(Script::failing(tonic::Code::Unavailable, "sick"));
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_admin(&simple_via(
        addr,
        "[defaults.retry]\nmax_attempts = 1\n[defaults.breaker]\nenabled = false\n",
    ))
    .await;
    let mut c = keel.client().await;
    for _ in 0..8 {
        let s = c.model_infer(simple_request()).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "UPSTREAM_UNAVAILABLE",
            "{s:?}"
        );
    }
    assert_eq!(up.seen().len(), 8, "every call reached the endpoint");
    assert_eq!(endpoint_state(keel.admin.unwrap(), addr).await, Some(0.0));
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_dns_name_becomes_the_pools_endpoints() {
    let up = Keel::embedded().await;
    let port = up.addr.port();
    let keel = Keel::with_admin(&format!(
        "[upstreams.up]\ndns = \"localhost:{port}\"\ndns_interval = \"1s\"\n\
         [models.simple]\nbackend = \"up\"\n"
    ))
    .await;
    let mut client = keel.client().await;
    // The first resolution runs in the background: poll (bounded) until it has answered.
    let mut answer = None;
    for _ in 0..200 {
        match client.model_infer(simple_request()).await {
            Ok(resp) => {
                answer = Some(resp);
                break;
            }
            Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let resp = answer.expect("localhost resolved within 5s");
    // `localhost` may also stand for ::1, where nothing listens: that endpoint is refused
    // and the call goes to 127.0.0.1.
    assert_eq!(served_by(&resp), format!("up@127.0.0.1:{port}"));
    let state = endpoint_state(keel.admin.unwrap(), up.addr).await;
    assert_eq!(
        state,
        Some(0.0),
        "127.0.0.1:{port} is in the pool and serving"
    );
    keel.stop().await.unwrap();
    up.stop().await.unwrap();
}

/// A `simple` request in sequence `id`.
fn in_sequence(id: i64, start: bool, end: bool) -> keel::pb::inference::ModelInferRequest {
    use keel::pb::inference::InferParameter;
    use keel::pb::inference::infer_parameter::ParameterChoice;
    let mut r = simple_request();
    let p = |c| InferParameter {
        parameter_choice: Some(c),
    };
    r.parameters
        .insert("sequence_id".into(), p(ParameterChoice::Int64Param(id)));
    r.parameters.insert(
        "sequence_start".into(),
        p(ParameterChoice::BoolParam(start)),
    );
    r.parameters
        .insert("sequence_end".into(), p(ParameterChoice::BoolParam(end)));
    r
}

#[tokio::test]
async fn a_sequence_stays_on_its_endpoint_and_fails_clearly_when_it_dies() {
    let a = Keel::embedded().await;
    let b = Keel::embedded().await;
    let keel = Keel::with_config(&format!(
        "[upstreams.up]\nendpoints = [\"{}\", \"{}\"]\n[models.simple]\nbackend = \"up\"\n\
         fallback = [{{ model = \"iris\", on = [\"unavailable\"] }}]\n\
         [models.iris]\nbackend = \"embedded\"\n",
        a.addr, b.addr
    ))
    .await;
    let mut client = keel.client().await;
    // Two sequences interleaved, while plain calls keep alternating between endpoints.
    let mut homes = Vec::new();
    for id in [7, 8] {
        let resp = client
            .model_infer(in_sequence(id, true, false))
            .await
            .unwrap();
        homes.push(served_by(&resp));
    }
    let mut plain = std::collections::BTreeSet::new();
    for step in 0..6 {
        for (id, home) in [7, 8].into_iter().zip(&homes) {
            let resp = client
                .model_infer(in_sequence(id, false, step == 5 && id == 8))
                .await
                .unwrap();
            assert_eq!(&served_by(&resp), home, "sequence {id}, step {step}");
        }
        let resp = client.model_infer(simple_request()).await.unwrap();
        plain.insert(served_by(&resp));
    }
    assert_eq!(plain.len(), 2, "plain calls use both endpoints: {plain:?}");

    // Sequence 7's endpoint goes away mid-sequence: its next call fails, naming the
    // endpoint, and is neither retried elsewhere nor answered by the fallback.
    let home = homes[0].strip_prefix("up@").unwrap().to_string();
    let (dead, alive) = if home == a.addr.to_string() {
        (a, b)
    } else {
        (b, a)
    };
    dead.stop().await.unwrap();
    let s = client
        .model_infer(in_sequence(7, false, false))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Aborted, "{s:?}");
    assert_eq!(
        s.get_details_error_info().unwrap().reason,
        "SEQUENCE_BROKEN"
    );
    assert!(s.message().contains(&home), "{}", s.message());
    assert!(s.message().contains("sequence_start"), "{}", s.message());
    // Restarted, the sequence finds a living endpoint.
    let resp = client
        .model_infer(in_sequence(7, true, false))
        .await
        .unwrap();
    assert_eq!(served_by(&resp), format!("up@{}", alive.addr));
    keel.stop().await.unwrap();
    alive.stop().await.unwrap();
}
