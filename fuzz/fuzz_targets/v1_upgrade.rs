//! Arbitrary bytes decoded as a legacy PredictRequest, upgraded for the embedded models'
//! contracts under a mapping chosen from the input, and the result answered back as
//! predictions (an identity answer): never a panic.
#![no_main]

use keel::adapt::v1::{self, Value};
use keel::model::InferResponse;
use keel::policy::{Predict, V1Mapping};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use prost_types::value::Kind;

fn from_pb(v: prost_types::Value, depth: usize) -> Value {
    if depth > 32 {
        return Value::Null;
    }
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => Value::Number(n),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(l)) => Value::List(
            l.values
                .into_iter()
                .map(|v| from_pb(v, depth + 1))
                .collect(),
        ),
        Some(Kind::StructValue(s)) => Value::Struct(
            s.fields
                .into_iter()
                .map(|(k, v)| (k, from_pb(v, depth + 1)))
                .collect(),
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let Ok(msg) = keel::pb::keel_inference_v1::PredictRequest::decode(rest) else {
        return;
    };
    let embedded = keel::upstream::embedded::Embedded::new();
    let names: Vec<&str> = embedded.model_names().collect();
    let model = names[usize::from(choice) % names.len()];
    let Some(contract) = embedded.contract(model) else {
        return;
    };
    let map = V1Mapping {
        input: (choice & 0x10 != 0).then(|| "features".to_string()),
        features: if choice & 0x20 != 0 {
            vec!["a".into(), "b".into(), "c".into(), "d".into()]
        } else {
            vec![]
        },
        output: (choice & 0x40 != 0).then(|| "OUTPUT0".to_string()),
        predict: if choice & 0x80 != 0 {
            Predict::Label
        } else {
            Predict::Values
        },
        labels: vec!["x".into(), "y".into()],
    };
    let n = msg.instances.len();
    let request = v1::Request {
        model: msg.model_name,
        version: msg.model_version,
        id: msg.id,
        instances: msg.instances.into_iter().map(|v| from_pb(v, 0)).collect(),
        parameters: Default::default(),
    };
    if let Ok(req) = v1::upgrade(request, &contract, &map) {
        let answer = InferResponse {
            model: req.model.clone(),
            version: "1".into(),
            id: req.id.clone(),
            parameters: Default::default(),
            outputs: req.inputs.clone(),
            form: keel::model::ContentForm::Raw,
            wire: Default::default(),
        };
        let _ = v1::downgrade(&answer, n, &map);
    }
});
