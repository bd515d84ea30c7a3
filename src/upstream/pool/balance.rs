//! Choosing the endpoint for an attempt: power of two choices over attempts pending.
//!
//! Of the next two serving endpoints, taken in turn so the choice is deterministic, the one
//! with fewer attempts pending takes the attempt. A retry avoids the endpoint that just
//! failed its call unless no other serves. A call of a sequence goes to the endpoint the
//! sequence is bound to (see [`crate::upstream::sequence`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::{Endpoint, Pool, Standing};
use crate::error::Error;
use crate::upstream::sequence::Marks;

/// Counts an attempt as pending on its endpoint until dropped.
pub struct Pending(Arc<Endpoint>);

impl Pending {
    /// Starts counting an attempt on `endpoint`.
    pub fn start(endpoint: &Arc<Endpoint>) -> Pending {
        endpoint.pending.fetch_add(1, Ordering::Relaxed);
        Pending(endpoint.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// The endpoint for the next attempt: of the next two in turn that are serving (and not
    /// `avoid`, the one that just failed this call, unless no other serves), the one with
    /// fewer attempts pending.
    pub fn pick(&self, avoid: Option<&str>) -> Result<Arc<Endpoint>, Error> {
        let endpoints = self.endpoints();
        let n = endpoints.len();
        if n == 0 {
            return Err(Error::UpstreamUnavailable {
                upstream: self.name.to_string(),
                detail: match &self.spec.endpoints {
                    crate::policy::Endpoints::Dns { host, .. } => {
                        format!("no endpoints: {host} resolved to no address (yet)")
                    }
                    crate::policy::Endpoints::Static(_) => "no endpoints".into(),
                },
                never_sent: true,
            });
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut first: Option<usize> = None;
        let mut second: Option<usize> = None;
        let mut avoided: Option<usize> = None;
        let mut soonest: Option<Instant> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let e = &endpoints[i];
            match e.standing(now) {
                Standing::Serving if Some(&*e.addr) == avoid => avoided = Some(i),
                Standing::Serving if first.is_none() => first = Some(i),
                Standing::Serving => {
                    second = Some(i);
                    break;
                }
                Standing::Ejected { until } => {
                    soonest = Some(soonest.map_or(until, |s| s.min(until)));
                }
                Standing::Unhealthy => {}
            }
        }
        let load = |i: usize| endpoints[i].pending.load(Ordering::Relaxed);
        let chosen = match (first, second) {
            (Some(a), Some(b)) if load(b) < load(a) => Some(b),
            (Some(a), _) => Some(a),
            (None, _) => avoided,
        };
        match (chosen, soonest) {
            (Some(i), _) => Ok(endpoints[i].clone()),
            // Every endpoint is out; the ejected come back first.
            (None, Some(until)) => Err(Error::NoEndpoint {
                upstream: self.name.to_string(),
                retry_after: until.saturating_duration_since(now),
            }),
            (None, None) => Err(Error::UpstreamUnavailable {
                upstream: self.name.to_string(),
                detail: "no healthy endpoint: every endpoint fails its health checks".into(),
                never_sent: true,
            }),
        }
    }

    /// The endpoint for a call of a sequence: the one the sequence is bound to, or (for its
    /// first call) the one [`Pool::pick`] chooses, which it is then bound to. A bound
    /// endpoint that is no longer serving fails the call with `SequenceBroken`.
    pub fn pick_for_sequence(&self, model: &str, marks: &Marks) -> Result<Arc<Endpoint>, Error> {
        let Some(addr) = self.sequences.bound(model, marks) else {
            let endpoint = self.pick(None)?;
            self.sequences.bind(model, marks, endpoint.addr.clone());
            return Ok(endpoint);
        };
        let endpoints = self.endpoints();
        let why = match endpoints.iter().find(|e| e.addr == addr) {
            None => "has left the pool",
            Some(e) => match e.standing(Instant::now()) {
                Standing::Serving => return Ok(e.clone()),
                Standing::Unhealthy => "fails its health checks",
                Standing::Ejected { .. } => "was ejected for failing calls",
            },
        };
        self.sequences.forget(model, marks);
        Err(Error::SequenceBroken {
            upstream: self.name.to_string(),
            model: model.to_string(),
            sequence: marks.id.clone(),
            endpoint: addr.to_string(),
            why,
        })
    }

    /// Forgets the binding of a sequence whose endpoint lost it.
    pub fn forget_sequence(&self, model: &str, marks: &Marks) {
        self.sequences.forget(model, marks);
    }
}
