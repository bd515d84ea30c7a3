//! Arbitrary bytes decoded as a ModelInferRequest, converted and checked against the
//! contract of every embedded model: never a panic, and a request that passes fits.
#![no_main]

use keel::model::{Contract, RequestLimits, check};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = keel::pb::inference::ModelInferRequest::decode(data) else {
        return;
    };
    let Ok(req) = keel::pb::infer_request_from_pb(msg) else {
        return;
    };
    let embedded = keel::upstream::embedded::Embedded::new();
    let contracts: Vec<Contract> = embedded
        .model_names()
        .filter_map(|m| embedded.contract(m))
        .collect();
    let limits = [
        RequestLimits::NONE,
        RequestLimits {
            max_bytes: 64,
            max_elements: 8,
        },
    ];
    for contract in &contracts {
        for limits in limits {
            if check(&req, contract, limits).is_ok() && !contract.any_inputs {
                for t in &req.inputs {
                    let spec = contract
                        .input(t.name())
                        .expect("an accepted input is known");
                    assert_eq!(spec.dtype, t.dtype());
                    assert_eq!(spec.dims.len(), t.shape().len());
                    assert!(t.data().len() as u64 <= limits.max_bytes);
                }
            }
        }
    }
});
