//! Tower layers that keep calls calm, each generic over the inner service and ignorant of
//! protos and models. Only the deadline layer exists so far; retries, breakers and limits
//! join it here.

mod deadline;

pub use deadline::{Deadline, DeadlineExceeded, DeadlineFuture, DeadlineLayer, HasDeadline};
