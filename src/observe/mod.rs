//! Logs and metrics (traces later). Depends on nothing else in the crate.

pub mod edge;
mod logs;
pub mod metrics;

pub use logs::{LogFormat, init_logs};
pub use metrics::Metrics;
