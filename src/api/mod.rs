//! The gRPC edge: decodes requests into domain types, reads each call's context from its
//! metadata, authenticates the caller, hands the request to the [`dispatch`](crate::dispatch),
//! and turns answers and errors back into protocol messages and statuses.
//!
//! Traffic speaks [`InferenceApi`] on the traffic listener; [`admin`] serves the policy
//! admin API on the admin listener.

pub mod admin;
pub mod context;
pub mod deadline;
mod inference;
pub mod keys;
pub mod legacy;
pub mod passed;
pub mod receipt;
pub mod status;
pub mod unreadable;

pub use inference::{InferenceApi, InferenceRoutes, Lifecycle, POLICY_REVISION};
