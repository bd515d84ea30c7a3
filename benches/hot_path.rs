//! Micro-benchmarks of the pieces every call goes through: taking the policy snapshot,
//! resolving settings, classifying an error, a backoff, a breaker admission and record,
//! decoding and validating a 1 MiB tensor, the forwarding path's bytes (reading a request,
//! appending Keel's labels to an answer), and upgrading a v1 request.
//!
//! `cargo bench --bench hot_path`; figures are recorded in docs/benchmarks.md.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keel::adapt::v1;
use keel::model::{Contract, DataType, RequestLimits, TensorSpec, check};
use keel::pb::inference as pb;
use keel::policy::{METHODS, Policy, Store, V1Mapping};
use keel::resilience::{BreakerCell, Origin, backoff_delay, classify};

fn policy(c: &mut Criterion) {
    let store = Store::with_default();
    c.bench_function("policy snapshot load", |b| {
        b.iter(|| black_box(store.current()))
    });
    let p = Policy::parse(
        "[defaults]\ntimeout = \"10s\"\n[methods.\"inference.GRPCInferenceService/ModelInfer\"]\ntimeout = \"5s\"\n\
         [models.simple]\nbackend = \"embedded\"\ntimeout = \"2s\"\n",
    )
    .unwrap();
    c.bench_function("settings resolution (model > method > defaults)", |b| {
        b.iter(|| black_box(p.resolve(black_box(METHODS[0]), Some("simple"))))
    });
}

fn resilience(c: &mut Criterion) {
    c.bench_function("classify", |b| {
        b.iter(|| classify(black_box(Origin::Upstream(tonic::Code::Unavailable)), false))
    });
    let retry = Policy::parse("").unwrap().resolve(METHODS[0], None).retry;
    c.bench_function("backoff (deterministic jitter)", |b| {
        b.iter(|| backoff_delay(&retry, black_box(2), "req-1", 7))
    });
    let breaker = BreakerCell::new(Policy::parse("").unwrap().resolve(METHODS[0], None).breaker);
    c.bench_function("breaker admit + record", |b| {
        b.iter(|| {
            let a = breaker.admit().unwrap();
            breaker.record(a, true);
        })
    });
}

fn validation(c: &mut Criterion) {
    let n = (1 << 20) / 4;
    let msg = pb::ModelInferRequest {
        model_name: "m".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, n],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(vec![0u8; 1 << 20])],
        ..Default::default()
    };
    let contract = Contract {
        model: "m".into(),
        inputs: vec![TensorSpec::new("x", DataType::Fp32, &[-1, -1])],
        outputs: vec![],
        max_batch_size: Some(8),
        any_inputs: false,
        outputs_complete: true,
    };
    c.bench_function("decode + validate a 1 MiB FP32 tensor (raw)", |b| {
        b.iter(|| {
            let req = keel::pb::infer_request_from_pb(black_box(msg.clone())).unwrap();
            check(&req, &contract, RequestLimits::NONE).unwrap()
        })
    });
}

/// Validation's cost against the request's size: per input, flat from 10 to 100,000
/// inputs when it is linear (the limits raised so the loops really run).
fn validation_by_input_count(c: &mut Criterion) {
    let mut group = c.benchmark_group("validation by input count (limits raised)");
    for n in [10usize, 1_000, 100_000] {
        let msg = pb::ModelInferRequest {
            model_name: "m".into(),
            inputs: (0..n)
                .map(|i| pb::model_infer_request::InferInputTensor {
                    name: format!("input_{i}"),
                    datatype: "INT32".into(),
                    shape: vec![1],
                    ..Default::default()
                })
                .collect(),
            raw_input_contents: (0..n).map(|_| Bytes::from(vec![0u8; 4])).collect(),
            ..Default::default()
        };
        let req = keel::pb::infer_request_from_pb(msg).unwrap();
        let contract = Contract {
            model: "m".into(),
            inputs: vec![],
            outputs: vec![],
            max_batch_size: None,
            any_inputs: true,
            outputs_complete: true,
        };
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &req, |b, req| {
            b.iter(|| check(black_box(req), &contract, RequestLimits::NONE).unwrap())
        });
    }
    group.finish();
}

/// The forwarding path's own pieces: reading the routing view out of a request's bytes
/// (the domain request, tensor data left in the bytes), the bytes sent upstream for it, and
/// an answer's bytes with Keel's labels appended, against encoding the answer whole.
fn wire(c: &mut Criterion) {
    use keel::model::Param;
    use keel::pb::wire;
    use prost::Message as _;
    let simple = pb::ModelInferRequest {
        model_name: "simple".into(),
        id: "req-1".into(),
        inputs: ["INPUT0", "INPUT1"]
            .map(|name| pb::model_infer_request::InferInputTensor {
                name: name.into(),
                datatype: "INT32".into(),
                shape: vec![1, 16],
                ..Default::default()
            })
            .to_vec(),
        raw_input_contents: vec![Bytes::from(vec![1u8; 64]), Bytes::from(vec![2u8; 64])],
        ..Default::default()
    };
    let bytes = Bytes::from(simple.encode_to_vec());
    c.bench_function("wire: read a simple ModelInfer from its bytes", |b| {
        b.iter(|| {
            let msg = wire::decode_request(black_box(&bytes)).unwrap();
            wire::request_from(msg, bytes.clone()).unwrap()
        })
    });
    let req = wire::request_from(wire::decode_request(&bytes).unwrap(), bytes.clone()).unwrap();
    c.bench_function("wire: the bytes sent upstream for it (unchanged)", |b| {
        b.iter(|| wire::request(black_box(&req)))
    });
    // An answer with two outputs of `each` bytes, its labels set as the edge sets them.
    let labelled = |each: usize| {
        let answer = pb::ModelInferResponse {
            model_name: "simple".into(),
            model_version: "1".into(),
            id: "req-1".into(),
            outputs: ["OUTPUT0", "OUTPUT1"]
                .map(|name| pb::model_infer_response::InferOutputTensor {
                    name: name.into(),
                    datatype: "INT32".into(),
                    shape: vec![1, (each / 4) as i64],
                    ..Default::default()
                })
                .to_vec(),
            raw_output_contents: vec![Bytes::from(vec![3u8; each]), Bytes::from(vec![4u8; each])],
            ..Default::default()
        };
        let mut r = wire::decode_response(
            Bytes::from(answer.encode_to_vec()),
            Default::default(),
            Default::default(),
        )
        .unwrap();
        for (k, v) in [("keel.tier", "primary"), ("keel.served_by", "simple:1")] {
            r.parameters.insert(k.into(), Param::String(v.into()));
        }
        r.parameters
            .insert("keel.degraded".into(), Param::Bool(false));
        r
    };
    for (each, size) in [(64, "64 B"), (1 << 20, "1 MiB")] {
        let resp = labelled(each);
        let mut whole = resp.clone();
        whole.wire = keel::model::Wire::none();
        c.bench_function(
            &format!("wire: an answer (2 x {size}) with Keel's labels appended"),
            |b| {
                b.iter_batched(
                    || resp.clone(),
                    wire::response,
                    criterion::BatchSize::SmallInput,
                )
            },
        );
        c.bench_function(
            &format!("wire: the same answer (2 x {size}) encoded whole (as before)"),
            |b| {
                b.iter_batched(
                    || whole.clone(),
                    wire::response,
                    criterion::BatchSize::SmallInput,
                )
            },
        );
    }
}

fn legacy(c: &mut Criterion) {
    let iris = Contract {
        model: "iris".into(),
        inputs: vec![TensorSpec::new("features", DataType::Fp32, &[-1, 4])],
        outputs: vec![],
        max_batch_size: Some(0),
        any_inputs: false,
        outputs_complete: true,
    };
    let row = v1::Value::List([5.1, 3.5, 1.4, 0.2].map(v1::Value::Number).to_vec());
    let request = |n: usize| v1::Request {
        model: "iris".into(),
        version: String::new(),
        id: String::new(),
        instances: vec![row.clone(); n],
        parameters: Default::default(),
    };
    let map = V1Mapping::default();
    for n in [1, 64] {
        let r = request(n);
        c.bench_function(&format!("v1 upgrade, {n} iris instance(s)"), |b| {
            b.iter(|| v1::upgrade(black_box(r.clone()), &iris, &map).unwrap())
        });
    }
}

criterion_group!(
    benches,
    policy,
    resilience,
    validation,
    validation_by_input_count,
    wire,
    legacy
);
criterion_main!(benches);
