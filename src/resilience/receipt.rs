//! What the resilience layers did for one call, reported to the client in trailing metadata
//! (`keel-attempts`, `keel-retry-delays-ms`) and in error details.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The receipt of one call, shared by its layers. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct Receipt(Arc<Mutex<ReceiptData>>);

/// The contents of a [`Receipt`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiptData {
    /// Attempts started, the first included.
    pub attempts: u32,
    /// The wait before each retry.
    pub delays: Vec<Duration>,
    /// The class of the failure each retry answered.
    pub retry_reasons: Vec<&'static str>,
    /// Hedged attempts.
    pub hedges: u32,
    /// A retry was wanted but the retry budget refused it.
    pub budget_exhausted: bool,
    /// The last error an attempt met, for the final error's details.
    pub last_error: Option<String>,
    /// The call succeeded but took longer than the method's `slow_threshold`.
    pub slow: bool,
    /// Who answered the last attempt (`embedded`, `triton@10.0.0.7:8001`).
    pub served_by: Option<Arc<str>>,
    /// The endpoint (`10.0.0.7:8001`) the last attempt went to, for the next to avoid.
    pub endpoint: Option<Arc<str>>,
}

impl Receipt {
    /// Changes the receipt.
    pub fn update(&self, f: impl FnOnce(&mut ReceiptData)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Records who takes the attempt under way, and at which endpoint (none for the
    /// embedded backend).
    pub fn served(&self, by: Arc<str>, endpoint: Option<Arc<str>>) {
        self.update(|r| {
            r.served_by = Some(by);
            r.endpoint = endpoint;
        });
    }

    /// The endpoint the last attempt went to.
    pub fn endpoint(&self) -> Option<Arc<str>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .endpoint
            .clone()
    }

    /// A copy of the contents.
    pub fn read(&self) -> ReceiptData {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ReceiptData {
    /// `keel-retry-delays-ms`: the waits in whole milliseconds, comma-separated (the
    /// trailer is left out when there were none).
    pub fn delays_ms(&self) -> String {
        self.delays
            .iter()
            .map(|d| d.as_millis().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}
