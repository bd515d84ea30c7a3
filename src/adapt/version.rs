//! Version adapters: a request written for one version of a model, turned into a request
//! for the version that answers, and the answer turned back into what the client expects.
//!
//! Pure functions over domain types; the policy says what each adapter does
//! ([`VersionAdapter`]). Tensor bytes are not copied unless a cast changes them.

use crate::model::cast::cast;
use crate::model::{Contract, InferRequest, InferResponse, InvalidRequest, Rejection, Tensor};
use crate::policy::VersionAdapter;
use crate::route::ladder::static_tensors;

/// The problems of `adapter` (at policy path `at`) against the contract of the version it
/// targets, as (policy path, message): every input and output it names must exist there.
/// Empty when it fits.
pub fn check(adapter: &VersionAdapter, contract: &Contract, at: &str) -> Vec<(String, String)> {
    if contract.any_inputs {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (name, path) in adapter.model_inputs(at) {
        if contract.input(&name).is_none() {
            out.push((
                path,
                format!(
                    "model '{}' has no input '{name}' (inputs: {})",
                    contract.model,
                    names(&contract.inputs)
                ),
            ));
        }
    }
    for (name, path) in adapter.model_outputs(at) {
        if contract.output(&name).is_none() {
            out.push((
                path,
                format!(
                    "model '{}' has no output '{name}' (outputs: {})",
                    contract.model,
                    names(&contract.outputs)
                ),
            ));
        }
    }
    out
}

fn names(specs: &[crate::model::TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The contract as a client of the adapted version sees it: inputs and outputs under the
/// client's names, without the inputs the adapter fills with defaults. Types and shapes are
/// the model's (a cast or reshape of the adapter then changes nothing), so the legacy v1 API
/// can build an old client's request from it.
pub fn client_contract(adapter: &VersionAdapter, contract: &Contract) -> Contract {
    let client_input = |model: &str| {
        adapter
            .rename_inputs
            .iter()
            .find(|(_, m)| *m == model)
            .map_or(model.to_string(), |(c, _)| c.clone())
    };
    let inputs = contract
        .inputs
        .iter()
        .filter(|t| !adapter.defaults.iter().any(|d| d.name == t.name))
        .map(|t| crate::model::TensorSpec {
            name: client_input(&t.name),
            ..t.clone()
        })
        .collect();
    let outputs = contract
        .outputs
        .iter()
        .map(|t| crate::model::TensorSpec {
            name: adapter.client_output(&t.name).to_string(),
            ..t.clone()
        })
        .collect();
    Contract {
        inputs,
        outputs,
        ..contract.clone()
    }
}

/// `t` with the shape `dims`, where one -1 stands for what is left; the element count must
/// stay the same.
pub fn reshape(t: &Tensor, dims: &[i64]) -> Result<Tensor, String> {
    let count = t.element_count() as i64;
    let known: i64 = dims.iter().filter(|&&d| d >= 0).product();
    let shape: Vec<i64> = match dims.iter().position(|&d| d == -1) {
        Some(_) if known == 0 || count % known != 0 => {
            return Err(format!("{count} elements do not fit shape {dims:?}"));
        }
        Some(at) => {
            let mut s = dims.to_vec();
            s[at] = count / known;
            s
        }
        None => dims.to_vec(),
    };
    let mut out = Tensor::new(t.name(), t.dtype(), shape, t.data().clone())
        .map_err(|_| format!("{count} elements do not fit shape {dims:?}"))?;
    out.parameters = t.parameters.clone();
    Ok(out)
}

/// The client's request as a request for `adapter.to`: inputs renamed, cast and reshaped,
/// defaults added for inputs the client does not send, requested outputs renamed.
pub fn request(req: InferRequest, adapter: &VersionAdapter) -> Result<InferRequest, Rejection> {
    let mut problems = crate::model::Violations::default();
    let mut inputs = Vec::with_capacity(req.inputs.len() + adapter.defaults.len());
    for (i, t) in req.inputs.into_iter().enumerate() {
        let client = t.name().to_string();
        let model = adapter.model_input(&client).to_string();
        let mut t = t.with_name(model.clone());
        let mut fail = |reason: String| {
            problems.push(
                InvalidRequest::Adapter {
                    tensor: client.clone(),
                    reason,
                }
                .at(format!("inputs[{i}]")),
            );
        };
        if let Some(&to) = adapter.cast_inputs.get(&model) {
            match cast(&t, to, adapter.allow_lossy) {
                Ok(c) => t = c,
                Err(e) => {
                    fail(format!("as {to} for version {}: {e}", adapter.to));
                    continue;
                }
            }
        }
        if let Some(dims) = adapter.reshape_inputs.get(&model) {
            match reshape(&t, dims) {
                Ok(r) => t = r,
                Err(e) => {
                    fail(format!("reshaping for version {}: {e}", adapter.to));
                    continue;
                }
            }
        }
        inputs.push(t);
    }
    let missing: Vec<_> = adapter
        .defaults
        .iter()
        .filter(|d| !inputs.iter().any(|t| t.name() == d.name))
        .cloned()
        .collect();
    // Checked when the policy loaded, so this does not fail.
    match static_tensors(&missing) {
        Ok(defaults) => inputs.extend(defaults),
        Err(e) => problems.push(
            InvalidRequest::Adapter {
                tensor: "defaults".into(),
                reason: e,
            }
            .at("inputs"),
        ),
    }
    if let Some(r) = Rejection::of(problems) {
        return Err(r);
    }
    let mut outputs = req.outputs;
    if outputs.is_empty() {
        outputs = adapter
            .outputs
            .iter()
            .map(|name| crate::model::RequestedOutput {
                name: name.clone(),
                parameters: Default::default(),
            })
            .collect();
    }
    for o in &mut outputs {
        o.name = adapter.model_output(&o.name).to_string();
    }
    Ok(InferRequest {
        version: adapter.to.clone(),
        inputs,
        outputs,
        ..req
    })
}

/// The answer of `adapter.to` as the client expects it: outputs renamed, cast, reshaped
/// and selected. An output that cannot be turned back is named in the error.
pub fn response(
    mut resp: InferResponse,
    adapter: &VersionAdapter,
) -> Result<InferResponse, String> {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    for t in resp.outputs {
        let client = adapter.client_output(t.name()).to_string();
        if !adapter.outputs.is_empty() && !adapter.outputs.contains(&client) {
            continue;
        }
        let mut t = t.with_name(client.clone());
        if let Some(&to) = adapter.cast_outputs.get(&client) {
            t = cast(&t, to, adapter.allow_lossy)
                .map_err(|e| format!("output '{client}' as {to}: {e}"))?;
        }
        if let Some(dims) = adapter.reshape_outputs.get(&client) {
            t = reshape(&t, dims).map_err(|e| format!("output '{client}': {e}"))?;
        }
        outputs.push(t);
    }
    resp.outputs = outputs;
    Ok(resp)
}

#[cfg(test)]
mod tests;
