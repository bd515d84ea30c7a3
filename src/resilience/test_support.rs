//! A request and an error for the layers' unit tests: every field a layer reads, settable.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Failure, HasDeadline, HasRetry, Hopeless, Latency, Pushback, Receipt, RetryBudget};
use crate::policy::{ErrorClass, Retry, Settings};

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct E {
    pub(crate) class: ErrorClass,
    pub(crate) pushback: Pushback,
    pub(crate) never_sent: bool,
}

pub(crate) fn e(class: ErrorClass) -> E {
    E {
        class,
        pushback: Pushback::None,
        never_sent: false,
    }
}

impl std::fmt::Display for E {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl Failure for E {
    fn class(&self) -> ErrorClass {
        self.class
    }
    fn code(&self) -> tonic::Code {
        tonic::Code::Unknown
    }
    fn pushback(&self) -> Pushback {
        self.pushback
    }
    fn never_sent(&self) -> bool {
        self.never_sent
    }
}

impl From<Hopeless> for E {
    fn from(_: Hopeless) -> Self {
        e(ErrorClass::DeadlineExceeded)
    }
}

#[derive(Clone)]
pub(crate) struct Req {
    pub(crate) id: &'static str,
    pub(crate) retry: Retry,
    pub(crate) idempotent: bool,
    pub(crate) deadline: Instant,
    pub(crate) budget: Arc<RetryBudget>,
    pub(crate) receipt: Receipt,
    pub(crate) latency: Arc<Latency>,
    pub(crate) hopeless: bool,
    pub(crate) attempt: u32,
}

impl Req {
    pub(crate) fn new(id: &'static str, budget: Duration) -> Req {
        Req {
            id,
            retry: Retry {
                max_attempts: 4,
                ..Settings::default().retry
            },
            idempotent: true,
            deadline: Instant::now() + budget,
            budget: Arc::new(RetryBudget::new(Settings::default().budget)),
            receipt: Receipt::default(),
            latency: Arc::new(Latency::default()),
            hopeless: false,
            attempt: 0,
        }
    }
}

impl HasDeadline for Req {
    fn deadline(&self) -> Instant {
        self.deadline
    }
    fn budget(&self) -> Duration {
        Duration::from_secs(1)
    }
}

impl HasRetry for Req {
    fn retry(&self) -> &Retry {
        &self.retry
    }
    fn idempotent(&self) -> bool {
        self.idempotent
    }
    fn jitter_seed(&self) -> (&str, u64) {
        (self.id, 1)
    }
    fn retry_budget(&self) -> &RetryBudget {
        &self.budget
    }
    fn receipt(&self) -> &Receipt {
        &self.receipt
    }
    fn latency(&self) -> &Latency {
        &self.latency
    }
    fn refuse_hopeless(&self) -> bool {
        self.hopeless
    }
    fn set_attempt(&mut self, n: u32) {
        self.attempt = n;
    }
}
