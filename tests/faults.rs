//! Fault injection over loopback: a Keel on its embedded backend made sick by policy, and
//! a Keel in front of it that keeps its clients whole.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use keel::load::{Api, Payload, Plan, Stop, run};
use tonic::Code;
use tonic_types::StatusExt as _;

const SICK: &str = "[models.simple]\nbackend = \"embedded\"\n\
    [models.simple.fault]\nallow_request = true\n\
    [models.simple.fault.abort]\npercent = 10\ncode = \"UNAVAILABLE\"\n";

fn load(addr: std::net::SocketAddr, n: u64) -> Plan {
    Plan {
        target: addr.to_string(),
        model: "simple".into(),
        concurrency: 8,
        connections: 2,
        stop: Stop::Requests(n),
        rate: None,
        payload: Payload::Simple,
        deadline: Some(Duration::from_secs(10)),
        api: Api::V2,
    }
}

#[tokio::test]
async fn a_sick_upstream_fails_a_tenth_and_a_keel_in_front_hides_it_within_its_budget() {
    let sick = Keel::with_config(&format!("[defaults.retry]\nmax_attempts = 1\n{SICK}")).await;
    // Direct: about a tenth fail, labelled as injected.
    let direct = run(load(sick.addr, 1000), |_| {}).await.unwrap();
    let failed = direct
        .errors_by_reason
        .get("FAULT_INJECTED")
        .copied()
        .unwrap_or(0);
    assert!((60..=140).contains(&failed), "{direct}");
    assert_eq!(direct.requests - direct.ok, failed);

    let front = Keel::with_config(&format!(
        "[defaults.retry]\nmax_attempts = 3\ninitial_backoff = \"1ms\"\n\
         [upstreams.sick]\nendpoints = [\"{}\"]\n[models.simple]\nbackend = \"sick\"\n",
        sick.addr
    ))
    .await;
    let through = run(load(front.addr, 1000), |_| {}).await.unwrap();
    assert!(through.success_ratio >= 0.999, "{through}");
    let attempts = through.attempts_per_request.unwrap();
    assert!(
        attempts > 1.0 && attempts <= 1.2 + 0.05,
        "retries stay within the 20% budget: {attempts}"
    );
    front.stop().await.unwrap();
    sick.stop().await.unwrap();
}

#[tokio::test]
async fn an_injected_abort_says_so_and_a_request_may_ask_for_one_where_allowed() {
    let keel = Keel::with_config(&format!(
        "[defaults.retry]\nmax_attempts = 1\n{SICK}[models.iris]\nbackend = \"embedded\"\n"
    ))
    .await;
    let mut client = keel.client().await;
    // Find a request id the 10% abort hits, then check its labels.
    let mut hit = None;
    for i in 0..200 {
        let mut req = tonic::Request::new(simple_request());
        req.metadata_mut()
            .insert("x-request-id", format!("f{i}").parse().unwrap());
        if let Err(s) = client.model_infer(req).await {
            hit = Some(s);
            break;
        }
    }
    let s = hit.expect("one in ten is aborted");
    assert_eq!(s.code(), Code::Unavailable);
    let info = s.get_details_error_info().unwrap();
    assert_eq!(info.reason, "FAULT_INJECTED");
    assert_eq!(info.metadata["injected"], "true");

    // keel-fault is honoured where the policy allows it (simple), ignored elsewhere (iris).
    let mut req = tonic::Request::new(simple_request());
    req.metadata_mut()
        .insert("keel-fault", "abort=resource_exhausted".parse().unwrap());
    let s = client.model_infer(req).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    let mut iris = keel::pb::inference::ModelInferRequest {
        model_name: "iris".into(),
        inputs: vec![input("features", "FP32", &[1, 4])],
        raw_input_contents: vec![vec![0u8; 16].into()],
        ..Default::default()
    };
    iris.id = "i".into();
    let mut req = tonic::Request::new(iris);
    req.metadata_mut()
        .insert("keel-fault", "abort=unavailable".parse().unwrap());
    client.model_infer(req).await.unwrap();
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn an_injected_pushback_is_answered_as_a_sick_server_would() {
    let sick = Keel::with_config(
        "[defaults.retry]\nmax_attempts = 1\n[models.simple]\nbackend = \"embedded\"\n\
         [models.simple.fault]\npushback_ms = 40\n[models.simple.fault.abort]\npercent = 100\ncode = \"RESOURCE_EXHAUSTED\"\n",
    )
    .await;
    let mut client = sick.client().await;
    let s = client.model_infer(simple_request()).await.unwrap_err();
    assert_eq!(s.metadata().get("grpc-retry-pushback-ms").unwrap(), "40");
    assert_eq!(
        s.get_details_retry_info().unwrap().retry_delay,
        Some(Duration::from_millis(40))
    );
    sick.stop().await.unwrap();
}
