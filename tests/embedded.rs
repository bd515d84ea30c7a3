//! Every embedded model answers correctly over real gRPC, raw and typed, and the model
//! information RPCs (ready, metadata, config, statistics, index) are real.
//!
//! Answers are raw whatever the request's form, as Triton's are: Triton's
//! `grpc_explicit_{int,int8,byte}_content_client.py` send typed `contents` and read
//! `raw_output_contents`, and the typed-request tests here read them the same way.

mod common;

use common::*;
use keel::pb::inference as pb;

fn typed(int: Vec<i32>) -> Option<pb::InferTensorContents> {
    Some(pb::InferTensorContents {
        int_contents: int,
        ..Default::default()
    })
}

#[tokio::test]
async fn simple_adds_and_subtracts_raw_and_echoes_ids() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    let mut req = tonic::Request::new(simple_request());
    req.metadata_mut()
        .insert("x-request-id", "abc-123".parse().unwrap());
    let resp = client.model_infer(req).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "abc-123");
    let resp = resp.into_inner();
    assert_eq!(resp.model_name, "simple");
    assert_eq!(resp.model_version, "1");
    assert_eq!(resp.id, "req-1");
    assert_eq!(resp.outputs.len(), 2);
    assert_eq!(resp.outputs[0].name, "OUTPUT0");
    assert_eq!(resp.outputs[0].datatype, "INT32");
    assert_eq!(resp.outputs[0].shape, vec![1, 16]);
    assert!(resp.outputs[0].contents.is_none(), "raw in, raw out");
    let sum = i32s(&resp.raw_output_contents[0]);
    let diff = i32s(&resp.raw_output_contents[1]);
    for i in 0..16 {
        assert_eq!(sum[i], i as i32 + 1);
        assert_eq!(diff[i], i as i32 - 1);
    }
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_request_id_is_generated_when_the_client_sends_none() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    let resp = client.model_infer(simple_request()).await.unwrap();
    let id = resp
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(id.len(), 36, "a UUID, got {id}");
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn simple_answers_a_typed_request_raw_with_a_full_batch() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    let a: Vec<i32> = (0..128).collect();
    let b: Vec<i32> = (0..128).map(|x| x * 2).collect();
    let mut i0 = input("INPUT0", "INT32", &[8, 16]);
    i0.contents = typed(a.clone());
    let mut i1 = input("INPUT1", "INT32", &[8, 16]);
    i1.contents = typed(b.clone());
    let resp = client
        .model_infer(pb::ModelInferRequest {
            model_name: "simple".into(),
            inputs: vec![i0, i1],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        resp.outputs.iter().all(|o| o.contents.is_none()),
        "typed in, raw out, as Triton answers"
    );
    let at = |name: &str| resp.outputs.iter().position(|o| o.name == name).unwrap();
    let (out0, out1) = (at("OUTPUT0"), at("OUTPUT1"));
    assert_eq!(resp.outputs[out0].shape, vec![8, 16]);
    let sum = i32s(&resp.raw_output_contents[out0]);
    let diff = i32s(&resp.raw_output_contents[out1]);
    for i in 0..128 {
        assert_eq!(sum[i], a[i] + b[i]);
        assert_eq!(diff[i], a[i] - b[i]);
    }
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn simple_wraps_on_int32_overflow() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    let mut req = simple_request();
    req.raw_input_contents = vec![i32_bytes(&[i32::MAX; 16]), i32_bytes(&[1; 16])];
    let resp = client.model_infer(req).await.unwrap().into_inner();
    assert_eq!(i32s(&resp.raw_output_contents[0]), vec![i32::MIN; 16]);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn simple_int8_computes_raw_and_typed() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    let a: Vec<u8> = (0..16).map(|x| x as u8).collect();
    let b: Vec<u8> = vec![3; 16];
    let resp = client
        .model_infer(pb::ModelInferRequest {
            model_name: "simple_int8".into(),
            inputs: vec![
                input("INPUT0", "INT8", &[1, 16]),
                input("INPUT1", "INT8", &[1, 16]),
            ],
            raw_input_contents: vec![a.into(), b.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let sum: Vec<i8> = resp.raw_output_contents[0]
        .iter()
        .map(|&x| x as i8)
        .collect();
    let diff: Vec<i8> = resp.raw_output_contents[1]
        .iter()
        .map(|&x| x as i8)
        .collect();
    assert_eq!(sum[5], 8);
    assert_eq!(diff[0], -3);

    let mut i0 = input("INPUT0", "INT8", &[1, 16]);
    i0.contents = typed(vec![100; 16]);
    let mut i1 = input("INPUT1", "INT8", &[1, 16]);
    i1.contents = typed(vec![-100; 16]);
    let resp = client
        .model_infer(pb::ModelInferRequest {
            model_name: "simple_int8".into(),
            inputs: vec![i0, i1],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // grpc_explicit_int8_content_client.py reads the answer as raw INT8.
    assert!(resp.outputs.iter().all(|o| o.contents.is_none()));
    let int8s = |b: &[u8]| b.iter().map(|&x| x as i8).collect::<Vec<i8>>();
    assert_eq!(int8s(&resp.raw_output_contents[0]), vec![0; 16]);
    assert_eq!(
        int8s(&resp.raw_output_contents[1]),
        vec![-56; 16],
        "200 wraps to -56 as INT8"
    );
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn simple_string_sums_decimal_strings_raw_and_typed() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    let a: Vec<String> = (0..16).map(|i| i.to_string()).collect();
    let b: Vec<String> = vec!["10".into(); 16];
    let resp = client
        .model_infer(pb::ModelInferRequest {
            model_name: "simple_string".into(),
            inputs: vec![
                input("INPUT0", "BYTES", &[1, 16]),
                input("INPUT1", "BYTES", &[1, 16]),
            ],
            raw_input_contents: vec![bytes_elements(&a), bytes_elements(&b)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let sums = split_bytes_elements(&resp.raw_output_contents[0]);
    let diffs = split_bytes_elements(&resp.raw_output_contents[1]);
    assert_eq!(sums[2], b"12");
    assert_eq!(diffs[2], b"-8");

    let mut i0 = input("INPUT0", "BYTES", &[1, 16]);
    i0.contents = Some(pb::InferTensorContents {
        bytes_contents: a.iter().map(|s| s.clone().into()).collect(),
        ..Default::default()
    });
    let mut i1 = input("INPUT1", "BYTES", &[1, 16]);
    i1.contents = Some(pb::InferTensorContents {
        bytes_contents: b.iter().map(|s| s.clone().into()).collect(),
        ..Default::default()
    });
    let resp = client
        .model_infer(pb::ModelInferRequest {
            model_name: "simple_string".into(),
            inputs: vec![i0, i1],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // grpc_explicit_byte_content_client.py reads the answer as raw BYTES elements.
    assert!(resp.outputs.iter().all(|o| o.contents.is_none()));
    let sums = split_bytes_elements(&resp.raw_output_contents[0]);
    assert_eq!(&sums[15][..], b"25");
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn simple_identity_and_identity_echo_their_inputs() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    let items = ["alpha", "", "gamma"];
    let resp = client
        .model_infer(pb::ModelInferRequest {
            model_name: "simple_identity".into(),
            inputs: vec![input("INPUT0", "BYTES", &[1, 3])],
            raw_input_contents: vec![bytes_elements(&items)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.outputs[0].name, "OUTPUT0");
    assert_eq!(resp.outputs[0].shape, vec![1, 3]);
    assert_eq!(resp.raw_output_contents[0], bytes_elements(&items));

    // identity: any names, types and shapes, answered under the same names.
    let payload: Vec<u8> = (0..=255).cycle().take(3 * 1024 * 1024).collect();
    let resp = client
        .model_infer(pb::ModelInferRequest {
            model_name: "identity".into(),
            inputs: vec![
                input("blob", "UINT8", &[payload.len() as i64]),
                input("half", "FP16", &[2]),
                input("words", "BYTES", &[2]),
            ],
            raw_input_contents: vec![
                payload.clone().into(),
                vec![0, 60, 0, 188].into(),
                bytes_elements(&["x", "yz"]),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = resp.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["blob", "half", "words"]);
    assert_eq!(resp.outputs[1].datatype, "FP16");
    assert_eq!(&resp.raw_output_contents[0][..], &payload[..]);
    assert_eq!(&resp.raw_output_contents[1][..], &[0, 60, 0, 188]);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn iris_classifies_known_flowers_raw_and_typed() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    let samples: Vec<f32> = vec![
        5.1, 3.5, 1.4, 0.2, // setosa
        7.0, 3.2, 4.7, 1.4, // versicolor
        6.3, 3.3, 6.0, 2.5, // virginica
    ];
    let raw: Vec<u8> = samples.iter().flat_map(|x| x.to_le_bytes()).collect();
    let resp = client
        .model_infer(pb::ModelInferRequest {
            model_name: "iris".into(),
            inputs: vec![input("features", "FP32", &[3, 4])],
            raw_input_contents: vec![raw.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let probs_at = resp
        .outputs
        .iter()
        .position(|o| o.name == "probabilities")
        .unwrap();
    let label_at = resp.outputs.iter().position(|o| o.name == "label").unwrap();
    assert_eq!(resp.outputs[probs_at].shape, vec![3, 3]);
    assert_eq!(resp.outputs[label_at].datatype, "INT64");
    assert_eq!(i64s(&resp.raw_output_contents[label_at]), vec![0, 1, 2]);
    let p = f32s(&resp.raw_output_contents[probs_at]);
    for row in p.chunks(3) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    assert!(p[0] > 0.98, "setosa is confidently setosa: {}", p[0]);

    let mut x = input("features", "FP32", &[1, 4]);
    x.contents = Some(pb::InferTensorContents {
        fp32_contents: vec![6.3, 3.3, 6.0, 2.5],
        ..Default::default()
    });
    let resp = client
        .model_infer(pb::ModelInferRequest {
            model_name: "iris".into(),
            inputs: vec![x],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let label = resp.outputs.iter().position(|o| o.name == "label").unwrap();
    assert!(resp.outputs[label].contents.is_none(), "typed in, raw out");
    assert_eq!(i64s(&resp.raw_output_contents[label]), vec![2]);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn model_information_rpcs_describe_the_embedded_models() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    assert!(
        client
            .server_live(pb::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        client
            .server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let meta = client
        .server_metadata(pb::ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "keel");
    assert_eq!(meta.version, env!("CARGO_PKG_VERSION"));

    let ready = |name: &str| pb::ModelReadyRequest {
        name: name.into(),
        version: String::new(),
    };
    assert!(
        client
            .model_ready(ready("iris"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !client
            .model_ready(ready("nope"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );

    let m = client
        .model_metadata(pb::ModelMetadataRequest {
            name: "simple".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.versions, vec!["1"]);
    assert_eq!(m.inputs[0].name, "INPUT0");
    assert_eq!(m.inputs[0].datatype, "INT32");
    assert_eq!(m.inputs[0].shape, vec![-1, 16]);
    assert_eq!(m.outputs[1].name, "OUTPUT1");

    let c = client
        .model_config(pb::ModelConfigRequest {
            name: "simple_string".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(c.max_batch_size, 8);
    assert_eq!(c.input[0].data_type, pb::DataType::TypeString as i32);
    assert_eq!(c.input[0].dims, vec![16]);

    let index = client
        .repository_index(pb::RepositoryIndexRequest {
            repository_name: String::new(),
            ready: true,
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = index.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "identity",
            "iris",
            "simple",
            "simple_identity",
            "simple_int8",
            "simple_string"
        ]
    );
    assert!(index.models.iter().all(|m| m.state == "READY"));
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn statistics_count_what_was_served() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    let stats = |name: &str| pb::ModelStatisticsRequest {
        name: name.into(),
        version: String::new(),
    };
    let before = client
        .model_statistics(stats("simple"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.model_stats[0].inference_count, 0);

    client.model_infer(simple_request()).await.unwrap();
    client.model_infer(simple_request()).await.unwrap();
    let mut bad = simple_request();
    bad.raw_input_contents.pop();
    bad.inputs.pop();
    assert!(client.model_infer(bad).await.is_err());

    let after = client
        .model_statistics(stats("simple"))
        .await
        .unwrap()
        .into_inner();
    let s = &after.model_stats[0];
    assert_eq!(s.name, "simple");
    assert_eq!(s.version, "1");
    assert_eq!(s.inference_count, 2);
    assert_eq!(s.execution_count, 2);
    let i = s.inference_stats.as_ref().unwrap();
    assert_eq!(i.success.as_ref().unwrap().count, 2);
    // Keel turned the malformed request away before the model saw it.
    assert_eq!(i.fail.as_ref().unwrap().count, 0);
    assert_eq!(i.compute_infer.as_ref().unwrap().count, 2);
    assert!(s.last_inference > 0);
    assert_eq!(s.batch_stats[0].batch_size, 1);

    let all = client
        .model_statistics(stats(""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.model_stats.len(), 6, "one entry per embedded model");
    keel.stop().await.unwrap();
}
