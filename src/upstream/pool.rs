//! An upstream's endpoints and one view of each endpoint's health.
//!
//! The pool decides which endpoint takes an attempt. An endpoint stands in one of three
//! ways ([`Standing`]): serving; failing its active health checks (no traffic until it
//! passes `healthy_threshold` checks in a row); or ejected for failing real traffic
//! (`consecutive_failures` health-relevant failures in a row eject it for
//! `base_ejection × n`, capped, never more than `max_ejection_percent` of the pool at
//! once). An endpoint back from an ejection is on probation: one failure ejects it again,
//! for longer. The same view answers the balancer, readiness and the metrics.
//!
//! # Ending an ejection early
//!
//! With active checks on (and `outlier.uneject_on_health_check`, on by default), an
//! ejection also ends when the endpoint passes `healthy_threshold` checks in a row that
//! all began after the ejection did, as Envoy's `successful_active_health_check_uneject_host`
//! does: a restarted endpoint is back within `interval × healthy_threshold`, not after
//! `base_ejection × n`. A check begun before the ejection (in flight while the calls
//! failed) does not count, so what the endpoint said before its failures cannot undo them.
//! It comes back on probation, as from an ejection that ran its course.
//!
//! Endpoints come from a fixed list or a DNS name re-resolved on an interval; an endpoint
//! that leaves the pool finishes the attempts it has (they hold it) and gets no more.
//! Balancing is power of two choices over attempts pending, the pair taken in turn so the
//! choice is deterministic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use tokio::time::Instant;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint as TonicEndpoint, Identity,
};

use super::sequence::{Affinity, Marks};
use crate::error::Error;
use crate::pb::inference as proto;
use crate::policy::{CheckKind, HealthCheck, UpstreamSpec};
use crate::resilience::Changed;
use proto::grpc_inference_service_client::GrpcInferenceServiceClient;

/// What one call said about its endpoint, for outlier ejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It answered, or failed in a way that says nothing about it (a client error).
    Healthy,
    /// It answered with a failure that says it is sick: transient, overloaded, timed out,
    /// a server bug.
    Failed,
    /// The connection was refused: the endpoint is down.
    Unreachable,
}

/// How an endpoint stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// It takes calls.
    Serving,
    /// It failed its active health checks and has not yet passed enough again.
    Unhealthy,
    /// It failed real traffic and is out until `until`.
    Ejected {
        /// When it comes back (on probation).
        until: Instant,
    },
}

impl Standing {
    /// As a metric: 0 serving, 1 failing health checks, 2 ejected.
    pub fn as_gauge(self) -> i64 {
        match self {
            Standing::Serving => 0,
            Standing::Unhealthy => 1,
            Standing::Ejected { .. } => 2,
        }
    }
}

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

/// Which ejection (if any) stood when a check of an endpoint began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Begun(u64);

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

    /// Marks the start of an active check, for [`Pool::record_check`].
    fn begin_check(&self) -> Begun {
        Begun(self.lock().epoch)
    }

    /// How ModelInfer calls reach this endpoint.
    pub fn forwarder(&self) -> &super::forward::Forwarder {
        &self.forwarder
    }

    /// A client on this endpoint's connection.
    pub fn client(&self) -> GrpcInferenceServiceClient<Channel> {
        self.client.clone()
    }

    /// How the endpoint stands at `now`.
    pub fn standing(&self, now: Instant) -> Standing {
        let mut h = self.lock();
        if let Some(until) = h.ejected_until {
            if until > now {
                return Standing::Ejected { until };
            }
            // Back, on probation.
            h.ejected_until = None;
            h.probation = true;
        }
        if h.checked_healthy {
            Standing::Serving
        } else {
            Standing::Unhealthy
        }
    }
}

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

/// Resolves a name to addresses; the system resolver in production, a stub in tests.
pub trait Resolve: Send + Sync + 'static {
    /// Every address `host:port` stands for.
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (`getaddrinfo`, so `/etc/hosts` counts).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let target = format!("{host}:{port}");
        Box::pin(async move { Ok(tokio::net::lookup_host(target).await?.collect()) })
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
        let endpoints = uris
            .iter()
            .map(|uri| {
                let addr = uri
                    .authority()
                    .map_or_else(|| uri.to_string(), ToString::to_string);
                pool.connect(&addr)
            })
            .collect();
        pool.endpoints.store(Arc::new(endpoints));
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

    fn connect(&self, addr: &str) -> Arc<Endpoint> {
        let c = &self.spec.connection;
        let scheme = if self.spec.tls.is_some() {
            "https"
        } else {
            "http"
        };
        // `addr` is an authority (`host:port`), checked when the policy loaded or taken
        // from a resolved socket address.
        let uri = format!("{scheme}://{addr}")
            .parse::<http::Uri>()
            .unwrap_or_else(|e| {
                tracing::error!(upstream = %self.name, endpoint = %addr, error = %e,
                    "not a usable address; calls to this endpoint will fail");
                http::Uri::from_static("http://invalid.invalid:1")
            });
        let mut endpoint = TonicEndpoint::from(uri)
            .connect_timeout(self.spec.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(c.keepalive_interval)
            .keep_alive_timeout(c.keepalive_timeout)
            .keep_alive_while_idle(true);
        if let Some(n) = c.max_concurrent_streams {
            endpoint = endpoint.concurrency_limit(n);
        }
        if let Some(tls) = &self.spec.tls {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let mut config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                .domain_name(tls.server_name.as_deref().unwrap_or(host));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            // On failure the endpoint keeps its https:// address without TLS settings, so
            // every call to it fails: never plaintext instead.
            match endpoint.clone().tls_config(config) {
                Ok(e) => endpoint = e,
                Err(e) => {
                    tracing::error!(upstream = %self.name, endpoint = %addr, error = %e,
                        "cannot set up TLS; calls to this endpoint will fail");
                }
            }
        }
        let channel = endpoint.connect_lazy();
        let tls = self.spec.tls.is_some().then(|| channel.clone());
        let forwarder =
            super::forward::Forwarder::new(addr, &self.spec, self.max_message_size, tls);
        Arc::new(Endpoint::new(
            &self.name,
            addr,
            channel,
            forwarder,
            self.max_message_size,
        ))
    }

    /// Replaces the endpoints with `addrs` (a fresh resolution), keeping the endpoints
    /// (connections, health) of addresses that stay. Returns (added, removed).
    pub fn set_addresses(&self, addrs: &[SocketAddr]) -> (Vec<String>, Vec<String>) {
        let old = self.endpoints();
        let mut by_addr: BTreeMap<String, Arc<Endpoint>> = old
            .iter()
            .map(|e| (e.addr.to_string(), e.clone()))
            .collect();
        let mut wanted: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        wanted.sort();
        wanted.dedup();
        let mut added = Vec::new();
        let mut next = Vec::with_capacity(wanted.len());
        for addr in &wanted {
            match by_addr.remove(addr) {
                Some(e) => next.push(e),
                None => {
                    added.push(addr.clone());
                    next.push(self.connect(addr));
                }
            }
        }
        let removed: Vec<String> = by_addr.into_keys().collect();
        if !added.is_empty() || !removed.is_empty() {
            self.endpoints.store(Arc::new(next));
            self.on_change.tell();
        }
        (added, removed)
    }

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
            (None, Some(until)) => Err(Error::AllEjected {
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

    /// Records what a call said about `endpoint`. Enough failures in a row eject it.
    pub fn record(&self, endpoint: &Endpoint, verdict: Verdict) {
        let o = &self.spec.outlier;
        let now = Instant::now();
        {
            let mut h = endpoint.lock();
            if verdict == Verdict::Healthy {
                h.consecutive = 0;
                h.probation = false;
                return;
            }
            h.consecutive = h.consecutive.saturating_add(1);
            let threshold = if h.probation {
                1
            } else {
                o.consecutive_failures
            };
            if !o.enabled || h.consecutive < threshold || h.ejected_until.is_some_and(|u| u > now) {
                return;
            }
        }
        let endpoints = self.endpoints();
        let out = endpoints
            .iter()
            .filter(|e| matches!(e.standing(now), Standing::Ejected { .. }))
            .count();
        if out >= o.max_ejected(endpoints.len()) {
            tracing::debug!(upstream = %self.name, endpoint = %endpoint.addr,
                "not ejected: max_ejection_percent of the pool is out already");
            return;
        }
        // Ejection moves calls to the other endpoints. With none left serving, an endpoint
        // that still answers stays: ejecting it would turn some failed calls into all of
        // them (a sick upstream is the breaker's to stop). One that refuses connections is
        // down either way, and goes.
        let others_serving = endpoints
            .iter()
            .any(|e| e.addr != endpoint.addr && e.standing(now) == Standing::Serving);
        if !others_serving && verdict != Verdict::Unreachable {
            tracing::debug!(upstream = %self.name, endpoint = %endpoint.addr,
                "not ejected: no other endpoint of the pool is serving");
            return;
        }
        let mut h = endpoint.lock();
        if !h.probation {
            // A first ejection after a quiet spell starts the count again.
            h.ejections = 0;
        }
        h.ejections = h.ejections.saturating_add(1);
        let length = o.ejection(h.ejections);
        h.ejected_until = Some(now + length);
        h.consecutive = 0;
        h.probation = false;
        h.epoch = h.epoch.wrapping_add(1);
        h.passes_ejected = 0;
        tracing::warn!(upstream = %self.name, endpoint = %endpoint.addr,
            ejections = h.ejections, ejected_for = ?length, "endpoint ejected");
        drop(h);
        self.on_change.tell();
        self.on_change.tell_at(now + length);
    }

    /// Records the outcome of an active check of `endpoint` that began at `begun`.
    ///
    /// 1. A pass counts toward `healthy_threshold` in a row; reaching it makes an
    ///    endpoint that failed its checks healthy again.
    /// 2. A pass of a check begun during the endpoint's current ejection also counts
    ///    toward ending that ejection; at `healthy_threshold` in a row (and with
    ///    `uneject_on_health_check`) the endpoint is back, on probation.
    /// 3. A failure resets both counts, and `unhealthy_threshold` in a row take the
    ///    endpoint out.
    fn record_check(
        &self,
        endpoint: &Endpoint,
        check: &HealthCheck,
        begun: Begun,
        passed: Result<(), String>,
    ) {
        let now = Instant::now();
        let mut h = endpoint.lock();
        let was = h.checked_healthy;
        let mut cut_short = None;
        match passed {
            Ok(()) => {
                h.fails = 0;
                h.passes = h.passes.saturating_add(1);
                if !h.checked_healthy && h.passes >= check.healthy_threshold {
                    h.checked_healthy = true;
                    tracing::info!(upstream = %self.name, endpoint = %endpoint.addr,
                        "endpoint passes its health checks again");
                }
                if let Some(until) = h.ejected_until.filter(|&u| u > now)
                    && begun == Begun(h.epoch)
                {
                    h.passes_ejected = h.passes_ejected.saturating_add(1);
                    if self.spec.outlier.uneject_on_health_check
                        && h.passes_ejected >= check.healthy_threshold
                    {
                        h.ejected_until = None;
                        h.probation = true;
                        h.passes_ejected = 0;
                        cut_short = Some(until - now);
                    }
                }
            }
            Err(why) => {
                h.passes = 0;
                h.passes_ejected = 0;
                h.fails = h.fails.saturating_add(1);
                if h.checked_healthy && h.fails >= check.unhealthy_threshold {
                    h.checked_healthy = false;
                    tracing::warn!(upstream = %self.name, endpoint = %endpoint.addr,
                        reason = %why, "endpoint fails its health checks");
                }
            }
        }
        let changed = h.checked_healthy != was || cut_short.is_some();
        if let Some(left) = cut_short {
            tracing::info!(upstream = %self.name, endpoint = %endpoint.addr,
                ejections = h.ejections, passes = check.healthy_threshold, ejection_left = ?left,
                "endpoint ejection ended early: it passes its health checks");
        }
        drop(h);
        if changed {
            self.on_change.tell();
        }
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

    /// Checks every endpoint once, concurrently, each within the check's timeout.
    pub async fn check_all(&self, check: &HealthCheck) {
        let endpoints = self.endpoints();
        let begun: Vec<Begun> = endpoints.iter().map(|e| e.begin_check()).collect();
        let outcomes = futures::future::join_all(endpoints.iter().map(|e| probe(e, check))).await;
        for ((e, begun), outcome) in endpoints.iter().zip(begun).zip(outcomes) {
            self.record_check(e, check, begun, outcome);
        }
    }

    /// Resolves the DNS name once and applies the answer; an error keeps the endpoints
    /// there are.
    pub async fn resolve_once(&self, resolver: &dyn Resolve) {
        let crate::policy::Endpoints::Dns { host, port, .. } = &self.spec.endpoints else {
            return;
        };
        match resolver.resolve(host, *port).await {
            Ok(addrs) => {
                let (added, removed) = self.set_addresses(&addrs);
                if !added.is_empty() || !removed.is_empty() {
                    tracing::info!(upstream = %self.name, name = %host, ?added, ?removed,
                        "endpoints changed");
                }
            }
            Err(e) => {
                tracing::warn!(upstream = %self.name, name = %host, error = %e,
                    "cannot resolve; keeping the endpoints there are");
            }
        }
    }
}

/// One active check of `endpoint`: `Ok` if it answered that it is ready in time.
async fn probe(endpoint: &Endpoint, check: &HealthCheck) -> Result<(), String> {
    let ask = async {
        match &check.kind {
            CheckKind::ServerReady => {
                let r = endpoint
                    .client()
                    .server_ready(proto::ServerReadyRequest {})
                    .await
                    .map_err(|s| format!("ServerReady: {}", s.message()))?;
                r.into_inner()
                    .ready
                    .then_some(())
                    .ok_or_else(|| "ServerReady: not ready".to_string())
            }
            CheckKind::ModelReady { model, version } => {
                let r = endpoint
                    .client()
                    .model_ready(proto::ModelReadyRequest {
                        name: model.clone(),
                        version: version.clone(),
                    })
                    .await
                    .map_err(|s| format!("ModelReady {model}: {}", s.message()))?;
                r.into_inner()
                    .ready
                    .then_some(())
                    .ok_or_else(|| format!("ModelReady {model}: not ready"))
            }
            CheckKind::GrpcHealth { service } => {
                use tonic_health::pb::health_check_response::ServingStatus;
                let mut client =
                    tonic_health::pb::health_client::HealthClient::new(endpoint.channel.clone());
                let r = client
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: service.clone(),
                    })
                    .await
                    .map_err(|s| format!("Health/Check {service:?}: {}", s.message()))?;
                let status = r.into_inner().status;
                (status == ServingStatus::Serving as i32)
                    .then_some(())
                    .ok_or_else(|| format!("Health/Check {service:?}: status {status}"))
            }
        }
    };
    match tokio::time::timeout(check.timeout, ask).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
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
