//! What Keel knows of each model's contract (inputs, outputs, batching), fetched from the
//! backend that serves it and cached, so a malformed request is turned away before it costs
//! the model server anything.
//!
//! One [`Contracts`] cache belongs to each (model, upstream) target and outlives policy
//! swaps. A contract is fetched on the first call that needs it (within that call's
//! deadline), used for [`REFRESH`], then re-fetched in the background while the old one keeps
//! serving. A failed fetch never blocks a call: validation then checks only what it can (the
//! size limits) and says so in a debug log, and the fetch is tried again after [`RETRY`].
//!
//! A request the cached contract refuses has it fetched again first ([`Contracts::recheck`],
//! at most once per [`RETRY`]), so a model whose inputs changed upstream is followed at once
//! rather than after [`REFRESH`] of refusing valid requests.
//!
//! The layer that turns requests away by it is [`ValidateLayer`](crate::resilience::ValidateLayer).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use tokio::time::Instant;

use crate::model::{Contract, ModelRef};
use crate::upstream::{Attempt, Backend, MetadataQuery};

/// How long a fetched contract is used before it is fetched again.
pub const REFRESH: Duration = Duration::from_secs(60);
/// How long after a failed fetch the next one may be tried.
pub const RETRY: Duration = Duration::from_secs(5);
/// The longest one fetch may take (the first call's deadline bounds it further).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

type Fetch = Shared<BoxFuture<'static, Option<Arc<Contract>>>>;

/// What is known of one version's contract.
enum Slot {
    /// Fetched at `at` (due for a refresh [`REFRESH`] later); last fetched or tried at
    /// `tried`; `refreshing` holds the fetch under way, if any.
    Known {
        contract: Arc<Contract>,
        at: Instant,
        tried: Instant,
        refreshing: Option<Fetch>,
    },
    /// The last fetch failed at `at`.
    Failed { at: Instant },
    /// The first fetch is under way; callers wait for it.
    Fetching(Fetch),
}

/// What [`Contracts::lookup`] found.
pub enum Lookup {
    /// The contract (possibly being refreshed in the background).
    Known(Arc<Contract>),
    /// No contract, and no fetch is due: check what can be checked without one.
    Unknown,
    /// A fetch is under way or due: wait for it.
    Fetch(Fetch),
}

/// The contracts of one model on one backend, per version asked for.
pub struct Contracts {
    backend: Arc<dyn Backend>,
    model: Arc<str>,
    slots: Mutex<HashMap<String, Slot>>,
    /// Fetches made, for each fetch's own request id.
    fetches: AtomicU64,
}

impl std::fmt::Debug for Contracts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contracts")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl Contracts {
    /// An empty cache for `model` on `backend`.
    pub fn new(backend: Arc<dyn Backend>, model: Arc<str>) -> Contracts {
        Contracts {
            backend,
            model,
            slots: Mutex::new(HashMap::new()),
            fetches: AtomicU64::new(0),
        }
    }

    /// Whether this cache asks `backend` (a swap that replaces the backend starts afresh).
    pub fn serves(&self, backend: &Arc<dyn Backend>) -> bool {
        Arc::ptr_eq(&self.backend, backend)
    }

    /// The contract of `version` for a call that must end by `until`: known, unknown, or a
    /// fetch to wait for. Starts a fetch when one is due; a stale contract is refreshed in the background
    /// and served meanwhile.
    pub fn lookup(self: &Arc<Self>, version: &str, until: Instant) -> Lookup {
        let now = Instant::now();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.get_mut(version) {
            Some(Slot::Known {
                contract,
                at,
                refreshing,
                ..
            }) => {
                if now.saturating_duration_since(*at) >= REFRESH && refreshing.is_none() {
                    *refreshing = Some(self.spawn_fetch(version, now + FETCH_TIMEOUT));
                }
                Lookup::Known(contract.clone())
            }
            Some(Slot::Failed { at }) if now.saturating_duration_since(*at) < RETRY => {
                Lookup::Unknown
            }
            Some(Slot::Fetching(f)) => Lookup::Fetch(f.clone()),
            _ => {
                let deadline = until.min(now + FETCH_TIMEOUT);
                let fetch = self.fetch(version, deadline).boxed().shared();
                slots.insert(version.to_string(), Slot::Fetching(fetch.clone()));
                Lookup::Fetch(fetch)
            }
        }
    }

    /// A fetch of the contract of `version` that runs on its own (callers may wait for it
    /// or not).
    fn spawn_fetch(self: &Arc<Self>, version: &str, deadline: Instant) -> Fetch {
        let fetch = self.fetch(version, deadline).boxed().shared();
        tokio::spawn(fetch.clone());
        fetch
    }

    /// A fetch to wait for before refusing a request the known contract of `version`
    /// refuses: the one under way, or a new one when the contract is at least [`RETRY`]
    /// old. `None`: the contract is fresh (or unknown), so the refusal stands.
    pub fn recheck(self: &Arc<Self>, version: &str, until: Instant) -> Option<Fetch> {
        let now = Instant::now();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let Some(Slot::Known {
            tried, refreshing, ..
        }) = slots.get_mut(version)
        else {
            return None;
        };
        if let Some(under_way) = refreshing {
            return Some(under_way.clone());
        }
        // Spaced from the last attempt, failed ones included, so a metadata endpoint that
        // is down is not asked once per refused request.
        if now.saturating_duration_since(*tried) < RETRY {
            return None;
        }
        let deadline = until.min(now + FETCH_TIMEOUT);
        let fetch = self.spawn_fetch(version, deadline);
        *refreshing = Some(fetch.clone());
        Some(fetch)
    }

    /// Fetches the contract of `version` by `deadline` and records the outcome.
    fn fetch(
        self: &Arc<Self>,
        version: &str,
        deadline: Instant,
    ) -> impl Future<Output = Option<Arc<Contract>>> + Send + 'static {
        // An attempt of its own: the fetch must not write the client's receipt, and a
        // background refresh outlives the call that started it. It is Keel's call, not the
        // client's: its own request id, and none of the client's metadata (its request id,
        // custom headers, a fault-injection header meant for the inference call).
        let n = self.fetches.fetch_add(1, Ordering::Relaxed) + 1;
        let query = MetadataQuery(ModelRef {
            name: self.model.to_string(),
            version: version.to_string(),
        });
        let id = format!("keel-contract-{}-{n}", self.model).into();
        let future = self.backend.contract(Attempt::own(id, query, deadline));
        let this = self.clone();
        let version = version.to_string();
        async move {
            let result = tokio::time::timeout_at(deadline, future).await;
            let now = Instant::now();
            let mut slots = this.slots.lock().unwrap_or_else(|p| p.into_inner());
            let stale = match slots.remove(&version) {
                Some(Slot::Known { contract, .. }) => Some(contract),
                _ => None,
            };
            match result {
                Ok(Ok(contract)) => {
                    let contract = Arc::new(contract);
                    slots.insert(
                        version,
                        Slot::Known {
                            contract: contract.clone(),
                            at: now,
                            tried: now,
                            refreshing: None,
                        },
                    );
                    Some(contract)
                }
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".to_string(),
                    };
                    tracing::debug!(
                        model = %this.model,
                        version = %version,
                        error = %why,
                        "model metadata unavailable; requests are checked only against the size limits until it is fetched"
                    );
                    // A stale contract keeps serving; try again after RETRY.
                    match stale {
                        Some(contract) => {
                            let at = now.checked_sub(REFRESH - RETRY).unwrap_or(now);
                            slots.insert(
                                version,
                                Slot::Known {
                                    contract: contract.clone(),
                                    at,
                                    tried: now,
                                    refreshing: None,
                                },
                            );
                            Some(contract)
                        }
                        None => {
                            slots.insert(version, Slot::Failed { at: now });
                            None
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
