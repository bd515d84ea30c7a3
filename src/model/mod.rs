//! What Keel knows about models and inference, free of protobuf: tensors, data types, model
//! contracts, requests, responses and statistics.
//!
//! The edges (`api`, `upstream`) convert generated proto types into these; everything in
//! between works on them.

pub mod cast;
mod dtype;
mod request;
mod spec;
mod tensor;
mod validate;
mod wire;

pub use dtype::DataType;
pub use request::{
    ContentForm, InferRequest, InferResponse, ModelRef, Param, Parameters, RequestedOutput,
};
pub use spec::{BatchStats, ModelMetadata, ModelSpec, ModelStats, StatDuration, TensorSpec};
pub use tensor::{
    Element, Tensor, TensorError, element_count, encode_byte_strings, split_bytes_elements,
};
pub use validate::{
    Contract, InvalidRequest, MAX_MESSAGE, MAX_REPORTED, MAX_VIOLATION_TEXT, Rejection,
    RequestLimits, Violation, Violations, Work, check, check_counted, clip, validate,
};
pub use wire::{Patch, Wire};
