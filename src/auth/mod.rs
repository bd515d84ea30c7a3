//! Tenants at the edge: who is calling (API key → tenant), whether they may call the model,
//! and whether they are within their fair share (rate limits, calls in flight).
//!
//! The tenants themselves are policy ([`crate::policy::Tenant`]); what must outlive a policy
//! swap (token buckets, in-flight slots) lives here in a [`Guard`], rebuilt for each new
//! revision while keeping every bucket and slot whose limit did not change, so a reload
//! neither refills a bucket nor frees a tenant from its calls already in flight.
//!
//! # Errors
//!
//! Refusals are small named types ([`Unauthenticated`], [`Refused`]); `crate::error` turns
//! them into the gRPC status. No message ever contains the presented key.

mod bucket;
pub mod key;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use bucket::Bucket;
pub use key::{BadHeader, constant_time_eq, digest, hash_key};

use crate::policy::{Policy, Priority, RateLimit, Tenant};

/// The metadata key clients send their API key in.
pub const AUTHORIZATION: &str = "authorization";

/// What a refused in-flight quota asks the client to wait: a slot frees when any of the
/// tenant's calls ends, which Keel cannot predict.
const QUOTA_RETRY: Duration = Duration::from_millis(100);

/// The credentials were missing, malformed or unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    /// No `authorization` metadata.
    #[error("this Keel requires an API key: send the metadata `authorization: Bearer <key>`")]
    Missing,
    /// The metadata is not `Bearer <key>`.
    #[error("the authorization metadata must be `Bearer <key>`")]
    Malformed,
    /// No tenant has this key.
    #[error("the API key is not valid")]
    UnknownKey,
    /// The client certificate's identity is no tenant's, and no API key was sent.
    #[error(
        "the client certificate's identity is not a tenant's: send a tenant's certificate, or the metadata `authorization: Bearer <key>`"
    )]
    UnknownIdentity,
}

impl Unauthenticated {
    /// The `reason` label of `keel_auth_failures_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Unauthenticated::Missing => "missing",
            Unauthenticated::Malformed => "malformed",
            Unauthenticated::UnknownKey => "unknown_key",
            Unauthenticated::UnknownIdentity => "unknown_identity",
        }
    }
}

/// A known caller refused for what it asked.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refused {
    /// The model is not in the tenant's list.
    #[error("tenant '{tenant}' may not call model '{model}'")]
    Denied {
        /// The tenant.
        tenant: String,
        /// The model asked for.
        model: String,
    },
    /// The model is not in the tenant's list and the policy hides models: answered exactly
    /// as an unknown model.
    #[error("model '{model}' is hidden from the caller")]
    Hidden {
        /// The model asked for.
        model: String,
    },
    /// Over a rate limit.
    #[error("tenant '{tenant}' is over its rate limit{} of {} requests/s (burst {})", model.as_ref().map(|m| format!(" for model '{m}'")).unwrap_or_default(), limit.per_second, limit.burst)]
    RateLimited {
        /// The tenant.
        tenant: String,
        /// The model, when the limit is the tenant's limit for one model.
        model: Option<String>,
        /// The limit.
        limit: RateLimit,
        /// Time until a token.
        retry_after: Duration,
    },
    /// Every in-flight slot of the tenant is taken.
    #[error("tenant '{tenant}' has all of its {max_in_flight} calls in flight")]
    Quota {
        /// The tenant.
        tenant: String,
        /// Its `max_in_flight`.
        max_in_flight: u32,
    },
}

impl Refused {
    /// How long to wait before a retry can succeed, when that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Refused::RateLimited { retry_after, .. } => Some(*retry_after),
            Refused::Quota { .. } => Some(QUOTA_RETRY),
            _ => None,
        }
    }
}

/// What one tenant keeps across calls.
#[derive(Debug)]
struct TenantState {
    name: Arc<str>,
    tenant: Tenant,
    rate: Option<Arc<Bucket>>,
    model_rates: BTreeMap<String, Arc<Bucket>>,
    slots: Option<(u32, Arc<Semaphore>)>,
}

impl TenantState {
    /// The state for `tenant`, reusing what `old` had for unchanged limits.
    fn new(name: &str, tenant: &Tenant, old: Option<&TenantState>) -> TenantState {
        let bucket = |limit: RateLimit, old: Option<&Arc<Bucket>>| match old {
            Some(b) if b.limit == limit => b.clone(),
            _ => Arc::new(Bucket::new(limit)),
        };
        let rate = tenant
            .rate_limit
            .map(|l| bucket(l, old.and_then(|o| o.rate.as_ref())));
        let model_rates = tenant
            .model_rate_limits
            .iter()
            .map(|(m, l)| {
                let before = old.and_then(|o| o.model_rates.get(m));
                (m.clone(), bucket(*l, before))
            })
            .collect();
        let slots = tenant
            .max_in_flight
            .map(|max| match old.and_then(|o| o.slots.as_ref()) {
                Some((n, s)) if *n == max => (max, s.clone()),
                _ => (max, Arc::new(Semaphore::new(max as usize))),
            });
        TenantState {
            name: name.into(),
            tenant: tenant.clone(),
            rate,
            model_rates,
            slots,
        }
    }
}

/// The tenants' state under one policy revision.
#[derive(Debug, Default)]
struct Table {
    revision: u64,
    tenants: HashMap<String, Arc<TenantState>>,
}

/// The tenants' state, kept across policy swaps.
#[derive(Debug, Default)]
pub struct Guard {
    table: ArcSwap<Table>,
    /// Serialises rebuilds, so two calls seeing a new revision build one table.
    rebuild: Mutex<()>,
}

impl Guard {
    /// An empty guard; the first call under a policy with tenants fills it.
    pub fn new() -> Guard {
        Guard::default()
    }

    /// Who is calling, under `policy` (revision `revision`): `Ok(None)` when the policy
    /// defines no tenants (authentication is off); the tenant whose `identities` list the
    /// verified client certificate `identity`; else the tenant when `authorization` holds
    /// one of its keys.
    pub fn authenticate(
        &self,
        policy: &Policy,
        revision: u64,
        authorization: Option<&[u8]>,
        identity: Option<&str>,
    ) -> Result<Option<Caller>, Unauthenticated> {
        if policy.tenants.is_empty() {
            return Ok(None);
        }
        // Identities are names, not secrets: a plain lookup is fine.
        let by_identity = identity.and_then(|id| {
            policy
                .tenants
                .iter()
                .find(|(_, t)| t.identities.iter().any(|i| i == id))
                .map(|(name, _)| name.as_str())
        });
        let name = match by_identity {
            Some(name) => name,
            None => by_key(policy, authorization, identity.is_some())?,
        };
        let table = self.table_for(policy, revision);
        let state = match table.tenants.get(name) {
            Some(s) => s.clone(),
            // A call still on an older revision than the table's, for a tenant since
            // removed: it keeps its older rights, without state to charge.
            None => Arc::new(TenantState::new(name, &policy.tenants[name], None)),
        };
        Ok(Some(Caller {
            state,
            hide_models: policy.auth.hide_models,
        }))
    }

    /// The table for `revision`, built if it is newer than the current one.
    fn table_for(&self, policy: &Policy, revision: u64) -> Arc<Table> {
        let current = self.table.load_full();
        if current.revision >= revision {
            return current;
        }
        let _one = self
            .rebuild
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.table.load_full();
        if current.revision >= revision {
            return current;
        }
        let tenants = policy
            .tenants
            .iter()
            .map(|(name, t)| {
                let old = current.tenants.get(name).map(|s| &**s);
                (name.clone(), Arc::new(TenantState::new(name, t, old)))
            })
            .collect();
        let table = Arc::new(Table { revision, tenants });
        self.table.store(table.clone());
        table
    }
}

/// The tenant whose key `authorization` holds. `with_identity`: the caller presented a
/// certificate no tenant claims, which is what a missing key is reported as.
fn by_key<'p>(
    policy: &'p Policy,
    authorization: Option<&[u8]>,
    with_identity: bool,
) -> Result<&'p str, Unauthenticated> {
    let key = key::bearer(authorization).map_err(|e| match e {
        BadHeader::Missing if with_identity => Unauthenticated::UnknownIdentity,
        BadHeader::Missing => Unauthenticated::Missing,
        BadHeader::NotBearer => Unauthenticated::Malformed,
    })?;
    let presented = digest(key);
    // Every digest of every tenant is compared, whatever matched before.
    let mut found: Option<&str> = None;
    for (name, tenant) in &policy.tenants {
        for h in &tenant.key_hashes {
            if constant_time_eq(h, &presented) {
                found = Some(name);
            }
        }
    }
    found.ok_or(Unauthenticated::UnknownKey)
}

/// An authenticated tenant, for one call.
#[derive(Clone, Debug)]
pub struct Caller {
    state: Arc<TenantState>,
    hide_models: bool,
}

/// A call let in: holds the tenant's in-flight slot until dropped.
#[derive(Debug)]
pub struct Pass {
    _slot: Option<OwnedSemaphorePermit>,
}

impl Caller {
    /// The tenant's name (from policy, so a bounded label).
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The tenant's priority class.
    pub fn priority(&self) -> Priority {
        self.state.tenant.priority
    }

    /// Whether the tenant may see and call `model`.
    pub fn may_call(&self, model: &str) -> bool {
        self.state.tenant.models.allows(model)
    }

    /// Lets one request in, for `model` when it names one: the model must be the tenant's,
    /// a slot must be free, and a token there in the tenant's bucket (and the model's).
    ///
    /// Slots are taken before tokens, so a request refused for its quota spends no token.
    pub fn admit(&self, model: Option<&str>) -> Result<Pass, Refused> {
        let s = &self.state;
        if let Some(m) = model
            && !self.may_call(m)
        {
            return Err(if self.hide_models {
                Refused::Hidden {
                    model: m.to_string(),
                }
            } else {
                Refused::Denied {
                    tenant: s.name.to_string(),
                    model: m.to_string(),
                }
            });
        }
        let slot = match &s.slots {
            None => None,
            Some((max, slots)) => {
                Some(
                    slots
                        .clone()
                        .try_acquire_owned()
                        .map_err(|_| Refused::Quota {
                            tenant: s.name.to_string(),
                            max_in_flight: *max,
                        })?,
                )
            }
        };
        let limited = |bucket: &Bucket, model: Option<&str>| {
            bucket.take().map_err(|retry_after| Refused::RateLimited {
                tenant: s.name.to_string(),
                model: model.map(str::to_string),
                limit: bucket.limit,
                retry_after,
            })
        };
        if let Some(b) = &s.rate {
            limited(b, None)?;
        }
        if let Some((m, b)) = model.and_then(|m| s.model_rates.get_key_value(m)) {
            limited(b, Some(m))?;
        }
        Ok(Pass { _slot: slot })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(extra: &str) -> Policy {
        Policy::parse(&format!(
            "[tenants.acme]\napi_keys = [\"{}\", \"{}\"]\nmodels = [\"simple\"]\n{extra}",
            hash_key("k1"),
            hash_key("k2"),
        ))
        .unwrap()
    }

    #[test]
    fn without_tenants_everyone_is_let_in_unnamed() {
        let g = Guard::new();
        assert!(matches!(
            g.authenticate(&Policy::default(), 1, None, None),
            Ok(None)
        ));
    }

    #[test]
    fn either_key_of_a_rotation_names_the_tenant() {
        let (g, p) = (Guard::new(), policy(""));
        for k in ["Bearer k1", "Bearer k2"] {
            let c = g
                .authenticate(&p, 1, Some(k.as_bytes()), None)
                .unwrap()
                .unwrap();
            assert_eq!(c.name(), "acme");
        }
        let e = |v: Option<&str>| {
            g.authenticate(&p, 1, v.map(str::as_bytes), None)
                .unwrap_err()
        };
        assert_eq!(e(None), Unauthenticated::Missing);
        assert_eq!(e(Some("k1")), Unauthenticated::Malformed);
        assert_eq!(e(Some("Bearer k3")), Unauthenticated::UnknownKey);
    }

    #[tokio::test(start_paused = true)]
    async fn slots_and_tokens_survive_a_reload_that_keeps_the_limits() {
        let g = Guard::new();
        let p = policy("max_in_flight = 1\nrate_limit = { per_second = 1, burst = 2 }\n");
        let c = g
            .authenticate(&p, 1, Some(b"Bearer k1"), None)
            .unwrap()
            .unwrap();
        let held = c.admit(Some("simple")).unwrap();
        assert!(matches!(
            c.admit(Some("simple")),
            Err(Refused::Quota {
                max_in_flight: 1,
                ..
            })
        ));
        // Revision 2, same limits: the slot is still taken, one token is left.
        let c = g
            .authenticate(&p, 2, Some(b"Bearer k1"), None)
            .unwrap()
            .unwrap();
        assert!(matches!(c.admit(None), Err(Refused::Quota { .. })));
        drop(held);
        let _p = c.admit(None).unwrap();
        assert!(matches!(c.admit(Some("iris")), Err(Refused::Denied { .. })));
    }
}
