use proptest::prelude::*;

use super::*;
use crate::model::{ModelSpec, TensorSpec};

fn iris() -> Contract {
    Contract {
        model: "iris".into(),
        inputs: vec![TensorSpec::new("features", DataType::Fp32, &[-1, 4])],
        outputs: vec![
            TensorSpec::new("probabilities", DataType::Fp32, &[-1, 3]),
            TensorSpec::new("label", DataType::Int64, &[-1]),
        ],
        max_batch_size: Some(0),
        any_inputs: false,
        outputs_complete: true,
    }
}

fn simple() -> Contract {
    Contract::of_spec(&ModelSpec {
        name: "simple".into(),
        versions: vec!["1".into()],
        platform: "p".into(),
        backend: "b".into(),
        max_batch_size: 8,
        inputs: vec![
            TensorSpec::new("INPUT0", DataType::Int32, &[16]),
            TensorSpec::new("INPUT1", DataType::Int32, &[16]),
        ],
        outputs: vec![TensorSpec::new("OUTPUT0", DataType::Int32, &[16])],
        any_inputs: false,
    })
}

fn n(x: f64) -> Value {
    Value::Number(x)
}

fn list(xs: &[f64]) -> Value {
    Value::List(xs.iter().map(|x| n(*x)).collect())
}

fn request(model: &str, instances: Vec<Value>) -> Request {
    Request {
        model: model.into(),
        version: String::new(),
        id: "r".into(),
        instances,
        parameters: Parameters::new(),
    }
}

fn features() -> V1Mapping {
    V1Mapping {
        features: ["sepal_length", "sepal_width", "petal_length", "petal_width"]
            .map(String::from)
            .to_vec(),
        ..V1Mapping::default()
    }
}

#[test]
fn number_lists_batch_into_the_models_only_input() {
    let req = upgrade(
        request(
            "iris",
            vec![list(&[5.1, 3.5, 1.4, 0.2]), list(&[6.7, 3.0, 5.2, 2.3])],
        ),
        &iris(),
        &V1Mapping::default(),
    )
    .unwrap();
    assert_eq!(req.inputs.len(), 1);
    assert_eq!(req.inputs[0].name(), "features");
    assert_eq!(req.inputs[0].shape(), [2, 4]);
    assert_eq!(
        req.inputs[0].values::<f32>().unwrap(),
        [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]
    );
}

#[test]
fn named_features_fill_one_row_in_the_mappings_order() {
    let instance = Value::Struct(
        [
            ("petal_width", 0.2),
            ("sepal_length", 5.1),
            ("petal_length", 1.4),
            ("sepal_width", 3.5),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), n(v)))
        .collect(),
    );
    let req = upgrade(request("iris", vec![instance]), &iris(), &features()).unwrap();
    assert_eq!(req.inputs[0].values::<f32>().unwrap(), [5.1, 3.5, 1.4, 0.2]);
}

#[test]
fn a_struct_without_features_names_the_models_inputs() {
    let instance = Value::Struct(
        [("INPUT0", list(&[1.0; 16])), ("INPUT1", list(&[2.0; 16]))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    );
    let req = upgrade(
        request("simple", vec![instance]),
        &simple(),
        &V1Mapping::default(),
    )
    .unwrap();
    assert_eq!(req.inputs[1].name(), "INPUT1");
    assert_eq!(req.inputs[1].shape(), [1, 16]);
    assert_eq!(req.inputs[1].values::<i32>().unwrap(), [2; 16]);
}

#[test]
fn every_problem_names_the_instance_and_field() {
    let r = request(
        "iris",
        vec![
            list(&[5.1, 3.5, 1.4, 0.2]),
            list(&[5.1, 3.5, 1.4]),
            Value::List(vec![n(1.0), Value::String("x".into()), n(2.0), n(3.0)]),
            Value::Struct([("petal_width".to_string(), n(0.1))].into_iter().collect()),
        ],
    );
    let e = upgrade(r, &iris(), &V1Mapping::default()).unwrap_err();
    let text: Vec<String> = e
        .violations()
        .iter()
        .map(|v| v.problem.to_string())
        .collect();
    assert_eq!(
        text,
        [
            "instances[1]: expected 4 numbers, got 3",
            "instances[2]: element 1: input 'features' is FP32 and takes numbers",
            "instances[3].petal_width: not an input of model 'iris' (inputs: features)",
            "instances[3].features: missing",
        ]
    );
    assert_eq!(e.violations()[0].field, "instances[1]");

    let r = request("simple", vec![list(&[1.5; 16])]);
    let m = V1Mapping {
        input: Some("INPUT0".into()),
        ..V1Mapping::default()
    };
    let e = upgrade(r, &simple(), &m).unwrap_err();
    assert_eq!(
        e.to_string(),
        "instances[0]: element 0: 1.5 is not an integer, as INT32 needs"
    );
    let e = upgrade(
        request("simple", vec![list(&[1.0; 16])]),
        &simple(),
        &V1Mapping::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("has 2 inputs (INPUT0, INPUT1)"),
        "{e}"
    );
}

/// A struct instance of `simple` with `INPUT0` and `INPUT1`.
fn simple_instance(input0: Value, input1: Value) -> Value {
    Value::Struct(
        [("INPUT0", input0), ("INPUT1", input1)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

#[test]
fn a_bad_element_names_the_input_it_was_given_for() {
    let mut bad = [1.0; 16];
    bad[3] = 2.5;
    let r = request(
        "simple",
        vec![
            simple_instance(list(&[1.0; 16]), list(&[1.0; 16])),
            simple_instance(list(&[1.0; 16]), list(&bad)),
        ],
    );
    let e = upgrade(r, &simple(), &V1Mapping::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "instances[1].INPUT1: element 3: 2.5 is not an integer, as INT32 needs"
    );
    assert_eq!(e.violations()[0].field, "instances[1].INPUT1");

    let mut big = [1.0; 16];
    big[0] = 1e10;
    let r = request(
        "simple",
        vec![simple_instance(list(&big), list(&[1.0; 16]))],
    );
    let e = upgrade(r, &simple(), &V1Mapping::default()).unwrap_err();
    assert_eq!(e.violations()[0].field, "instances[0].INPUT0");
    assert!(
        e.to_string()
            .starts_with("instances[0].INPUT0: element 0: "),
        "{e}"
    );
}

#[test]
fn a_bad_feature_is_named_by_its_feature() {
    let mut instance: BTreeMap<String, Value> = features()
        .features
        .iter()
        .map(|f| (f.clone(), n(1.0)))
        .collect();
    instance.insert("petal_length".into(), Value::String("long".into()));
    let r = request("iris", vec![Value::Struct(instance)]);
    let e = upgrade(r, &iris(), &features()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "instances[0].petal_length: input 'features' is FP32 and takes numbers"
    );
    assert_eq!(e.violations()[0].field, "instances[0].petal_length");
}

#[test]
fn instances_of_different_shapes_name_the_input_that_differs() {
    let contract = Contract {
        model: "ragged".into(),
        inputs: vec![TensorSpec::new("tokens", DataType::Fp32, &[-1, -1])],
        outputs: vec![TensorSpec::new("out", DataType::Fp32, &[-1])],
        max_batch_size: Some(0),
        any_inputs: false,
        outputs_complete: true,
    };
    let one = |xs: &[f64]| Value::Struct([("tokens".to_string(), list(xs))].into_iter().collect());
    let r = request("ragged", vec![one(&[1.0, 2.0]), one(&[1.0, 2.0, 3.0])]);
    let e = upgrade(r, &contract, &V1Mapping::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "instances[1].tokens: shape [3] differs from instances[0].tokens's [2]; the instances of one request are batched together"
    );
}

fn answer(outputs: Vec<Tensor>) -> InferResponse {
    InferResponse {
        model: "iris".into(),
        version: "1".into(),
        id: "r".into(),
        parameters: Parameters::new(),
        outputs,
        form: crate::model::ContentForm::Raw,
        wire: Default::default(),
    }
}

#[test]
fn predictions_are_rows_labels_or_structs_of_outputs() {
    let probs = Tensor::from_values(
        "probabilities",
        vec![2, 3],
        &[0.1f32, 0.7, 0.2, 0.6, 0.3, 0.1],
    )
    .unwrap();
    let label = Tensor::from_values("label", vec![2], &[1i64, 0]).unwrap();
    let resp = answer(vec![probs.clone(), label.clone()]);
    let one = V1Mapping {
        output: Some("probabilities".into()),
        ..V1Mapping::default()
    };
    let p = downgrade(&resp, 2, &one).unwrap();
    assert_eq!(p[0], list(&[0.1f32 as f64, 0.7f32 as f64, 0.2f32 as f64]));

    let names = V1Mapping {
        output: Some("probabilities".into()),
        predict: crate::policy::Predict::Label,
        labels: ["setosa", "versicolor", "virginica"]
            .map(String::from)
            .to_vec(),
        ..V1Mapping::default()
    };
    assert_eq!(
        downgrade(&resp, 2, &names).unwrap(),
        [
            Value::String("versicolor".into()),
            Value::String("setosa".into())
        ]
    );

    let both = downgrade(&resp, 2, &V1Mapping::default()).unwrap();
    let Value::Struct(first) = &both[0] else {
        panic!("{both:?}")
    };
    assert_eq!(first["label"], n(1.0));
    assert!(downgrade(&answer(vec![label]), 3, &V1Mapping::default()).is_err());
}

/// Values of `dtype` that a JSON double carries exactly.
fn values(dtype: DataType) -> BoxedStrategy<Vec<f64>> {
    let ints = |lo: i64, hi: i64| {
        prop::collection::vec(lo..=hi, 1..6)
            .prop_map(|v| v.into_iter().map(|x| x as f64).collect())
            .boxed()
    };
    match dtype {
        DataType::Bool => ints(0, 1),
        DataType::Uint8 => ints(0, 255),
        DataType::Uint16 => ints(0, 65_535),
        DataType::Uint32 => ints(0, u32::MAX.into()),
        DataType::Uint64 | DataType::Int64 => ints(-(1 << 53), 1 << 53)
            .prop_map(move |v| {
                v.into_iter()
                    .map(|x| {
                        if dtype == DataType::Uint64 {
                            x.abs()
                        } else {
                            x
                        }
                    })
                    .collect()
            })
            .boxed(),
        DataType::Int8 => ints(-128, 127),
        DataType::Int16 => ints(-32_768, 32_767),
        DataType::Int32 => ints(i32::MIN.into(), i32::MAX.into()),
        DataType::Fp16 => prop::collection::vec(any::<u16>(), 1..6)
            .prop_map(|v| {
                v.into_iter()
                    .map(|h| f64::from(crate::model::cast::f16_to_f32(h)))
                    .filter(|x| x.is_finite())
                    .collect()
            })
            .boxed(),
        DataType::Bf16 => prop::collection::vec(any::<u16>(), 1..6)
            .prop_map(|v| {
                v.into_iter()
                    .map(|h| f64::from(crate::model::cast::bf16_to_f32(h)))
                    .filter(|x| x.is_finite())
                    .collect()
            })
            .boxed(),
        DataType::Fp32 => prop::collection::vec(any::<f32>(), 1..6)
            .prop_map(|v| {
                v.into_iter()
                    .filter(|x| x.is_finite())
                    .map(f64::from)
                    .collect()
            })
            .boxed(),
        _ => prop::collection::vec(any::<f64>(), 1..6)
            .prop_map(|v| v.into_iter().filter(|x| x.is_finite()).collect())
            .boxed(),
    }
}

fn round_trip(dtype: DataType, instances: Vec<Vec<Value>>) {
    let width = instances[0].len() as i64;
    let contract = Contract {
        model: "echo".into(),
        inputs: vec![TensorSpec::new("x", dtype, &[-1, width])],
        outputs: vec![TensorSpec::new("x", dtype, &[-1, width])],
        max_batch_size: None,
        any_inputs: false,
        outputs_complete: true,
    };
    let sent: Vec<Value> = instances.into_iter().map(Value::List).collect();
    let req = upgrade(
        request("echo", sent.clone()),
        &contract,
        &V1Mapping::default(),
    )
    .unwrap();
    // An identity model answers its input as its output.
    let resp = InferResponse {
        model: "echo".into(),
        version: "1".into(),
        id: req.id.clone(),
        parameters: Parameters::new(),
        outputs: req.inputs.clone(),
        form: crate::model::ContentForm::Raw,
        wire: Default::default(),
    };
    let back = downgrade(&resp, sent.len(), &V1Mapping::default()).unwrap();
    assert_eq!(back, sent, "{dtype}");
}

proptest! {
    #[test]
    fn v1_to_v2_to_v1_preserves_values_of_every_numeric_dtype(
        (dtype, vals) in prop::sample::select(
            DataType::ALL.iter().copied().filter(|d| *d != DataType::Bytes).collect::<Vec<_>>()
        )
        .prop_flat_map(|d| (Just(d), values(d)))
    ) {
        prop_assume!(!vals.is_empty());
        let row: Vec<Value> = vals.iter().map(|x| Value::Number(*x)).collect();
        round_trip(dtype, vec![row.clone(), row]);
    }

    #[test]
    fn v1_to_v2_to_v1_preserves_strings(strings in prop::collection::vec(".{0,12}", 1..5)) {
        let row: Vec<Value> = strings.into_iter().map(Value::String).collect();
        round_trip(DataType::Bytes, vec![row]);
    }
}
