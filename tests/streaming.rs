//! ModelStreamInfer in Triton's dialect: one answer per request, in order, and an error on
//! one request becomes that message's `error_message` while the stream goes on.

mod common;

use common::*;
use keel::pb::inference as pb;

#[tokio::test]
async fn answers_come_in_request_order_and_errors_do_not_end_the_stream() {
    let keel = Keel::embedded().await;
    let mut client = keel.client().await;
    let mut requests = Vec::new();
    for i in 0..20 {
        let mut r = simple_request();
        r.id = format!("r{i}");
        r.raw_input_contents[1] = i32_bytes(&[i; 16]);
        if i == 7 {
            r.model_name = "missing".into();
        }
        if i == 11 {
            r.raw_input_contents[0] = vec![0u8; 3].into();
        }
        requests.push(r);
    }
    let mut answers = client
        .model_stream_infer(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(a) = answers.message().await.unwrap() {
        got.push(a);
    }
    assert_eq!(got.len(), 20, "one answer per request");
    for (i, a) in got.iter().enumerate() {
        let resp = a.infer_response.as_ref().unwrap();
        assert_eq!(resp.id, format!("r{i}"), "answers keep request order");
        let last = resp.parameters["triton_final_response"]
            .parameter_choice
            .clone();
        assert_eq!(
            last,
            Some(pb::infer_parameter::ParameterChoice::BoolParam(true))
        );
        match i {
            7 => assert_eq!(a.error_message, "unknown model 'missing'"),
            11 => assert!(
                a.error_message
                    .starts_with("input 'INPUT0': raw content is 3 bytes"),
                "{}",
                a.error_message
            ),
            _ => {
                assert_eq!(a.error_message, "");
                let sum = i32s(&resp.raw_output_contents[0]);
                assert_eq!(sum[0], i as i32, "0 + {i}");
            }
        }
    }
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn streamed_requests_are_forwarded_as_unary_calls() {
    let upstream = Keel::embedded().await;
    let front = Keel::with_config(&format!(
        "[upstreams.up]\nendpoints = [\"{}\"]\n[models.iris]\nbackend = \"up\"\n",
        upstream.addr
    ))
    .await;
    let mut client = front.client().await;
    let features: Vec<u8> = [5.1f32, 3.5, 1.4, 0.2]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let req = pb::ModelInferRequest {
        model_name: "iris".into(),
        inputs: vec![input("features", "FP32", &[1, 4])],
        raw_input_contents: vec![features.into()],
        ..Default::default()
    };
    let mut answers = client
        .model_stream_infer(futures::stream::iter(vec![req.clone(), req]))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(a) = answers.message().await.unwrap() {
        assert_eq!(a.error_message, "");
        let resp = a.infer_response.unwrap();
        let label = resp.outputs.iter().position(|o| o.name == "label").unwrap();
        assert_eq!(i64s(&resp.raw_output_contents[label]), vec![0]);
        n += 1;
    }
    assert_eq!(n, 2);
    let mut up = upstream.client().await;
    let stats = up
        .model_statistics(pb::ModelStatisticsRequest {
            name: "iris".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stats.model_stats[0].execution_count, 2,
        "two unary calls upstream"
    );
    front.stop().await.unwrap();
    upstream.stop().await.unwrap();
}
