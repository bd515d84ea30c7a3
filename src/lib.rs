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
//! - [`dispatch`]: one client request from its decoded message to its answer: route,
//!   version, gate, deadline, drain cut, the fallback ladder, canary verdicts, its record.
//! - [`route`]: each snapshot's model → backend routes, compiled and chosen per call; the
//!   state kept across swaps and the backend factory per upstream protocol; the fallback
//!   ladder, the response cache, canary analysis; the innermost tower service.
//! - [`contract`]: each (model, upstream) target's contract, fetched and cached.
//! - [`resilience`]: every layer of a method's tower stack: deadline, contract validation,
//!   limits, retry, hedging, breaker, attempt timeout, fault injection; the error taxonomy.
//! - [`upstream`]: backends: the embedded models and OIP gRPC upstreams, endpoint pools.
//! - [`model`]: tensors, data types, model contracts, requests: Keel's domain, no protobuf.
//! - [`pb`]: generated protobuf code and its conversion to [`model`] types.
//! - [`policy`]: the TOML policy: validated plain data, snapshots, the store, audit, watch.
//! - [`observe`]: logs, metrics (and the edge's RPC counters), traces.
//! - [`call`]: the stack's request: what travels with every call (request id, deadline,
//!   metadata, snapshot, route) and the `Has*` answers the layers ask of it. Its own
//!   module because the dispatch makes it, the layers read it and `route::Deliver` ends it.
//! - [`error`]: what can go wrong with a call.
//! - [`grpc_code`]: gRPC status codes by name and by metric label (a leaf, shared by
//!   policy and metrics).
//! - [`headers`]: the names of the gRPC headers Keel both sends and reads (a leaf).
//! - [`server`]: wiring of both listeners; Keel's health and readiness view
//!   ([`server::health`]), reflection, reloads and shutdown.
//! - [`worker`]: the traffic workers (a thread and runtime per core) and which one runs.
//! - [`load`]: `keel load`, the OIP load generator.
//! - [`testing`]: constructors for tests and benchmarks, outside any server.

pub mod adapt;
pub mod api;
pub mod auth;
pub mod call;
pub mod contract;
pub mod dispatch;
pub mod error;
pub mod grpc_code;
pub mod headers;
pub mod load;
pub mod model;
pub mod observe;
pub mod pb;
pub mod policy;
pub mod resilience;
pub mod route;
pub mod server;
pub mod testing;
pub mod transport;
pub mod upstream;
pub mod worker;

pub use error::Error;
pub use policy::Policy;
pub use server::{Keel, Options, ServeError, serve};
