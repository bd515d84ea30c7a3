//! The legacy v1 API over loopback: predictions from `iris` and `simple` equal the v2
//! answers, a v1 client of an older model version works through an adapter, errors name
//! the instance and field (the input or feature, for a bad element), v1 calls are counted apart, and a deprecated v1 says so.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use keel::pb::keel_inference_v1 as v1;
use prost_types::value::Kind;
use tonic::Code;
use tonic_types::StatusExt as _;
use v1::prediction_service_client::PredictionServiceClient;

type V1Client = PredictionServiceClient<tonic::transport::Channel>;

fn num(x: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::NumberValue(x)),
    }
}

fn list(xs: &[f64]) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::ListValue(prost_types::ListValue {
            values: xs.iter().map(|x| num(*x)).collect(),
        })),
    }
}

fn object(fields: &[(&str, prost_types::Value)]) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::StructValue(prost_types::Struct {
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        })),
    }
}

fn numbers(v: &prost_types::Value) -> Vec<f64> {
    match &v.kind {
        Some(Kind::ListValue(l)) => l.values.iter().flat_map(numbers).collect(),
        Some(Kind::NumberValue(n)) => vec![*n],
        other => panic!("not numbers: {other:?}"),
    }
}

fn text(v: &prost_types::Value) -> &str {
    match &v.kind {
        Some(Kind::StringValue(s)) => s,
        other => panic!("not a string: {other:?}"),
    }
}

fn predict(model: &str, instances: Vec<prost_types::Value>) -> v1::PredictRequest {
    v1::PredictRequest {
        model_name: model.into(),
        instances,
        ..Default::default()
    }
}

async fn v1_client(keel: &Keel) -> V1Client {
    PredictionServiceClient::new(keel.channel().await)
}

const FLOWERS: [[f64; 4]; 3] = [
    [5.1, 3.5, 1.4, 0.2],
    [7.0, 3.2, 4.7, 1.4],
    [6.3, 3.3, 6.0, 2.5],
];

const IRIS: &str = r#"
[models.iris]
backend = "embedded"
[models.iris.v1]
features = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
output = "label"
predict = "label"
labels = ["setosa", "versicolor", "virginica"]
[models.simple]
backend = "embedded"
"#;

#[tokio::test]
async fn iris_and_simple_answer_v1_clients_as_they_answer_v2_clients() {
    let keel = Keel::with_admin(IRIS).await;
    let mut v1c = v1_client(&keel).await;

    // Named features, labels by name.
    let instances = FLOWERS
        .iter()
        .map(|f| {
            object(&[
                ("sepal_length", num(f[0])),
                ("sepal_width", num(f[1])),
                ("petal_length", num(f[2])),
                ("petal_width", num(f[3])),
            ])
        })
        .collect();
    let resp = v1c.predict(predict("iris", instances)).await.unwrap();
    let resp = resp.into_inner();
    assert_eq!(resp.model_name, "iris");
    assert_eq!(resp.model_version, "1");
    let labels: Vec<&str> = resp.predictions.iter().map(text).collect();
    assert_eq!(labels, ["setosa", "versicolor", "virginica"]);

    // simple: one struct per instance naming both inputs; the answer is a struct of both
    // outputs, equal to what v2 answers.
    let a: Vec<f64> = (0..16).map(f64::from).collect();
    let b = vec![1.0; 16];
    let instance = object(&[("INPUT0", list(&a)), ("INPUT1", list(&b))]);
    let resp = v1c
        .predict(predict("simple", vec![instance]))
        .await
        .unwrap()
        .into_inner();
    let mut v2 = keel.client().await;
    let direct = v2.model_infer(simple_request()).await.unwrap().into_inner();
    let Some(Kind::StructValue(s)) = &resp.predictions[0].kind else {
        panic!("{:?}", resp.predictions)
    };
    let sum: Vec<f64> = numbers(&s.fields["OUTPUT0"]);
    let direct_sum: Vec<f64> = i32s(&direct.raw_output_contents[0])
        .into_iter()
        .map(f64::from)
        .collect();
    assert_eq!(sum, direct_sum);
    let difference: Vec<f64> = (0..16).map(|i| f64::from(i) - 1.0).collect();
    assert_eq!(numbers(&s.fields["OUTPUT1"]), difference);

    // ModelStatus.
    let status = v1c
        .model_status(v1::ModelStatusRequest {
            model_name: "iris".into(),
            model_version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.ready);

    // Counted as v1, apart from v2.
    let (_, scrape) = get(keel.admin.unwrap(), "/metrics").await;
    assert_eq!(
        value(&scrape, "keel_api_requests_total{api=\"v1\"}"),
        Some(2.0),
        "{scrape}"
    );
    assert_eq!(
        value(&scrape, "keel_api_requests_total{api=\"v2\"}"),
        Some(1.0)
    );
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn errors_name_the_instance_and_field_and_keel_keeps_serving() {
    let keel = Keel::with_config(IRIS).await;
    let mut v1c = v1_client(&keel).await;
    let cases: Vec<(prost_types::Value, &str, &str)> = vec![
        (
            object(&[
                ("sepal_length", num(5.1)),
                ("sepal_width", num(3.5)),
                ("petal_length", num(1.4)),
            ]),
            "instances[1].petal_width",
            "instances[1].petal_width: missing",
        ),
        (
            object(&[
                ("sepal_length", num(5.1)),
                ("sepal_width", num(3.5)),
                ("petal_length", num(1.4)),
                ("petal_width", num(0.2)),
                ("colour", num(1.0)),
            ]),
            "instances[1].colour",
            "instances[1].colour: not a feature of model 'iris' (features: sepal_length, sepal_width, petal_length, petal_width)",
        ),
    ];
    let good = list(&FLOWERS[0]);
    for (bad, field, message) in cases {
        let s = v1c
            .predict(predict("iris", vec![good.clone(), bad]))
            .await
            .unwrap_err();
        assert_eq!(s.message(), message);
        assert_eq!(violation_fields(&s), [field]);
        // Still serving.
        let ok = v1c
            .predict(predict("iris", vec![good.clone()]))
            .await
            .unwrap();
        assert_eq!(text(&ok.into_inner().predictions[0]), "setosa");
    }
    // A list instance fills the model's only input.
    let s = v1c
        .predict(predict(
            "iris",
            vec![
                good.clone(),
                good.clone(),
                good.clone(),
                list(&[5.1, 3.5, 1.4]),
            ],
        ))
        .await
        .unwrap_err();
    assert_eq!(s.message(), "instances[3]: expected 4 numbers, got 3");

    // A bad element names the input it was given for, or its feature.
    let mut ints = [1.0; 16];
    ints[5] = 0.5;
    let s = v1c
        .predict(predict(
            "simple",
            vec![object(&[
                ("INPUT0", list(&[1.0; 16])),
                ("INPUT1", list(&ints)),
            ])],
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "instances[0].INPUT1: element 5: 0.5 is not an integer, as INT32 needs"
    );
    assert_eq!(violation_fields(&s), ["instances[0].INPUT1"]);
    let word = prost_types::Value {
        kind: Some(Kind::StringValue("long".into())),
    };
    let s = v1c
        .predict(predict(
            "iris",
            vec![
                good.clone(),
                object(&[
                    ("sepal_length", num(5.1)),
                    ("sepal_width", num(3.5)),
                    ("petal_length", word),
                    ("petal_width", num(0.2)),
                ]),
            ],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        s.message(),
        "instances[1].petal_length: input 'features' is FP32 and takes numbers"
    );
    assert_eq!(violation_fields(&s), ["instances[1].petal_length"]);

    let s = v1c.predict(predict("nope", vec![good])).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn an_older_client_keeps_working_through_a_version_adapter_and_hears_of_the_deprecation() {
    // Version "0" of iris called its input `x` and its scores `scores`; version "1" is the
    // embedded model with `features` and `probabilities`.
    let keel = Keel::with_config(
        r#"
[api.v1]
deprecated = true
[models.iris]
backend = "embedded"
[models.iris.v1]
output = "scores"
[models.iris.adapters."0"]
to = "1"
rename_inputs = { x = "features" }
rename_outputs = { probabilities = "scores" }
"#,
    )
    .await;
    let mut v1c = v1_client(&keel).await;
    let mut req = predict("iris", vec![list(&FLOWERS[2])]);
    req.model_version = "0".into();
    let resp = v1c.predict(req).await.unwrap();
    let deprecation = resp.metadata().get("keel-deprecation").cloned();
    let resp = resp.into_inner();
    let scores = numbers(&resp.predictions[0]);
    assert_eq!(scores.len(), 3);
    assert!(scores[2] > 0.5, "virginica: {scores:?}");
    assert!(
        deprecation.is_some_and(|d| d
            .to_str()
            .unwrap()
            .contains("inference.GRPCInferenceService")),
        "the deprecation trailer names the v2 API"
    );

    // A v2 client of version "0" sends `x` and reads `scores`.
    let mut v2 = keel.client().await;
    let raw: Vec<u8> = FLOWERS[2]
        .iter()
        .flat_map(|x| (*x as f32).to_le_bytes())
        .collect();
    let resp = v2
        .model_infer(keel::pb::inference::ModelInferRequest {
            model_name: "iris".into(),
            model_version: "0".into(),
            inputs: vec![input("x", "FP32", &[1, 4])],
            raw_input_contents: vec![raw.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = resp.outputs.iter().map(|o| o.name.as_str()).collect();
    assert!(
        names.contains(&"scores") && !names.contains(&"probabilities"),
        "{names:?}"
    );
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn an_adapter_that_does_not_fit_is_refused_at_load_or_at_the_first_call() {
    // Embedded: the model's contract is known when the policy loads.
    let bad = "[models.iris]\nbackend = \"embedded\"\n[models.iris.adapters.\"0\"]\nto = \"1\"\n\
               rename_inputs = { x = \"petals\" }\n";
    let policy = keel::policy::Policy::parse(bad).unwrap();
    let errors = keel::policy::builtin::check(&policy, &*keel::upstream::embedded::Embedded::new())
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("models.iris.adapters.\"0\".rename_inputs.x")
            && errors.contains("has no input 'petals'"),
        "{errors}"
    );

    // Upstream: known at the first call, which is refused naming the policy path.
    let upstream = Keel::embedded().await;
    let front = Keel::with_config(&format!(
        "[upstreams.up]\nendpoints = [\"{}\"]\n[models.iris]\nbackend = \"up\"\n\
         [models.iris.adapters.\"0\"]\nto = \"1\"\nrename_inputs = {{ x = \"petals\" }}\n",
        upstream.addr
    ))
    .await;
    let mut client = front.client().await;
    let s = client
        .model_infer(keel::pb::inference::ModelInferRequest {
            model_name: "iris".into(),
            model_version: "0".into(),
            inputs: vec![input("x", "FP32", &[1, 4])],
            raw_input_contents: vec![vec![0u8; 16].into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert_eq!(
        s.get_details_error_info().unwrap().reason,
        "ADAPTER_MISMATCH"
    );
    assert!(s.message().contains("rename_inputs.x"), "{}", s.message());
    front.stop().await.unwrap();
    upstream.stop().await.unwrap();
}
