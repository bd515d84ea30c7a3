//! Golden pairs: for each adapter kind, a request (or answer) before and after.

use std::collections::BTreeMap;

use super::*;
use crate::model::{ContentForm, DataType, Parameters, RequestedOutput, Tensor, TensorSpec};
use crate::policy::{StaticData, StaticTensor};

fn request_with(inputs: Vec<Tensor>) -> InferRequest {
    InferRequest {
        model: "m".into(),
        version: "1".into(),
        id: "r".into(),
        parameters: Parameters::new(),
        inputs,
        outputs: vec![],
        form: ContentForm::Raw,
        wire: Default::default(),
    }
}

fn answer_with(outputs: Vec<Tensor>) -> InferResponse {
    InferResponse {
        model: "m".into(),
        version: "2".into(),
        id: "r".into(),
        parameters: Parameters::new(),
        outputs,
        form: ContentForm::Raw,
        wire: Default::default(),
    }
}

fn adapter() -> VersionAdapter {
    VersionAdapter {
        to: "2".into(),
        ..VersionAdapter::default()
    }
}

fn map<V: Clone>(pairs: &[(&str, V)]) -> BTreeMap<String, V> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[test]
fn a_renamed_input_goes_by_its_new_name_to_the_new_version() {
    let a = VersionAdapter {
        rename_inputs: map(&[("x", "features".to_string())]),
        ..adapter()
    };
    let before = request_with(vec![
        Tensor::from_values("x", vec![1, 4], &[1f32, 2., 3., 4.]).unwrap(),
    ]);
    let after = request(before.clone(), &a).unwrap();
    assert_eq!(after.version, "2");
    assert_eq!(after.inputs[0].name(), "features");
    assert_eq!(
        after.inputs[0].data(),
        before.inputs[0].data(),
        "bytes unchanged"
    );
}

#[test]
fn a_lossless_cast_widens_and_a_lossy_one_needs_permission() {
    let a = VersionAdapter {
        cast_inputs: map(&[("x", DataType::Int64)]),
        ..adapter()
    };
    let before = request_with(vec![
        Tensor::from_values("x", vec![2], &[7i32, -1]).unwrap(),
    ]);
    let after = request(before, &a).unwrap();
    assert_eq!(after.inputs[0].values::<i64>().unwrap(), [7, -1]);

    let narrow = VersionAdapter {
        cast_inputs: map(&[("x", DataType::Fp16)]),
        ..adapter()
    };
    let before = request_with(vec![Tensor::from_values("x", vec![1], &[0.1f32]).unwrap()]);
    let e = request(before.clone(), &narrow).unwrap_err();
    assert_eq!(e.violations()[0].field, "inputs[0]");
    assert!(e.to_string().contains("allow_lossy"), "{e}");
    let lossy = VersionAdapter {
        allow_lossy: true,
        ..narrow
    };
    let after = request(before, &lossy).unwrap();
    assert_eq!(after.inputs[0].dtype(), DataType::Fp16);
}

#[test]
fn a_reshape_adds_a_batch_dimension_and_keeps_the_element_count() {
    let a = VersionAdapter {
        reshape_inputs: map(&[("x", vec![1, -1])]),
        ..adapter()
    };
    let before = request_with(vec![
        Tensor::from_values("x", vec![4], &[1f32, 2., 3., 4.]).unwrap(),
    ]);
    let after = request(before, &a).unwrap();
    assert_eq!(after.inputs[0].shape(), [1, 4]);
    let bad = VersionAdapter {
        reshape_inputs: map(&[("x", vec![3, -1])]),
        ..adapter()
    };
    let before = request_with(vec![
        Tensor::from_values("x", vec![4], &[1f32, 2., 3., 4.]).unwrap(),
    ]);
    let e = request(before, &bad).unwrap_err();
    assert!(
        e.to_string()
            .contains("4 elements do not fit shape [3, -1]"),
        "{e}"
    );
}

#[test]
fn an_input_the_old_client_does_not_send_gets_its_default() {
    let a = VersionAdapter {
        defaults: vec![StaticTensor {
            name: "temperature".into(),
            datatype: "FP32".into(),
            shape: vec![1],
            data: StaticData::Numbers(vec![0.5]),
        }],
        ..adapter()
    };
    let before = request_with(vec![Tensor::from_values("x", vec![1], &[1f32]).unwrap()]);
    let after = request(before, &a).unwrap();
    assert_eq!(after.inputs[1].name(), "temperature");
    assert_eq!(after.inputs[1].values::<f32>().unwrap(), [0.5]);
    // A client that sends it keeps its own value.
    let before = request_with(vec![
        Tensor::from_values("temperature", vec![1], &[0.9f32]).unwrap(),
    ]);
    let after = request(before, &a).unwrap();
    assert_eq!(after.inputs.len(), 1);
    assert_eq!(after.inputs[0].values::<f32>().unwrap(), [0.9]);
}

#[test]
fn outputs_are_asked_for_by_their_new_names_and_answered_by_the_old_ones() {
    let a = VersionAdapter {
        rename_outputs: map(&[("probabilities", "scores".to_string())]),
        cast_outputs: map(&[("scores", DataType::Fp64)]),
        reshape_outputs: map(&[("scores", vec![-1])]),
        outputs: vec!["scores".into()],
        ..adapter()
    };
    let mut before = request_with(vec![]);
    before.outputs.push(RequestedOutput {
        name: "scores".into(),
        parameters: Parameters::new(),
    });
    assert_eq!(
        request(before, &a).unwrap().outputs[0].name,
        "probabilities"
    );
    // No outputs named: the adapter's selection is asked for.
    let asked = request(request_with(vec![]), &a).unwrap();
    assert_eq!(asked.outputs[0].name, "probabilities");

    let answer = answer_with(vec![
        Tensor::from_values("probabilities", vec![1, 3], &[0.25f32, 0.5, 0.25]).unwrap(),
        Tensor::from_values("label", vec![1], &[1i64]).unwrap(),
    ]);
    let back = response(answer, &a).unwrap();
    assert_eq!(back.outputs.len(), 1, "only the selected output");
    let scores = &back.outputs[0];
    assert_eq!(scores.name(), "scores");
    assert_eq!(scores.shape(), [3]);
    assert_eq!(scores.values::<f64>().unwrap(), [0.25, 0.5, 0.25]);
}

#[test]
fn an_adapter_naming_what_the_model_lacks_is_reported_with_its_policy_path() {
    let a = VersionAdapter {
        rename_inputs: map(&[("x", "features".to_string())]),
        rename_outputs: map(&[("probs", "scores".to_string())]),
        ..adapter()
    };
    let contract = Contract {
        model: "m".into(),
        inputs: vec![TensorSpec::new("input", DataType::Fp32, &[-1, 4])],
        outputs: vec![TensorSpec::new("probabilities", DataType::Fp32, &[-1, 3])],
        max_batch_size: None,
        any_inputs: false,
        outputs_complete: true,
    };
    let problems: Vec<String> = check(&a, &contract, "models.m.adapters.\"1\"")
        .into_iter()
        .map(|(path, message)| format!("{path}: {message}"))
        .collect();
    assert_eq!(
        problems,
        [
            "models.m.adapters.\"1\".rename_inputs.x: model 'm' has no input 'features' (inputs: input)",
            "models.m.adapters.\"1\".rename_outputs.probs: model 'm' has no output 'probs' (outputs: probabilities)"
        ]
    );
}
