//! The gRPC edge: decodes requests into domain types, builds each call's context, and turns
//! answers and errors back into protocol messages and statuses.

pub mod context;
mod inference;
pub mod oversize;
pub mod status;

pub use inference::{CallService, InferenceApi, POLICY_REVISION, Stacks};
