//! Keel's policy: one TOML document, parsed and validated whole into plain immutable data,
//! held as versioned snapshots that are swapped atomically.
//!
//! The same file `keel serve --config` takes and `keel validate` checks. Nothing here knows
//! about other modules of the crate; later layers read a [`Snapshot`] of the [`Policy`].
//!
//! # Errors
//!
//! Every problem is reported with its path in the document
//! (`models.resnet.retry.max_atempts: unknown key, did you mean max_attempts?`), and all
//! problems are reported at once rather than stopping at the first.

mod adapters;
mod audit;
pub mod builtin;
pub mod diff;
mod document;
mod fallback;
mod fault;
mod reader;
mod rollout;
mod settings;
mod snapshot;
mod store;
mod tenants;
mod tls;
mod units;
mod upstreams;
pub mod watch;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use adapters::{LegacyApi, Predict, V1Mapping, VersionAdapter};
pub use audit::{AuditEntry, AuditLog, Outcome, rfc3339};
pub use fallback::{CacheSpec, Fallback, StaticData, StaticTensor, Tier, Trigger};
pub use fault::{Abort, Delay, Fault, parse_code};
pub use rollout::{RollbackSpec, WeightedRoute, When};
pub use settings::{
    Breaker, BreakerOverrides, Budget, BudgetOverrides, ErrorClass, Jitter, LimitOverrides, Limits,
    MAX_DURATION, Overrides, Retry, RetryOn, RetryOverrides, Settings,
};
pub use snapshot::{Change, Snapshot, Source};
pub use store::{Adjust, Applied, ApplyError, Check, HISTORY, Listener, Store};
pub use tenants::{
    AuthSettings, MAX_TENANT_NAME, ModelAccess, Priority, RateLimit, Tenant, parse_key_hash,
};
pub use tls::TlsSettings;
pub use units::{format_duration, parse_duration, parse_size};
pub use upstreams::{
    CheckKind, Connection, Endpoints, HealthCheck, Outlier, UpstreamSpec, UpstreamTls,
};

/// Whether reading a policy reads the files it names (certificates, keys, CAs) to check them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Files {
    /// Read and check them: what serving needs.
    #[default]
    Read,
    /// Leave them alone: checking a policy where they are not mounted.
    Skip,
}

/// Where Keel listens for traffic unless told otherwise: Triton's gRPC port on loopback.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8001";

/// The gRPC methods a `[methods."<name>"]` section may name.
pub const METHODS: &[&str] = &[
    "inference.GRPCInferenceService/ModelInfer",
    "inference.GRPCInferenceService/ModelStreamInfer",
    "inference.GRPCInferenceService/ModelReady",
    "inference.GRPCInferenceService/ModelMetadata",
    "inference.GRPCInferenceService/ModelConfig",
    "inference.GRPCInferenceService/ModelStatistics",
];

/// A validated policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    /// The author's label for this document (`"2026-11-28.1"`), carried into logs.
    pub version: Option<String>,
    /// Listener settings; they need a restart to change.
    pub server: ServerSettings,
    /// `[defaults]`: settings for every method and model.
    pub defaults: Overrides,
    /// `[methods."<full method name>"]`: per-method settings.
    pub methods: BTreeMap<String, Overrides>,
    /// Named OIP gRPC servers Keel forwards to.
    pub upstreams: BTreeMap<String, UpstreamSpec>,
    /// Which backend answers each model, with per-model settings. `None` serves every
    /// embedded model with the defaults.
    pub models: Option<BTreeMap<String, ModelPolicy>>,
    /// Named switches that models refer to.
    pub flags: BTreeMap<String, Flag>,
    /// What Keel reports about its calls.
    pub observability: Observability,
    /// `[api.v1]`: the legacy API's status.
    pub api: LegacyApi,
    /// `[tenants.<name>]`: who may call which models, and their fair-use limits. Empty:
    /// authentication is off.
    pub tenants: BTreeMap<String, Tenant>,
    /// `[auth]`: how authentication refusals look.
    pub auth: AuthSettings,
}

/// `[observability]`: request logs (metrics and traces need no settings here).
#[derive(Clone, Debug, PartialEq)]
pub struct Observability {
    /// Share of successful calls that get a request log line, 0..=1; failed and slow calls
    /// always do. Chosen by request id, so a sampled call is sampled everywhere.
    pub success_log_sample: f64,
}

impl Default for Observability {
    fn default() -> Self {
        Observability {
            success_log_sample: 0.01,
        }
    }
}

/// Listener settings. A swap that changes any of them is refused: they need a restart.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerSettings {
    /// Address of the gRPC traffic listener.
    pub listen: SocketAddr,
    /// Address of the admin listener (PolicyAdmin), kept apart so it can be firewalled.
    pub admin_listen: SocketAddr,
    /// Environment variable holding the admin bearer token; required off loopback.
    pub admin_token_env: Option<String>,
    /// How long Keel keeps taking new calls after shutdown begins, with readiness already
    /// NOT_SERVING, so load balancers stop sending before the listener closes.
    pub drain_grace: Duration,
    /// How long in-flight calls may run after the listener closes before they are cut.
    pub drain_timeout: Duration,
    /// Largest request or response message, in bytes; larger ones get RESOURCE_EXHAUSTED.
    pub max_message_size: usize,
    /// Where the audit log of policy changes is appended (JSON lines). `None`: next to the
    /// policy file.
    pub audit_log: Option<PathBuf>,
    /// Whether the policy file is watched and reloaded when it changes.
    pub watch: bool,
    /// Calls Keel serves at once, all models together; more are refused at once.
    pub max_in_flight: u32,
    /// Share of those slots (rounded up, never all) only interactive callers may take: when
    /// Keel is full, batch tenants are refused first. 0..=1.
    pub interactive_reserve: f64,
    /// `[server.tls]`: TLS (and with `client_ca`, mutual TLS) on the traffic listener.
    /// `None`: plaintext.
    pub tls: Option<TlsSettings>,
    /// `[server.admin_tls]`: TLS on the admin listener, configured apart from traffic's
    /// because the people who may change policy are not the tenants. `None`: plaintext.
    pub admin_tls: Option<TlsSettings>,
    /// Largest header block (metadata) of one call a client may send, in bytes (HTTP/2
    /// `SETTINGS_MAX_HEADER_LIST_SIZE`), so no one can make Keel buffer huge headers.
    pub max_metadata_size: u32,
    /// Calls one HTTP/2 connection may have open at once, so one connection cannot hold
    /// every slot.
    pub max_concurrent_streams: u32,
    /// How often Keel pings an HTTP/2 connection to find dead peers.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// How long a connection may live before Keel asks the client to reconnect (GOAWAY),
    /// so connections rebalance and pick up rotated certificates. `None`: forever.
    pub max_connection_age: Option<Duration>,
    /// Connections each listener keeps open at once; more are closed as they are accepted.
    pub max_connections: u32,
    /// How long a client has to complete its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// How long a connection has, from its accept, to complete its TLS handshake and its
    /// HTTP/2 preface, so half-open connections cannot fill `max_connections`.
    pub handshake_timeout: Duration,
    /// Bytes one connection may make Keel hold for request messages still arriving and
    /// answers its client has not taken, so one client cannot hold Keel's memory.
    pub max_buffered_per_connection: usize,
    /// The same bound for all connections together.
    pub max_buffered: usize,
    /// Traffic workers: OS threads, each with its own runtime and listening socket on
    /// `listen`, so a call's wake-ups stay on one core. 0: one per core Keel may use. Read
    /// at startup only; a swap that changes it is accepted and applies at the next start.
    pub workers: u32,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8002)),
            admin_token_env: None,
            drain_grace: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            max_message_size: 64 << 20,
            audit_log: None,
            watch: true,
            max_in_flight: 10_000,
            interactive_reserve: 0.1,
            tls: None,
            admin_tls: None,
            max_metadata_size: 16 << 10,
            max_concurrent_streams: 200,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            max_connection_age: None,
            max_connections: 10_000,
            tls_handshake_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            max_buffered_per_connection: 256 << 20,
            max_buffered: 1 << 30,
            workers: 0,
        }
    }
}

/// A backend named in the policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendRef {
    /// The built-in models.
    Embedded,
    /// The upstream of this name (a key of [`Policy::upstreams`]).
    Upstream(String),
}

impl fmt::Display for BackendRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendRef::Embedded => f.write_str("embedded"),
            BackendRef::Upstream(u) => f.write_str(u),
        }
    }
}

/// What the policy says about one model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelPolicy {
    /// Where calls go: one backend, or several weighted routes (shares among those on).
    pub routes: Vec<WeightedRoute>,
    /// Versions clients may ask for; empty allows any. Others are NOT_FOUND.
    pub versions: Vec<String>,
    /// Per-model settings, over the method's and the defaults.
    pub overrides: Overrides,
    /// What answers, in order, when this model cannot.
    pub fallback: Vec<Fallback>,
    /// The model's response cache, if any.
    pub cache: Option<CacheSpec>,
    /// The flag condition that switches the model on; `None` is always on.
    pub when: Option<When>,
    /// Metadata key whose value picks the route (stickiness); the request id otherwise.
    pub route_key: Option<String>,
    /// Whether a call may choose its route by name with `keel-route` metadata (for tests).
    pub route_override: bool,
    /// When Keel rolls the canary route back by itself.
    pub rollback: Option<RollbackSpec>,
    /// How the legacy v1 API maps the model (`[models.<name>.v1]`).
    pub v1: Option<V1Mapping>,
    /// Adapters by the version a client asks for (`[models.<name>.adapters."<version>"]`).
    pub adapters: BTreeMap<String, VersionAdapter>,
    /// Keel is ready only while this model can answer (a healthy route or a fallback).
    pub required: bool,
}

impl ModelPolicy {
    /// Where calls go under `flags`, in a few words: `triton`, or each route's share of
    /// calls (`95% triton v1, 5% triton v2 canary, 0% embedded (off: color=green)`).
    pub fn describe_routes(&self, flags: &BTreeMap<String, Flag>) -> String {
        if let [only] = self.routes.as_slice()
            && only.version.is_none()
            && only.when.is_none()
        {
            return only.backend.to_string();
        }
        let total: u32 = self
            .routes
            .iter()
            .filter(|r| r.is_on(flags))
            .map(|r| u32::from(r.weight))
            .sum();
        let parts: Vec<String> = self
            .routes
            .iter()
            .map(|r| {
                let on = r.is_on(flags);
                let share = if on {
                    (u32::from(r.weight) * 100).checked_div(total).unwrap_or(0)
                } else {
                    0
                };
                let mut s = format!("{share}% {}", r.backend);
                if let Some(v) = &r.version {
                    s.push_str(&format!(" v{v}"));
                }
                if r.canary {
                    s.push_str(" canary");
                }
                if let (false, Some(w)) = (on, &r.when) {
                    s.push_str(&format!(" (off: {w})"));
                }
                s
            })
            .collect();
        parts.join(", ")
    }

    /// A model served by `backend` alone, with nothing else set.
    pub fn served_by(backend: BackendRef) -> ModelPolicy {
        ModelPolicy {
            routes: vec![WeightedRoute::only(backend)],
            ..ModelPolicy::default()
        }
    }
}

/// A flag's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Flag {
    /// On or off.
    Bool(bool),
    /// A named choice.
    String(String),
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Flag::Bool(b) => write!(f, "{b}"),
            Flag::String(s) => write!(f, "{s:?}"),
        }
    }
}

/// One problem in a policy document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// Dotted path to the offending key (`models.simple.backend`); empty for the whole file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a policy document.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl PolicyErrors {
    /// A single error at `path`.
    pub fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        PolicyErrors(vec![PolicyError {
            path: path.into(),
            message: message.into(),
        }])
    }
}

impl Policy {
    /// Parses and validates a TOML policy document.
    pub fn parse(text: &str) -> Result<Policy, PolicyErrors> {
        document::parse(text, Files::Read).map(|(policy, _)| policy)
    }

    /// Reads and parses a policy file; errors name the file when it cannot be read.
    pub fn load(path: &std::path::Path) -> Result<Policy, PolicyErrors> {
        Policy::load_with(path, Files::Read)
    }

    /// [`Policy::load`], reading the files the policy names or not (`keel validate
    /// --skip-files`, where certificates are mounted only where Keel runs). A policy read
    /// with [`Files::Skip`] is for checking, not serving: its upstream TLS material is empty.
    pub fn load_with(path: &std::path::Path, files: Files) -> Result<Policy, PolicyErrors> {
        document::parse(&read_file(path)?, files).map(|(policy, _)| policy)
    }

    /// The effective settings of a call to `method` (a full gRPC method name) for `model`:
    /// built-in defaults < `[defaults]` < the method < the model.
    pub fn resolve(&self, method: &str, model: Option<&str>) -> Settings {
        let mut s = Settings::default();
        self.defaults.apply_to(&mut s);
        if let Some(m) = self.methods.get(method) {
            m.apply_to(&mut s);
        }
        if let Some(m) = model.and_then(|name| self.models.as_ref()?.get(name)) {
            m.overrides.apply_to(&mut s);
        }
        s
    }
}

/// Reads a policy file, naming it in the error.
pub fn read_file(path: &std::path::Path) -> Result<String, PolicyErrors> {
    std::fs::read_to_string(path)
        .map_err(|e| PolicyErrors::one("", format!("cannot read {}: {e}", path.display())))
}
