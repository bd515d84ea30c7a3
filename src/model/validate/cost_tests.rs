//! What validation costs, in [`Work`] steps against the request's encoded size: within
//! [`Work::allowance`] for every hostile shape of issue 22, the same per byte at 10, 1,000
//! and 100,000 tensors, and far outside it for the old scan of earlier inputs.

use bytes::Bytes;
use prost::Message as _;

use super::*;
use crate::pb::inference::ModelInferRequest;
use crate::pb::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::policy::Settings;

const SIZES: [usize; 3] = [10, 1_000, 100_000];

/// The limits a route has when the policy sets none.
fn default_limits() -> RequestLimits {
    let l = Settings::default().limits;
    RequestLimits {
        max_bytes: l.max_request_bytes,
        max_elements: l.max_elements,
        max_inputs: l.max_inputs as usize,
        max_outputs: l.max_outputs as usize,
    }
}

/// Every limit out of the way, so every loop runs over all 100,000 tensors.
const RAISED: RequestLimits = RequestLimits::NONE;

fn input(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        parameters: Default::default(),
        contents: None,
    }
}

fn request(inputs: Vec<InferInputTensor>, raw: Vec<Bytes>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "m".into(),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    }
}

/// `n` INT32 `[1]` inputs sent raw, named `t000000`, `t000001`...: fixed-width names, so
/// a request's bytes per input are the same at every `n`.
fn distinct_inputs(n: usize) -> ModelInferRequest {
    request(
        (0..n)
            .map(|i| input(&format!("t{i:06}"), "INT32", vec![1]))
            .collect(),
        vec![Bytes::from_static(&[0; 4]); n],
    )
}

/// `n` inputs all named `x`, INT8 `[0]` (no data).
fn one_name_repeated(n: usize) -> ModelInferRequest {
    request(vec![input("x", "INT8", vec![0]); n], vec![])
}

/// `n` inputs with no name: the smallest entry that decodes. An empty `inputs {}` has no
/// datatype and is refused by the conversion, before validation.
fn nameless(n: usize) -> ModelInferRequest {
    request(vec![input("", "BOOL", vec![0]); n], vec![])
}

/// One valid input `a` and `n` requested outputs named `name(j)`.
fn outputs(n: usize, name: impl Fn(usize) -> String) -> ModelInferRequest {
    let mut r = request(
        vec![input("a", "INT32", vec![1, 1])],
        vec![Bytes::from_static(&[0; 4])],
    );
    r.outputs = (0..n)
        .map(|j| InferRequestedOutputTensor {
            name: name(j),
            parameters: Default::default(),
        })
        .collect();
    r
}

/// A complete contract with `inputs` inputs `c000000`... (names as long as
/// [`distinct_inputs`]', the worst case for a scan: every compare reads the bytes) and
/// `outputs` outputs `o000000`....
fn contract(inputs: usize, outputs: usize) -> Contract {
    let specs = |prefix: char, n: usize| {
        (0..n)
            .map(|i| TensorSpec::new(&format!("{prefix}{i:06}"), DataType::Int32, &[-1, 1]))
            .collect()
    };
    Contract {
        model: "m".into(),
        inputs: specs('c', inputs),
        outputs: specs('o', outputs),
        max_batch_size: Some(8),
        any_inputs: false,
        outputs_complete: true,
    }
}

fn any_inputs() -> Contract {
    Contract {
        model: "identity".into(),
        inputs: vec![],
        outputs: vec![],
        max_batch_size: None,
        any_inputs: true,
        outputs_complete: false,
    }
}

/// The contract the output shapes are sent to: its one input is `a`.
fn with_outputs(outputs: usize) -> Contract {
    let mut c = contract(0, outputs);
    c.inputs = vec![TensorSpec::new("a", DataType::Int32, &[-1, 1])];
    c
}

struct Shape {
    what: &'static str,
    request: fn(usize) -> ModelInferRequest,
    contract: fn() -> Contract,
}

/// The hostile shapes of issue 22, and the lookups each reaches: sets, scans and maps.
const SHAPES: &[Shape] = &[
    Shape {
        what: "distinct inputs, any model",
        request: distinct_inputs,
        contract: any_inputs,
    },
    Shape {
        what: "unknown inputs, 16 inputs scanned",
        request: distinct_inputs,
        contract: || contract(16, 1),
    },
    Shape {
        what: "unknown inputs, 100 inputs in a map",
        request: distinct_inputs,
        contract: || contract(100, 1),
    },
    Shape {
        what: "one name repeated",
        request: one_name_repeated,
        contract: || contract(2, 1),
    },
    Shape {
        what: "nameless inputs",
        request: nameless,
        contract: || contract(16, 1),
    },
    Shape {
        what: "unknown outputs, 16 outputs scanned",
        request: |n| outputs(n, |j| format!("u{j:06}")),
        contract: || with_outputs(16),
    },
    Shape {
        what: "empty outputs {}, 16 outputs scanned",
        request: |n| outputs(n, |_| String::new()),
        contract: || with_outputs(16),
    },
    Shape {
        what: "unknown outputs, 100 outputs in a map",
        request: |n| outputs(n, |j| format!("u{j:06}")),
        contract: || with_outputs(100),
    },
];

/// The request's encoded size, its domain form, and what checking it cost.
fn measure(msg: ModelInferRequest, contract: &Contract, limits: RequestLimits) -> (usize, Work) {
    let bytes = msg.encoded_len();
    let req = crate::pb::infer_request_from_pb(msg).expect("every shape here decodes");
    let mut work = Work::default();
    let counted = check_counted(&req, contract, limits, &mut work);
    assert_eq!(counted, check(&req, contract, limits), "one path");
    (bytes, work)
}

fn per_byte(bytes: usize, work: Work) -> f64 {
    work.steps() as f64 / bytes as f64
}

#[test]
fn every_hostile_shape_costs_at_most_its_allowance_with_the_limits_raised() {
    for shape in SHAPES {
        let contract = (shape.contract)();
        for n in SIZES {
            let (bytes, work) = measure((shape.request)(n), &contract, RAISED);
            let allowed = Work::allowance(bytes, &contract);
            assert!(
                work <= allowed,
                "{}, n = {n}: {} steps for {bytes} bytes, allowed {}",
                shape.what,
                work.steps(),
                allowed.steps()
            );
        }
    }
}

#[test]
fn work_per_byte_does_not_grow_with_the_number_of_tensors() {
    for shape in SHAPES {
        let contract = (shape.contract)();
        let ratios: Vec<f64> = SIZES
            .iter()
            .map(|&n| {
                let (bytes, work) = measure((shape.request)(n), &contract, RAISED);
                per_byte(bytes, work)
            })
            .collect();
        // Linear: the same per byte at every size (the fixed part makes small requests
        // dearer per byte). Quadratic: a hundred times more at 100,000 than at 1,000.
        for pair in ratios.windows(2) {
            assert!(
                pair[1] <= pair[0] * 1.1,
                "{}: steps per byte at {SIZES:?} tensors: {ratios:?}",
                shape.what
            );
        }
    }
}

#[test]
fn with_the_default_limits_a_request_past_max_inputs_or_max_outputs_costs_two_steps() {
    let limits = default_limits();
    for shape in SHAPES {
        let contract = (shape.contract)();
        let (_, under) = measure((shape.request)(1_000), &contract, limits);
        let (bytes, over) = measure((shape.request)(100_000), &contract, limits);
        assert!(over <= Work::allowance(bytes, &contract), "{}", shape.what);
        assert!(
            over.steps() <= 2 && over < under,
            "{}: {} steps at 100,000 tensors, {} at 1,000",
            shape.what,
            over.steps(),
            under.steps()
        );
    }
}

/// The duplicate check validation had before issue 22, counted in the same units: each
/// input compared with every earlier one.
fn scan_of_earlier_inputs(req: &InferRequest, work: &mut Work) -> usize {
    let mut duplicates = 0;
    for (i, input) in req.inputs.iter().enumerate() {
        let name = input.name();
        if req.inputs[..i].iter().any(|t| {
            work.add(
                1 + if t.name().len() == name.len() {
                    name.len()
                } else {
                    0
                },
            );
            t.name() == name
        }) {
            duplicates += 1;
        }
    }
    duplicates
}

#[test]
fn the_old_scan_of_earlier_inputs_breaks_the_allowance() {
    // Run at 10,000 inputs (50 million compares); at 100,000 it is 100 times that.
    let n = 10_000;
    let msg = distinct_inputs(n);
    let bytes = msg.encoded_len();
    let req = crate::pb::infer_request_from_pb(msg).unwrap();
    let contract = any_inputs();
    let allowed = Work::allowance(bytes, &contract);
    let mut linear = Work::default();
    assert!(check_counted(&req, &contract, RAISED, &mut linear).is_ok());
    let mut quadratic = Work::default();
    assert_eq!(scan_of_earlier_inputs(&req, &mut quadratic), 0);
    assert!(linear <= allowed);
    assert!(
        quadratic > allowed,
        "the old scan took {} steps, within the allowance of {} for {bytes} bytes: the \
         bound could not tell linear from quadratic",
        quadratic.steps(),
        allowed.steps()
    );
    // At 100,000 inputs the scan makes n(n-1)/2 compares at least.
    let n = 100_000u64;
    let (bytes, _) = measure(distinct_inputs(n as usize), &contract, RAISED);
    assert!(n * (n - 1) / 2 > Work::allowance(bytes, &contract).steps());
}
