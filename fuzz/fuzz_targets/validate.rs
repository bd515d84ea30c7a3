//! Arbitrary bytes decoded as a ModelInferRequest, converted and checked against the
//! contract of every embedded model: never a panic, a request that passes fits, and the
//! check's work stays within `Work::allowance` of the input's length (the cost oracle:
//! linear, counted in steps, not wall time).
#![no_main]

use keel::model::{Contract, RequestLimits, Work, check_counted};
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
            ..RequestLimits::NONE
        },
    ];
    for contract in &contracts {
        for limits in limits {
            let mut work = Work::default();
            let checked = check_counted(&req, contract, limits, &mut work);
            let allowed = Work::allowance(data.len(), contract);
            assert!(
                work <= allowed,
                "{} steps for {} bytes, allowed {}",
                work.steps(),
                data.len(),
                allowed.steps()
            );
            if checked.is_ok() && !contract.any_inputs {
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
