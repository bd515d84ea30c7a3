//! `keel load` against a real Keel over loopback: counts, receipts, errors by code and
//! reason, the open-loop schedule, progress readings, and the loopback guard of the
//! command line.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use keel::load::{Api, Payload, Plan, Report, Stop, Tick, run};

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

/// What must hold of a run's progress readings: no more than one per whole second of the
/// run, the n-th no sooner than n seconds in, counts that only grow and never pass the
/// report's, errors among them. (Fewer readings than seconds is allowed: the run may
/// end in the instant a reading falls due.)
fn check_ticks(ticks: &[Tick], report: &Report) {
    assert!(
        ticks.len() <= report.elapsed_s.floor() as usize,
        "{} ticks in a run of {}s",
        ticks.len(),
        report.elapsed_s
    );
    let mut last = Tick {
        elapsed: Duration::ZERO,
        done: 0,
        errors: 0,
    };
    for (i, t) in ticks.iter().enumerate() {
        assert!(
            t.elapsed >= Duration::from_secs(i as u64 + 1),
            "tick {i} at {:?}",
            t.elapsed
        );
        assert!(t.elapsed.as_secs_f64() <= report.elapsed_s, "{t:?}");
        assert!(
            t.done >= last.done && t.errors >= last.errors,
            "{last:?} then {t:?}"
        );
        assert!(t.errors <= t.done && t.done <= report.requests, "{t:?}");
        assert!(t.errors <= report.requests - report.ok, "{t:?}");
        last = *t;
    }
}

#[tokio::test]
async fn a_run_reports_every_request_with_keels_receipts() {
    let keel = Keel::embedded().await;
    let mut ticks = Vec::new();
    let report = run(plan(&keel, Payload::Simple, Stop::Requests(300)), |t| {
        ticks.push(t)
    })
    .await
    .unwrap();
    check_ticks(&ticks, &report);
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
async fn an_open_loop_run_keeps_its_schedule_and_reports_its_progress() {
    let keel = Keel::embedded().await;
    let rate = 40.0;
    let mut p = plan(&keel, Payload::Simple, Stop::Requests(50));
    p.rate = Some(rate);
    let mut ticks = Vec::new();
    let report = run(p, |t| ticks.push(t)).await.unwrap();
    assert_eq!((report.requests, report.ok), (50, 50));
    // The 50th request is not sent before its intended time, 49/40 s after the start.
    assert!(report.elapsed_s >= 1.225, "{}", report.elapsed_s);
    check_ticks(&ticks, &report);
    // The run lasts past its first second, so there is a reading, and it never counts a
    // request before its turn: by time t at most 1 + t × rate have been sent.
    assert!(!ticks.is_empty(), "no progress in {}s", report.elapsed_s);
    for t in &ticks {
        let sent_by_then = 1 + (t.elapsed.as_secs_f64() * rate).floor() as u64;
        assert!(t.done <= sent_by_then, "{t:?}: ahead of the schedule");
        assert_eq!(t.errors, 0, "{t:?}");
    }
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
