//! Arbitrary bytes decoded as a ModelInferRequest, run through a version adapter built from
//! the input (renames, casts, reshapes, output selection) and back: never a panic, and a
//! lossless cast that succeeds round-trips exactly.
#![no_main]

use keel::adapt::version;
use keel::model::DataType;
use keel::model::cast::{cast, lossless};
use keel::policy::VersionAdapter;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (head, rest) = data.split_at(4);
    let Ok(msg) = keel::pb::inference::ModelInferRequest::decode(rest) else {
        return;
    };
    let Ok(req) = keel::pb::infer_request_from_pb(msg) else {
        return;
    };
    let dtype = |b: u8| DataType::ALL[usize::from(b) % DataType::ALL.len()];
    let first = req
        .inputs
        .first()
        .map(|t| t.name().to_string())
        .unwrap_or_default();
    let mut adapter = VersionAdapter {
        to: "2".into(),
        allow_lossy: head[0] & 1 == 1,
        ..VersionAdapter::default()
    };
    adapter
        .rename_inputs
        .insert(first.clone(), format!("{first}_v2"));
    if dtype(head[1]) != DataType::Bytes {
        adapter
            .cast_inputs
            .insert(format!("{first}_v2"), dtype(head[1]));
    }
    let dims = match head[2] % 4 {
        0 => vec![-1],
        1 => vec![1, -1],
        2 => vec![i64::from(head[3]), -1],
        _ => vec![i64::from(head[3])],
    };
    adapter
        .reshape_inputs
        .insert(format!("{first}_v2"), dims.clone());
    adapter
        .rename_outputs
        .insert(format!("{first}_v2"), first.clone());
    adapter.reshape_outputs.insert(first.clone(), dims);
    if let Ok(adapted) = version::request(req.clone(), &adapter) {
        let answer = keel::model::InferResponse {
            model: adapted.model.clone(),
            version: adapted.version.clone(),
            id: adapted.id.clone(),
            parameters: Default::default(),
            outputs: adapted.inputs.clone(),
            form: keel::model::ContentForm::Raw,
            wire: Default::default(),
        };
        let _ = version::response(answer, &adapter);
    }
    // Lossless casts round-trip exactly.
    for t in &req.inputs {
        let to = dtype(head[1]);
        if t.dtype() != DataType::Bytes && to != DataType::Bytes && lossless(t.dtype(), to) {
            if let Ok(wide) = cast(t, to, false) {
                let back = cast(&wide, t.dtype(), true).expect("a widened value narrows back");
                assert_eq!(
                    back.data(),
                    t.data(),
                    "{} -> {to} -> {}",
                    t.dtype(),
                    t.dtype()
                );
            }
        }
    }
});
