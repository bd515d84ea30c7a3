//! Arbitrary bytes as a client's ModelInferRequest and as an upstream's ModelInferResponse,
//! read as Keel's forwarding path reads them: never a panic, and what Keel would send for a
//! request it read (unchanged, with a new version, with a parameter added) decodes to
//! that request.
#![no_main]

use bytes::Bytes;
use keel::model::Param;
use keel::pb::wire;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(msg) = wire::decode_request(&bytes)
        && let Ok(req) = wire::request_from(msg, bytes.clone())
    {
        let mut changed = req.clone();
        changed.version = "fuzz".into();
        changed
            .parameters
            .insert("keel.fuzz".into(), Param::Int64(data.len() as i64));
        for r in [&req, &changed] {
            let sent = wire::request(r).to_bytes();
            let back = keel::pb::inference::ModelInferRequest::decode(sent)
                .ok()
                .and_then(|m| keel::pb::infer_request_from_pb(m).ok());
            assert_eq!(back.as_ref(), Some(r));
        }
    }
    if let Ok(mut resp) =
        wire::decode_response(bytes, http::HeaderMap::new(), http::HeaderMap::new())
    {
        resp.parameters
            .insert("keel.tier".into(), Param::String("primary".into()));
        let sent = wire::response(resp.clone()).to_bytes();
        let back = keel::pb::inference::ModelInferResponse::decode(sent)
            .ok()
            .and_then(|m| keel::pb::infer_response_from_pb(m).ok());
        assert_eq!(back.as_ref(), Some(&resp));
    }
});
