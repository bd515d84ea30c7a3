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

/// Encodes one entry of the `parameters` map (field 4), as prost encodes it, from the
/// borrowed name and value: building the proto's `InferParameter` copied every string of
/// Keel's labels on each answer (about 500 instructions an answer, callgrind).
pub fn append_parameter(out: &mut BytesMut, name: &str, value: &Param) {
    use encoding::{encode_key, encode_varint, encoded_len_varint, key_len};
    // InferParameter's oneof: bool 1, int64 2, string 3, double 4, uint64 5. A oneof's
    // field is written even at its default value.
    let value_len = match value {
        Param::Bool(_) => key_len(1) + 1,
        Param::Int64(i) => key_len(2) + encoded_len_varint(*i as u64),
        Param::String(s) => key_len(3) + encoded_len_varint(s.len() as u64) + s.len(),
        Param::Double(_) => key_len(4) + 8,
        Param::Uint64(u) => key_len(5) + encoded_len_varint(*u),
    };
    // prost leaves out a map entry's key at its default, the empty string.
    let name_len = if name.is_empty() {
        0
    } else {
        key_len(1) + encoded_len_varint(name.len() as u64) + name.len()
    };
    let entry_len = name_len + key_len(2) + encoded_len_varint(value_len as u64) + value_len;
    encode_key(4, WireType::LengthDelimited, out);
    encode_varint(entry_len as u64, out);
    if !name.is_empty() {
        put_str(1, name, out);
    }
    encode_key(2, WireType::LengthDelimited, out);
    encode_varint(value_len as u64, out);
    match value {
        Param::Bool(b) => {
            encode_key(1, WireType::Varint, out);
            encode_varint(u64::from(*b), out);
        }
        // int64 is the varint of its two's complement, ten bytes when negative.
        Param::Int64(i) => {
            encode_key(2, WireType::Varint, out);
            encode_varint(*i as u64, out);
        }
        Param::String(s) => put_str(3, s, out),
        Param::Double(d) => {
            encode_key(4, WireType::SixtyFourBit, out);
            out.put_f64_le(*d);
        }
        Param::Uint64(u) => {
            encode_key(5, WireType::Varint, out);
            encode_varint(*u, out);
        }
    }
}

/// A length-delimited string field.
fn put_str(field: u32, s: &str, out: &mut BytesMut) {
    encoding::encode_key(field, WireType::LengthDelimited, out);
    encoding::encode_varint(s.len() as u64, out);
    out.put_slice(s.as_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of value, at its edges, encodes to the bytes prost writes for the same
    /// map entry.
    #[test]
    fn an_appended_parameter_is_what_prost_would_write() {
        let values = [
            Param::Bool(false),
            Param::Bool(true),
            Param::Int64(0),
            Param::Int64(-1),
            Param::Int64(i64::MIN),
            Param::Int64(i64::MAX),
            Param::String(String::new()),
            Param::String("primary".into()),
            Param::String("é".repeat(100)),
            Param::Double(0.0),
            Param::Double(-2.5),
            Param::Double(f64::NAN),
            Param::Uint64(0),
            Param::Uint64(u64::MAX),
        ];
        for value in values {
            for name in ["", "keel.tier", &"n".repeat(200)] {
                let mut ours = BytesMut::new();
                append_parameter(&mut ours, name, &value);
                let choice = match &value {
                    Param::Bool(b) => pb::infer_parameter::ParameterChoice::BoolParam(*b),
                    Param::Int64(i) => pb::infer_parameter::ParameterChoice::Int64Param(*i),
                    Param::String(s) => {
                        pb::infer_parameter::ParameterChoice::StringParam(s.clone())
                    }
                    Param::Double(d) => pb::infer_parameter::ParameterChoice::DoubleParam(*d),
                    Param::Uint64(u) => pb::infer_parameter::ParameterChoice::Uint64Param(*u),
                };
                let mut msg = pb::ModelInferResponse::default();
                msg.parameters.insert(
                    name.to_string(),
                    pb::InferParameter {
                        parameter_choice: Some(choice),
                    },
                );
                assert_eq!(&ours[..], &msg.encode_to_vec()[..], "{name:?} = {value:?}");
            }
        }
    }
}
