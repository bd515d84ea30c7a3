//! What one caller can cost everyone else: hostile requests beside a well-behaved client on
//! its own connection. The attack gets a clean, bounded refusal; the well-behaved client
//! loses nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use keel::pb::inference as pb;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic_types::StatusExt as _;

/// A request with `n` distinct one-element INT32 inputs (about 20 bytes each on the wire).
fn many_inputs(model: &str, n: usize) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: (0..n)
            .map(|i| input(&format!("i{i}"), "INT32", &[1]))
            .collect(),
        raw_input_contents: (0..n).map(|_| i32_bytes(&[1])).collect(),
        ..Default::default()
    }
}

/// A well-behaved client on its own connection: `simple` calls with a 2 s deadline until
/// `stop`, counting the ones that fail.
fn bystander(
    addr: std::net::SocketAddr,
) -> (tokio::sync::watch::Sender<bool>, JoinHandle<(u32, u32)>) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let mut client = connect(addr).await;
        let (mut ok, mut failed) = (0, 0);
        while !*stopped.borrow_and_update() {
            let mut req = tonic::Request::new(simple_request());
            req.set_timeout(Duration::from_secs(2));
            match client.model_infer(req).await {
                Ok(_) => ok += 1,
                Err(s) => {
                    eprintln!("bystander call failed: {s:?}");
                    failed += 1;
                }
            }
        }
        (ok, failed)
    });
    (stop, task)
}

async fn stop_bystander(
    (stop, task): (tokio::sync::watch::Sender<bool>, JoinHandle<(u32, u32)>),
) -> (u32, u32) {
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the bystander finished")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eighty_thousand_inputs_are_refused_at_once_and_cost_the_others_nothing() {
    let upstream = Keel::embedded().await;
    let keel = Keel::with_config(&format!(
        "[upstreams.up]\nendpoints = [\"{}\"]\n[models.iris]\nbackend = \"up\"\n\
         [models.identity]\nbackend = \"embedded\"\n[models.simple]\nbackend = \"embedded\"\n",
        upstream.addr
    ))
    .await;
    let watch = bystander(keel.addr);
    let mut attacker = keel.client().await.max_encoding_message_size(64 << 20);
    // 80,000 inputs took 18 CPU-seconds of quadratic validation; now the count is checked
    // first, for embedded and forwarded models alike, unary and streamed.
    for model in ["identity", "iris"] {
        for _ in 0..2 {
            let s = attacker
                .model_infer(many_inputs(model, 80_000))
                .await
                .unwrap_err();
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            assert_eq!(
                s.message(),
                "the request has 80000 inputs, above the limit of 1024 (limits.max_inputs)"
            );
            let bad = s.get_details_bad_request().unwrap();
            assert_eq!(bad.field_violations.len(), 1);
            assert_eq!(bad.field_violations[0].field, "inputs");
        }
    }
    let mut answers = attacker
        .model_stream_infer(futures::stream::iter(vec![many_inputs("identity", 80_000)]))
        .await
        .unwrap()
        .into_inner();
    let a = answers.message().await.unwrap().unwrap();
    assert!(
        a.error_message.contains("limits.max_inputs"),
        "{}",
        a.error_message
    );
    // Within the limit, the same shape of request is served.
    let ok = attacker
        .model_infer(many_inputs("identity", 1024))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().outputs.len(), 1024);

    let (ok, failed) = stop_bystander(watch).await;
    assert_eq!(
        failed,
        0,
        "the well-behaved client lost {failed} of {}",
        ok + failed
    );
    assert!(ok > 0);
    keel.stop().await.unwrap();
    upstream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_empty_inputs_gets_an_answer_of_fixed_size() {
    let keel = Keel::embedded().await;
    let watch = bystander(keel.addr);
    let mut attacker = keel.client().await.max_encoding_message_size(64 << 20);
    // 400 KB of `inputs {}` (the attack sent 1-2 MiB; a debug build encodes slowly): each
    // one is a problem (no name, no datatype). The answer reports the first few and counts
    // the rest.
    let empty = pb::ModelInferRequest {
        model_name: "simple".into(),
        inputs: vec![Default::default(); 200_000],
        ..Default::default()
    };
    for _ in 0..2 {
        let s = attacker.model_infer(empty.clone()).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().starts_with("200000 problems: "),
            "{}",
            &s.message()[..60]
        );
        assert!(s.message().len() <= 2048 + 3, "{} bytes", s.message().len());
        assert!(
            s.details().len() < 16 * 1024,
            "{} bytes of details",
            s.details().len()
        );
        let bad = s.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations.len(), keel::model::MAX_REPORTED + 1);
    }
    let (ok, failed) = stop_bystander(watch).await;
    assert_eq!(
        failed,
        0,
        "the well-behaved client lost {failed} of {}",
        ok + failed
    );
    assert!(ok > 0);
    keel.stop().await.unwrap();
}
