//! Keel: a gRPC inference gateway for the KServe Open Inference Protocol v2.
//!
//! The crate map, one line per module, in the order a request meets them:
//!
//! - [`transport`]: accepting connections: TLS (reloadable), connection caps, the peer, HTTP/2.
//! - [`api`]: the gRPC edge: OIP v2 service, PolicyAdmin, call context, error → status.
//! - [`auth`]: tenants at the edge: API keys, model access, rate limits, in-flight quotas.
//! - [`route`]: each snapshot's model → backend routes; the dispatching tower service.
//! - [`resilience`]: tower layers that keep calls calm (deadline so far).
//! - [`upstream`]: backends: the embedded models and OIP gRPC upstreams.
//! - [`model`]: tensors, data types, model contracts, requests: Keel's domain, no protobuf.
//! - [`pb`]: generated protobuf code and its conversion to [`model`] types.
//! - [`policy`]: the TOML policy: validated plain data, snapshots, the store, audit, watch.
//! - [`observe`]: logs (metrics and traces later).
//! - [`call`]: what travels with every call (request id, deadline, metadata, snapshot).
//! - [`error`]: what can go wrong with a call.
//! - [`grpc_code`]: gRPC status codes by name (a leaf, shared by policy and metrics).
//! - [`server`]: wiring of both listeners, health, reflection, reloads and shutdown.

pub mod adapt;
pub mod api;
pub mod auth;
pub mod call;
pub mod contract;
pub mod error;
pub mod fault;
pub mod grpc_code;
pub mod health;
pub mod load;
pub mod model;
pub mod observe;
pub mod passthrough;
pub mod pb;
pub mod policy;
pub mod resilience;
pub mod route;
pub mod server;
pub mod transport;
pub mod upstream;

pub use error::Error;
pub use policy::Policy;
pub use server::{Keel, Options, ServeError, serve};
