//! `[upstreams.<name>]`: where an upstream's endpoints come from (a static list or a DNS
//! name), how its connections behave, how its endpoints are checked, and when one is
//! ejected for failing real traffic.
//!
//! # Errors
//!
//! Every problem is reported at its path (`upstreams.triton.health_check.kind: ...`); an
//! upstream with both `endpoints` and `dns`, or neither, is an error.

use std::time::Duration;

use super::reader::{Problems, Section};

/// A named upstream: an OIP gRPC server reached over one or more endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamSpec {
    /// Where the endpoints come from.
    pub endpoints: Endpoints,
    /// Bound on establishing a connection, so an unreachable endpoint fails fast.
    pub connect_timeout: Duration,
    /// HTTP/2 connection settings.
    pub connection: Connection,
    /// Active checks of each endpoint; `None`: endpoints are judged by traffic alone.
    pub health_check: Option<HealthCheck>,
    /// Ejection of endpoints that fail real traffic.
    pub outlier: Outlier,
    /// How long a sequence's binding to its endpoint outlives its last call.
    pub sequence_idle_timeout: Duration,
    /// TLS to every endpoint; `None`: plaintext HTTP/2.
    pub tls: Option<UpstreamTls>,
}

/// `[upstreams.<name>.tls]`: the CA an upstream's certificates must chain to, and the
/// client certificate Keel presents when the upstream asks for one (mutual TLS). The
/// files are read when the policy loads, so a reload with rotated files reconnects with
/// them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM of the CA certificates (only these are trusted: no system roots).
    pub ca_pem: Vec<u8>,
    /// PEM of Keel's client certificate chain and its private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the endpoints' certificates must carry; by default the endpoint's host (an
    /// IP address for a DNS upstream, so set it there).
    pub server_name: Option<String>,
}

/// An upstream's endpoints.
#[derive(Clone, Debug, PartialEq)]
pub enum Endpoints {
    /// A fixed list (`http://127.0.0.1:9001`).
    Static(Vec<http::Uri>),
    /// Every address a name resolves to, re-resolved on an interval (a Kubernetes headless
    /// service): added addresses get traffic, removed ones finish their calls and get no more.
    Dns {
        /// The name to resolve.
        host: String,
        /// The port every address is reached on.
        port: u16,
        /// How often the name is resolved again.
        interval: Duration,
    },
}

/// HTTP/2 connection settings for every endpoint of an upstream.
#[derive(Clone, Debug, PartialEq)]
pub struct Connection {
    /// How often an idle connection is pinged, so a dead peer is noticed between calls.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// Calls in flight at once on one endpoint's connection; more wait (within their
    /// deadline) for a free stream.
    pub max_concurrent_streams: Option<usize>,
}

impl Default for Connection {
    fn default() -> Self {
        Connection {
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_concurrent_streams: None,
        }
    }
}

/// What an active check asks an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// OIP `ServerReady`.
    ServerReady,
    /// OIP `ModelReady` for one model (and optionally version).
    ModelReady {
        /// The model asked about.
        model: String,
        /// Its version; empty lets the server choose.
        version: String,
    },
    /// `grpc.health.v1.Health/Check` for a service name (`""`: the whole server).
    GrpcHealth {
        /// The service asked about.
        service: String,
    },
}

/// `[upstreams.<name>.health_check]`: checks of each endpoint on an interval. An endpoint
/// that fails `unhealthy_threshold` checks in a row gets no traffic until it passes
/// `healthy_threshold` in a row.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheck {
    /// What to ask.
    pub kind: CheckKind,
    /// Time between checks of one endpoint.
    pub interval: Duration,
    /// How long one check may take before it counts as failed.
    pub timeout: Duration,
    /// Failed checks in a row that make an endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that make an unhealthy endpoint healthy again (and, with
    /// `outlier.uneject_on_health_check`, end an ejection early).
    pub healthy_threshold: u32,
}

/// `[upstreams.<name>.outlier]`: ejection of an endpoint whose real calls keep failing
/// (transient, overloaded, timed out, refused, server bugs; never client errors).
#[derive(Clone, Debug, PartialEq)]
pub struct Outlier {
    /// Whether endpoints are ejected at all.
    pub enabled: bool,
    /// Failures in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th lasts n times as long.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
    /// The most of a pool ejected at once, in percent (at least one endpoint may always be
    /// ejected), so a bad threshold cannot empty the pool.
    pub max_ejection_percent: u32,
    /// Whether `healthy_threshold` active checks passed in a row, all begun after the
    /// ejection, end it early (Envoy's `successful_active_health_check_uneject_host`):
    /// a restarted endpoint is back in seconds, not after `base_ejection × n`.
    pub uneject_on_health_check: bool,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            enabled: true,
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
            uneject_on_health_check: true,
        }
    }
}

impl Outlier {
    /// How many of `pool` endpoints may be ejected at once.
    pub fn max_ejected(&self, pool: usize) -> usize {
        (pool * self.max_ejection_percent as usize / 100).max(1)
    }

    /// The length of the `n`-th ejection in a row (1-based).
    pub fn ejection(&self, n: u32) -> Duration {
        self.base_ejection
            .saturating_mul(n.max(1))
            .min(self.max_ejection)
    }
}

/// Reads one `[upstreams.<name>]` section.
pub(super) fn read_upstream(mut s: Section<'_>, p: &mut Problems) -> UpstreamSpec {
    let endpoints = match (s.has("endpoints"), s.has("dns")) {
        (true, true) => {
            p.add(
                s.at("dns"),
                "give either `endpoints` (a fixed list) or `dns` (a name to resolve), not both",
            );
            Endpoints::Static(Vec::new())
        }
        (false, false) => {
            p.add(
                s.at("endpoints"),
                "is required: a list of \"host:port\" (or give `dns = \"name:port\"`)",
            );
            Endpoints::Static(Vec::new())
        }
        (true, false) => {
            let tls = s.has("tls");
            Endpoints::Static(static_endpoints(&mut s, p, tls))
        }
        (false, true) => dns(&mut s, p),
    };
    if !matches!(endpoints, Endpoints::Dns { .. }) && s.has("dns_interval") {
        p.add(s.at("dns_interval"), "applies only with `dns`");
    }
    let connect_timeout = s
        .duration(p, "connect_timeout", Duration::from_secs(60))
        .unwrap_or(Duration::from_secs(1));
    let connection = connection(&mut s, p);
    let health_check = s.table(p, "health_check").map(|c| health_check(c, p));
    let outlier = s
        .table(p, "outlier")
        .map_or_else(Outlier::default, |o| outlier(o, p, health_check.is_some()));
    let tls = s.table(p, "tls").map(|t| tls(t, p));
    let sequence_idle_timeout = s
        .duration(p, "sequence_idle_timeout", Duration::from_secs(86_400))
        .unwrap_or(Duration::from_secs(60));
    s.finish(p);
    UpstreamSpec {
        endpoints,
        connect_timeout,
        connection,
        health_check,
        outlier,
        sequence_idle_timeout,
        tls,
    }
}

fn tls(mut s: Section<'_>, p: &mut Problems) -> UpstreamTls {
    let file = |s: &mut Section<'_>,
                p: &mut Problems,
                key: &'static str,
                read: fn(&std::path::Path) -> Result<(), String>| {
        let path = s.string(p, key)?;
        if !p.reads_files() {
            return Some(Vec::new());
        }
        let path = std::path::PathBuf::from(path);
        match read(&path).and_then(|()| super::tls::read_file(&path)) {
            Ok(bytes) => Some(bytes),
            Err(msg) => {
                p.add(s.at(key), msg);
                None
            }
        }
    };
    let certs: fn(&std::path::Path) -> Result<(), String> =
        |path| super::tls::read_certs(path).map(|_| ());
    let key: fn(&std::path::Path) -> Result<(), String> =
        |path| super::tls::read_key(path).map(|_| ());
    let had_ca = s.has("ca");
    let ca_pem = file(&mut s, p, "ca", certs);
    if !had_ca {
        p.add(
            s.at("ca"),
            "is required: the PEM file of the CA the upstream's certificates chain to",
        );
    }
    let (had_cert, had_key) = (s.has("cert"), s.has("key"));
    let cert = file(&mut s, p, "cert", certs);
    let key = file(&mut s, p, "key", key);
    if had_cert != had_key {
        p.add(
            s.at(if had_cert { "key" } else { "cert" }),
            "give both `cert` and `key` (a client certificate and its private key), or neither",
        );
    }
    let server_name = s.string(p, "server_name");
    s.finish(p);
    UpstreamTls {
        ca_pem: ca_pem.unwrap_or_default(),
        identity: cert.zip(key),
        server_name,
    }
}

fn static_endpoints(s: &mut Section<'_>, p: &mut Problems, tls: bool) -> Vec<http::Uri> {
    let mut endpoints = Vec::new();
    match s.strings(p, "endpoints") {
        None => {}
        Some(list) if list.is_empty() => p.add(s.at("endpoints"), "needs at least one endpoint"),
        Some(list) => {
            for (i, e) in list.iter().enumerate() {
                match parse_endpoint(e) {
                    Ok(uri) if uri.scheme_str() == Some("https") && !tls => p.add(
                        format!("{}[{i}]", s.at("endpoints")),
                        "https:// needs a [tls] table for this upstream (at least its `ca`)",
                    ),
                    Ok(uri) => endpoints.push(uri),
                    Err(msg) => p.add(format!("{}[{i}]", s.at("endpoints")), msg),
                }
            }
        }
    }
    endpoints
}

fn dns(s: &mut Section<'_>, p: &mut Problems) -> Endpoints {
    let interval = s
        .duration(p, "dns_interval", Duration::from_secs(3600))
        .unwrap_or(Duration::from_secs(5));
    let name = s.string(p, "dns").unwrap_or_default();
    let parsed = name
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
        .filter(|(host, port)| !host.is_empty() && *port != 0 && !host.contains("://"));
    match parsed {
        Some((host, port)) => Endpoints::Dns {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            interval,
        },
        None => {
            if !name.is_empty() {
                p.add(
                    s.at("dns"),
                    format!("{name:?} must be \"name:port\", such as \"triton.models.svc.cluster.local:8001\""),
                );
            }
            Endpoints::Dns {
                host: String::new(),
                port: 0,
                interval,
            }
        }
    }
}

fn connection(s: &mut Section<'_>, p: &mut Problems) -> Connection {
    let d = Connection::default();
    Connection {
        keepalive_interval: s
            .duration(p, "keepalive_interval", Duration::from_secs(3600))
            .unwrap_or(d.keepalive_interval),
        keepalive_timeout: s
            .duration(p, "keepalive_timeout", Duration::from_secs(600))
            .unwrap_or(d.keepalive_timeout),
        max_concurrent_streams: s
            .count(p, "max_concurrent_streams", 1..=1_000_000)
            .map(|n| n as usize),
    }
}

fn health_check(mut s: Section<'_>, p: &mut Problems) -> HealthCheck {
    let kind = s.string(p, "kind").unwrap_or_else(|| "server_ready".into());
    let model = s.string(p, "model");
    let version = s.string(p, "version");
    let service = s.string(p, "service");
    let kind = match kind.as_str() {
        "server_ready" => CheckKind::ServerReady,
        "model_ready" => match model {
            Some(model) if !model.is_empty() => CheckKind::ModelReady {
                model,
                version: version.unwrap_or_default(),
            },
            _ => {
                p.add(s.at("model"), "is required when kind = \"model_ready\"");
                CheckKind::ServerReady
            }
        },
        "grpc_health" => CheckKind::GrpcHealth {
            service: service.unwrap_or_default(),
        },
        other => {
            p.add(
                s.at("kind"),
                format!(
                    "unknown check {other:?}: use \"server_ready\", \"model_ready\" or \"grpc_health\""
                ),
            );
            CheckKind::ServerReady
        }
    };
    let interval = s
        .duration(p, "interval", Duration::from_secs(3600))
        .unwrap_or(Duration::from_secs(5));
    let timeout = s
        .duration(p, "timeout", Duration::from_secs(600))
        .unwrap_or(Duration::from_secs(1));
    if timeout > interval {
        p.add(
            s.at("timeout"),
            "must not be longer than the interval: checks of one endpoint would overlap",
        );
    }
    let check = HealthCheck {
        kind,
        interval,
        timeout,
        unhealthy_threshold: s.count(p, "unhealthy_threshold", 1..=100).unwrap_or(2),
        healthy_threshold: s.count(p, "healthy_threshold", 1..=100).unwrap_or(2),
    };
    s.finish(p);
    check
}

fn outlier(mut s: Section<'_>, p: &mut Problems, checked: bool) -> Outlier {
    let d = Outlier::default();
    if !checked && s.has("uneject_on_health_check") {
        p.add(
            s.at("uneject_on_health_check"),
            "applies only with a [health_check] table for this upstream",
        );
    }
    let o = Outlier {
        enabled: s.boolean(p, "enabled").unwrap_or(d.enabled),
        consecutive_failures: s
            .count(p, "consecutive_failures", 1..=1000)
            .unwrap_or(d.consecutive_failures),
        base_ejection: s
            .duration(p, "base_ejection", Duration::from_secs(3600))
            .unwrap_or(d.base_ejection),
        max_ejection: s
            .duration(p, "max_ejection", Duration::from_secs(86_400))
            .unwrap_or(d.max_ejection),
        max_ejection_percent: s
            .count(p, "max_ejection_percent", 0..=100)
            .unwrap_or(d.max_ejection_percent),
        uneject_on_health_check: s
            .boolean(p, "uneject_on_health_check")
            .unwrap_or(d.uneject_on_health_check),
    };
    if o.max_ejection < o.base_ejection {
        p.add(
            s.at("max_ejection"),
            "must not be shorter than base_ejection",
        );
    }
    s.finish(p);
    o
}

/// Accepts `host:port`, `http://host:port` or `https://host:port` (the scheme is a hint:
/// TLS is on exactly when the upstream has a `[tls]` table, checked by the caller).
fn parse_endpoint(s: &str) -> Result<http::Uri, String> {
    let with_scheme = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|e| format!("{s:?} is not a valid endpoint: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{s:?}: use http:// or https:// (or no scheme)"));
    }
    if uri.port_u16().is_none() {
        return Err(format!("{s:?} needs a port, such as \"127.0.0.1:8001\""));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!("{s:?} must not have a path"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejections_grow_linearly_up_to_the_cap() {
        let o = Outlier {
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            ..Outlier::default()
        };
        assert_eq!(o.ejection(1), Duration::from_secs(10));
        assert_eq!(o.ejection(2), Duration::from_secs(20));
        assert_eq!(o.ejection(3), Duration::from_secs(25));
    }

    #[test]
    fn a_passing_check_ends_an_ejection_unless_switched_off() {
        let upstream = |extra: &str| {
            crate::policy::Policy::parse(&format!(
                "[upstreams.up]\nendpoints = [\"127.0.0.1:9001\"]\n{extra}"
            ))
            .map(|p| p.upstreams["up"].outlier.uneject_on_health_check)
            .map_err(|e| e.to_string())
        };
        assert_eq!(upstream(""), Ok(true), "on by default");
        assert_eq!(
            upstream(
                "[upstreams.up.health_check]\n[upstreams.up.outlier]\nuneject_on_health_check = false\n"
            ),
            Ok(false)
        );
        let e = upstream("[upstreams.up.outlier]\nuneject_on_health_check = false\n").unwrap_err();
        assert!(
            e.contains("upstreams.up.outlier.uneject_on_health_check")
                && e.contains("only with a [health_check]"),
            "{e}"
        );
        let e = upstream(
            "[upstreams.up.health_check]\n[upstreams.up.outlier]\nuneject_on_health_check = 1\n",
        )
        .unwrap_err();
        assert!(
            e.contains("upstreams.up.outlier.uneject_on_health_check"),
            "{e}"
        );
    }

    #[test]
    fn at_least_one_endpoint_may_be_ejected() {
        let o = Outlier {
            max_ejection_percent: 50,
            ..Outlier::default()
        };
        assert_eq!(o.max_ejected(1), 1);
        assert_eq!(o.max_ejected(4), 2);
        assert_eq!(o.max_ejected(5), 2);
    }
}
