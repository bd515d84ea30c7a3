//! Validation before forwarding, over loopback: each rule answers INVALID_ARGUMENT with a
//! `BadRequest` listing every violation at its field path, the model never sees the
//! request, and Keel keeps serving after each.

#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use keel::pb::inference as pb;

async fn still_serving(client: &mut Client) {
    let ok = client
        .model_infer(simple_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(i32s(&ok.raw_output_contents[0])[15], 16);
}

#[tokio::test]
async fn each_rule_is_reported_at_its_field_and_keel_keeps_serving() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;

    // A shape whose element count overflows: an error, not a panic.
    let mut req = simple_request();
    req.inputs[0].shape = vec![1 << 40, 1 << 40];
    let s = client.model_infer(req).await.unwrap_err();
    assert_eq!(violation_fields(&s), ["inputs[0].shape"]);
    assert!(s.message().contains("too many elements"), "{}", s.message());
    still_serving(&mut client).await;

    // Raw length not elements × dtype size, on both inputs: both are listed.
    let mut req = simple_request();
    req.raw_input_contents = vec![Bytes::from(vec![0u8; 63]), Bytes::from(vec![0u8; 65])];
    let s = client.model_infer(req).await.unwrap_err();
    assert_eq!(
        violation_fields(&s),
        ["raw_input_contents[0]", "raw_input_contents[1]"]
    );
    still_serving(&mut client).await;

    // BYTES length prefixes that run past the buffer.
    let req = pb::ModelInferRequest {
        model_name: "simple_string".into(),
        inputs: vec![
            input("INPUT0", "BYTES", &[1, 16]),
            input("INPUT1", "BYTES", &[1, 16]),
        ],
        raw_input_contents: vec![
            Bytes::from_static(&[200, 0, 0, 0, b'1']),
            bytes_elements(&["1"; 16]),
        ],
        ..Default::default()
    };
    let s = client.model_infer(req).await.unwrap_err();
    assert_eq!(violation_fields(&s), ["raw_input_contents[0]"]);
    assert!(
        s.message().contains("BYTES content is malformed"),
        "{}",
        s.message()
    );
    still_serving(&mut client).await;

    // Wrong dtype, an unknown input, a missing one and an unknown output, in one request.
    let mut req = simple_request();
    req.inputs[0].datatype = "INT64".into();
    req.raw_input_contents[0] = Bytes::from(vec![0u8; 128]);
    req.inputs[1].name = "INPUT9".into();
    req.outputs[1].name = "OUTPUT7".into();
    let s = client.model_infer(req).await.unwrap_err();
    assert_eq!(
        violation_fields(&s),
        [
            "inputs[0].datatype",
            "inputs[1].name",
            "inputs",
            "outputs[1].name"
        ]
    );
    assert!(s.message().starts_with("4 problems: "), "{}", s.message());
    still_serving(&mut client).await;

    // A batch above max_batch_size (8).
    let mut req = simple_request();
    for i in &mut req.inputs {
        i.shape = vec![9, 16];
    }
    req.raw_input_contents = vec![i32_bytes(&[0; 144]), i32_bytes(&[0; 144])];
    let s = client.model_infer(req).await.unwrap_err();
    assert_eq!(violation_fields(&s), ["inputs[0].shape", "inputs[1].shape"]);
    still_serving(&mut client).await;
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn the_policys_size_limits_turn_large_requests_away() {
    let keel = Keel::with_config(
        "[models.simple]\nbackend = \"embedded\"\n[models.simple.limits]\nmax_request_bytes = \"100B\"\n\
         [models.iris]\nbackend = \"embedded\"\n[models.iris.limits]\nmax_elements = 6\n",
    )
    .await;
    let mut client = keel.client().await;
    let s = client.model_infer(simple_request()).await.unwrap_err();
    assert_eq!(violation_fields(&s), ["inputs"]);
    assert_eq!(
        s.message(),
        "the request carries 128 bytes of tensor data, above the limit of 100 (limits.max_request_bytes)"
    );
    let iris = |rows: usize| pb::ModelInferRequest {
        model_name: "iris".into(),
        inputs: vec![input("features", "FP32", &[rows as i64, 4])],
        raw_input_contents: vec![Bytes::from(vec![0u8; rows * 16])],
        ..Default::default()
    };
    let s = client.model_infer(iris(2)).await.unwrap_err();
    assert!(
        s.message().contains("limits.max_elements"),
        "{}",
        s.message()
    );
    client.model_infer(iris(1)).await.unwrap();
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn an_upstream_model_is_checked_against_its_metadata_and_never_sees_a_bad_request() {
    let upstream = Keel::embedded().await;
    let front = Keel::with_config(&format!(
        "[upstreams.up]\nendpoints = [\"{}\"]\n[models.iris]\nbackend = \"up\"\n",
        upstream.addr
    ))
    .await;
    let mut client = front.client().await;
    let bad = pb::ModelInferRequest {
        model_name: "iris".into(),
        inputs: vec![input("features", "FP32", &[1, 5])],
        raw_input_contents: vec![Bytes::from(vec![0u8; 20])],
        ..Default::default()
    };
    let s = client.model_infer(bad).await.unwrap_err();
    assert_eq!(violation_fields(&s), ["inputs[0].shape"]);
    assert_eq!(
        s.message(),
        "input 'features': shape [1, 5] does not match the model's [-1, 4] (-1 is any size)"
    );
    let stats = upstream
        .client()
        .await
        .model_statistics(pb::ModelStatisticsRequest {
            name: "iris".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let i = stats.model_stats[0].inference_stats.as_ref().unwrap();
    assert_eq!(
        i.fail.as_ref().map_or(0, |f| f.count),
        0,
        "the upstream never saw it"
    );
    front.stop().await.unwrap();
    upstream.stop().await.unwrap();
}

#[tokio::test]
async fn a_forwarded_models_unlisted_output_goes_to_the_upstream_unless_strict() {
    let upstream = Keel::embedded().await;
    let policy = |strict: &str| {
        format!(
            "[upstreams.up]\nendpoints = [\"{}\"]\n[models.iris]\nbackend = \"up\"\n{strict}",
            upstream.addr
        )
    };
    let ask_for = |output: &str| pb::ModelInferRequest {
        model_name: "iris".into(),
        inputs: vec![input("features", "FP32", &[1, 4])],
        raw_input_contents: vec![Bytes::from(vec![0u8; 16])],
        outputs: vec![pb::model_infer_request::InferRequestedOutputTensor {
            name: output.into(),
            parameters: Default::default(),
        }],
        ..Default::default()
    };
    // By default the upstream decides: an output its metadata does not list reaches it
    // (MLServer answers `predict_proba` that way); this upstream refuses it itself.
    let front = Keel::with_config(&policy("")).await;
    let mut client = front.client().await;
    let ok = client
        .model_infer(ask_for("label"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.outputs.len(), 1);
    let s = client
        .model_infer(ask_for("predict_proba"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().starts_with("upstream 'up': "),
        "the upstream saw and refused it: {}",
        s.message()
    );
    front.stop().await.unwrap();

    // strict_outputs: Keel refuses it at the field, and the upstream never sees it.
    let front = Keel::with_config(&policy("strict_outputs = true\n")).await;
    let mut client = front.client().await;
    let ok = client
        .model_infer(ask_for("label"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.outputs.len(), 1);
    let s = client
        .model_infer(ask_for("predict_proba"))
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&s), ["outputs[0].name"]);
    assert_eq!(
        s.message(),
        "output 'predict_proba' is not an output of model 'iris' (outputs: probabilities, label)",
        "Keel's own refusal, not the upstream's"
    );
    front.stop().await.unwrap();
    upstream.stop().await.unwrap();
}
