//! The legacy v1 API: KServe-v1 style `instances` upgraded to one OIP v2 request using the
//! model's contract and the policy's [`V1Mapping`], and the OIP answer turned back into
//! `predictions`.
//!
//! Instances of one request are batched into one tensor per input, so a model whose first
//! dimension is -1 runs them in one call; a model without a batch dimension takes exactly
//! one instance. Numbers travel as `google.protobuf.Value` doubles, so integers beyond 2^53
//! cannot be represented exactly on this API (use v2 for them).

use std::collections::BTreeMap;

use bytes::{BufMut, BytesMut};

use crate::model::cast::{Scalar, from_scalars, scalars};
use crate::model::{
    Contract, DataType, InferRequest, InferResponse, InvalidRequest, Param, Parameters, Rejection,
    RequestedOutput, Tensor, TensorSpec, Violation, Violations,
};
use crate::policy::{Predict, V1Mapping};

/// A JSON-like value, as `google.protobuf.Value` carries it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// No value.
    Null,
    /// true or false.
    Bool(bool),
    /// A number (a double).
    Number(f64),
    /// Text.
    String(String),
    /// A list.
    List(Vec<Value>),
    /// Named values.
    Struct(BTreeMap<String, Value>),
}

/// A legacy Predict request, free of protobuf.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The model.
    pub model: String,
    /// The version; empty lets the routes choose.
    pub version: String,
    /// The client's request id.
    pub id: String,
    /// One entry per instance.
    pub instances: Vec<Value>,
    /// Request parameters.
    pub parameters: Parameters,
}

/// The elements of one instance for one input, flattened, with the shape they had.
struct Filled {
    /// Where the instance gave them (`instances[0]`, `instances[0].INPUT1`), so a problem
    /// found later, when the instances are batched, names the same field.
    field: String,
    /// For named features, the feature each element came from (one scalar each).
    features: Option<Vec<String>>,
    shape: Vec<i64>,
    elements: Vec<Element>,
}

impl Filled {
    /// The field element `i` came from, and the message prefix that places it there:
    /// `instances[0].petal_width` and no prefix for a named feature, else the instance's
    /// field and `element 3: `.
    fn element(&self, i: usize) -> (String, String) {
        match self.features.as_ref().and_then(|f| f.get(i)) {
            Some(feature) => (format!("{}.{feature}", self.field), String::new()),
            None => (self.field.clone(), format!("element {i}: ")),
        }
    }
}

#[derive(Clone, Debug)]
enum Element {
    Number(Scalar),
    Text(String),
}

/// A violation of a v1 request: `instances[3]: expected 4 numbers, got 3`.
fn violation(field: String, message: String) -> Violation {
    InvalidRequest::V1 {
        field: field.clone(),
        message,
    }
    .at(field)
}

/// Flattens `v` into elements, checking that nested lists are rectangular.
fn flatten(
    v: &Value,
    out: &mut Vec<Element>,
    shape: &mut Vec<i64>,
    depth: usize,
) -> Result<(), String> {
    match v {
        Value::List(items) => {
            if shape.len() == depth {
                shape.push(items.len() as i64);
            } else if shape[depth] != items.len() as i64 {
                return Err("nested lists have different lengths".into());
            }
            for item in items {
                flatten(item, out, shape, depth + 1)?;
            }
            Ok(())
        }
        _ if shape.len() > depth => Err("nested lists have different depths".into()),
        Value::Number(n) => {
            out.push(Element::Number(Scalar::Float(*n)));
            Ok(())
        }
        Value::Bool(b) => {
            out.push(Element::Number(Scalar::Int(i128::from(*b))));
            Ok(())
        }
        Value::String(s) => {
            out.push(Element::Text(s.clone()));
            Ok(())
        }
        Value::Null => Err("null is not a value".into()),
        Value::Struct(_) => Err("a struct cannot be an element".into()),
    }
}

/// Whether the input batches instances (its first dimension is -1).
fn batched(spec: &TensorSpec) -> bool {
    spec.dims.first() == Some(&-1)
}

/// The dimensions one instance fills.
fn instance_dims(spec: &TensorSpec) -> &[i64] {
    if batched(spec) {
        &spec.dims[1..]
    } else {
        &spec.dims
    }
}

/// Checks one instance's value for `spec` and flattens it; `features` names each element
/// when the instance gave them as named scalars.
fn fill(
    value: &Value,
    spec: &TensorSpec,
    field: &str,
    features: Option<&[String]>,
) -> Result<Filled, Violation> {
    let mut elements = Vec::new();
    let mut shape = Vec::new();
    flatten(value, &mut elements, &mut shape, 0).map_err(|e| violation(field.to_string(), e))?;
    let want = instance_dims(spec);
    let kind = if spec.dtype == DataType::Bytes {
        "strings"
    } else {
        "numbers"
    };
    let fixed = want.iter().all(|&d| d >= 0);
    let expected: i64 = want.iter().filter(|&&d| d >= 0).product();
    if fixed && elements.len() as i64 != expected {
        return Err(violation(
            field.to_string(),
            format!("expected {expected} {kind}, got {}", elements.len()),
        ));
    }
    let shape = if fixed {
        // A flat list fills a fixed multi-dimensional instance in order.
        want.to_vec()
    } else if shape.len() == want.len() && shape.iter().zip(want).all(|(&d, &w)| w < 0 || d == w) {
        shape
    } else {
        return Err(violation(
            field.to_string(),
            format!("shape {shape:?} does not match {want:?} (-1 is any size)"),
        ));
    };
    // Named features map one to one onto elements only when each is a scalar.
    let features = features
        .filter(|f| f.len() == elements.len())
        .map(<[String]>::to_vec);
    let filled = Filled {
        field: field.to_string(),
        features,
        shape,
        elements,
    };
    if let Some(i) = filled
        .elements
        .iter()
        .position(|e| (spec.dtype == DataType::Bytes) != matches!(e, Element::Text(_)))
    {
        let (field, prefix) = filled.element(i);
        return Err(violation(
            field,
            format!(
                "{prefix}input '{}' is {} and takes {kind}",
                spec.name, spec.dtype
            ),
        ));
    }
    Ok(filled)
}

/// Builds one input tensor from the instances that filled it.
fn tensor(spec: &TensorSpec, rows: Vec<(usize, Filled)>) -> Result<Tensor, Violations> {
    let mut problems = Violations::default();
    let Some((_, first)) = rows.first() else {
        return Err(problems);
    };
    let row_shape = first.shape.clone();
    for (_, row) in &rows[1..] {
        if row.shape != row_shape {
            problems.push(violation(
                row.field.clone(),
                format!(
                    "shape {:?} differs from {}'s {row_shape:?}; the instances of one request are batched together",
                    row.shape, first.field
                ),
            ));
        }
    }
    if !batched(spec) && rows.len() > 1 {
        problems.push(violation(
            "instances".into(),
            format!(
                "input '{}' of shape {:?} has no batch dimension: send one instance per request",
                spec.name, spec.dims
            ),
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut shape = Vec::with_capacity(row_shape.len() + 1);
    if batched(spec) {
        shape.push(rows.len() as i64);
    }
    shape.extend_from_slice(&row_shape);
    if spec.dtype == DataType::Bytes {
        let mut buf = BytesMut::new();
        for (_, row) in &rows {
            for e in &row.elements {
                if let Element::Text(s) = e {
                    buf.put_u32_le(s.len() as u32);
                    buf.put_slice(s.as_bytes());
                }
            }
        }
        return Tensor::new(spec.name.clone(), DataType::Bytes, shape, buf.freeze())
            .map_err(|e| vec![violation("instances".into(), e.to_string())].into());
    }
    let mut values = Vec::new();
    let mut starts = Vec::with_capacity(rows.len());
    for (k, (_, row)) in rows.iter().enumerate() {
        starts.push((values.len(), k));
        values.extend(row.elements.iter().filter_map(|e| match e {
            Element::Number(n) => Some(*n),
            Element::Text(_) => None,
        }));
    }
    from_scalars(&spec.name, spec.dtype, shape, &values, false).map_err(|e| {
        // Name the field the element came from (the instance and input, or the feature),
        // and its place in it, as every other v1 problem does.
        let (start, k) = starts
            .iter()
            .rev()
            .find(|(start, _)| *start <= e.index)
            .copied()
            .unwrap_or((0, 0));
        let (field, prefix) = rows[k].1.element(e.index - start);
        vec![violation(field, format!("{prefix}{}", e.reason))].into()
    })
}

/// The input list instances fill: the mapping's, else the model's only input.
fn target_input<'c>(contract: &'c Contract, map: &V1Mapping) -> Result<&'c TensorSpec, String> {
    match &map.input {
        Some(name) => contract.input(name).ok_or_else(|| {
            format!(
                "models.{}.v1.input names '{name}', which is not an input of the model (inputs: {})",
                contract.model,
                input_names(contract)
            )
        }),
        None => match contract.inputs.as_slice() {
            [only] => Ok(only),
            _ => Err(format!(
                "model '{}' has {} inputs ({}): send each instance as a struct naming them, or set models.{}.v1.input",
                contract.model,
                contract.inputs.len(),
                input_names(contract),
                contract.model
            )),
        },
    }
}

fn input_names(contract: &Contract) -> String {
    contract
        .inputs
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The v1 request as one OIP request for `contract`'s model, or every problem of it, each
/// naming the instance and field.
pub fn upgrade(
    p: Request,
    contract: &Contract,
    map: &V1Mapping,
) -> Result<InferRequest, Rejection> {
    let mut problems = Violations::default();
    if p.model.is_empty() {
        problems.push(InvalidRequest::MissingModelName.at("model_name"));
    }
    if p.instances.is_empty() {
        problems.push(violation(
            "instances".into(),
            "at least one instance is needed".into(),
        ));
    }
    // Per input (contract order), the instances that filled it.
    let mut rows: BTreeMap<usize, Vec<(usize, Filled)>> = BTreeMap::new();
    for (i, instance) in p.instances.iter().enumerate() {
        let at = format!("instances[{i}]");
        match instance {
            Value::Struct(fields) if !map.features.is_empty() => {
                let spec = match target_input(contract, map) {
                    Ok(s) => s,
                    Err(e) => {
                        problems.push(violation(at, e));
                        continue;
                    }
                };
                let mut ok = true;
                for key in fields.keys().filter(|k| !map.features.contains(k)) {
                    ok = false;
                    problems.push(violation(
                        format!("{at}.{key}"),
                        format!(
                            "not a feature of model '{}' (features: {})",
                            contract.model,
                            map.features.join(", ")
                        ),
                    ));
                }
                let mut row = Vec::with_capacity(map.features.len());
                for f in &map.features {
                    match fields.get(f) {
                        Some(v) => row.push(v.clone()),
                        None => {
                            ok = false;
                            problems.push(violation(format!("{at}.{f}"), "missing".into()));
                        }
                    }
                }
                if ok {
                    match fill(&Value::List(row), spec, &at, Some(&map.features)) {
                        Ok(f) => rows
                            .entry(index_of(contract, spec))
                            .or_default()
                            .push((i, f)),
                        Err(v) => problems.push(v),
                    }
                }
            }
            Value::Struct(fields) => {
                for key in fields.keys().filter(|k| contract.input(k).is_none()) {
                    problems.push(violation(
                        format!("{at}.{key}"),
                        format!(
                            "not an input of model '{}' (inputs: {})",
                            contract.model,
                            input_names(contract)
                        ),
                    ));
                }
                for (k, spec) in contract.inputs.iter().enumerate() {
                    match fields.get(&spec.name) {
                        Some(v) => match fill(v, spec, &format!("{at}.{}", spec.name), None) {
                            Ok(f) => rows.entry(k).or_default().push((i, f)),
                            Err(v) => problems.push(v),
                        },
                        None => problems
                            .push(violation(format!("{at}.{}", spec.name), "missing".into())),
                    }
                }
            }
            v => match target_input(contract, map) {
                Ok(spec) => match fill(v, spec, &at, None) {
                    Ok(f) => rows
                        .entry(index_of(contract, spec))
                        .or_default()
                        .push((i, f)),
                    Err(v) => problems.push(v),
                },
                Err(e) => problems.push(violation(at, e)),
            },
        }
    }
    Rejection::check(std::mem::take(&mut problems))?;
    let mut inputs = Vec::with_capacity(rows.len());
    for (k, rows) in rows {
        if rows.len() != p.instances.len() {
            problems.push(violation(
                "instances".into(),
                format!(
                    "only some instances give input '{}'",
                    contract.inputs[k].name
                ),
            ));
            continue;
        }
        match tensor(&contract.inputs[k], rows) {
            Ok(t) => inputs.push(t),
            Err(v) => problems.extend(v),
        }
    }
    Rejection::check(problems)?;
    let outputs = map
        .output
        .iter()
        .map(|name| RequestedOutput {
            name: name.clone(),
            parameters: Parameters::new(),
        })
        .collect();
    Ok(InferRequest {
        model: p.model,
        version: p.version,
        id: p.id,
        parameters: p.parameters,
        inputs,
        outputs,
        form: crate::model::ContentForm::Raw,
        wire: Default::default(),
    })
}

fn index_of(contract: &Contract, spec: &TensorSpec) -> usize {
    contract
        .inputs
        .iter()
        .position(|s| s.name == spec.name)
        .unwrap_or(0)
}

/// The rows of `t` as one value per instance.
fn rows(t: &Tensor, instances: usize) -> Result<Vec<Value>, String> {
    let elements: Vec<Value> = if t.dtype() == DataType::Bytes {
        crate::model::split_bytes_elements(t.data())
            .map_err(|e| e.to_string())?
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                String::from_utf8(b.to_vec())
                    .map(Value::String)
                    .map_err(|_| {
                        format!(
                            "output '{}' element {i} is not UTF-8 text, which the v1 API needs",
                            t.name()
                        )
                    })
            })
            .collect::<Result<_, _>>()?
    } else {
        scalars(t)
            .map_err(|e| format!("output '{}': {e}", t.name()))?
            .into_iter()
            .map(|s| Value::Number(s.as_f64()))
            .collect()
    };
    let shape = t.shape();
    let (row_shape, n) = match shape.split_first() {
        Some((&first, rest)) if first == instances as i64 => (rest, instances),
        _ if instances == 1 => (shape, 1),
        _ => {
            return Err(format!(
                "output '{}' of shape {shape:?} does not split into {instances} predictions",
                t.name()
            ));
        }
    };
    let per = elements.len().checked_div(n).unwrap_or(0);
    Ok(elements
        .chunks(per.max(1))
        .take(n)
        .map(|row| nest(row, row_shape))
        .collect())
}

/// Elements as nested lists of `shape` (a scalar for an empty shape).
fn nest(elements: &[Value], shape: &[i64]) -> Value {
    match shape.split_first() {
        None => elements.first().cloned().unwrap_or(Value::Null),
        Some((&d, rest)) => {
            let d = d.max(1) as usize;
            let per = (elements.len() / d).max(1);
            Value::List(elements.chunks(per).map(|c| nest(c, rest)).collect())
        }
    }
}

/// The index of the largest number in `v` (a scalar is its own label).
fn argmax(v: &Value) -> Option<usize> {
    match v {
        Value::Number(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as usize),
        Value::List(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, x)| match x {
                Value::Number(n) => Some((i, *n)),
                _ => None,
            })
            .fold(None, |best: Option<(usize, f64)>, (i, n)| match best {
                Some((_, b)) if b >= n => best,
                _ => Some((i, n)),
            })
            .map(|(i, _)| i),
        _ => None,
    }
}

/// The OIP answer to a request of `instances` instances as v1 predictions.
pub fn downgrade(
    resp: &InferResponse,
    instances: usize,
    map: &V1Mapping,
) -> Result<Vec<Value>, String> {
    let chosen: Vec<&Tensor> = match &map.output {
        Some(name) => vec![
            resp.outputs
                .iter()
                .find(|t| t.name() == name)
                .ok_or_else(|| {
                    format!(
                        "the answer has no output '{name}' (models.{}.v1.output)",
                        resp.model
                    )
                })?,
        ],
        None => resp.outputs.iter().collect(),
    };
    let mut columns = Vec::with_capacity(chosen.len());
    for t in &chosen {
        let mut r = rows(t, instances)?;
        if map.predict == Predict::Label {
            r = r
                .iter()
                .map(|row| {
                    let i = argmax(row).ok_or_else(|| format!("output '{}' has no numeric row to take a label from", t.name()))?;
                    if map.labels.is_empty() {
                        Ok(Value::Number(i as f64))
                    } else {
                        map.labels
                            .get(i)
                            .map(|l| Value::String(l.clone()))
                            .ok_or_else(|| format!("label index {i} is beyond the {} labels of models.{}.v1.labels", map.labels.len(), resp.model))
                    }
                })
                .collect::<Result<_, String>>()?;
        }
        columns.push((t.name(), r));
    }
    Ok(match columns.as_mut_slice() {
        [(_, only)] => std::mem::take(only),
        _ => (0..instances)
            .map(|i| {
                Value::Struct(
                    columns
                        .iter()
                        .map(|(name, r)| {
                            (name.to_string(), r.get(i).cloned().unwrap_or(Value::Null))
                        })
                        .collect(),
                )
            })
            .collect(),
    })
}

/// A request parameter from a v1 value: strings, booleans and numbers (integral numbers
/// as INT64); other values are not parameters.
pub fn parameter(v: &Value) -> Option<Param> {
    match v {
        Value::Bool(b) => Some(Param::Bool(*b)),
        Value::String(s) => Some(Param::String(s.clone())),
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 => {
            Some(Param::Int64(*n as i64))
        }
        Value::Number(n) => Some(Param::Double(*n)),
        _ => None,
    }
}

/// A response parameter as a v1 value.
pub fn parameter_value(p: &Param) -> Value {
    match p {
        Param::Bool(b) => Value::Bool(*b),
        Param::Int64(i) => Value::Number(*i as f64),
        Param::Uint64(u) => Value::Number(*u as f64),
        Param::Double(d) => Value::Number(*d),
        Param::String(s) => Value::String(s.clone()),
    }
}

#[cfg(test)]
mod tests;
