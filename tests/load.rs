//! `keel load` against a real Keel over loopback: counts, receipts, errors by code and
//! reason, the open-loop schedule, and the loopback guard of the command line.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use keel::load::{Api, Payload, Plan, Stop, run};

fn plan(keel: &Keel, payload: Payload, stop: Stop) -> Plan {
    Plan {
        target: keel.addr.to_string(),
        model: payload.model().into(),
        concurrency: 8,
        connections: 2,
        stop,
        rate: None,
        payload,
        deadline: Some(Duration::from_secs(5)),
        api: Api::V2,
    }
}

#[tokio::test]
async fn a_run_reports_every_request_with_keels_receipts() {
    let keel = Keel::embedded().await;
    let mut ticks = 0;
    let report = run(plan(&keel, Payload::Simple, Stop::Requests(300)), |_| {
        ticks += 1
    })
    .await
    .unwrap();
    assert_eq!(report.requests, 300);
    assert_eq!(report.ok, 300);
    assert_eq!(report.success_ratio, 1.0);
    assert_eq!(report.attempts_per_request, Some(1.0));
    assert_eq!(report.tiers.get("primary"), Some(&300));
    let l = &report.latency_ms;
    assert!(l.p50 > 0.0 && l.p50 <= l.p99 && l.p99 <= l.max, "{l:?}");

    // The other payloads and the v1 API.
    for (payload, api) in [
        (Payload::Iris, Api::V1),
        (Payload::Simple, Api::V1),
        (Payload::Identity(1 << 20), Api::V2),
    ] {
        let mut p = plan(&keel, payload, Stop::Requests(20));
        p.api = api;
        let r = run(p, |_| {}).await.unwrap();
        assert_eq!((r.requests, r.ok), (20, 20), "{payload:?} {api:?}: {r}");
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["plan"]["stop"]["requests"], 300);
    assert_eq!(json["latency_ms"]["p50"], report.latency_ms.p50);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn failures_are_counted_by_code_and_reason() {
    let down = ScriptedUpstream::new(Script::failing(tonic::Code::Unavailable, "down"));
    let (addr, _stop) = down.serve().await;
    let keel = Keel::with_config(&simple_via(
        addr,
        "[defaults.retry]\nmax_attempts = 2\ninitial_backoff = \"1ms\"\n[defaults.breaker]\nenabled = false\n[upstreams.up.outlier]\nenabled = false",
    ))
    .await;
    let report = run(plan(&keel, Payload::Simple, Stop::Requests(40)), |_| {})
        .await
        .unwrap();
    assert_eq!(report.ok, 0);
    assert_eq!(report.errors_by_code.get("UNAVAILABLE"), Some(&40));
    assert_eq!(
        report.errors_by_reason.get("UPSTREAM_UNAVAILABLE"),
        Some(&40),
        "{report}"
    );
    let a = report.attempts_per_request.unwrap();
    assert!(a > 1.0 && a <= 2.0, "retried within the budget: {a}");
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn an_open_loop_run_keeps_its_schedule() {
    let keel = Keel::embedded().await;
    let mut p = plan(&keel, Payload::Simple, Stop::Requests(50));
    p.rate = Some(200.0);
    let report = run(p, |_| {}).await.unwrap();
    assert_eq!(report.requests, 50);
    // The 50th request is not sent before its intended time, 49/200 s after the start.
    assert!(report.elapsed_s >= 0.245, "{}", report.elapsed_s);
    keel.stop().await.unwrap();
}

#[test]
fn the_command_line_refuses_remote_targets_and_bad_flags() {
    let keel = env!("CARGO_BIN_EXE_keel");
    for (args, expect) in [
        (
            vec!["load", "--target", "10.0.0.7:8001"],
            "not a loopback address",
        ),
        (vec!["load", "--payload", "resnet"], "--payload"),
        (vec!["load", "--duration", "soon"], "--duration"),
        (vec!["load", "--api", "v3"], "--api"),
    ] {
        let out = std::process::Command::new(keel)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}
