//! Logs (and later metrics and traces). Depends on nothing else in the crate.

mod logs;

pub use logs::{LogFormat, init_logs};
