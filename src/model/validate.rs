//! Checks an inference request against a model's contract before the model sees it.
//!
//! # Errors
//!
//! Every [`InvalidRequest`] names the tensor (or field) and the rule it broke, so the client
//! can fix the request from the message alone; a [`Rejection`] holds every rule a request
//! broke, each at its field path (`inputs[1].shape`), so one round trip shows them all.

use std::collections::{HashMap, HashSet};
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
    /// More input tensors than one request may carry.
    #[error("the request has {inputs} inputs, above the limit of {max} (limits.max_inputs)")]
    TooManyInputs {
        /// Inputs sent.
        inputs: usize,
        /// The limit.
        max: usize,
    },
    /// More requested outputs than one request may name.
    #[error(
        "the request asks for {outputs} outputs, above the limit of {max} (limits.max_outputs)"
    )]
    TooManyOutputs {
        /// Outputs asked for.
        outputs: usize,
        /// The limit.
        max: usize,
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
            InvalidRequest::TooManyBytes { .. }
            | InvalidRequest::TooManyElements { .. }
            | InvalidRequest::TooManyInputs { .. } => "inputs".into(),
            InvalidRequest::TooManyOutputs { .. } => "outputs".into(),
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
            InvalidRequest::TooManyInputs { .. } => "max_inputs",
            InvalidRequest::TooManyOutputs { .. } => "max_outputs",
            InvalidRequest::Adapter { .. } => "adapter",
            InvalidRequest::V1 { .. } => "v1_instances",
            InvalidRequest::BadElement { .. } => "bad_element",
        }
    }

    /// Bytes and items this problem copied from the request and the contract when it was
    /// built (names, name lists, shapes): its cost in [`Work`].
    fn held(&self) -> usize {
        let list = |v: &[String]| v.len() + v.iter().map(String::len).sum::<usize>();
        match self {
            InvalidRequest::MissingModelName
            | InvalidRequest::RawCount { .. }
            | InvalidRequest::TooManyBytes { .. }
            | InvalidRequest::TooManyElements { .. }
            | InvalidRequest::TooManyInputs { .. }
            | InvalidRequest::TooManyOutputs { .. } => 0,
            InvalidRequest::Tensor { tensor, .. }
            | InvalidRequest::MixedContents { tensor }
            | InvalidRequest::DuplicateInput { tensor }
            | InvalidRequest::InputDataType { tensor, .. }
            | InvalidRequest::BatchSize { tensor, .. }
            | InvalidRequest::BadElement { tensor, .. } => tensor.len(),
            InvalidRequest::UnknownDataType {
                tensor,
                datatype: other,
            }
            | InvalidRequest::MissingInput {
                tensor,
                model: other,
            }
            | InvalidRequest::BatchMismatch {
                tensor,
                first: other,
                ..
            }
            | InvalidRequest::Adapter {
                tensor,
                reason: other,
            }
            | InvalidRequest::V1 {
                field: tensor,
                message: other,
            } => tensor.len() + other.len(),
            InvalidRequest::UnknownInput {
                model,
                tensor: name,
                expected,
            }
            | InvalidRequest::UnknownOutput {
                model,
                output: name,
                expected,
            } => model.len() + name.len() + list(expected),
            InvalidRequest::InputShape {
                tensor,
                expected,
                actual,
            } => tensor.len() + expected.len() + actual.len(),
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

/// Violations a [`Rejection`] reports in full; the rest are only counted, so an error
/// answer, its details and its log line stay bounded whatever the request holds.
pub const MAX_REPORTED: usize = 32;

/// The longest text one violation contributes to a message or a detail: field paths and
/// messages quote names the client chose.
pub const MAX_VIOLATION_TEXT: usize = 256;

/// Violations as they are found: the first [`MAX_REPORTED`] kept, the rest counted, so
/// collecting them costs the same whatever the request holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Violations {
    kept: Vec<Violation>,
    more: usize,
}

impl Violations {
    /// Adds one.
    pub fn push(&mut self, v: Violation) {
        self.push_with(|| v);
    }

    /// Adds the one `make` builds, calling it only when it will be reported: past
    /// [`MAX_REPORTED`] a violation is only counted, and copies nothing. Returns it when
    /// kept.
    pub fn push_with(&mut self, make: impl FnOnce() -> Violation) -> Option<&Violation> {
        if self.kept.len() < MAX_REPORTED {
            self.kept.push(make());
            self.kept.last()
        } else {
            self.more += 1;
            None
        }
    }

    /// Adds every one of `other`, its counted ones included.
    pub fn extend(&mut self, other: Violations) {
        let more = other.more;
        for v in other.kept {
            self.push(v);
        }
        self.more += more;
    }

    /// Whether none was found.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

impl From<Vec<Violation>> for Violations {
    fn from(all: Vec<Violation>) -> Self {
        let mut v = Violations::default();
        for one in all {
            v.push(one);
        }
        v
    }
}

/// Every rule a request broke; never empty. Answered with INVALID_ARGUMENT and one
/// `google.rpc.BadRequest` field violation per reported entry; past [`MAX_REPORTED`], only
/// how many more.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    violations: Vec<Violation>,
    more: usize,
}

impl Rejection {
    /// The rejection for `violations`, or `None` when there are none.
    pub fn of(violations: impl Into<Violations>) -> Option<Rejection> {
        let Violations { kept, more } = violations.into();
        (!kept.is_empty()).then_some(Rejection {
            violations: kept,
            more,
        })
    }

    /// `Err` with `violations` when there are any.
    pub fn check(violations: impl Into<Violations>) -> Result<(), Rejection> {
        Rejection::of(violations).map_or(Ok(()), Err)
    }

    /// The violations reported, in request order (at most [`MAX_REPORTED`]).
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// How many more were found than are reported.
    pub fn more(&self) -> usize {
        self.more
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
            more: 0,
        }
    }
}

impl Violation {
    /// The field path, clipped to [`MAX_VIOLATION_TEXT`].
    pub fn field_text(&self) -> &str {
        clip(&self.field, MAX_VIOLATION_TEXT)
    }

    /// What is wrong, clipped to [`MAX_VIOLATION_TEXT`].
    pub fn problem_text(&self) -> String {
        let mut text = self.problem.to_string();
        let keep = clip(&text, MAX_VIOLATION_TEXT).len();
        if keep < text.len() {
            text.truncate(keep);
            text.push('…');
        }
        text
    }
}

/// The longest message Keel writes that quotes a client (a status message, a log line's
/// error): longer ones are clipped.
pub const MAX_MESSAGE: usize = 2048;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.violations.as_slice() {
            [one] if self.more == 0 => f.write_str(&one.problem_text()),
            many => {
                write!(f, "{} problems: ", many.len() + self.more)?;
                for (i, v) in many.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    let text = v.problem_text();
                    // A problem that names its field already is not prefixed again.
                    if text.starts_with(v.field_text()) {
                        f.write_str(&text)?;
                    } else {
                        write!(f, "{}: {text}", v.field_text())?;
                    }
                }
                if self.more > 0 {
                    write!(f, "; and {} more", self.more)?;
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

/// Size limits on one request, from policy (`limits.max_request_bytes`, `max_elements`,
/// `max_inputs`, `max_outputs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Bytes of tensor data, over every input.
    pub max_bytes: u64,
    /// Elements, over every input.
    pub max_elements: u64,
    /// Input tensors.
    pub max_inputs: usize,
    /// Requested outputs.
    pub max_outputs: usize,
}

impl RequestLimits {
    /// No limits.
    pub const NONE: RequestLimits = RequestLimits {
        max_bytes: u64::MAX,
        max_elements: u64::MAX,
        max_inputs: usize::MAX,
        max_outputs: usize::MAX,
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
/// # Cost
///
/// Linear in the request and the contract: names are looked up in sets, never by scanning
/// earlier inputs, and the counts are checked first, so a request with more tensors than
/// `limits` allow costs one comparison. At most [`MAX_REPORTED`] violations are built; the
/// rest are only counted. [`check_counted`] measures it.
///
/// # Rules
///
/// 0. No more inputs and requested outputs than `limits` allow (checked alone, first).
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
    // A plain counter on the stack, dropped: the price of measuring is a few adds.
    check_counted(req, contract, limits, &mut Work::default())
}

/// Elementary steps of a [`check`], so its cost can be asserted in a unit the tests and
/// the fuzzer see (not wall time, which is noise on a shared machine).
///
/// It exists because quadratic validation was a denial of service (issue 22): 80,000
/// inputs in 1.5 MB cost 18 CPU-seconds. [`Work::allowance`] is the bound every request
/// must stay under; a regression to a scan of earlier inputs breaks it at a few thousand
/// inputs.
///
/// # Units
///
/// One step per:
///
/// 1. request tensor or requested output visited, per pass over it;
/// 2. dimension read (element counts, shape matches);
/// 3. byte of a name hashed (a set or map insert or probe), and again when the probe finds
///    it (the keys are compared);
/// 4. contract entry scanned, plus the bytes compared when the names have the same length
///    (`str` equality compares lengths first);
/// 5. violation found; one more per byte a reported one copies (names, lists, shapes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Work(u64);

impl Work {
    /// Steps a request may cost per byte of its encoding. Per name byte: a hash, a compare
    /// on a duplicate, compares against at most 16 contract names of its length (a
    /// contract's index scans up to 16), and copies into at most three reported violations (2 + 16 + 3 = 21). Per
    /// entry, the fixed steps (about 20 with a scan) are spread over its encoding, at least
    /// two bytes for an output and eight for an input that decodes (`datatype: "BOOL"`).
    pub const PER_BYTE: u64 = 24;

    /// Steps counted so far.
    pub fn steps(self) -> u64 {
        self.0
    }

    /// What checking a request of `request_bytes` encoded bytes against `contract` may
    /// cost: [`Work::PER_BYTE`] per byte, and for the contract's side (building its
    /// indexes, looking up every declared input, the contract names each reported
    /// violation copies) a fixed part proportional to the contract's size.
    pub fn allowance(request_bytes: usize, contract: &Contract) -> Work {
        let size = contract.model.len()
            + contract
                .inputs
                .iter()
                .chain(&contract.outputs)
                .map(|t| 1 + t.name.len() + t.dims.len())
                .sum::<usize>();
        let per_request = Self::PER_BYTE.saturating_mul(request_bytes as u64);
        // Each reported violation may copy the whole contract (an unknown input lists the
        // model's inputs) and a field path; the indexes and the missing-input pass read
        // it a few times more.
        let fixed = ((MAX_REPORTED + 8) * (size + 64)) as u64;
        Work(per_request.saturating_add(fixed))
    }

    fn add(&mut self, steps: usize) {
        self.0 = self.0.saturating_add(steps as u64);
    }

    /// A name hashed, and compared when the probe found it.
    fn hash(&mut self, name: &str, found: bool) {
        self.add(1 + name.len() * (1 + usize::from(found)));
    }
}

/// Records the violation `make` builds, building it only when it will be reported: past
/// [`MAX_REPORTED`] a violation costs one step, whatever it would have copied.
fn report(out: &mut Violations, work: &mut Work, make: impl FnOnce() -> Violation) {
    work.add(1);
    if let Some(v) = out.push_with(make) {
        work.add(v.field.len() + v.problem.held());
    }
}

/// [`check`], adding the steps it takes to `work`. This is the only implementation:
/// [`check`] calls it, so what a test or the fuzzer counts is what production runs.
pub fn check_counted(
    req: &InferRequest,
    contract: &Contract,
    limits: RequestLimits,
    work: &mut Work,
) -> Result<u64, Rejection> {
    work.add(2);
    if req.inputs.len() > limits.max_inputs {
        return Err(InvalidRequest::TooManyInputs {
            inputs: req.inputs.len(),
            max: limits.max_inputs,
        }
        .into());
    }
    if req.outputs.len() > limits.max_outputs {
        return Err(InvalidRequest::TooManyOutputs {
            outputs: req.outputs.len(),
            max: limits.max_outputs,
        }
        .into());
    }
    let mut out = Violations::default();
    let (bytes, elements) = req.inputs.iter().fold((0u64, 0u64), |(b, e), t| {
        work.add(1 + t.shape().len());
        (
            b.saturating_add(t.data().len() as u64),
            e.saturating_add(t.element_count() as u64),
        )
    });
    if bytes > limits.max_bytes {
        report(&mut out, work, || {
            InvalidRequest::TooManyBytes {
                bytes,
                max: limits.max_bytes,
            }
            .at("inputs")
        });
    }
    if elements > limits.max_elements {
        report(&mut out, work, || {
            InvalidRequest::TooManyElements {
                elements,
                max: limits.max_elements,
            }
            .at("inputs")
        });
    }
    let batching = contract.max_batch_size.filter(|&m| m > 0);
    let mut batch: Option<(&str, i64)> = None;
    let declared = Index::of(&contract.inputs, work);
    let mut seen: HashSet<&str> = HashSet::with_capacity(req.inputs.len());
    for (i, input) in req.inputs.iter().enumerate() {
        let name = input.name();
        let fresh = seen.insert(name);
        work.hash(name, !fresh);
        if !fresh {
            report(&mut out, work, || {
                InvalidRequest::DuplicateInput {
                    tensor: name.to_string(),
                }
                .at(format!("inputs[{i}].name"))
            });
            continue;
        }
        if contract.any_inputs {
            continue;
        }
        let Some(want) = declared.get(name, work) else {
            report(&mut out, work, || {
                InvalidRequest::UnknownInput {
                    model: contract.model.clone(),
                    tensor: name.to_string(),
                    expected: names(&contract.inputs),
                }
                .at(format!("inputs[{i}].name"))
            });
            continue;
        };
        if input.dtype() != want.dtype {
            report(&mut out, work, || {
                InvalidRequest::InputDataType {
                    tensor: name.to_string(),
                    expected: want.dtype,
                    actual: input.dtype(),
                }
                .at(format!("inputs[{i}].datatype"))
            });
        }
        let shape = input.shape();
        let same_rank = shape.len() == want.dims.len();
        work.add(if same_rank { shape.len() } else { 1 });
        let matches = same_rank && shape.iter().zip(&want.dims).all(|(&d, &w)| w < 0 || d == w);
        if !matches {
            report(&mut out, work, || {
                InvalidRequest::InputShape {
                    tensor: name.to_string(),
                    expected: want.dims.clone(),
                    actual: shape.to_vec(),
                }
                .at(format!("inputs[{i}].shape"))
            });
            continue;
        }
        if let (Some(max), Some(&b)) = (batching, shape.first()) {
            if b < 1 || b > i64::from(max) {
                report(&mut out, work, || {
                    InvalidRequest::BatchSize {
                        tensor: name.to_string(),
                        batch: b,
                        max,
                    }
                    .at(format!("inputs[{i}].shape"))
                });
            }
            match batch {
                Some((first, first_batch)) if first_batch != b => report(&mut out, work, || {
                    InvalidRequest::BatchMismatch {
                        tensor: name.to_string(),
                        batch: b,
                        first: first.to_string(),
                        first_batch,
                    }
                    .at(format!("inputs[{i}].shape"))
                }),
                Some(_) => {}
                None => batch = Some((name, b)),
            }
        }
    }
    if !contract.any_inputs {
        for spec in &contract.inputs {
            let present = seen.contains(spec.name.as_str());
            work.hash(&spec.name, present);
            if !present {
                report(&mut out, work, || {
                    InvalidRequest::MissingInput {
                        model: contract.model.clone(),
                        tensor: spec.name.clone(),
                    }
                    .at("inputs")
                });
            }
        }
    }
    if contract.outputs_complete && !contract.any_inputs {
        let outputs = Index::of(&contract.outputs, work);
        for (j, o) in req.outputs.iter().enumerate() {
            if outputs.get(&o.name, work).is_none() {
                report(&mut out, work, || {
                    InvalidRequest::UnknownOutput {
                        model: contract.model.clone(),
                        output: o.name.clone(),
                        expected: names(&contract.outputs),
                    }
                    .at(format!("outputs[{j}].name"))
                });
            }
        }
    }
    match Rejection::of(out) {
        Some(r) => Err(r),
        None => Ok(batch.map_or(1, |(_, b)| b.unsigned_abs())),
    }
}

/// A contract's tensors by name: a scan for the few tensors a model usually has, a map for
/// many, so a lookup per request tensor keeps the check linear.
enum Index<'a> {
    Few(&'a [TensorSpec]),
    Many(HashMap<&'a str, &'a TensorSpec>),
}

impl<'a> Index<'a> {
    /// Past this many tensors, a map.
    const SCAN: usize = 16;

    fn of(specs: &'a [TensorSpec], work: &mut Work) -> Index<'a> {
        if specs.len() <= Self::SCAN {
            Index::Few(specs)
        } else {
            // The first of a name wins, as a scan would find it.
            let mut map = HashMap::with_capacity(specs.len());
            for s in specs {
                let mut fresh = false;
                map.entry(s.name.as_str()).or_insert_with(|| {
                    fresh = true;
                    s
                });
                work.hash(&s.name, !fresh);
            }
            Index::Many(map)
        }
    }

    fn get(&self, name: &str, work: &mut Work) -> Option<&'a TensorSpec> {
        match self {
            Index::Few(specs) => specs.iter().find(|t| {
                work.add(
                    1 + if t.name.len() == name.len() {
                        name.len()
                    } else {
                        0
                    },
                );
                t.name == name
            }),
            Index::Many(map) => {
                let found = map.get(name).copied();
                work.hash(name, found.is_some());
                found
            }
        }
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
            wire: Default::default(),
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
            ..RequestLimits::NONE
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

    fn any(model: &str) -> Contract {
        Contract {
            model: model.into(),
            inputs: vec![],
            outputs: vec![],
            max_batch_size: None,
            any_inputs: true,
            outputs_complete: false,
        }
    }

    #[test]
    fn duplicates_are_found_among_many_inputs() {
        // A set, not a scan of every earlier input: 50,000 inputs cost 50,000 lookups.
        let mut inputs: Vec<Tensor> = (0..50_000).map(|i| t(&format!("t{i}"), vec![1])).collect();
        inputs.push(t("t7", vec![1]));
        let e = check(&req(inputs), &any("identity"), RequestLimits::NONE).unwrap_err();
        assert_eq!(e.violations().len(), 1);
        assert_eq!(e.violations()[0].field, "inputs[50000].name");
        assert_eq!(e.first().rule(), "duplicate_input");
    }

    #[test]
    fn more_inputs_or_outputs_than_the_limits_allow_are_refused_alone() {
        let limits = RequestLimits {
            max_inputs: 4,
            max_outputs: 1,
            ..RequestLimits::NONE
        };
        // Unknown and duplicate names too, but the count is checked first and alone.
        let five: Vec<Tensor> = (0..5).map(|_| t("X", vec![1])).collect();
        let e = check(&req(five), &Contract::of_spec(&spec()), limits).unwrap_err();
        assert_eq!(e.violations().len(), 1);
        assert_eq!(e.violations()[0].field, "inputs");
        assert_eq!(
            e.to_string(),
            "the request has 5 inputs, above the limit of 4 (limits.max_inputs)"
        );
        let mut r = req(vec![t("A", vec![1, 4]), t("B", vec![1, 1])]);
        for name in ["Y", "Y"] {
            r.outputs.push(RequestedOutput {
                name: name.into(),
                parameters: Parameters::new(),
            });
        }
        let e = check(&r, &Contract::of_spec(&spec()), limits).unwrap_err();
        assert_eq!(e.first().rule(), "max_outputs");
        assert_eq!(e.violations()[0].field, "outputs");
    }

    #[test]
    fn a_rejection_reports_the_first_violations_and_counts_the_rest() {
        let inputs: Vec<Tensor> = (0..1000).map(|i| t(&format!("u{i}"), vec![1])).collect();
        let e = check(
            &req(inputs),
            &Contract::of_spec(&spec()),
            RequestLimits::NONE,
        )
        .unwrap_err();
        // 1000 unknown inputs and 2 missing ones.
        assert_eq!(e.violations().len(), MAX_REPORTED);
        assert_eq!(e.more(), 1002 - MAX_REPORTED);
        let text = e.to_string();
        assert!(
            text.starts_with("1002 problems: inputs[0].name: input 'u0'"),
            "{text}"
        );
        assert!(
            text.ends_with(&format!("; and {} more", 1002 - MAX_REPORTED)),
            "{text}"
        );
        assert!(
            text.len() < MAX_REPORTED * 2 * MAX_VIOLATION_TEXT,
            "{}",
            text.len()
        );
    }

    #[test]
    fn a_violation_quoting_a_long_name_is_clipped() {
        let long = "\u{e9}".repeat(1000);
        let e = check(
            &req(vec![t(&long, vec![1])]),
            &Contract::of_spec(&spec()),
            RequestLimits::NONE,
        )
        .unwrap_err();
        let v = &e.violations()[0];
        assert!(v.field_text().len() <= MAX_VIOLATION_TEXT);
        let text = v.problem_text();
        assert!(
            text.len() <= MAX_VIOLATION_TEXT + '…'.len_utf8(),
            "{}",
            text.len()
        );
        assert!(text.ends_with('…'));
        assert_eq!(
            clip("\u{e9}\u{e9}", 3),
            "\u{e9}",
            "never inside a character"
        );
    }

    #[test]
    fn a_large_contract_is_looked_up_by_name() {
        let mut s = spec();
        s.inputs = (0..100)
            .map(|i| TensorSpec::new(&format!("in{i}"), DataType::Int32, &[-1]))
            .collect();
        s.max_batch_size = 0;
        let all: Vec<Tensor> = (0..100).map(|i| t(&format!("in{i}"), vec![2])).collect();
        assert_eq!(validate(&req(all.clone()), &s), Ok(1));
        let mut missing = all;
        missing.remove(40);
        let e = validate(&req(missing), &s).unwrap_err();
        assert_eq!(e.to_string(), "input 'in40' of model 'm' is missing");
    }
}

#[cfg(test)]
mod cost_tests;
