//! Logs, metrics and traces. Depends on nothing else in the crate but the leaf `grpc_code`.

pub mod edge;
pub mod frames;
mod logs;
pub mod metrics;
pub mod traces;

pub use logs::{LogFormat, init_logs};
pub use metrics::Metrics;
