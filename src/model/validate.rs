//! Checks an inference request against a model's contract before the model sees it.
//!
//! # Errors
//!
//! Every [`InvalidRequest`] names the tensor (or field) and the rule it broke, so the client
//! can fix the request from the message alone.

use super::{DataType, InferRequest, ModelSpec, TensorError, TensorSpec};

/// Why a request is not a valid inference request (answered with INVALID_ARGUMENT).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InvalidRequest {
    /// The request names no model.
    #[error("model_name is empty")]
    MissingModelName,
    /// A tensor whose data does not match its shape and data type.
    #[error("input '{tensor}': {problem}")]
    Tensor {
        /// Tensor name.
        tensor: String,
        /// The problem.
        problem: TensorError,
    },
    /// A data type the protocol does not define.
    #[error(
        "input '{tensor}': unknown datatype {datatype:?} (expected one of BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BF16, BYTES)"
    )]
    UnknownDataType {
        /// Tensor name.
        tensor: String,
        /// The datatype as sent.
        datatype: String,
    },
    /// `raw_input_contents` does not have one entry per input.
    #[error("raw_input_contents has {raw} entries but the request has {inputs} inputs")]
    RawCount {
        /// Inputs in the request.
        inputs: usize,
        /// Raw entries in the request.
        raw: usize,
    },
    /// Both raw and typed contents: the protocol allows one or the other.
    #[error("input '{tensor}': typed contents are not allowed when raw_input_contents is used")]
    MixedContents {
        /// Tensor name.
        tensor: String,
    },
    /// The same input twice.
    #[error("input '{tensor}' appears more than once")]
    DuplicateInput {
        /// Tensor name.
        tensor: String,
    },
    /// An input the model does not have.
    #[error("input '{tensor}' is not an input of model '{model}' (inputs: {})", expected.join(", "))]
    UnknownInput {
        /// Model name.
        model: String,
        /// Tensor name.
        tensor: String,
        /// The model's inputs.
        expected: Vec<String>,
    },
    /// A required input is missing.
    #[error("input '{tensor}' of model '{model}' is missing")]
    MissingInput {
        /// Model name.
        model: String,
        /// Tensor name.
        tensor: String,
    },
    /// An input of the wrong data type.
    #[error("input '{tensor}': datatype {actual} does not match the model's {expected}")]
    InputDataType {
        /// Tensor name.
        tensor: String,
        /// What the model takes.
        expected: DataType,
        /// What was sent.
        actual: DataType,
    },
    /// An input of the wrong shape.
    #[error(
        "input '{tensor}': shape {actual:?} does not match the model's {expected:?} (-1 is any size)"
    )]
    InputShape {
        /// Tensor name.
        tensor: String,
        /// What the model takes, batch dimension included.
        expected: Vec<i64>,
        /// What was sent.
        actual: Vec<i64>,
    },
    /// A batch larger than the model takes, or empty.
    #[error("input '{tensor}': batch size {batch} is outside 1..={max} (max_batch_size)")]
    BatchSize {
        /// Tensor name.
        tensor: String,
        /// The batch sent.
        batch: i64,
        /// The model's max_batch_size.
        max: u32,
    },
    /// Inputs with different batch sizes.
    #[error(
        "input '{tensor}': batch size {batch} differs from input '{first}' with batch size {first_batch}"
    )]
    BatchMismatch {
        /// Tensor name.
        tensor: String,
        /// Its batch size.
        batch: i64,
        /// The first input.
        first: String,
        /// The first input's batch size.
        first_batch: i64,
    },
    /// An output the model does not have.
    #[error("output '{output}' is not an output of model '{model}' (outputs: {})", expected.join(", "))]
    UnknownOutput {
        /// Model name.
        model: String,
        /// Output name.
        output: String,
        /// The model's outputs.
        expected: Vec<String>,
    },
    /// An element the model cannot interpret.
    #[error("input '{tensor}': element {index} {reason}")]
    BadElement {
        /// Tensor name.
        tensor: String,
        /// Position in the flattened tensor.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

impl InvalidRequest {
    /// The request field the problem is in, for `google.rpc.BadRequest` details.
    pub fn field(&self) -> String {
        match self {
            InvalidRequest::MissingModelName => "model_name".into(),
            InvalidRequest::RawCount { .. } => "raw_input_contents".into(),
            InvalidRequest::UnknownOutput { output, .. } => format!("outputs[{output}]"),
            InvalidRequest::MissingInput { tensor, .. } => format!("inputs[{tensor}]"),
            InvalidRequest::Tensor { tensor, .. }
            | InvalidRequest::UnknownDataType { tensor, .. }
            | InvalidRequest::MixedContents { tensor }
            | InvalidRequest::DuplicateInput { tensor }
            | InvalidRequest::UnknownInput { tensor, .. }
            | InvalidRequest::InputDataType { tensor, .. }
            | InvalidRequest::InputShape { tensor, .. }
            | InvalidRequest::BatchSize { tensor, .. }
            | InvalidRequest::BatchMismatch { tensor, .. }
            | InvalidRequest::BadElement { tensor, .. } => format!("inputs[{tensor}]"),
        }
    }
}

/// Checks `req` against `spec`; returns the batch size (1 for a model that does not batch).
///
/// 1. Every input is known (unless the model takes any), appears once and has the right type.
/// 2. Every declared input is present.
/// 3. Shapes match the contract, -1 matching any size; for a batching model the first
///    dimension is the batch, the same for every input and within `1..=max_batch_size`.
/// 4. Every requested output exists.
pub fn validate(req: &InferRequest, spec: &ModelSpec) -> Result<u64, InvalidRequest> {
    let mut batch: Option<(&str, i64)> = None;
    for (i, input) in req.inputs.iter().enumerate() {
        let name = input.name();
        if req.inputs[..i].iter().any(|t| t.name() == name) {
            return Err(InvalidRequest::DuplicateInput {
                tensor: name.to_string(),
            });
        }
        if spec.any_inputs {
            continue;
        }
        let Some(want) = spec.inputs.iter().find(|s| s.name == name) else {
            return Err(InvalidRequest::UnknownInput {
                model: spec.name.clone(),
                tensor: name.to_string(),
                expected: names(&spec.inputs),
            });
        };
        if input.dtype() != want.dtype {
            return Err(InvalidRequest::InputDataType {
                tensor: name.to_string(),
                expected: want.dtype,
                actual: input.dtype(),
            });
        }
        let shape = input.shape();
        let (dims, this_batch) = if spec.max_batch_size > 0 {
            match shape.split_first() {
                Some((&b, rest)) => (rest, Some(b)),
                None => (shape, None),
            }
        } else {
            (shape, None)
        };
        let matches = dims.len() == want.dims.len()
            && dims.iter().zip(&want.dims).all(|(&d, &w)| w < 0 || d == w)
            && (spec.max_batch_size == 0 || this_batch.is_some());
        if !matches {
            let mut expected = Vec::with_capacity(want.dims.len() + 1);
            if spec.max_batch_size > 0 {
                expected.push(-1);
            }
            expected.extend_from_slice(&want.dims);
            return Err(InvalidRequest::InputShape {
                tensor: name.to_string(),
                expected,
                actual: shape.to_vec(),
            });
        }
        if let Some(b) = this_batch {
            if b < 1 || b > i64::from(spec.max_batch_size) {
                return Err(InvalidRequest::BatchSize {
                    tensor: name.to_string(),
                    batch: b,
                    max: spec.max_batch_size,
                });
            }
            match batch {
                Some((first, first_batch)) if first_batch != b => {
                    return Err(InvalidRequest::BatchMismatch {
                        tensor: name.to_string(),
                        batch: b,
                        first: first.to_string(),
                        first_batch,
                    });
                }
                Some(_) => {}
                None => batch = Some((name, b)),
            }
        }
    }
    if !spec.any_inputs {
        if let Some(missing) = spec
            .inputs
            .iter()
            .find(|s| !req.inputs.iter().any(|t| t.name() == s.name))
        {
            return Err(InvalidRequest::MissingInput {
                model: spec.name.clone(),
                tensor: missing.name.clone(),
            });
        }
        for out in &req.outputs {
            if !spec.outputs.iter().any(|s| s.name == out.name) {
                return Err(InvalidRequest::UnknownOutput {
                    model: spec.name.clone(),
                    output: out.name.clone(),
                    expected: names(&spec.outputs),
                });
            }
        }
    }
    Ok(batch.map_or(1, |(_, b)| b.unsigned_abs()))
}

fn names(specs: &[TensorSpec]) -> Vec<String> {
    specs.iter().map(|s| s.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContentForm, Parameters, RequestedOutput, Tensor};

    fn spec() -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            versions: vec!["1".into()],
            platform: "p".into(),
            backend: "b".into(),
            max_batch_size: 8,
            inputs: vec![
                TensorSpec::new("A", DataType::Int32, &[4]),
                TensorSpec::new("B", DataType::Int32, &[-1]),
            ],
            outputs: vec![TensorSpec::new("Y", DataType::Int32, &[4])],
            any_inputs: false,
        }
    }

    fn req(inputs: Vec<Tensor>) -> InferRequest {
        InferRequest {
            model: "m".into(),
            version: String::new(),
            id: String::new(),
            parameters: Parameters::new(),
            inputs,
            outputs: vec![],
            form: ContentForm::Raw,
        }
    }

    fn t(name: &str, shape: Vec<i64>) -> Tensor {
        let n = crate::model::element_count(&shape).unwrap();
        Tensor::from_values(name, shape, &vec![0i32; n]).unwrap()
    }

    #[test]
    fn a_matching_request_passes_and_reports_its_batch() {
        assert_eq!(
            validate(&req(vec![t("A", vec![3, 4]), t("B", vec![3, 7])]), &spec()),
            Ok(3)
        );
    }

    #[test]
    fn each_broken_rule_is_named() {
        let s = spec();
        let e = validate(&req(vec![t("A", vec![1, 4])]), &s).unwrap_err();
        assert_eq!(e.to_string(), "input 'B' of model 'm' is missing");
        let e = validate(
            &req(vec![
                t("A", vec![1, 4]),
                t("B", vec![1, 1]),
                t("C", vec![1]),
            ]),
            &s,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 'C' is not an input of model 'm' (inputs: A, B)"
        );
        let e = validate(&req(vec![t("A", vec![1, 5]), t("B", vec![1, 1])]), &s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 'A': shape [1, 5] does not match the model's [-1, 4] (-1 is any size)"
        );
        let e = validate(&req(vec![t("A", vec![9, 4]), t("B", vec![9, 1])]), &s).unwrap_err();
        assert!(matches!(
            e,
            InvalidRequest::BatchSize {
                batch: 9,
                max: 8,
                ..
            }
        ));
        let e = validate(&req(vec![t("A", vec![2, 4]), t("B", vec![3, 1])]), &s).unwrap_err();
        assert!(matches!(
            e,
            InvalidRequest::BatchMismatch {
                batch: 3,
                first_batch: 2,
                ..
            }
        ));
        let e = validate(&req(vec![t("A", vec![4]), t("B", vec![1, 1])]), &s).unwrap_err();
        assert!(matches!(e, InvalidRequest::InputShape { .. }), "{e}");
        let f = Tensor::from_values("A", vec![1, 4], &[0f32; 4]).unwrap();
        let e = validate(&req(vec![f, t("B", vec![1, 1])]), &s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 'A': datatype FP32 does not match the model's INT32"
        );
        let e = validate(&req(vec![t("A", vec![1, 4]), t("A", vec![1, 4])]), &s).unwrap_err();
        assert_eq!(e.field(), "inputs[A]");
        let mut r = req(vec![t("A", vec![1, 4]), t("B", vec![1, 1])]);
        r.outputs.push(RequestedOutput {
            name: "Z".into(),
            parameters: Parameters::new(),
        });
        let e = validate(&r, &s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "output 'Z' is not an output of model 'm' (outputs: Y)"
        );
    }

    #[test]
    fn a_model_that_does_not_batch_checks_full_shapes() {
        let mut s = spec();
        s.max_batch_size = 0;
        s.inputs = vec![TensorSpec::new("A", DataType::Int32, &[-1, 4])];
        assert_eq!(validate(&req(vec![t("A", vec![5, 4])]), &s), Ok(1));
        assert!(validate(&req(vec![t("A", vec![4])]), &s).is_err());
    }
}
