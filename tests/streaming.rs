//! ModelStreamInfer in Triton's dialect: one answer per request, in order, and an error on
//! one request becomes that message's `error_message` while the stream goes on. Each
//! streamed request is served as a ModelInfer call would be: fallback ladder, version
//! adapters, tenants' admission, metrics.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use keel::pb::inference as pb;
use pb::infer_parameter::ParameterChoice;
use tonic::Code;

/// Sends `requests` on one stream and reads every answer.
async fn stream(
    client: &mut Client,
    requests: Vec<pb::ModelInferRequest>,
) -> Vec<pb::ModelStreamInferResponse> {
    let mut answers = client
        .model_stream_infer(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(a) = answers.message().await.unwrap() {
        got.push(a);
    }
    got
}

fn param(resp: &pb::ModelInferResponse, key: &str) -> Option<ParameterChoice> {
    resp.parameters
        .get(key)
        .and_then(|p| p.parameter_choice.clone())
}

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
    let got = stream(&mut client, requests).await;
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
    let req = pb::ModelInferRequest {
        model_name: "iris".into(),
        inputs: vec![input("features", "FP32", &[1, 4])],
        raw_input_contents: vec![f32_bytes(&[5.1, 3.5, 1.4, 0.2])],
        ..Default::default()
    };
    let got = stream(&mut client, vec![req.clone(), req]).await;
    assert_eq!(got.len(), 2);
    for a in got {
        assert_eq!(a.error_message, "");
        let resp = a.infer_response.unwrap();
        let label = resp.outputs.iter().position(|o| o.name == "label").unwrap();
        assert_eq!(i64s(&resp.raw_output_contents[label]), vec![0]);
    }
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

#[tokio::test]
async fn a_streamed_request_falls_back_and_is_counted_as_a_unary_call_is() {
    let down = ScriptedUpstream::new(Script::failing(Code::Unavailable, "down"));
    let (addr, _stop) = down.serve().await;
    let keel = Keel::with_admin(&format!(
        "[defaults.retry]\nmax_attempts = 1\n[defaults.breaker]\nenabled = false\n\
         [upstreams.up]\nendpoints = [\"{addr}\"]\n\
         [models.simple]\nbackend = \"up\"\n\
         fallback = [{{ static = [{{ name = \"OUTPUT0\", datatype = \"INT32\", shape = [1, 2], data = [-1, -1] }}] }}]\n\
         [models.iris]\nbackend = \"embedded\"\n"
    ))
    .await;
    let mut client = keel.client().await;
    let mut requests = Vec::new();
    for i in 0..3 {
        let mut r = simple_request();
        r.id = format!("s{i}");
        requests.push(r);
    }
    let got = stream(&mut client, requests).await;
    assert_eq!(got.len(), 3);
    for (i, a) in got.iter().enumerate() {
        assert_eq!(a.error_message, "", "the ladder answered");
        let resp = a.infer_response.as_ref().unwrap();
        assert_eq!(resp.id, format!("s{i}"));
        assert_eq!(
            param(resp, "keel.degraded"),
            Some(ParameterChoice::BoolParam(true))
        );
        assert_eq!(
            param(resp, "keel.tier"),
            Some(ParameterChoice::StringParam("static".into()))
        );
        assert_eq!(
            param(resp, "keel.degraded_reason"),
            Some(ParameterChoice::StringParam("unavailable".into()))
        );
        assert_eq!(
            param(resp, "triton_final_response"),
            Some(ParameterChoice::BoolParam(true))
        );
        assert_eq!(i32s(&resp.raw_output_contents[0]), vec![-1, -1]);
    }
    assert_eq!(down.seen().len(), 3, "each request tried the primary once");

    // A model without a ladder: counted as primary, one unary call each.
    let iris = pb::ModelInferRequest {
        model_name: "iris".into(),
        inputs: vec![input("features", "FP32", &[1, 4])],
        raw_input_contents: vec![f32_bytes(&[5.1, 3.5, 1.4, 0.2])],
        ..Default::default()
    };
    let got = stream(&mut client, vec![iris.clone(), iris]).await;
    assert!(got.iter().all(|a| a.error_message.is_empty()));

    let (_, scrape) = get(keel.admin.unwrap(), "/metrics").await;
    for (series, want) in [
        (
            "keel_requests_total{model=\"simple\",tier=\"static\",class=\"ok\"}",
            3.0,
        ),
        (
            "keel_requests_total{model=\"iris\",tier=\"primary\",class=\"ok\"}",
            2.0,
        ),
        (
            "keel_degraded_total{model=\"simple\",tier=\"static\",reason=\"unavailable\"}",
            3.0,
        ),
        ("keel_api_requests_total{api=\"v2\"}", 5.0),
    ] {
        assert_eq!(value(&scrape, series), Some(want), "{series} in\n{scrape}");
    }
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_streamed_request_for_an_adapted_version_is_adapted() {
    // Version "0" of iris called its input `x` and its scores `scores`.
    let keel = Keel::with_config(
        "[models.iris]\nbackend = \"embedded\"\n[models.iris.adapters.\"0\"]\nto = \"1\"\n\
         rename_inputs = { x = \"features\" }\nrename_outputs = { probabilities = \"scores\" }\n",
    )
    .await;
    let mut client = keel.client().await;
    let old = pb::ModelInferRequest {
        model_name: "iris".into(),
        model_version: "0".into(),
        id: "old".into(),
        inputs: vec![input("x", "FP32", &[1, 4])],
        raw_input_contents: vec![f32_bytes(&[6.5, 3.0, 5.8, 2.2])],
        ..Default::default()
    };
    let got = stream(&mut client, vec![old]).await;
    assert_eq!(got[0].error_message, "");
    let resp = got[0].infer_response.as_ref().unwrap();
    let names: Vec<&str> = resp.outputs.iter().map(|o| o.name.as_str()).collect();
    assert!(
        names.contains(&"scores") && !names.contains(&"probabilities"),
        "{names:?}"
    );
    assert_eq!(resp.id, "old");
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn each_streamed_request_has_its_own_request_id_and_is_retried_on_its_own() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(
        addr,
        "[defaults.retry]\nmax_attempts = 3\ninitial_backoff = \"1ms\"\n",
    ))
    .await;
    let mut client = keel.client().await;
    // The first attempt of `with-id` meets a transient failure; the retry answers.
    up.plan("with-id", vec![Step::Fail(Code::Unavailable, None)]);
    let mut named = simple_request();
    named.id = "with-id".into();
    let unnamed = pb::ModelInferRequest {
        id: String::new(),
        ..simple_request()
    };
    let mut req = tonic::Request::new(futures::stream::iter(vec![named, unnamed.clone(), unnamed]));
    req.metadata_mut()
        .insert("x-request-id", "stream-9".parse().unwrap());
    let mut answers = client.model_stream_infer(req).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(a) = answers.message().await.unwrap() {
        got.push(a);
    }
    assert_eq!(got.len(), 3);
    let ids: Vec<Option<ParameterChoice>> = got
        .iter()
        .map(|a| {
            assert_eq!(a.error_message, "", "the transient failure was retried");
            param(a.infer_response.as_ref().unwrap(), "keel.request_id")
        })
        .collect();
    let named_id = |s: &str| Some(ParameterChoice::StringParam(s.into()));
    assert_eq!(
        ids,
        [
            named_id("with-id"),
            named_id("stream-9-1"),
            named_id("stream-9-2")
        ],
        "the request's id, else the stream's and its index"
    );
    assert_eq!(
        up.seen_for("with-id").len(),
        2,
        "two attempts, the retry answered"
    );
    assert_eq!(up.seen_for("stream-9-1").len(), 1);
    assert_eq!(up.seen_for("stream-9-2").len(), 1);
    assert!(
        up.seen_for("stream-9").is_empty(),
        "no request used the stream's id"
    );
    keel.stop().await.unwrap();
}
