//! The chaos suite: sustained load through Keel against two upstream endpoints while one
//! of them is killed and restarted, flaps, or turns slow, while the policy is swapped over
//! and over, and while a Keel process gets SIGTERM. Each scenario is bounded (about two
//! seconds of load), asserts what must hold, and prints one line of figures.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use keel::load::{Api, Payload, Plan, Report, Stop, run};

/// Load through `addr`: `simple`, 8 in flight, for `secs`.
fn plan(addr: std::net::SocketAddr, secs: u64) -> Plan {
    Plan {
        target: addr.to_string(),
        model: "simple".into(),
        concurrency: 8,
        connections: 2,
        stop: Stop::Duration(Duration::from_secs(secs)),
        rate: None,
        payload: Payload::Simple,
        deadline: Some(Duration::from_secs(5)),
        api: Api::V2,
    }
}

fn figure(scenario: &str, r: &Report) {
    println!(
        "chaos {scenario}: {} calls, {} failures, {:.3} attempts/call, max {:.1} ms",
        r.requests,
        r.requests - r.ok,
        r.attempts_per_request.unwrap_or(0.0),
        r.latency_ms.max
    );
}

/// A gateway over two embedded upstream Keels.
async fn pool(extra: &str) -> (Keel, Keel, Keel) {
    let a = Keel::embedded().await;
    let b = Keel::embedded().await;
    let gateway = Keel::with_config(&format!(
        "[defaults.retry]\nmax_attempts = 3\ninitial_backoff = \"1ms\"\n{extra}\n\
         [upstreams.pool]\nendpoints = [\"{}\", \"{}\"]\n[models.simple]\nbackend = \"pool\"\n",
        a.addr, b.addr
    ))
    .await;
    (gateway, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_and_restarted_costs_no_call() {
    let (gateway, a, b) = pool("").await;
    let load = tokio::spawn(run(plan(gateway.addr, 2), |_| {}));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let addr = a.addr;
    a.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let a = Keel::start_on(keel::Options::default(), addr).await;
    let r = load.await.unwrap().unwrap();
    figure("kill-restart", &r);
    assert_eq!(r.ok, r.requests, "{r}");
    assert!(r.attempts_per_request.unwrap() < 1.5, "{r}");
    for k in [gateway, a, b] {
        k.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_endpoint_costs_no_call() {
    let (gateway, a, b) = pool("").await;
    let load = tokio::spawn(run(plan(gateway.addr, 2), |_| {}));
    let mut a = Some(a);
    let addr = a.as_ref().unwrap().addr;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.take().unwrap().stop().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        a = Some(Keel::start_on(keel::Options::default(), addr).await);
    }
    let r = load.await.unwrap().unwrap();
    figure("flap", &r);
    assert_eq!(r.ok, r.requests, "{r}");
    assert!(r.attempts_per_request.unwrap() < 1.5, "{r}");
    for k in [gateway, a.unwrap(), b] {
        k.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_costs_no_call_and_most_calls_do_not_wait_for_it() {
    let slow = Keel::with_config(
        "[models.simple]\nbackend = \"embedded\"\n[models.simple.fault.delay]\npercent = 100\nduration = \"300ms\"\n",
    )
    .await;
    let fast = Keel::embedded().await;
    let gateway = Keel::with_config(&format!(
        "[defaults.retry]\nmax_attempts = 3\nhedge_delay = \"50ms\"\n\
         [upstreams.pool]\nendpoints = [\"{}\", \"{}\"]\n[models.simple]\nbackend = \"pool\"\n",
        slow.addr, fast.addr
    ))
    .await;
    let r = run(plan(gateway.addr, 2), |_| {}).await.unwrap();
    figure("slow", &r);
    assert_eq!(r.ok, r.requests, "{r}");
    // Most calls did not wait for the slow answer: half never met it, and hedges (as far
    // as the retry budget allows them) rescued others.
    assert!(r.latency_ms.p50 < 300.0, "{r}");
    for k in [gateway, slow, fast] {
        k.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_swaps_under_load_lose_no_call() {
    let (gateway, a, b) = pool("").await;
    let mut admin = {
        // A gateway with an admin listener, to swap its policy.
        let toml = format!(
            "[upstreams.pool]\nendpoints = [\"{}\", \"{}\"]\n[models.simple]\nbackend = \"pool\"\n",
            a.addr, b.addr
        );
        let g = Keel::with_admin(&toml).await;
        (g, toml)
    };
    let load = tokio::spawn(run(plan(admin.0.addr, 2), |_| {}));
    let mut client = admin.0.admin_client().await;
    let mut swaps = 0;
    let end = tokio::time::Instant::now() + Duration::from_millis(1800);
    while tokio::time::Instant::now() < end {
        let toml = format!(
            "{}\n[defaults]\ntimeout = \"{}s\"\n",
            admin.1,
            10 + swaps % 5
        );
        client
            .apply_policy(keel::pb::keel_admin::ApplyPolicyRequest {
                toml,
                ..Default::default()
            })
            .await
            .unwrap();
        swaps += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = load.await.unwrap().unwrap();
    figure(&format!("policy-swaps ({swaps} swaps)"), &r);
    assert!(swaps > 10);
    assert_eq!(r.ok, r.requests, "{r}");
    admin.1.clear();
    for k in [admin.0, gateway, a, b] {
        k.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_lets_calls_in_flight_finish() {
    // A slow upstream, so calls are in flight when the gateway process gets SIGTERM.
    let slow = Keel::with_config(
        "[models.simple]\nbackend = \"embedded\"\n[models.simple.fault.delay]\npercent = 100\nduration = \"400ms\"\n",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("policy.toml");
    std::fs::write(
        &config,
        format!(
            "[upstreams.up]\nendpoints = [\"{}\"]\n[models.simple]\nbackend = \"up\"\n",
            slow.addr
        ),
    )
    .unwrap();
    let process = KeelProcess::spawn(&["--config", config.to_str().unwrap()], &[]).await;
    let mut calls = Vec::new();
    for i in 0..16 {
        let mut client = connect(process.addr).await;
        calls.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(simple_request());
            req.metadata_mut()
                .insert("x-request-id", format!("t{i}").parse().unwrap());
            client.model_infer(req).await
        }));
    }
    // Every call is at the slow upstream before the signal.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let code = process.stop().await;
    let mut ok = 0;
    for c in calls {
        if c.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    println!("chaos sigterm: 16 calls in flight, {ok} finished, exit code {code:?}");
    assert_eq!(ok, 16, "every call in flight finished during the drain");
    assert_eq!(code, Some(0));
    slow.stop().await.unwrap();
}
