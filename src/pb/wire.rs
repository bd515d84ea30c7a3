//! ModelInfer messages as bytes: a request sent upstream as the client sent it, an answer
//! sent to the client as the upstream gave it, with what Keel changed appended
//! ([`crate::model::Wire`] says what changed). The edge frames them itself
//! (`api::inference::bytes`).
//!
//! Protobuf's merge rules make appending enough: of a singular field repeated the last
//! value counts (a routed `model_version`), and map entries are merged, the last one of a
//! key counting (Keel's `keel.*` response parameters). A value whose wire no longer stands
//! for it is encoded whole.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use prost::encoding::{self, WireType};

use super::convert::{infer_request_to_pb, infer_response_to_pb};
use super::inference as pb;
use super::inference::infer_parameter::ParameterChoice;
use crate::model::{InferRequest, InferResponse, Param, Parameters, Patch};

/// A gRPC frame: prefix, message, appended fields.
pub type Frame = bytes::buf::Chain<bytes::buf::Chain<Bytes, Bytes>, Bytes>;

/// A message to send: the bytes it came as (or its whole encoding) and what is appended.
#[derive(Clone, Debug, Default)]
pub struct Encoded {
    /// The message as received, or encoded whole.
    pub head: Bytes,
    /// Fields appended to it; empty when nothing changed.
    pub tail: Bytes,
}

impl Encoded {
    /// The message's length on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Whether the message is empty (every field at its default).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message as one gRPC frame (uncompressed): the 5-byte prefix, then the message,
    /// without copying it.
    pub fn framed(self) -> Frame {
        Bytes::copy_from_slice(&super::framing::prefix(self.len()))
            .chain(self.head)
            .chain(self.tail)
    }

    /// The message in one piece (copies it when something was appended).
    pub fn to_bytes(&self) -> Bytes {
        if self.tail.is_empty() {
            return self.head.clone();
        }
        let mut out = BytesMut::with_capacity(self.len());
        out.put_slice(&self.head);
        out.put_slice(&self.tail);
        out.freeze()
    }
}

/// The ModelInferRequest to send for `req`.
pub fn request(req: &InferRequest) -> Encoded {
    let encoded = match req.wire.patch_request(req) {
        Some(patch) => patched(&patch, [&req.model, &req.version, &req.id], &req.parameters),
        None => whole(infer_request_to_pb(req).encode_to_vec()),
    };
    debug_assert_request(req, &encoded);
    encoded
}

/// The ModelInferResponse to answer with for `resp`.
pub fn response(resp: InferResponse) -> Encoded {
    if let Some(patch) = resp.wire.patch_response(&resp) {
        let encoded = patched(
            &patch,
            [&resp.model, &resp.version, &resp.id],
            &resp.parameters,
        );
        debug_assert_response(&resp, &encoded);
        return encoded;
    }
    whole(infer_response_to_pb(resp).encode_to_vec())
}

fn whole(v: Vec<u8>) -> Encoded {
    Encoded {
        head: Bytes::from(v),
        tail: Bytes::new(),
    }
}

/// The kept bytes with the changed fields appended. Fields 1 to 4 are the model name,
/// version, id and parameters of both ModelInferRequest and ModelInferResponse.
fn patched(patch: &Patch<'_>, heads: [&String; 3], parameters: &Parameters) -> Encoded {
    let mut tail = BytesMut::new();
    for (field, (changed, value)) in [patch.model, patch.version, patch.id]
        .into_iter()
        .zip(heads)
        .enumerate()
    {
        if changed {
            encoding::string::encode(field as u32 + 1, value, &mut tail);
        }
    }
    for name in &patch.parameters {
        if let Some(value) = parameters.get(*name) {
            append_parameter(&mut tail, name, value);
        }
    }
    Encoded {
        head: patch.bytes.clone(),
        tail: tail.freeze(),
    }
}

/// Encodes one entry of the `parameters` map (field 4).
pub fn append_parameter(out: &mut BytesMut, name: &str, value: &Param) {
    let choice = match value {
        Param::Bool(b) => ParameterChoice::BoolParam(*b),
        Param::Int64(i) => ParameterChoice::Int64Param(*i),
        Param::String(s) => ParameterChoice::StringParam(s.clone()),
        Param::Double(d) => ParameterChoice::DoubleParam(*d),
        Param::Uint64(u) => ParameterChoice::Uint64Param(*u),
    };
    let value = pb::InferParameter {
        parameter_choice: Some(choice),
    };
    let key = name.to_string();
    let len = encoding::string::encoded_len(1, &key) + encoding::message::encoded_len(2, &value);
    encoding::encode_key(4, WireType::LengthDelimited, out);
    encoding::encode_varint(len as u64, out);
    encoding::string::encode(1, &key, out);
    encoding::message::encode(2, &value, out);
}

/// In tests (debug builds), checks that what is sent decodes to the value it stands for: a
/// wire that no longer matched its value would otherwise be sent silently.
fn debug_assert_request(req: &InferRequest, encoded: &Encoded) {
    if cfg!(debug_assertions) && req.wire.is_kept() {
        let sent = pb::ModelInferRequest::decode(encoded.to_bytes())
            .ok()
            .and_then(|m| super::infer_request_from_pb(m).ok());
        debug_assert!(
            sent.as_ref() == Some(req),
            "the request's wire no longer stands for it: {sent:?} != {req:?}"
        );
    }
}

/// [`debug_assert_request`] for an answer.
fn debug_assert_response(resp: &InferResponse, encoded: &Encoded) {
    if cfg!(debug_assertions) {
        let sent = pb::ModelInferResponse::decode(encoded.to_bytes())
            .ok()
            .and_then(|m| super::infer_response_from_pb(m).ok());
        debug_assert!(
            sent.as_ref() == Some(resp),
            "the answer's wire no longer stands for it: {sent:?} != {resp:?}"
        );
    }
}

/// An upstream's ModelInferResponse from its bytes, keeping them (and the `headers` and
/// `trailers` it came with) to pass on.
pub fn decode_response(
    bytes: Bytes,
    headers: http::HeaderMap,
    trailers: http::HeaderMap,
) -> Result<InferResponse, String> {
    let msg = pb::ModelInferResponse::decode(bytes.clone())
        .map_err(|e| format!("ModelInferResponse does not decode: {e}"))?;
    let mut resp = super::infer_response_from_pb(msg)?;
    resp.wire = crate::model::Wire::of_response(bytes, &resp, headers, trailers);
    Ok(resp)
}

/// A client's ModelInferRequest from its bytes: tensor data stays in them.
pub fn decode_request(bytes: &Bytes) -> Result<pb::ModelInferRequest, prost::DecodeError> {
    pb::ModelInferRequest::decode(bytes.clone())
}

/// `msg`, decoded from `bytes`, as a domain request that keeps them to send upstream as
/// they came.
pub fn request_from(
    msg: pb::ModelInferRequest,
    bytes: Bytes,
) -> Result<InferRequest, crate::model::Rejection> {
    let mut req = super::infer_request_from_pb(msg)?;
    req.wire = crate::model::Wire::of_request(bytes, &req);
    Ok(req)
}
