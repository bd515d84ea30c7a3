//! Keel: a gRPC inference gateway for the KServe Open Inference Protocol v2.
//!
//! The crate map, one line per module, in the order a request meets them:
//!
//! - [`transport`]: accepting connections: TLS (reloadable), connection caps and who makes
//!   room at them, the handshake deadline, the peer, the HTTP/2 connection loop of the
//!   traffic listener.
//! - [`api`]: the gRPC edge: OIP v2 and legacy v1 services, PolicyAdmin, call context, the
//!   edge deadline, error → status, request records.
//! - [`auth`]: tenants at the edge: API keys, model access, rate limits, in-flight quotas.
//! - [`adapt`]: pure functions for older clients: legacy v1 ⇄ OIP, version adapters.
//! - [`route`]: each snapshot's model → backend routes, the fallback ladder, the response
//!   cache, canary analysis; the dispatching tower service.
//! - [`contract`]: each (model, upstream) target's contract, fetched and cached, and the
//!   layer that turns away requests that break it.
//! - [`resilience`]: tower layers that keep calls calm: deadline, limits, retry, hedging,
//!   breaker, attempt timeout; the error taxonomy.
//! - [`fault`]: fault injection just before the backend, looking like the backend's answer.
//! - [`passthrough`]: the unboxed response future of a layer that usually passes a call on.
//! - [`upstream`]: backends: the embedded models and OIP gRPC upstreams, endpoint pools.
//! - [`model`]: tensors, data types, model contracts, requests: Keel's domain, no protobuf.
//! - [`pb`]: generated protobuf code and its conversion to [`model`] types.
//! - [`policy`]: the TOML policy: validated plain data, snapshots, the store, audit, watch.
//! - [`observe`]: logs, metrics (and the edge's RPC counters), traces.
//! - [`health`]: Keel's readiness view: per-model health, required models, `/readyz`.
//! - [`call`]: what travels with every call (request id, deadline, metadata, snapshot).
//! - [`error`]: what can go wrong with a call.
//! - [`grpc_code`]: gRPC status codes by name and by metric label (a leaf, shared by
//!   policy and metrics).
//! - [`headers`]: the names of the gRPC retry headers Keel both sends and reads (a leaf).
//! - [`server`]: wiring of both listeners, health, reflection, reloads and shutdown.
//! - [`worker`]: the traffic workers (a thread and runtime per core) and which one runs.
//! - [`load`]: `keel load`, the OIP load generator.

pub mod adapt;
pub mod api;
pub mod auth;
pub mod call;
pub mod contract;
pub mod error;
pub mod fault;
pub mod grpc_code;
pub mod headers;
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
pub mod worker;

pub use error::Error;
pub use policy::Policy;
pub use server::{Keel, Options, ServeError, serve};
