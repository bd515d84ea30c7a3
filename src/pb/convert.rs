//! Generated proto messages to and from [`crate::model`] types.
//!
//! Messages are destructured in full, so a field added to a proto breaks the build here
//! instead of being dropped silently.

use std::collections::HashMap;

use super::contents::{has_data, raw_to_typed, typed_to_raw};
use super::inference as pb;
use super::inference::infer_parameter::ParameterChoice;
use super::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use super::inference::model_infer_response::InferOutputTensor;
use super::inference::model_metadata_response::TensorMetadata;
use crate::model::{
    BatchStats, ContentForm, DataType, InferRequest, InferResponse, InvalidRequest, ModelMetadata,
    ModelSpec, ModelStats, Param, Parameters, Rejection, RequestedOutput, StatDuration, Tensor,
    TensorError, TensorSpec, Violations,
};

fn params_from_pb(p: HashMap<String, pb::InferParameter>) -> Parameters {
    p.into_iter()
        .filter_map(|(k, v)| {
            let value = match v.parameter_choice? {
                ParameterChoice::BoolParam(b) => Param::Bool(b),
                ParameterChoice::Int64Param(i) => Param::Int64(i),
                ParameterChoice::StringParam(s) => Param::String(s),
                ParameterChoice::DoubleParam(d) => Param::Double(d),
                ParameterChoice::Uint64Param(u) => Param::Uint64(u),
            };
            Some((k, value))
        })
        .collect()
}

fn params_to_pb(p: Parameters) -> HashMap<String, pb::InferParameter> {
    p.into_iter()
        .map(|(k, v)| {
            let choice = match v {
                Param::Bool(b) => ParameterChoice::BoolParam(b),
                Param::Int64(i) => ParameterChoice::Int64Param(i),
                Param::String(s) => ParameterChoice::StringParam(s),
                Param::Double(d) => ParameterChoice::DoubleParam(d),
                Param::Uint64(u) => ParameterChoice::Uint64Param(u),
            };
            (
                k,
                pb::InferParameter {
                    parameter_choice: Some(choice),
                },
            )
        })
        .collect()
}

/// A client's ModelInferRequest as a domain request, checking every tensor's data against
/// its shape and data type.
pub fn infer_request_from_pb(msg: pb::ModelInferRequest) -> Result<InferRequest, Rejection> {
    let pb::ModelInferRequest {
        model_name,
        model_version,
        id,
        parameters,
        inputs,
        outputs,
        raw_input_contents,
    } = msg;
    let mut problems = Violations::default();
    if model_name.is_empty() {
        problems.push(InvalidRequest::MissingModelName.at("model_name"));
    }
    let form = if raw_input_contents.is_empty() {
        ContentForm::Typed
    } else {
        ContentForm::Raw
    };
    // Without one raw entry per input, no input can be paired with its data.
    let paired = form == ContentForm::Typed || raw_input_contents.len() == inputs.len();
    if !paired {
        problems.push(
            InvalidRequest::RawCount {
                inputs: inputs.len(),
                raw: raw_input_contents.len(),
            }
            .at("raw_input_contents"),
        );
    }
    let mut raw = raw_input_contents.into_iter();
    let mut tensors = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate().filter(|_| paired) {
        let InferInputTensor {
            name,
            datatype,
            shape,
            parameters,
            contents,
        } = input;
        let raw_data = raw.next();
        let Some(dtype) = DataType::parse(&datatype) else {
            problems.push(
                InvalidRequest::UnknownDataType {
                    tensor: name,
                    datatype,
                }
                .at(format!("inputs[{i}].datatype")),
            );
            continue;
        };
        let data = match (form, raw_data, contents) {
            (ContentForm::Raw, _, Some(c)) if has_data(&c) => {
                problems.push(
                    InvalidRequest::MixedContents { tensor: name }
                        .at(format!("inputs[{i}].contents")),
                );
                continue;
            }
            (ContentForm::Raw, Some(bytes), _) => Ok(bytes),
            (_, _, c) => typed_to_raw(dtype, c.unwrap_or_default()),
        };
        match data.and_then(|data| Tensor::new(name.clone(), dtype, shape, data)) {
            Ok(mut tensor) => {
                tensor.parameters = params_from_pb(parameters);
                tensors.push(tensor);
            }
            Err(problem) => {
                let field = match (&problem, form) {
                    (
                        TensorError::NegativeDimension { .. } | TensorError::TooManyElements { .. },
                        _,
                    ) => {
                        format!("inputs[{i}].shape")
                    }
                    (TensorError::DataType { .. }, _) => format!("inputs[{i}].datatype"),
                    (_, ContentForm::Raw) => format!("raw_input_contents[{i}]"),
                    (_, ContentForm::Typed) => format!("inputs[{i}].contents"),
                };
                problems.push(
                    InvalidRequest::Tensor {
                        tensor: name,
                        problem,
                    }
                    .at(field),
                );
            }
        }
    }
    if let Some(rejection) = Rejection::of(problems) {
        return Err(rejection);
    }
    let outputs = outputs
        .into_iter()
        .map(|o| {
            let InferRequestedOutputTensor { name, parameters } = o;
            RequestedOutput {
                name,
                parameters: params_from_pb(parameters),
            }
        })
        .collect();
    Ok(InferRequest {
        model: model_name,
        version: model_version,
        id,
        parameters: params_from_pb(parameters),
        inputs: tensors,
        outputs,
        form,
        wire: Default::default(),
    })
}

/// A domain response as the client's ModelInferResponse, in the response's own form.
///
/// Typed answers need a typed field for every output; if one has none (FP16, BF16), the
/// whole answer is raw, since the protocol forbids mixing the two.
pub fn infer_response_to_pb(resp: InferResponse) -> pb::ModelInferResponse {
    let InferResponse {
        model,
        version,
        id,
        parameters,
        outputs,
        form,
        wire: _,
    } = resp;
    let typed: Option<Vec<pb::InferTensorContents>> = match form {
        ContentForm::Typed => outputs.iter().map(raw_to_typed).collect(),
        ContentForm::Raw => None,
    };
    let mut raw_output_contents = Vec::new();
    let mut typed = typed.map(Vec::into_iter);
    let outputs = outputs
        .into_iter()
        .map(|t| {
            let contents = match typed.as_mut() {
                Some(it) => it.next(),
                None => {
                    raw_output_contents.push(t.data().clone());
                    None
                }
            };
            output_to_pb(t, contents)
        })
        .collect();
    pb::ModelInferResponse {
        model_name: model,
        model_version: version,
        id,
        parameters: params_to_pb(parameters),
        outputs,
        raw_output_contents,
    }
}

/// The encoded length of `resp` as [`infer_response_to_pb`] gives it, if it may exceed
/// `limit`: an upper bound is summed first, without converting, and only an answer whose
/// bound passes `limit` is converted (a copy) and measured exactly. `None`: within it.
pub fn infer_response_len(resp: &InferResponse, limit: usize) -> Option<usize> {
    if infer_response_bound(resp) <= limit {
        return None;
    }
    let len = prost::Message::encoded_len(&infer_response_to_pb(resp.clone()));
    (len > limit).then_some(len)
}

/// An upper bound on the encoded length of `resp`, linear in its number of fields: each
/// field's bytes plus 11 for its tag and length, each tensor's data at 10 bytes per byte
/// (an INT8 element sent typed is a 10-byte varint at worst).
fn infer_response_bound(resp: &InferResponse) -> usize {
    const FIELD: usize = 11;
    fn params(p: &Parameters) -> usize {
        p.iter()
            .map(|(k, v)| {
                let value = match v {
                    Param::String(s) => s.len(),
                    _ => 10,
                };
                k.len() + value + 4 * FIELD
            })
            .sum()
    }
    let head = resp.model.len() + resp.version.len() + resp.id.len() + 3 * FIELD;
    let outputs: usize = resp
        .outputs
        .iter()
        .map(|t| {
            t.name().len()
                + t.dtype().as_str().len()
                + t.shape().len() * FIELD
                + params(&t.parameters)
                + t.data().len() * 10
                + 6 * FIELD
        })
        .sum();
    head + params(&resp.parameters) + outputs
}

fn output_to_pb(t: Tensor, contents: Option<pb::InferTensorContents>) -> InferOutputTensor {
    InferOutputTensor {
        name: t.name().to_string(),
        datatype: t.dtype().as_str().to_string(),
        shape: t.shape().to_vec(),
        parameters: params_to_pb(t.parameters),
        contents,
    }
}

/// A domain request as an upstream ModelInferRequest, always in raw form so tensor bytes are
/// passed on without a copy.
pub fn infer_request_to_pb(req: &InferRequest) -> pb::ModelInferRequest {
    let InferRequest {
        model,
        version,
        id,
        parameters,
        inputs,
        outputs,
        form: _,
        wire: _,
    } = req;
    pb::ModelInferRequest {
        model_name: model.clone(),
        model_version: version.clone(),
        id: id.clone(),
        parameters: params_to_pb(parameters.clone()),
        inputs: inputs
            .iter()
            .map(|t| InferInputTensor {
                name: t.name().to_string(),
                datatype: t.dtype().as_str().to_string(),
                shape: t.shape().to_vec(),
                parameters: params_to_pb(t.parameters.clone()),
                contents: None,
            })
            .collect(),
        outputs: outputs
            .iter()
            .map(|o| InferRequestedOutputTensor {
                name: o.name.clone(),
                parameters: params_to_pb(o.parameters.clone()),
            })
            .collect(),
        // Reference-counted: the tensor bytes are not copied.
        raw_input_contents: inputs.iter().map(|t| t.data().clone()).collect(),
    }
}

/// An upstream's ModelInferResponse as a domain response; raw or typed, its tensors are
/// checked like a client's, and its form is kept so the client gets the answer as the
/// upstream gave it.
pub fn infer_response_from_pb(msg: pb::ModelInferResponse) -> Result<InferResponse, String> {
    let pb::ModelInferResponse {
        model_name,
        model_version,
        id,
        parameters,
        outputs,
        raw_output_contents,
    } = msg;
    if !raw_output_contents.is_empty() && raw_output_contents.len() != outputs.len() {
        return Err(format!(
            "raw_output_contents has {} entries for {} outputs",
            raw_output_contents.len(),
            outputs.len()
        ));
    }
    // An answer with no outputs has no form of its own: raw, as Keel's.
    let form = if raw_output_contents.is_empty() && !outputs.is_empty() {
        ContentForm::Typed
    } else {
        ContentForm::Raw
    };
    let mut raw = raw_output_contents.into_iter();
    let mut tensors = Vec::with_capacity(outputs.len());
    for out in outputs {
        let InferOutputTensor {
            name,
            datatype,
            shape,
            parameters,
            contents,
        } = out;
        let dtype = DataType::parse(&datatype)
            .ok_or_else(|| format!("output '{name}': unknown datatype {datatype:?}"))?;
        let data = match raw.next() {
            Some(bytes) => Ok(bytes),
            None => typed_to_raw(dtype, contents.unwrap_or_default()),
        };
        let mut tensor = data
            .and_then(|d| Tensor::new(name.clone(), dtype, shape, d))
            .map_err(|e| format!("output '{name}': {e}"))?;
        tensor.parameters = params_from_pb(parameters);
        tensors.push(tensor);
    }
    Ok(InferResponse {
        model: model_name,
        version: model_version,
        id,
        parameters: params_from_pb(parameters),
        outputs: tensors,
        form,
        wire: Default::default(),
    })
}

fn tensor_meta_to_pb(t: TensorSpec) -> TensorMetadata {
    TensorMetadata {
        name: t.name,
        datatype: t.dtype.as_str().to_string(),
        shape: t.dims,
    }
}

fn tensor_meta_from_pb(t: TensorMetadata) -> Result<TensorSpec, String> {
    let TensorMetadata {
        name,
        datatype,
        shape,
    } = t;
    let dtype = DataType::parse(&datatype)
        .ok_or_else(|| format!("tensor '{name}': unknown datatype {datatype:?}"))?;
    Ok(TensorSpec {
        name,
        dtype,
        dims: shape,
    })
}

/// Model metadata as the OIP answer.
pub fn metadata_to_pb(m: ModelMetadata) -> pb::ModelMetadataResponse {
    pb::ModelMetadataResponse {
        name: m.name,
        versions: m.versions,
        platform: m.platform,
        inputs: m.inputs.into_iter().map(tensor_meta_to_pb).collect(),
        outputs: m.outputs.into_iter().map(tensor_meta_to_pb).collect(),
    }
}

/// An upstream's metadata answer.
pub fn metadata_from_pb(m: pb::ModelMetadataResponse) -> Result<ModelMetadata, String> {
    let pb::ModelMetadataResponse {
        name,
        versions,
        platform,
        inputs,
        outputs,
    } = m;
    Ok(ModelMetadata {
        name,
        versions,
        platform,
        inputs: inputs
            .into_iter()
            .map(tensor_meta_from_pb)
            .collect::<Result<_, _>>()?,
        outputs: outputs
            .into_iter()
            .map(tensor_meta_from_pb)
            .collect::<Result<_, _>>()?,
    })
}

fn dtype_from_code(code: i32) -> Option<DataType> {
    DataType::ALL.into_iter().find(|t| t.config_code() == code)
}

/// A model contract as Triton's ModelConfig.
pub fn spec_to_pb(s: ModelSpec) -> pb::ModelConfig {
    let ModelSpec {
        name,
        versions: _,
        platform,
        backend,
        max_batch_size,
        inputs,
        outputs,
        any_inputs: _,
    } = s;
    pb::ModelConfig {
        name,
        platform,
        version_policy: Some(pb::ModelVersionPolicy {
            policy_choice: Some(pb::model_version_policy::PolicyChoice::Latest(
                pb::model_version_policy::Latest { num_versions: 1 },
            )),
        }),
        max_batch_size: i32::try_from(max_batch_size).unwrap_or(i32::MAX),
        input: inputs
            .into_iter()
            .map(|t| pb::ModelInput {
                name: t.name,
                data_type: t.dtype.config_code(),
                format: 0,
                dims: t.dims,
                reshape: None,
                is_shape_tensor: false,
                allow_ragged_batch: false,
                optional: false,
            })
            .collect(),
        output: outputs
            .into_iter()
            .map(|t| pb::ModelOutput {
                name: t.name,
                data_type: t.dtype.config_code(),
                dims: t.dims,
                label_filename: String::new(),
                reshape: None,
                is_shape_tensor: false,
            })
            .collect(),
        backend,
        runtime: String::new(),
    }
}

/// An upstream's ModelConfig (the fields Keel models; others are not carried).
pub fn spec_from_pb(c: pb::ModelConfig) -> Result<ModelSpec, String> {
    let pb::ModelConfig {
        name,
        platform,
        version_policy: _,
        max_batch_size,
        input,
        output,
        backend,
        runtime: _,
    } = c;
    let tensor = |name: String, code: i32, dims: Vec<i64>| {
        dtype_from_code(code)
            .map(|dtype| TensorSpec {
                name: name.clone(),
                dtype,
                dims,
            })
            .ok_or_else(|| format!("tensor '{name}': unknown data type {code}"))
    };
    Ok(ModelSpec {
        name,
        versions: vec![],
        platform,
        backend,
        max_batch_size: u32::try_from(max_batch_size).unwrap_or(0),
        inputs: input
            .into_iter()
            .map(|t| tensor(t.name, t.data_type, t.dims))
            .collect::<Result<_, _>>()?,
        outputs: output
            .into_iter()
            .map(|t| tensor(t.name, t.data_type, t.dims))
            .collect::<Result<_, _>>()?,
        any_inputs: false,
    })
}

fn dur_to_pb(d: StatDuration) -> Option<pb::StatisticDuration> {
    Some(pb::StatisticDuration {
        count: d.count,
        ns: d.ns,
    })
}

fn dur_from_pb(d: Option<pb::StatisticDuration>) -> StatDuration {
    d.map(|d| StatDuration {
        count: d.count,
        ns: d.ns,
    })
    .unwrap_or_default()
}

/// Model statistics as Triton's ModelStatistics.
pub fn stats_to_pb(s: ModelStats) -> pb::ModelStatistics {
    let ModelStats {
        name,
        version,
        last_inference_ms,
        inference_count,
        execution_count,
        success,
        fail,
        queue,
        compute_input,
        compute_infer,
        compute_output,
        batches,
    } = s;
    pb::ModelStatistics {
        name,
        version,
        last_inference: last_inference_ms,
        inference_count,
        execution_count,
        inference_stats: Some(pb::InferStatistics {
            success: dur_to_pb(success),
            fail: dur_to_pb(fail),
            queue: dur_to_pb(queue),
            compute_input: dur_to_pb(compute_input),
            compute_infer: dur_to_pb(compute_infer),
            compute_output: dur_to_pb(compute_output),
            cache_hit: dur_to_pb(StatDuration::default()),
            cache_miss: dur_to_pb(StatDuration::default()),
        }),
        batch_stats: batches
            .into_iter()
            .map(|b| pb::InferBatchStatistics {
                batch_size: b.batch_size,
                compute_input: dur_to_pb(b.compute_input),
                compute_infer: dur_to_pb(b.compute_infer),
                compute_output: dur_to_pb(b.compute_output),
            })
            .collect(),
        memory_usage: vec![],
        response_stats: HashMap::new(),
    }
}

/// An upstream's statistics (the fields Keel models).
pub fn stats_from_pb(s: pb::ModelStatistics) -> ModelStats {
    let pb::ModelStatistics {
        name,
        version,
        last_inference,
        inference_count,
        execution_count,
        inference_stats,
        batch_stats,
        memory_usage: _,
        response_stats: _,
    } = s;
    let i = inference_stats.unwrap_or_default();
    ModelStats {
        name,
        version,
        last_inference_ms: last_inference,
        inference_count,
        execution_count,
        success: dur_from_pb(i.success),
        fail: dur_from_pb(i.fail),
        queue: dur_from_pb(i.queue),
        compute_input: dur_from_pb(i.compute_input),
        compute_infer: dur_from_pb(i.compute_infer),
        compute_output: dur_from_pb(i.compute_output),
        batches: batch_stats
            .into_iter()
            .map(|b| BatchStats {
                batch_size: b.batch_size,
                compute_input: dur_from_pb(b.compute_input),
                compute_infer: dur_from_pb(b.compute_infer),
                compute_output: dur_from_pb(b.compute_output),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn input(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: HashMap::new(),
            contents: None,
        }
    }

    #[test]
    fn raw_requests_keep_their_bytes_without_copying() {
        let data = Bytes::from(vec![1u8; 64]);
        let msg = pb::ModelInferRequest {
            model_name: "simple".into(),
            inputs: vec![input("INPUT0", "INT32", vec![1, 16])],
            raw_input_contents: vec![data.clone()],
            ..Default::default()
        };
        let req = infer_request_from_pb(msg).unwrap();
        assert_eq!(req.form, ContentForm::Raw);
        assert_eq!(req.inputs[0].data().as_ptr(), data.as_ptr());
        let back = infer_request_to_pb(&req);
        assert_eq!(back.raw_input_contents[0].as_ptr(), data.as_ptr());
    }

    #[test]
    fn malformed_requests_name_the_tensor_and_rule() {
        let msg = pb::ModelInferRequest {
            model_name: "simple".into(),
            inputs: vec![input("INPUT0", "INT32", vec![1, 16])],
            raw_input_contents: vec![Bytes::from(vec![0u8; 60])],
            ..Default::default()
        };
        assert_eq!(
            infer_request_from_pb(msg).unwrap_err().to_string(),
            "input 'INPUT0': raw content is 60 bytes but shape [1, 16] of INT32 needs 64 bytes"
        );
        let msg = pb::ModelInferRequest {
            model_name: "simple".into(),
            inputs: vec![input("INPUT0", "FLOAT", vec![1])],
            ..Default::default()
        };
        assert!(
            infer_request_from_pb(msg)
                .unwrap_err()
                .to_string()
                .starts_with("input 'INPUT0': unknown datatype \"FLOAT\"")
        );
        let msg = pb::ModelInferRequest {
            model_name: "simple".into(),
            inputs: vec![input("A", "INT32", vec![1]), input("B", "INT32", vec![1])],
            raw_input_contents: vec![Bytes::from(vec![0u8; 4])],
            ..Default::default()
        };
        assert_eq!(
            infer_request_from_pb(msg).unwrap_err(),
            InvalidRequest::RawCount { inputs: 2, raw: 1 }.into()
        );
        let msg = pb::ModelInferRequest::default();
        assert_eq!(
            infer_request_from_pb(msg).unwrap_err(),
            InvalidRequest::MissingModelName.into()
        );
    }

    #[test]
    fn every_bad_input_is_reported_at_its_path() {
        let msg = pb::ModelInferRequest {
            model_name: "simple".into(),
            inputs: vec![
                input("A", "FLOAT", vec![1]),
                input("B", "INT32", vec![2]),
                input("C", "INT32", vec![1 << 40, 1 << 40]),
                input("D", "BYTES", vec![1]),
            ],
            raw_input_contents: vec![
                Bytes::new(),
                Bytes::from(vec![0u8; 7]),
                Bytes::new(),
                Bytes::from_static(&[9, 0, 0, 0, b'x']),
            ],
            ..Default::default()
        };
        let e = infer_request_from_pb(msg).unwrap_err();
        let fields: Vec<&str> = e.violations().iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "inputs[0].datatype",
                "raw_input_contents[1]",
                "inputs[2].shape",
                "raw_input_contents[3]"
            ]
        );
        assert!(e.to_string().contains("needs 8 bytes"), "{e}");
        assert!(e.to_string().contains("too many elements"), "{e}");
    }

    #[test]
    fn an_answer_keeps_the_form_its_upstream_chose() {
        let typed_out = |name: &str, ints: Vec<i32>| InferOutputTensor {
            name: name.into(),
            datatype: "INT32".into(),
            shape: vec![ints.len() as i64],
            parameters: HashMap::new(),
            contents: Some(pb::InferTensorContents {
                int_contents: ints,
                ..Default::default()
            }),
        };
        let from_upstream = pb::ModelInferResponse {
            model_name: "m".into(),
            outputs: vec![typed_out("y", vec![3, 4])],
            ..Default::default()
        };
        let resp = infer_response_from_pb(from_upstream).unwrap();
        assert_eq!(resp.form, ContentForm::Typed);
        let typed = infer_response_to_pb(resp.clone());
        assert!(typed.raw_output_contents.is_empty());
        assert_eq!(
            typed.outputs[0].contents.as_ref().unwrap().int_contents,
            vec![3, 4]
        );

        let raw_upstream = infer_response_to_pb(InferResponse {
            form: ContentForm::Raw,
            ..resp.clone()
        });
        assert_eq!(raw_upstream.raw_output_contents.len(), 1);
        let back = infer_response_from_pb(raw_upstream).unwrap();
        assert_eq!(back.form, ContentForm::Raw);

        // A typed answer with an output that has no typed field (FP16) goes out raw whole.
        let mut with_half = resp;
        with_half
            .outputs
            .push(Tensor::new("h", DataType::Fp16, vec![1], Bytes::from_static(&[0, 60])).unwrap());
        let raw = infer_response_to_pb(with_half);
        assert_eq!(raw.raw_output_contents.len(), 2);
        assert!(raw.outputs.iter().all(|o| o.contents.is_none()));
    }

    #[test]
    fn parameters_of_every_kind_round_trip() {
        let mut p = Parameters::new();
        p.insert("b".into(), Param::Bool(true));
        p.insert("i".into(), Param::Int64(-3));
        p.insert("s".into(), Param::String("x".into()));
        p.insert("d".into(), Param::Double(0.5));
        p.insert("u".into(), Param::Uint64(9));
        assert_eq!(params_from_pb(params_to_pb(p.clone())), p);
    }

    #[test]
    fn specs_round_trip_through_model_config() {
        let spec = ModelSpec {
            name: "m".into(),
            versions: vec![],
            platform: "p".into(),
            backend: "b".into(),
            max_batch_size: 8,
            inputs: vec![TensorSpec::new("A", DataType::Bytes, &[-1])],
            outputs: vec![TensorSpec::new("B", DataType::Fp32, &[3])],
            any_inputs: false,
        };
        let pbc = spec_to_pb(spec.clone());
        assert_eq!(pbc.input[0].data_type, 13, "BYTES is TYPE_STRING");
        assert_eq!(spec_from_pb(pbc).unwrap(), spec);
    }

    mod never_panics {
        use proptest::prelude::*;

        use super::*;
        use crate::model::{Contract, RequestLimits, TensorSpec, check};

        fn dimension() -> impl Strategy<Value = i64> {
            prop_oneof![
                0i64..5,
                Just(-1i64),
                Just(i64::MIN),
                Just(i64::MAX),
                Just(1i64 << 40),
                any::<i64>(),
            ]
        }

        fn tensor() -> impl Strategy<Value = (InferInputTensor, Bytes)> {
            let datatype = prop_oneof![
                Just("INT32"),
                Just("FP32"),
                Just("BYTES"),
                Just("FP16"),
                Just("BOOL"),
                Just("UINT64"),
                Just("FLOAT"),
                Just(""),
            ];
            (
                prop_oneof![Just("a"), Just("b"), Just("c")],
                datatype,
                prop::collection::vec(dimension(), 0..4),
                prop::collection::vec(any::<u8>(), 0..48),
            )
                .prop_map(|(name, datatype, shape, raw)| {
                    (
                        InferInputTensor {
                            name: name.into(),
                            datatype: datatype.into(),
                            shape,
                            parameters: Default::default(),
                            contents: None,
                        },
                        Bytes::from(raw),
                    )
                })
        }

        fn contract() -> Contract {
            Contract {
                model: "m".into(),
                inputs: vec![
                    TensorSpec::new("a", DataType::Int32, &[-1, 2]),
                    TensorSpec::new("b", DataType::Bytes, &[-1]),
                ],
                outputs: vec![TensorSpec::new("y", DataType::Int32, &[-1, 2])],
                max_batch_size: Some(4),
                any_inputs: false,
                outputs_complete: true,
            }
        }

        proptest! {
            /// Arbitrary shapes, datatypes and byte lengths: decoding and checking answer
            /// with a rejection or a request that fits, never a panic.
            #[test]
            fn decoding_and_checking_never_panic(
                tensors in prop::collection::vec(tensor(), 0..4),
                raw in any::<bool>(),
                max_bytes in prop_oneof![Just(u64::MAX), 0u64..64],
                max_elements in prop_oneof![Just(u64::MAX), 0u64..16],
            ) {
                let (inputs, contents): (Vec<_>, Vec<_>) = tensors.into_iter().unzip();
                let msg = pb::ModelInferRequest {
                    model_name: "m".into(),
                    inputs,
                    raw_input_contents: if raw { contents } else { vec![] },
                    ..Default::default()
                };
                match infer_request_from_pb(msg) {
                    Err(r) => prop_assert!(!r.violations().is_empty()),
                    Ok(req) => {
                        let limits = RequestLimits { max_bytes, max_elements, ..RequestLimits::NONE };
                        if check(&req, &contract(), limits).is_ok() {
                            for t in &req.inputs {
                                let want = contract().input(t.name()).cloned();
                                prop_assert!(want.is_some_and(|w| w.dtype == t.dtype() && w.dims.len() == t.shape().len()));
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod answer_len {
    use bytes::Bytes;

    use super::*;

    fn answer(form: ContentForm, dtype: DataType, data: Vec<u8>) -> InferResponse {
        let n = i64::try_from(data.len() / dtype.element_size().unwrap_or(1)).unwrap();
        InferResponse {
            model: "m".into(),
            version: "1".into(),
            id: "r".into(),
            parameters: [("k".to_string(), Param::String("v".repeat(30)))].into(),
            outputs: vec![Tensor::new("out", dtype, vec![n], Bytes::from(data)).unwrap()],
            form,
            wire: Default::default(),
        }
    }

    fn exact(resp: &InferResponse) -> usize {
        prost::Message::encoded_len(&infer_response_to_pb(resp.clone()))
    }

    #[test]
    fn the_bound_holds_for_the_worst_typed_form_and_the_length_is_exact_near_the_limit() {
        // INT8 -1 sent typed is a 10-byte varint for each byte of raw data.
        for (form, dtype) in [
            (ContentForm::Raw, DataType::Int8),
            (ContentForm::Typed, DataType::Int8),
            (ContentForm::Typed, DataType::Int64),
            (ContentForm::Typed, DataType::Fp32),
        ] {
            let resp = answer(form, dtype, vec![0xff; 800]);
            let len = exact(&resp);
            assert!(infer_response_bound(&resp) >= len, "{form:?} {dtype:?}");
            assert_eq!(infer_response_len(&resp, len), None, "{form:?} {dtype:?}");
            assert_eq!(
                infer_response_len(&resp, len - 1),
                Some(len),
                "{form:?} {dtype:?}"
            );
        }
        // Typed INT8 really is that much larger than raw.
        let typed = exact(&answer(ContentForm::Typed, DataType::Int8, vec![0xff; 800]));
        assert!(typed > 8000, "{typed}");
    }
}
