//! Checks an inference request against a model's contract before the model sees it.
//!
//! # Errors
//!
//! Every [`InvalidRequest`] names the tensor (or field) and the rule it broke, so the client
//! can fix the request from the message alone; a [`Rejection`] holds every rule a request
//! broke, each at its field path (`inputs[1].shape`), so one round trip shows them all.

use std::fmt;

use super::{DataType, InferRequest, ModelMetadata, ModelSpec, TensorError, TensorSpec};

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
    /// More tensor data than the policy allows in one request.
    #[error(
        "the request carries {bytes} bytes of tensor data, above the limit of {max} (limits.max_request_bytes)"
    )]
    TooManyBytes {
        /// Bytes of tensor data sent.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// More elements than the policy allows in one request.
    #[error(
        "the request carries {elements} tensor elements, above the limit of {max} (limits.max_elements)"
    )]
    TooManyElements {
        /// Elements sent, over every input.
        elements: u64,
        /// The limit.
        max: u64,
    },
    /// A request the version adapter could not turn into the model's form.
    #[error("input '{tensor}': {reason}")]
    Adapter {
        /// Tensor name, as the client sent it.
        tensor: String,
        /// What the adapter could not do.
        reason: String,
    },
    /// A legacy v1 request that does not fit the model (`instances[3]: expected 4
    /// numbers, got 3`).
    #[error("{field}: {message}")]
    V1 {
        /// The v1 field (`instances[3]`, `instances[0].petal_width`).
        field: String,
        /// What is wrong there.
        message: String,
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
            | InvalidRequest::Adapter { tensor, .. }
            | InvalidRequest::BadElement { tensor, .. } => format!("inputs[{tensor}]"),
            InvalidRequest::TooManyBytes { .. } | InvalidRequest::TooManyElements { .. } => {
                "inputs".into()
            }
            InvalidRequest::V1 { field, .. } => field.clone(),
        }
    }

    /// The rule broken, as a bounded label for metrics and logs.
    pub fn rule(&self) -> &'static str {
        match self {
            InvalidRequest::MissingModelName => "missing_model_name",
            InvalidRequest::Tensor { .. } => "tensor_content",
            InvalidRequest::UnknownDataType { .. } => "unknown_datatype",
            InvalidRequest::RawCount { .. } => "raw_count",
            InvalidRequest::MixedContents { .. } => "mixed_contents",
            InvalidRequest::DuplicateInput { .. } => "duplicate_input",
            InvalidRequest::UnknownInput { .. } => "unknown_input",
            InvalidRequest::MissingInput { .. } => "missing_input",
            InvalidRequest::InputDataType { .. } => "input_datatype",
            InvalidRequest::InputShape { .. } => "input_shape",
            InvalidRequest::BatchSize { .. } => "batch_size",
            InvalidRequest::BatchMismatch { .. } => "batch_mismatch",
            InvalidRequest::UnknownOutput { .. } => "unknown_output",
            InvalidRequest::TooManyBytes { .. } => "max_request_bytes",
            InvalidRequest::TooManyElements { .. } => "max_elements",
            InvalidRequest::Adapter { .. } => "adapter",
            InvalidRequest::V1 { .. } => "v1_instances",
            InvalidRequest::BadElement { .. } => "bad_element",
        }
    }

    /// This problem at `field`.
    pub fn at(self, field: impl Into<String>) -> Violation {
        Violation {
            field: field.into(),
            problem: self,
        }
    }
}

/// One broken rule, at the path of the request field it is in.
#[derive(Clone, Debug, PartialEq)]
pub struct Violation {
    /// The field path (`inputs[1].shape`, `raw_input_contents[0]`, `outputs[0].name`).
    pub field: String,
    /// What is wrong there.
    pub problem: InvalidRequest,
}

/// Every rule a request broke; never empty. Answered with INVALID_ARGUMENT and one
/// `google.rpc.BadRequest` field violation per entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    violations: Vec<Violation>,
}

impl Rejection {
    /// The rejection for `violations`, or `None` when there are none.
    pub fn of(violations: Vec<Violation>) -> Option<Rejection> {
        (!violations.is_empty()).then_some(Rejection { violations })
    }

    /// `Err` with `violations` when there are any.
    pub fn check(violations: Vec<Violation>) -> Result<(), Rejection> {
        Rejection::of(violations).map_or(Ok(()), Err)
    }

    /// Every violation, in request order.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// The first problem (for a one-word metrics label).
    pub fn first(&self) -> &InvalidRequest {
        &self.violations[0].problem
    }
}

impl From<InvalidRequest> for Rejection {
    fn from(problem: InvalidRequest) -> Self {
        let field = problem.field();
        Rejection {
            violations: vec![problem.at(field)],
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.violations.as_slice() {
            [one] => write!(f, "{}", one.problem),
            many => {
                write!(f, "{} problems: ", many.len())?;
                for (i, v) in many.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    let text = v.problem.to_string();
                    // A problem that names its field already is not prefixed again.
                    if text.starts_with(&v.field) {
                        f.write_str(&text)?;
                    } else {
                        write!(f, "{}: {text}", v.field)?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Rejection {}

/// What a request is checked against: a model's tensors with full shapes (a batching
/// model's first dimension is the batch), from its configuration or its OIP metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contract {
    /// Model name.
    pub model: String,
    /// Inputs, full shapes, -1 any size.
    pub inputs: Vec<TensorSpec>,
    /// Outputs, full shapes.
    pub outputs: Vec<TensorSpec>,
    /// The largest batch, when known: 0 for a model that does not batch; `None` when only
    /// metadata is known (its -1 first dimension then stands for any batch).
    pub max_batch_size: Option<u32>,
    /// Accepts any inputs (the `identity` model): inputs and outputs are not enforced.
    pub any_inputs: bool,
    /// Whether `outputs` lists every output the model answers, so a request for another is
    /// refused. True for a configuration Keel owns (the embedded models); false for an
    /// upstream's metadata, which may leave some out (MLServer's scikit-learn runtime lists
    /// `predict` and answers `predict_proba`): the upstream then decides.
    pub outputs_complete: bool,
}

impl Contract {
    /// The contract of a model configuration (complete: batching known).
    pub fn of_spec(spec: &ModelSpec) -> Contract {
        let meta = spec.metadata();
        Contract {
            model: meta.name,
            inputs: meta.inputs,
            outputs: meta.outputs,
            max_batch_size: Some(spec.max_batch_size),
            any_inputs: spec.any_inputs,
            outputs_complete: true,
        }
    }

    /// The contract of a model's OIP metadata, with its `max_batch_size` when a model
    /// configuration gave it. Metadata that lists no inputs describes nothing (no real model
    /// takes none), so such a contract checks no tensors; its outputs are not taken as
    /// complete.
    pub fn of_metadata(meta: ModelMetadata, max_batch_size: Option<u32>) -> Contract {
        Contract {
            model: meta.name,
            any_inputs: meta.inputs.is_empty(),
            inputs: meta.inputs,
            outputs: meta.outputs,
            max_batch_size,
            outputs_complete: false,
        }
    }

    /// The input named `name`.
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.name == name)
    }

    /// The output named `name`.
    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|t| t.name == name)
    }
}

/// Size limits on one request, from policy (`limits.max_request_bytes`, `limits.max_elements`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Bytes of tensor data, over every input.
    pub max_bytes: u64,
    /// Elements, over every input.
    pub max_elements: u64,
}

impl RequestLimits {
    /// No limits.
    pub const NONE: RequestLimits = RequestLimits {
        max_bytes: u64::MAX,
        max_elements: u64::MAX,
    };
}

/// Checks `req` against `spec` (an embedded model's configuration); returns the batch size
/// (1 for a model that does not batch).
pub fn validate(req: &InferRequest, spec: &ModelSpec) -> Result<u64, Rejection> {
    check(req, &Contract::of_spec(spec), RequestLimits::NONE)
}

/// Checks `req` against `contract` and `limits`, collecting every broken rule; returns the
/// batch size (1 when the model does not batch or batching is unknown).
///
/// 1. Tensor data within `limits` (sums in `u64`, saturating: no overflow).
/// 2. Every input is known (unless the model takes any), appears once and has the right type.
/// 3. Every declared input is present.
/// 4. Shapes match the contract, -1 matching any size; for a batching model the first
///    dimension is the batch, the same for every input and within `1..=max_batch_size`.
/// 5. Every requested output exists, when the contract's outputs are complete.
pub fn check(
    req: &InferRequest,
    contract: &Contract,
    limits: RequestLimits,
) -> Result<u64, Rejection> {
    let mut out = Vec::new();
    let (bytes, elements) = req.inputs.iter().fold((0u64, 0u64), |(b, e), t| {
        (
            b.saturating_add(t.data().len() as u64),
            e.saturating_add(t.element_count() as u64),
        )
    });
    if bytes > limits.max_bytes {
        out.push(
            InvalidRequest::TooManyBytes {
                bytes,
                max: limits.max_bytes,
            }
            .at("inputs"),
        );
    }
    if elements > limits.max_elements {
        out.push(
            InvalidRequest::TooManyElements {
                elements,
                max: limits.max_elements,
            }
            .at("inputs"),
        );
    }
    let batching = contract.max_batch_size.filter(|&m| m > 0);
    let mut batch: Option<(&str, i64)> = None;
    for (i, input) in req.inputs.iter().enumerate() {
        let name = input.name();
        if req.inputs[..i].iter().any(|t| t.name() == name) {
            out.push(
                InvalidRequest::DuplicateInput {
                    tensor: name.to_string(),
                }
                .at(format!("inputs[{i}].name")),
            );
            continue;
        }
        if contract.any_inputs {
            continue;
        }
        let Some(want) = contract.input(name) else {
            out.push(
                InvalidRequest::UnknownInput {
                    model: contract.model.clone(),
                    tensor: name.to_string(),
                    expected: names(&contract.inputs),
                }
                .at(format!("inputs[{i}].name")),
            );
            continue;
        };
        if input.dtype() != want.dtype {
            out.push(
                InvalidRequest::InputDataType {
                    tensor: name.to_string(),
                    expected: want.dtype,
                    actual: input.dtype(),
                }
                .at(format!("inputs[{i}].datatype")),
            );
        }
        let shape = input.shape();
        let matches = shape.len() == want.dims.len()
            && shape.iter().zip(&want.dims).all(|(&d, &w)| w < 0 || d == w);
        if !matches {
            out.push(
                InvalidRequest::InputShape {
                    tensor: name.to_string(),
                    expected: want.dims.clone(),
                    actual: shape.to_vec(),
                }
                .at(format!("inputs[{i}].shape")),
            );
            continue;
        }
        if let (Some(max), Some(&b)) = (batching, shape.first()) {
            if b < 1 || b > i64::from(max) {
                out.push(
                    InvalidRequest::BatchSize {
                        tensor: name.to_string(),
                        batch: b,
                        max,
                    }
                    .at(format!("inputs[{i}].shape")),
                );
            }
            match batch {
                Some((first, first_batch)) if first_batch != b => out.push(
                    InvalidRequest::BatchMismatch {
                        tensor: name.to_string(),
                        batch: b,
                        first: first.to_string(),
                        first_batch,
                    }
                    .at(format!("inputs[{i}].shape")),
                ),
                Some(_) => {}
                None => batch = Some((name, b)),
            }
        }
    }
    if !contract.any_inputs {
        for missing in contract
            .inputs
            .iter()
            .filter(|s| !req.inputs.iter().any(|t| t.name() == s.name))
        {
            out.push(
                InvalidRequest::MissingInput {
                    model: contract.model.clone(),
                    tensor: missing.name.clone(),
                }
                .at("inputs"),
            );
        }
    }
    if contract.outputs_complete && !contract.any_inputs {
        for (j, o) in req.outputs.iter().enumerate() {
            if contract.output(&o.name).is_none() {
                out.push(
                    InvalidRequest::UnknownOutput {
                        model: contract.model.clone(),
                        output: o.name.clone(),
                        expected: names(&contract.outputs),
                    }
                    .at(format!("outputs[{j}].name")),
                );
            }
        }
    }
    match Rejection::of(out) {
        Some(r) => Err(r),
        None => Ok(batch.map_or(1, |(_, b)| b.unsigned_abs())),
    }
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
    fn every_broken_rule_is_reported_at_its_field() {
        let s = Contract::of_spec(&spec());
        let f = Tensor::from_values("A", vec![2, 5], &[0f32; 10]).unwrap();
        let mut r = req(vec![f, t("C", vec![1]), t("A", vec![1, 4])]);
        r.outputs.push(RequestedOutput {
            name: "Z".into(),
            parameters: Parameters::new(),
        });
        let limits = RequestLimits {
            max_bytes: 16,
            max_elements: 1_000,
        };
        let e = check(&r, &s, limits).unwrap_err();
        let fields: Vec<&str> = e.violations().iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "inputs",
                "inputs[0].datatype",
                "inputs[0].shape",
                "inputs[1].name",
                "inputs[2].name",
                "inputs",
                "outputs[0].name"
            ]
        );
        assert!(
            e.to_string()
                .starts_with("7 problems: inputs: the request carries 60 bytes"),
            "{e}"
        );
        assert_eq!(e.first().rule(), "max_request_bytes");
    }

    #[test]
    fn metadata_without_batching_treats_the_first_dimension_as_any_size() {
        let s = Contract::of_metadata(spec().metadata(), None);
        assert_eq!(
            check(
                &req(vec![t("A", vec![100, 4]), t("B", vec![3, 1])]),
                &s,
                RequestLimits::NONE
            ),
            Ok(1)
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
            e.first(),
            InvalidRequest::BatchSize {
                batch: 9,
                max: 8,
                ..
            }
        ));
        let e = validate(&req(vec![t("A", vec![2, 4]), t("B", vec![3, 1])]), &s).unwrap_err();
        assert!(matches!(
            e.first(),
            InvalidRequest::BatchMismatch {
                batch: 3,
                first_batch: 2,
                ..
            }
        ));
        let e = validate(&req(vec![t("A", vec![4]), t("B", vec![1, 1])]), &s).unwrap_err();
        assert!(
            matches!(e.first(), InvalidRequest::InputShape { .. }),
            "{e}"
        );
        let f = Tensor::from_values("A", vec![1, 4], &[0f32; 4]).unwrap();
        let e = validate(&req(vec![f, t("B", vec![1, 1])]), &s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 'A': datatype FP32 does not match the model's INT32"
        );
        let e = validate(&req(vec![t("A", vec![1, 4]), t("A", vec![1, 4])]), &s).unwrap_err();
        assert_eq!(e.violations()[0].field, "inputs[1].name");
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
