//! Generated protobuf and gRPC code, and its conversion to and from Keel's domain types.
//!
//! Only the edges (`api`, `upstream`) use this module; everything between them speaks
//! [`crate::model`].

pub mod census;
mod contents;
mod convert;
pub mod framing;
pub mod wire;

pub use convert::{
    infer_request_from_pb, infer_request_to_pb, infer_response_from_pb, infer_response_len,
    infer_response_to_pb, metadata_from_pb, metadata_to_pb, spec_from_pb, spec_to_pb,
    stats_from_pb, stats_to_pb,
};

/// `inference`: the Open Inference Protocol v2 with Triton's extensions (generated).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod inference {
    tonic::include_proto!("inference");
}

/// `keel.admin.v1`: the PolicyAdmin service of the admin listener (generated).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod keel_admin {
    tonic::include_proto!("keel.admin.v1");
}

/// `keel.inference.v1`: the legacy PredictionService (generated).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod keel_inference_v1 {
    tonic::include_proto!("keel.inference.v1");
}

/// Encoded descriptors of every Keel proto, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keel_descriptor");
