//! Inference requests and responses.

use std::collections::BTreeMap;

use super::{Tensor, Wire};

/// A request, response or tensor parameter value.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int64(i64),
    /// A string.
    String(String),
    /// A floating-point number.
    Double(f64),
    /// An unsigned integer.
    Uint64(u64),
}

/// Named parameters, ordered so that their rendering is deterministic.
pub type Parameters = BTreeMap<String, Param>;

/// How a message carries its tensor data.
///
/// Keel's own answers are raw whatever the request's form, as Triton's are: Triton's example
/// clients send typed `contents` and read `raw_output_contents`, and every OIP client's
/// result reader accepts raw answers. A forwarded answer keeps the form its upstream chose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ContentForm {
    /// `raw_input_contents` / `raw_output_contents`.
    #[default]
    Raw,
    /// Typed `contents` per tensor.
    Typed,
}

/// An output the client asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestedOutput {
    /// Output tensor name.
    pub name: String,
    /// Per-output parameters (Triton's `classification`, `binary_data`), carried through.
    pub parameters: Parameters,
}

/// One inference call for one model.
#[derive(Clone, Debug, PartialEq)]
pub struct InferRequest {
    /// Model name.
    pub model: String,
    /// Model version; empty lets the backend choose.
    pub version: String,
    /// The client's request id (the OIP `id` field), echoed in the response.
    pub id: String,
    /// Request parameters, carried through to the backend.
    pub parameters: Parameters,
    /// Input tensors, each already checked against its own shape and data type.
    pub inputs: Vec<Tensor>,
    /// Outputs to return; empty means all of them.
    pub outputs: Vec<RequestedOutput>,
    /// How the client sent inputs (error messages name the field it used).
    pub form: ContentForm,
    /// The message as the client sent it, to forward as received ([`Wire`]).
    pub wire: Wire,
}

/// The answer to an [`InferRequest`].
#[derive(Clone, Debug, PartialEq)]
pub struct InferResponse {
    /// Model that answered.
    pub model: String,
    /// Version that answered.
    pub version: String,
    /// The request's `id`.
    pub id: String,
    /// Response parameters.
    pub parameters: Parameters,
    /// Output tensors.
    pub outputs: Vec<Tensor>,
    /// How the answer goes back: raw for Keel's own answers, the upstream's form for a
    /// forwarded one.
    pub form: ContentForm,
    /// The message as the upstream answered it, to pass on as received ([`Wire`]).
    pub wire: Wire,
}

/// A model and optional version, as the metadata RPCs name them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRef {
    /// Model name.
    pub name: String,
    /// Version; empty lets the backend choose.
    pub version: String,
}
