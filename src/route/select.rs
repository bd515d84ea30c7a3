//! Choosing the route of a call among its model's compiled routes: the pinned version,
//! the `keel-route` override, then weights over the routes that are on.
//!
//! # Determinism
//!
//! A model with several weighted routes sends a call to the route chosen by a fixed hash
//! (FNV-1a, then a 64-bit finaliser) of its request id, or of the model's `route_key`
//! metadata when the call has it: the same id (or user) always takes the same route, and a
//! retried or replayed call stays where it went. Weights are shares among the routes that
//! are on (weight above 0, flag condition holding).

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::metadata::MetadataMap;

use super::{Route, Target, cache, canary, ladder};
use crate::error::Error;
use crate::policy::{METHODS, Settings, When};
use crate::resilience::Limiter;

/// What picks a call's route besides its model and version.
#[derive(Clone, Copy, Debug)]
pub struct Pick<'a> {
    /// The call's request id: the hash key when there is no `route_key` value.
    pub request_id: &'a str,
    /// The call's metadata: the `route_key` value and the `keel-route` override.
    pub metadata: Option<&'a MetadataMap>,
}

impl<'a> Pick<'a> {
    /// A pick by request id alone.
    pub fn by_id(request_id: &'a str) -> Self {
        Pick {
            request_id,
            metadata: None,
        }
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.metadata?.get(key)?.to_str().ok()
    }
}

/// The metadata that chooses a route by name, where the policy allows it.
pub const ROUTE_OVERRIDE: &str = "keel-route";

/// One compiled route of a model.
pub(super) struct Entry {
    pub(super) name: Arc<str>,
    pub(super) target: Arc<Target>,
    pub(super) version: Option<Arc<str>>,
    /// Zero when the route is off (weight 0 or its flag condition does not hold).
    pub(super) weight: u64,
    pub(super) canary: bool,
}

/// How one model's calls are routed.
pub(super) struct ModelRoutes {
    pub(super) model: Arc<str>,
    /// The fallback ladder, rungs whose flags are off left out.
    pub(super) ladder: Vec<ladder::Step>,
    /// The response cache, if the model has one.
    pub(super) cache: Option<Arc<cache::ResponseCache>>,
    /// Every route, in policy order; those that are off have weight 0.
    pub(super) entries: Vec<Entry>,
    /// Versions clients may ask for; empty allows any.
    pub(super) versions: Vec<String>,
    pub(super) limiter: Arc<Limiter>,
    /// Effective settings per method, resolved once per revision.
    pub(super) settings: BTreeMap<&'static str, Arc<Settings>>,
    /// The flag condition that switched the model off, when it did.
    pub(super) switched_off: Option<When>,
    /// Metadata whose value picks the route.
    pub(super) route_key: Option<String>,
    /// Whether `keel-route` may pick the route.
    pub(super) route_override: bool,
    /// The canary analysis, while the canary takes calls.
    pub(super) analysis: Option<Arc<canary::Analysis>>,
    /// Keel is ready only while this model can answer.
    pub(super) required: bool,
}

impl ModelRoutes {
    fn route(&self, entry: &Entry, settings: Arc<Settings>) -> Route {
        let side = if entry.canary {
            canary::Side::Canary
        } else {
            canary::Side::Baseline
        };
        Route {
            model: self.model.clone(),
            target: entry.target.clone(),
            settings,
            limiter: self.limiter.clone(),
            name: entry.name.clone(),
            version: entry.version.clone(),
            canary: self.analysis.clone().map(|a| (a, side)),
        }
    }
}

/// The routes of one policy revision.
pub struct Routes {
    pub(super) models: BTreeMap<String, ModelRoutes>,
}

impl Routes {
    /// The route of a call to `method` for `model` (`version`, empty for any), picked as
    /// `pick` says.
    ///
    /// A version the client pins goes to the routes that send that version, else to those
    /// that pass the client's version on; `keel-route`, where allowed, names the route.
    pub fn route(
        &self,
        method: &str,
        model: &str,
        version: &str,
        pick: &Pick<'_>,
    ) -> Result<Route, Error> {
        let routes = self.models.get(model).ok_or_else(|| Error::ModelNotFound {
            model: model.to_string(),
        })?;
        if let Some(condition) = &routes.switched_off {
            return Err(Error::ModelSwitchedOff {
                model: model.to_string(),
                condition: condition.to_string(),
            });
        }
        let not_found = |available: Vec<String>| Error::VersionNotFound {
            model: model.to_string(),
            version: version.to_string(),
            available,
        };
        if !version.is_empty()
            && !routes.versions.is_empty()
            && !routes.versions.iter().any(|v| v == version)
        {
            return Err(not_found(routes.versions.clone()));
        }
        let settings = routes
            .settings
            .get(method)
            .or_else(|| routes.settings.get(METHODS[0]))
            .cloned()
            .unwrap_or_default();
        if routes.route_override
            && let Some(name) = pick.get(ROUTE_OVERRIDE)
        {
            return match routes.entries.iter().find(|e| &*e.name == name) {
                Some(entry) => Ok(routes.route(entry, settings)),
                None => Err(Error::UnknownRoute {
                    model: model.to_string(),
                    route: name.to_string(),
                    routes: routes.entries.iter().map(|e| e.name.to_string()).collect(),
                }),
            };
        }
        let on = || routes.entries.iter().filter(|e| e.weight > 0);
        let candidates: Vec<&Entry> = if version.is_empty() {
            on().collect()
        } else {
            let sends = |e: &&Entry| e.version.as_deref() == Some(version);
            if on().any(|e| sends(&e)) {
                on().filter(sends).collect()
            } else {
                on().filter(|e| e.version.is_none()).collect()
            }
        };
        let total: u64 = candidates.iter().map(|e| e.weight).sum();
        if total == 0 {
            let mut available: Vec<String> = on()
                .filter_map(|e| e.version.as_deref().map(str::to_string))
                .collect();
            available.dedup();
            return Err(not_found(available));
        }
        let key = routes
            .route_key
            .as_deref()
            .and_then(|k| pick.get(k))
            .unwrap_or(pick.request_id);
        let mut point = share(key.as_bytes(), total);
        for entry in candidates {
            if point < entry.weight {
                return Ok(routes.route(entry, settings));
            }
            point -= entry.weight;
        }
        // Unreachable: the point is below the total.
        Err(not_found(vec![]))
    }

    /// The fallback ladder of `model`.
    pub fn ladder(&self, model: &str) -> &[ladder::Step] {
        self.models.get(model).map_or(&[], |m| &m.ladder)
    }

    /// The response cache of `model`, if any.
    pub fn cache(&self, model: &str) -> Option<&Arc<cache::ResponseCache>> {
        self.models.get(model)?.cache.as_ref()
    }

    /// The route of a call for `model` sent to a fallback `target` (another upstream); it
    /// counts in no canary analysis.
    pub fn route_to(&self, method: &str, model: &str, target: &Arc<Target>) -> Option<Route> {
        let routes = self.models.get(model)?;
        Some(Route {
            model: routes.model.clone(),
            target: target.clone(),
            settings: routes.settings.get(method).cloned().unwrap_or_default(),
            limiter: routes.limiter.clone(),
            name: target.upstream.clone(),
            version: None,
            canary: None,
        })
    }

    /// The versions clients may ask `model` for: the policy's `versions`, else those its
    /// routes send; empty when any version passes through.
    pub fn versions(&self, model: &str) -> Vec<String> {
        let Some(m) = self.models.get(model) else {
            return vec![];
        };
        if !m.versions.is_empty() {
            return m.versions.clone();
        }
        let mut sent: Vec<String> = m
            .entries
            .iter()
            .filter_map(|e| e.version.as_deref().map(str::to_string))
            .collect();
        sent.sort();
        sent.dedup();
        if m.entries.iter().any(|e| e.version.is_none()) {
            return vec![];
        }
        sent
    }

    /// Whether `model` is routed.
    pub fn has(&self, model: &str) -> bool {
        self.models.contains_key(model)
    }

    /// Every routed model, sorted by name.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }
}

/// FNV-1a, 64 bits: a fixed, portable hash for deterministic choices.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A point in `0..total` for `key`: FNV-1a mixed by the murmur3 finaliser (FNV's low bits
/// depend only on the low bits of the input), scaled by multiplication rather than a
/// modulo, so every key spreads evenly.
fn share(key: &[u8], total: u64) -> u64 {
    let mut h = fnv1a(key);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    ((u128::from(h) * u128::from(total)) >> 64) as u64
}
