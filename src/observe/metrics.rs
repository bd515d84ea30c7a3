//! Prometheus metrics: the gRPC edge and upstream metrics under the names existing gRPC
//! dashboards use, and Keel's own, in base units.
//!
//! # Bounded labels
//!
//! Model and upstream labels come from the policy, never from client input: a call for a
//! model the policy does not name is counted under `model="unknown"`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A status code as a label value, in go-grpc-prometheus's spelling (`OK`, `NotFound`,
/// `Unavailable`: [`crate::grpc_code::label`]), so existing gRPC dashboards and alerts
/// match Keel's series. A type of its own, so no metric can carry the canonical
/// `UNAVAILABLE` that logs and policies use.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct CodeLabel(pub tonic::Code);

impl EncodeLabelValue for CodeLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, crate::grpc_code::label(self.0))
    }
}

/// `grpc_type`, `grpc_service`, `grpc_method`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    /// `unary` or `bidi_stream`.
    pub grpc_type: &'static str,
    /// `inference.GRPCInferenceService`.
    pub grpc_service: String,
    /// `ModelInfer`.
    pub grpc_method: String,
}

/// [`ServerLabels`] and the status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerCodeLabels {
    /// `unary` or `bidi_stream`.
    pub grpc_type: &'static str,
    /// The service.
    pub grpc_service: String,
    /// The method.
    pub grpc_method: String,
    /// `OK`, `Unavailable`, ...
    pub grpc_code: CodeLabel,
}

/// An upstream call's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    /// The service.
    pub grpc_service: &'static str,
    /// The method.
    pub grpc_method: &'static str,
    /// The upstream's name from the policy.
    pub upstream: String,
}

/// [`ClientLabels`] and the status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientCodeLabels {
    /// The service.
    pub grpc_service: &'static str,
    /// The method.
    pub grpc_method: &'static str,
    /// The upstream.
    pub upstream: String,
    /// The status code.
    pub grpc_code: CodeLabel,
}

/// The labels of one side's RPC series (the server's or the client's), which gain the
/// status code in `*_handled_total`.
pub trait RpcLabels: Clone + std::hash::Hash + Eq {
    /// The labels with the code.
    type Coded: Clone + std::hash::Hash + Eq;
    /// These labels and `code`.
    fn with_code(&self, code: tonic::Code) -> Self::Coded;
    /// The side's started, handled and handling families in `metrics`.
    fn families(metrics: &Metrics) -> RpcFamilies<'_, Self>;
}

/// One side's three gRPC families.
pub struct RpcFamilies<'a, L: RpcLabels> {
    started: &'a Family<L, Counter>,
    handled: &'a Family<L::Coded, Counter>,
    handling: &'a Family<L, Histogram>,
}

impl RpcLabels for ServerLabels {
    type Coded = ServerCodeLabels;
    fn with_code(&self, code: tonic::Code) -> ServerCodeLabels {
        ServerCodeLabels {
            grpc_type: self.grpc_type,
            grpc_service: self.grpc_service.clone(),
            grpc_method: self.grpc_method.clone(),
            grpc_code: CodeLabel(code),
        }
    }
    fn families(m: &Metrics) -> RpcFamilies<'_, Self> {
        RpcFamilies {
            started: &m.server_started,
            handled: &m.server_handled,
            handling: &m.server_handling,
        }
    }
}

impl RpcLabels for ClientLabels {
    type Coded = ClientCodeLabels;
    fn with_code(&self, code: tonic::Code) -> ClientCodeLabels {
        ClientCodeLabels {
            grpc_service: self.grpc_service,
            grpc_method: self.grpc_method,
            upstream: self.upstream.clone(),
            grpc_code: CodeLabel(code),
        }
    }
    fn families(m: &Metrics) -> RpcFamilies<'_, Self> {
        RpcFamilies {
            started: &m.client_started,
            handled: &m.client_handled,
            handling: &m.client_handling,
        }
    }
}

/// One RPC's labels and, from its first use, its series in one [`Metrics`]: a call reaches
/// its counters through these, instead of building its labels (strings allocated) and
/// hashing them into each family, three times per call.
#[derive(Debug)]
pub struct RpcSeries<L> {
    labels: L,
    started: OnceLock<Counter>,
    handling: OnceLock<Histogram>,
    /// By gRPC code (0 to 16).
    handled: [OnceLock<Counter>; 17],
}

impl<L: RpcLabels> RpcSeries<L> {
    /// The series of `labels`, none created yet (nothing shows in /metrics before a call).
    pub fn new(labels: L) -> Self {
        RpcSeries {
            labels,
            started: OnceLock::new(),
            handling: OnceLock::new(),
            handled: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// `grpc_*_started_total`. `metrics` is the same every time.
    pub fn started(&self, metrics: &Metrics) -> &Counter {
        self.started.get_or_init(|| {
            L::families(metrics)
                .started
                .get_or_create(&self.labels)
                .clone()
        })
    }

    /// `grpc_*_handled_total` for `code`.
    pub fn handled(&self, metrics: &Metrics, code: tonic::Code) -> &Counter {
        self.handled[(code as usize).min(16)].get_or_init(|| {
            let coded = self.labels.with_code(code);
            L::families(metrics).handled.get_or_create(&coded).clone()
        })
    }

    /// `grpc_*_handling_seconds`.
    pub fn handling(&self, metrics: &Metrics) -> &Histogram {
        self.handling.get_or_init(|| {
            L::families(metrics)
                .handling
                .get_or_create(&self.labels)
                .clone()
        })
    }
}

/// A label value that names something of the policy (a model, an upstream), shared rather
/// than copied: the labels of a call are made on every call, and a `String` label would be
/// allocated and freed each time.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(Arc<str>);

impl Name {
    /// `model="unknown"`: a call for a model the policy does not name.
    pub fn unknown() -> Name {
        static UNKNOWN: std::sync::LazyLock<Arc<str>> =
            std::sync::LazyLock::new(|| Arc::from("unknown"));
        Name(UNKNOWN.clone())
    }
}

impl From<&Arc<str>> for Name {
    fn from(s: &Arc<str>) -> Name {
        Name(s.clone())
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name(s.into())
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Name {
        Name(s.as_str().into())
    }
}

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

/// A finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The model (from policy) or `unknown`.
    pub model: Name,
    /// What answered: `primary`, `cache` (fresh), `fallback_model` (another model or upstream),
    /// `cache` (stale, from the ladder) or `static`.
    pub tier: &'static str,
    /// `ok` or the error class.
    pub class: &'static str,
}

/// One model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// The model.
    pub model: Name,
}

/// One model on one upstream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelUpstreamLabels {
    /// The model.
    pub model: Name,
    /// The upstream.
    pub upstream: Name,
}

/// A retry and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// The model.
    pub model: Name,
    /// The upstream.
    pub upstream: Name,
    /// The error class of the failed attempt.
    pub reason: &'static str,
}

/// A degraded answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DegradedLabels {
    /// The model asked for (from policy).
    pub model: String,
    /// The tier that answered: `fallback_model`, `cache`, `static`.
    pub tier: &'static str,
    /// The failure that made the call fall back.
    pub reason: &'static str,
}

/// One upstream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The upstream.
    pub upstream: Name,
}

/// A policy change and its outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `startup`, `file`, `sighup`, `admin`, `rollback`, `set_flag`.
    pub source: &'static str,
    /// `accepted`, `rejected`, `unchanged`.
    pub result: &'static str,
}

/// A validation rule.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    /// `missing_input`, `raw_length`, ...
    pub rule: &'static str,
}

/// An API version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// `v2` or `v1`.
    pub api: &'static str,
}

/// One tenant's call and its outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantCodeLabels {
    /// The tenant, from policy.
    pub tenant: String,
    /// `OK` or the status code.
    pub code: CodeLabel,
}

/// Why credentials were refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabels {
    /// `missing`, `malformed` or `unknown_key`.
    pub reason: &'static str,
}

/// One of Keel's listeners.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `traffic` or `admin`.
    pub listener: &'static str,
}

/// Why Keel closed a connection it had let in.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionClosedLabels {
    /// `traffic` or `admin`.
    pub listener: &'static str,
    /// `handshake_timeout` (no HTTP/2 preface within `server.handshake_timeout`), or
    /// `displaced` (closed at `server.max_connections` for a new connection, having never
    /// made a call).
    pub reason: &'static str,
}

/// The outcome of re-reading a listener's certificate files.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsReloadLabels {
    /// `traffic` or `admin`.
    pub listener: &'static str,
    /// `accepted`, or `rejected` (the old certificates keep serving).
    pub result: &'static str,
}

/// State read from the running server at each scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuntimeState {
    /// Per (model, upstream): breaker state (0 closed, 1 half-open, 2 open) and trips.
    pub breakers: Vec<(String, String, i64, u64)>,
    /// Per (upstream, endpoint): its standing in the pool.
    pub endpoints: Vec<(String, String, i64)>,
    /// Per model: calls in flight and calls waiting for a slot.
    pub models: Vec<(String, i64, i64)>,
    /// Calls in flight, all models.
    pub gateway_in_flight: i64,
    /// Bytes held for request messages still arriving and answers not taken yet.
    pub buffered_bytes: i64,
    /// The current policy revision.
    pub policy_revision: i64,
    /// 1 when ready, 0 while draining.
    pub ready: i64,
}

/// Reads [`RuntimeState`] at scrape time.
pub type RuntimeSource = Box<dyn Fn() -> RuntimeState + Send + Sync>;

/// Every metric Keel records.
pub struct Metrics {
    registry: Registry,
    runtime: Arc<OnceLock<RuntimeSource>>,
    /// `grpc_server_started_total`.
    pub server_started: Family<ServerLabels, Counter>,
    /// `grpc_server_handled_total`.
    pub server_handled: Family<ServerCodeLabels, Counter>,
    /// `grpc_server_handling_seconds`.
    pub server_handling: Family<ServerLabels, Histogram>,
    /// `grpc_client_started_total`.
    pub client_started: Family<ClientLabels, Counter>,
    /// `grpc_client_handled_total`.
    pub client_handled: Family<ClientCodeLabels, Counter>,
    /// `grpc_client_handling_seconds`.
    pub client_handling: Family<ClientLabels, Histogram>,
    /// `keel_requests_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `keel_request_duration_seconds`.
    pub request_duration: Family<ModelLabels, Histogram>,
    /// `keel_attempts_total`.
    pub attempts: Family<ModelUpstreamLabels, Counter>,
    /// `keel_retries_total`.
    pub retries: Family<RetryLabels, Counter>,
    /// `keel_hedges_total`.
    pub hedges: Family<ModelUpstreamLabels, Counter>,
    /// `keel_retry_budget_exhausted_total`.
    pub budget_exhausted: Family<UpstreamLabels, Counter>,
    /// `keel_shed_total`.
    pub shed: Family<ModelLabels, Counter>,
    /// `keel_degraded_total`.
    pub degraded: Family<DegradedLabels, Counter>,
    /// `keel_slow_requests_total`.
    pub slow: Family<ModelLabels, Counter>,
    /// `keel_policy_reloads_total`.
    pub policy_reloads: Family<ReloadLabels, Counter>,
    /// `keel_validation_rejections_total`.
    pub validation_rejections: Family<RuleLabels, Counter>,
    /// `keel_api_requests_total`.
    pub api_requests: Family<ApiLabels, Counter>,
    /// `keel_tenant_requests_total`.
    pub tenant_requests: Family<TenantCodeLabels, Counter>,
    /// `keel_auth_failures_total`.
    pub auth_failures: Family<AuthFailureLabels, Counter>,
    /// `keel_connections_refused_total`.
    pub connections_refused: Family<ListenerLabels, Counter>,
    /// `keel_tls_handshake_failures_total`.
    pub tls_handshake_failures: Family<ListenerLabels, Counter>,
    /// `keel_connections_closed_total`.
    pub connections_closed: Family<ConnectionClosedLabels, Counter>,
    /// `keel_tls_reloads_total`.
    pub tls_reloads: Family<TlsReloadLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Every metric, registered. The gauges kept by the running server appear once
    /// [`Metrics::set_runtime`] says where to read them.
    pub fn new() -> Arc<Metrics> {
        let runtime: Arc<OnceLock<RuntimeSource>> = Arc::default();
        let mut registry = Registry::default();
        let hist = || Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let m = Metrics {
            server_started: Family::default(),
            server_handled: Family::default(),
            server_handling: Family::<ServerLabels, Histogram>::new_with_constructor(
                latency_histogram,
            ),
            client_started: Family::default(),
            client_handled: Family::default(),
            client_handling: Family::<ClientLabels, Histogram>::new_with_constructor(
                latency_histogram,
            ),
            requests: Family::default(),
            request_duration: hist(),
            attempts: Family::default(),
            retries: Family::default(),
            hedges: Family::default(),
            budget_exhausted: Family::default(),
            shed: Family::default(),
            degraded: Family::default(),
            slow: Family::default(),
            policy_reloads: Family::default(),
            validation_rejections: Family::default(),
            api_requests: Family::default(),
            tenant_requests: Family::default(),
            auth_failures: Family::default(),
            connections_refused: Family::default(),
            tls_handshake_failures: Family::default(),
            connections_closed: Family::default(),
            tls_reloads: Family::default(),
            registry: Registry::default(),
            runtime: runtime.clone(),
        };
        registry.register(
            "grpc_server_started",
            "RPCs started on the server",
            m.server_started.clone(),
        );
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, by code",
            m.server_handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server",
            m.server_handling.clone(),
        );
        registry.register(
            "grpc_client_started",
            "Attempts started on upstreams",
            m.client_started.clone(),
        );
        registry.register(
            "grpc_client_handled",
            "Attempts completed by upstreams, by code",
            m.client_handled.clone(),
        );
        registry.register(
            "grpc_client_handling_seconds",
            "Latency of attempts on upstreams",
            m.client_handling.clone(),
        );
        registry.register(
            "keel_requests",
            "Per-model calls answered, by tier and class (ok or the error class)",
            m.requests.clone(),
        );
        registry.register(
            "keel_request_duration_seconds",
            "Per-model call latency",
            m.request_duration.clone(),
        );
        registry.register(
            "keel_attempts",
            "Attempts made, the first included",
            m.attempts.clone(),
        );
        registry.register(
            "keel_retries",
            "Retries, by the class of the failure retried",
            m.retries.clone(),
        );
        registry.register("keel_hedges", "Hedged attempts", m.hedges.clone());
        registry.register(
            "keel_degraded",
            "Answers from the fallback ladder, by the tier that answered and the failure that led there",
            m.degraded.clone(),
        );
        registry.register(
            "keel_retry_budget_exhausted",
            "Retries refused by an exhausted retry budget",
            m.budget_exhausted.clone(),
        );
        registry.register(
            "keel_shed",
            "Calls shed because a model's slots and queue were full",
            m.shed.clone(),
        );
        registry.register(
            "keel_slow_requests",
            "Calls that succeeded slower than slow_threshold",
            m.slow.clone(),
        );
        registry.register(
            "keel_policy_reloads",
            "Policy changes, by source and result",
            m.policy_reloads.clone(),
        );
        registry.register(
            "keel_validation_rejections",
            "Requests rejected by validation, by rule",
            m.validation_rejections.clone(),
        );
        registry.register(
            "keel_api_requests",
            "Calls by API version",
            m.api_requests.clone(),
        );
        registry.register(
            "keel_tenant_requests",
            "Inference requests by tenant and status code, refusals at the edge included",
            m.tenant_requests.clone(),
        );
        registry.register(
            "keel_auth_failures",
            "Calls refused for missing, malformed or unknown API keys",
            m.auth_failures.clone(),
        );
        registry.register(
            "keel_connections_refused",
            "Connections closed as they were accepted: the listener had server.max_connections open",
            m.connections_refused.clone(),
        );
        registry.register(
            "keel_tls_handshake_failures",
            "TLS handshakes that failed or timed out (no certificate, an untrusted one, not TLS)",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "keel_connections_closed",
            "Connections Keel closed before they made a call: no HTTP/2 preface within server.handshake_timeout, or displaced at server.max_connections",
            m.connections_closed.clone(),
        );
        registry.register(
            "keel_tls_reloads",
            "Re-reads of a listener's certificate files, by result",
            m.tls_reloads.clone(),
        );
        registry.register_collector(Box::new(Runtime(runtime)));
        Arc::new(Metrics { registry, ..m })
    }

    /// Where the server's gauges are read at each scrape; only the first call counts.
    pub fn set_runtime(&self, source: RuntimeSource) {
        let _ = self.runtime.set(source);
    }

    /// Every metric in the Prometheus text format (version 0.0.4), which every Prometheus
    /// and `promtool check metrics` read.
    ///
    /// The registry writes OpenMetrics, where a counter family is named without its
    /// `_total` suffix; the classic format names it with the suffix, and has no `# EOF`.
    pub fn render(&self) -> String {
        let mut open = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut open, &self.registry);
        let lines: Vec<&str> = open.lines().collect();
        let mut out = String::with_capacity(open.len() + 256);
        for (i, line) in lines.iter().enumerate() {
            if *line == "# EOF" {
                continue;
            }
            let counter_family = |name: &str| {
                lines
                    .get(i..i + 2)
                    .into_iter()
                    .flatten()
                    .any(|l| *l == format!("# TYPE {name} counter"))
            };
            let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
                let rest = line.strip_prefix(prefix)?;
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                (counter_family(name) && !name.ends_with("_total"))
                    .then(|| format!("{prefix}{name}_total {tail}"))
            });
            match renamed {
                Some(l) => out.push_str(l.trim_end()),
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }

    /// Records one finished request: what answered it (`tier`) and how (`class`).
    pub fn observe_call(
        &self,
        model: impl Into<Name>,
        tier: &'static str,
        class: &'static str,
        took: Duration,
    ) {
        let model = model.into();
        self.requests
            .get_or_create(&RequestLabels {
                model: model.clone(),
                tier,
                class,
            })
            .inc();
        self.request_duration
            .get_or_create(&ModelLabels { model })
            .observe(took.as_secs_f64());
    }
}

/// Gauges and counters kept by the running server, read at scrape time.
struct Runtime(Arc<OnceLock<RuntimeSource>>);

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Runtime")
    }
}

#[derive(EncodeLabelSet, Debug, Clone, Hash, PartialEq, Eq)]
struct EndpointLabels {
    upstream: String,
    endpoint: String,
}

impl Collector for Runtime {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = self.0.get() else {
            return Ok(());
        };
        let state = source();
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64| {
            let g = ConstGauge::new(value);
            let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(m)
        };
        gauge(
            &mut encoder,
            "keel_policy_revision",
            "The current policy revision",
            state.policy_revision,
        )?;
        gauge(
            &mut encoder,
            "keel_ready",
            "1 when Keel is ready, 0 while it drains",
            state.ready,
        )?;
        gauge(
            &mut encoder,
            "keel_gateway_in_flight",
            "Calls in flight, all models",
            state.gateway_in_flight,
        )?;
        gauge(
            &mut encoder,
            "keel_buffered_bytes",
            "Bytes held for request messages still arriving and answers their clients have not taken, all connections",
            state.buffered_bytes,
        )?;

        let mut family = encoder.encode_descriptor(
            "keel_breaker_state",
            "Breaker of each (model, upstream): 0 closed, 1 half-open, 2 open",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (model, upstream, s, _) in &state.breakers {
            let labels = ModelUpstreamLabels {
                model: model.into(),
                upstream: upstream.into(),
            };
            ConstGauge::new(*s).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "keel_breaker_trips",
            "Times each (model, upstream) breaker opened",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (model, upstream, _, trips) in &state.breakers {
            let labels = ModelUpstreamLabels {
                model: model.into(),
                upstream: upstream.into(),
            };
            ConstCounter::new(*trips).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "keel_endpoint_state",
            "How each upstream endpoint stands: 0 serving, 1 failing its health checks, 2 ejected",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (upstream, endpoint, s) in &state.endpoints {
            let labels = EndpointLabels {
                upstream: upstream.clone(),
                endpoint: endpoint.clone(),
            };
            ConstGauge::new(*s).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "keel_in_flight",
            "Calls of each model in flight",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (model, in_flight, _) in &state.models {
            ConstGauge::new(*in_flight).encode(family.encode_family(&ModelLabels {
                model: model.into(),
            })?)?;
        }
        let mut family = encoder.encode_descriptor(
            "keel_queue_depth",
            "Calls of each model waiting for a slot",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (model, _, queued) in &state.models {
            ConstGauge::new(*queued).encode(family.encode_family(&ModelLabels {
                model: model.into(),
            })?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_the_grpc_and_keel_names() {
        let m = Metrics::new();
        m.set_runtime(Box::new(|| RuntimeState {
            breakers: vec![("simple".into(), "up".into(), 2, 3)],
            policy_revision: 4,
            ready: 1,
            ..RuntimeState::default()
        }));
        m.server_started
            .get_or_create(&ServerLabels {
                grpc_type: "unary",
                grpc_service: "inference.GRPCInferenceService".into(),
                grpc_method: "ModelInfer".into(),
            })
            .inc();
        m.observe_call("simple", "primary", "ok", Duration::from_millis(3));
        let text = m.render();
        for line in [
            "grpc_server_started_total{grpc_type=\"unary\",grpc_service=\"inference.GRPCInferenceService\",grpc_method=\"ModelInfer\"} 1",
            "keel_requests_total{model=\"simple\",tier=\"primary\",class=\"ok\"} 1",
            "keel_request_duration_seconds_count{model=\"simple\"} 1",
            "keel_policy_revision 4",
            "keel_breaker_state{model=\"simple\",upstream=\"up\"} 2",
            "keel_breaker_trips_total{model=\"simple\",upstream=\"up\"} 3",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(
            text.contains("# TYPE keel_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP keel_requests_total Per-model"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
    }
}
