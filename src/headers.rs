//! The names of the gRPC headers Keel both reads (at the edge, from upstreams) and writes
//! (to upstreams, on injected faults), defined once so the side that sends one and the
//! side that reads it cannot drift apart. A leaf: depends on nothing
//! else in the crate.
//!
//! The status headers (`grpc-status`, `grpc-message`, `grpc-status-details-bin`) live with
//! the codes they carry, in [`crate::grpc_code`].

/// The number of attempts of a call made before this one, as gRPC's retry design numbers
/// them: Keel sends it on its retries, and its fault injection counts it in the attempt
/// number, so a Keel behind another draws a fresh fault for each retry of the one in front.
pub const PREVIOUS_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

/// A server's wait before a retry, in milliseconds (negative or malformed: do not retry).
/// Keel reads it from upstreams and sends it on the faults it injects.
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// The caller's deadline, as gRPC encodes it: read at the edge, sent to every attempt with
/// what is left of it.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";
