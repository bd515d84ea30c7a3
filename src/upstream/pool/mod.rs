//! An upstream's endpoints and one view of each endpoint's health.
//!
//! The pool decides which endpoint takes an attempt. Each endpoint has one [`Standing`]
//! (serving, failing its active checks, or ejected for failing real traffic), and the same
//! view answers the balancer, readiness and the metrics.
//!
//! # Files
//!
//! - `mod.rs`: the [`Pool`] and its [`Endpoint`]s (connection, load, health state), the
//!   readiness and metrics views, and [`maintain`], which runs re-resolution and checks.
//! - `balance.rs`: how an endpoint is chosen for an attempt ([`Pool::pick`]: power of two
//!   choices over [`Pending`] attempts, a retry avoiding the last endpoint) and for a call
//!   of a sequence ([`Pool::pick_for_sequence`]).
//! - `eject.rs`: when failing calls eject an endpoint ([`Pool::record`] of a [`Verdict`]),
//!   for how long, and how an endpoint stands ([`Standing`]).
//! - `discover.rs`: how endpoints are found: a fixed list, or a DNS name through
//!   [`Resolve`] ([`SystemResolver`] in production), re-resolved by
//!   [`Pool::resolve_once`].
//! - `probe.rs`: how endpoints are probed: active health checks ([`Pool::check_all`]),
//!   their thresholds, and ending an ejection early.
//! - `connect.rs`: how an endpoint's connection is opened: channel settings and TLS.
//! - `tests.rs`: the pool's decisions, with paused time.

mod balance;
mod connect;
mod discover;
mod eject;
mod probe;

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::sequence::Affinity;
use crate::pb::inference as proto;
use crate::policy::UpstreamSpec;
use crate::resilience::Changed;
use proto::grpc_inference_service_client::GrpcInferenceServiceClient;

pub use balance::Pending;
pub use discover::{Resolve, SystemResolver};
pub use eject::{Standing, Verdict};

/// What calls (`eject.rs`) and checks (`probe.rs`) have said of an endpoint, under one
/// lock so its [`Standing`] is read from one consistent state.
#[derive(Debug)]
struct Health {
    /// What the active checks say (true until a check says otherwise).
    checked_healthy: bool,
    /// Checks passed or failed in a row.
    passes: u32,
    fails: u32,
    /// Health-relevant call failures in a row.
    consecutive: u32,
    /// Ejections in a row (reset once the endpoint stays in for `max_ejection`).
    ejections: u32,
    ejected_until: Option<Instant>,
    /// Back from an ejection: one failure ejects again.
    probation: bool,
    /// Bumped by each ejection, so a check begun before it does not count toward ending it.
    epoch: u64,
    /// Checks passed in a row that began during the current ejection.
    passes_ejected: u32,
}

/// One endpoint: its connection and its health.
#[derive(Debug)]
pub struct Endpoint {
    /// `host:port`, for logs, metrics and the receipt.
    pub addr: Arc<str>,
    /// `upstream@host:port`: who answered, in the receipt (`keel-served-by`), made once.
    pub served_by: Arc<str>,
    channel: Channel,
    client: GrpcInferenceServiceClient<Channel>,
    /// ModelInfer as bytes, on Keel's own connections.
    forwarder: super::forward::Forwarder,
    /// Attempts sent here and not yet answered: the load the balancer compares.
    pending: AtomicUsize,
    health: Mutex<Health>,
}

impl Endpoint {
    fn new(
        upstream: &str,
        addr: &str,
        channel: Channel,
        forwarder: super::forward::Forwarder,
        max_message_size: usize,
    ) -> Endpoint {
        let client = GrpcInferenceServiceClient::new(channel.clone())
            .max_decoding_message_size(max_message_size)
            .max_encoding_message_size(max_message_size);
        Endpoint {
            addr: addr.into(),
            served_by: format!("{upstream}@{addr}").into(),
            channel,
            client,
            forwarder,
            pending: AtomicUsize::new(0),
            health: Mutex::new(Health {
                checked_healthy: true,
                passes: 0,
                fails: 0,
                consecutive: 0,
                ejections: 0,
                ejected_until: None,
                probation: false,
                epoch: 0,
                passes_ejected: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How ModelInfer calls reach this endpoint.
    pub fn forwarder(&self) -> &super::forward::Forwarder {
        &self.forwarder
    }

    /// A client on this endpoint's connection.
    pub fn client(&self) -> GrpcInferenceServiceClient<Channel> {
        self.client.clone()
    }
}

/// An upstream's endpoints.
pub struct Pool {
    name: Arc<str>,
    spec: UpstreamSpec,
    max_message_size: usize,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    next: AtomicUsize,
    /// Which endpoint each live sequence is bound to.
    sequences: Affinity,
    /// Told when an endpoint's standing changes (the health view listens).
    on_change: Changed,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addrs: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("endpoints", &addrs)
            .finish()
    }
}

impl Pool {
    /// A pool with `uris` as its endpoints (none for a DNS upstream until it resolves);
    /// connections are made lazily. Must run inside a Tokio runtime.
    pub fn new(
        name: &str,
        spec: &UpstreamSpec,
        uris: &[http::Uri],
        max_message_size: usize,
    ) -> Pool {
        let pool = Pool {
            name: name.into(),
            spec: spec.clone(),
            max_message_size,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
            sequences: Affinity::new(spec.sequence_idle_timeout),
            on_change: Changed::default(),
        };
        pool.endpoints.store(Arc::new(pool.listed(uris)));
        pool
    }

    /// The settings the pool was built with.
    pub fn spec(&self) -> &UpstreamSpec {
        &self.spec
    }

    /// The same pool, telling `changed` whenever an endpoint is ejected (or its ejection
    /// ends early), passes or fails its checks, or comes or goes with DNS.
    pub fn notifying(mut self, changed: Changed) -> Self {
        self.on_change = changed;
        self
    }

    /// The endpoints now in the pool.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Whether some endpoint takes calls now.
    pub fn healthy(&self) -> bool {
        let now = Instant::now();
        self.endpoints()
            .iter()
            .any(|e| e.standing(now) == Standing::Serving)
    }

    /// Each endpoint with its standing as a gauge, for metrics.
    pub fn states(&self) -> Vec<(String, i64)> {
        let now = Instant::now();
        self.endpoints()
            .iter()
            .map(|e| (e.addr.to_string(), e.standing(now).as_gauge()))
            .collect()
    }
}

/// Runs the pool's background work until the pool is dropped: DNS re-resolution and active
/// checks, each on its own interval. Holds the pool weakly, so it never keeps it alive.
pub async fn maintain(pool: Weak<Pool>, resolver: Arc<dyn Resolve>) {
    let Some(p) = pool.upgrade() else { return };
    let dns = match &p.spec.endpoints {
        crate::policy::Endpoints::Dns { interval, .. } => Some(*interval),
        crate::policy::Endpoints::Static(_) => None,
    };
    let check = p.spec.health_check.clone();
    drop(p);
    let mut dns_tick = dns.map(tokio::time::interval);
    let mut check_tick = check.as_ref().map(|c| tokio::time::interval(c.interval));
    for t in [&mut dns_tick, &mut check_tick].into_iter().flatten() {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        let which = tokio::select! {
            _ = tick(&mut dns_tick) => true,
            _ = tick(&mut check_tick) => false,
        };
        let Some(p) = pool.upgrade() else { return };
        if which {
            p.resolve_once(resolver.as_ref()).await;
        } else if let Some(check) = &check {
            p.check_all(check).await;
        }
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
