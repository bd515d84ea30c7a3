//! Keel's configuration: one TOML document, parsed and validated whole into plain data.
//!
//! The same file `keel serve --config` takes and `keel validate` checks. Nothing here opens a
//! socket or knows about other modules: later layers read the validated [`Policy`].
//!
//! # Errors
//!
//! Every problem is reported with its path in the document (`upstreams.triton.endpoints[0]`),
//! and semantic checks report all problems at once rather than stopping at the first.

mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

pub use units::{format_duration, parse_duration, parse_size};

/// Where Keel listens unless told otherwise: Triton's gRPC port on loopback.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8001";

/// A validated configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    /// The author's label for this document (`"2026-11-28.1"`), carried into logs.
    pub version: Option<String>,
    /// Listener settings; they need a restart to change.
    pub server: ServerSettings,
    /// Settings for calls that say nothing themselves.
    pub defaults: Defaults,
    /// Named OIP gRPC servers Keel forwards to.
    pub upstreams: BTreeMap<String, UpstreamSpec>,
    /// Which backend answers each model. `None` serves every embedded model.
    pub models: Option<BTreeMap<String, ModelRoute>>,
}

/// Listener settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerSettings {
    /// Address of the gRPC traffic listener.
    pub listen: SocketAddr,
    /// How long in-flight calls may run after shutdown begins before they are cut.
    pub drain_timeout: Duration,
    /// Largest request or response message, in bytes; larger ones get RESOURCE_EXHAUSTED.
    pub max_message_size: usize,
}

/// Defaults for calls.
#[derive(Clone, Debug, PartialEq)]
pub struct Defaults {
    /// Deadline for a call whose client sent no `grpc-timeout`, so that no call waits forever.
    pub timeout: Duration,
}

/// A named upstream: one or more endpoints of an OIP gRPC server.
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamSpec {
    /// Endpoint URIs (`http://127.0.0.1:9001`); calls are spread over them in turn.
    pub endpoints: Vec<http::Uri>,
    /// Bound on establishing a connection, so an unreachable endpoint fails fast.
    pub connect_timeout: Duration,
}

/// Where a model's calls go.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelRoute {
    /// The backend that answers the model.
    pub backend: BackendRef,
}

/// A backend named in the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendRef {
    /// The built-in models.
    Embedded,
    /// The upstream of this name (a key of [`Policy::upstreams`]).
    Upstream(String),
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
            drain_timeout: Duration::from_secs(10),
            max_message_size: 64 << 20,
        }
    }
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            timeout: Duration::from_secs(30),
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
        let de =
            toml::Deserializer::parse(text).map_err(|e| PolicyErrors::one("", toml_message(&e)))?;
        let doc: Document = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            PolicyErrors::one(path, toml_message(e.inner()))
        })?;
        doc.validate()
    }

    /// Reads and parses a policy file; errors name the file when it cannot be read.
    pub fn load(path: &std::path::Path) -> Result<Policy, PolicyErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyErrors::one("", format!("cannot read {}: {e}", path.display())))?;
        Policy::parse(&text)
    }
}

/// toml's messages carry a source excerpt over several lines; keep the first line and the
/// line/column when there is one.
fn toml_message(e: &toml::de::Error) -> String {
    e.message().trim().to_string()
}

// The document as written. Kept private: only `Policy` leaves this module.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    policy_version: Option<String>,
    #[serde(default)]
    server: ServerDoc,
    #[serde(default)]
    defaults: DefaultsDoc,
    #[serde(default)]
    upstreams: BTreeMap<String, UpstreamDoc>,
    models: Option<BTreeMap<String, ModelDoc>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerDoc {
    listen: Option<String>,
    drain_timeout: Option<String>,
    max_message_size: Option<SizeDoc>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeDoc {
    Bytes(u64),
    Text(String),
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultsDoc {
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamDoc {
    endpoints: Vec<String>,
    connect_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelDoc {
    backend: String,
}

/// Collects problems while a document is checked, so all of them are reported together.
#[derive(Default)]
struct Problems(Vec<PolicyError>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(PolicyError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, value: Option<&str>, default: Duration) -> Duration {
        match value.map(parse_duration) {
            None => default,
            Some(Ok(d)) if d.is_zero() => {
                self.add(path, "must be greater than zero");
                default
            }
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.add(path, e);
                default
            }
        }
    }
}

impl Document {
    fn validate(self) -> Result<Policy, PolicyErrors> {
        let mut p = Problems::default();
        let defaults = Policy::default();

        if let Some(v) = &self.policy_version
            && v.trim().is_empty()
        {
            p.add("policy_version", "must not be empty when given");
        }

        let listen = match self.server.listen.as_deref().map(str::parse::<SocketAddr>) {
            None => defaults.server.listen,
            Some(Ok(a)) => a,
            Some(Err(_)) => {
                p.add(
                    "server.listen",
                    "must be an IP address and port, such as \"127.0.0.1:8001\"",
                );
                defaults.server.listen
            }
        };
        let drain_timeout = p.duration(
            "server.drain_timeout",
            self.server.drain_timeout.as_deref(),
            defaults.server.drain_timeout,
        );
        let max_message_size = match self.server.max_message_size {
            None => defaults.server.max_message_size,
            Some(SizeDoc::Bytes(n)) => usize::try_from(n).unwrap_or(usize::MAX),
            Some(SizeDoc::Text(s)) => parse_size(&s).unwrap_or_else(|e| {
                p.add("server.max_message_size", e);
                defaults.server.max_message_size
            }),
        };
        if max_message_size < 1024 {
            p.add("server.max_message_size", "must be at least 1KiB");
        }
        let timeout = p.duration(
            "defaults.timeout",
            self.defaults.timeout.as_deref(),
            defaults.defaults.timeout,
        );

        let mut upstreams = BTreeMap::new();
        for (name, doc) in self.upstreams {
            let base = format!("upstreams.{name}");
            if name == "embedded" {
                p.add(
                    &base,
                    "\"embedded\" names the built-in backend; choose another name",
                );
            }
            if doc.endpoints.is_empty() {
                p.add(format!("{base}.endpoints"), "needs at least one endpoint");
            }
            let mut endpoints = Vec::new();
            for (i, e) in doc.endpoints.iter().enumerate() {
                match parse_endpoint(e) {
                    Ok(uri) => endpoints.push(uri),
                    Err(msg) => p.add(format!("{base}.endpoints[{i}]"), msg),
                }
            }
            let connect_timeout = p.duration(
                &format!("{base}.connect_timeout"),
                doc.connect_timeout.as_deref(),
                Duration::from_secs(1),
            );
            upstreams.insert(
                name,
                UpstreamSpec {
                    endpoints,
                    connect_timeout,
                },
            );
        }

        let models = self.models.map(|models| {
            let mut out = BTreeMap::new();
            for (name, doc) in models {
                let backend = if doc.backend == "embedded" {
                    BackendRef::Embedded
                } else {
                    if !upstreams.contains_key(&doc.backend) {
                        let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
                        p.add(
                            format!("models.{name}.backend"),
                            format!(
                                "unknown backend {:?}: use \"embedded\" or an upstream name ({})",
                                doc.backend,
                                if known.is_empty() {
                                    "none defined".to_string()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        );
                    }
                    BackendRef::Upstream(doc.backend)
                };
                out.insert(name, ModelRoute { backend });
            }
            out
        });

        if !p.0.is_empty() {
            return Err(PolicyErrors(p.0));
        }
        Ok(Policy {
            version: self.policy_version,
            server: ServerSettings {
                listen,
                drain_timeout,
                max_message_size,
            },
            defaults: Defaults { timeout },
            upstreams,
            models,
        })
    }
}

/// Accepts `host:port` or `http://host:port`; TLS to upstreams is a later feature.
fn parse_endpoint(s: &str) -> Result<http::Uri, String> {
    let with_scheme = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|e| format!("{s:?} is not a valid endpoint: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{s:?}: only http:// (plaintext) endpoints are supported"
        ));
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

    fn messages(text: &str) -> Vec<String> {
        Policy::parse(text)
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn an_empty_document_is_the_embedded_default() {
        let p = Policy::parse("").unwrap();
        assert_eq!(p, Policy::default());
        assert_eq!(p.server.listen.to_string(), DEFAULT_LISTEN);
        assert!(p.models.is_none());
    }

    #[test]
    fn a_forwarding_document_parses() {
        let p = Policy::parse(
            r#"
            policy_version = "2026-11-28.1"
            [server]
            listen = "127.0.0.1:9000"
            drain_timeout = "2s"
            max_message_size = "8MiB"
            [defaults]
            timeout = "250ms"
            [upstreams.triton]
            endpoints = ["127.0.0.1:9001", "http://[::1]:9002"]
            [models.simple]
            backend = "triton"
            [models.iris]
            backend = "embedded"
            "#,
        )
        .unwrap();
        assert_eq!(p.version.as_deref(), Some("2026-11-28.1"));
        assert_eq!(p.server.drain_timeout, Duration::from_secs(2));
        assert_eq!(p.server.max_message_size, 8 << 20);
        assert_eq!(p.defaults.timeout, Duration::from_millis(250));
        let triton = &p.upstreams["triton"];
        assert_eq!(triton.endpoints[0].to_string(), "http://127.0.0.1:9001/");
        assert_eq!(triton.endpoints[1].port_u16(), Some(9002));
        let models = p.models.unwrap();
        assert_eq!(
            models["simple"].backend,
            BackendRef::Upstream("triton".into())
        );
        assert_eq!(models["iris"].backend, BackendRef::Embedded);
    }

    #[test]
    fn unknown_keys_are_named_by_their_path() {
        let errs = messages("[upstreams.a]\nendpoints = [\"127.0.0.1:1\"]\nendpoint = 3\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("upstreams.a"), "{errs:?}");
        assert!(errs[0].contains("unknown field `endpoint`"), "{errs:?}");
    }

    #[test]
    fn wrong_types_are_named_by_their_path() {
        let errs = messages("[server]\nlisten = 8001\n");
        assert!(errs[0].starts_with("server.listen: "), "{errs:?}");
    }

    #[test]
    fn every_semantic_problem_is_reported_at_once() {
        let errs = messages(
            r#"
            [server]
            listen = "localhost"
            drain_timeout = "soon"
            [upstreams.a]
            endpoints = ["127.0.0.1", "https://x:1"]
            [models.simple]
            backend = "nowhere"
            "#,
        );
        let joined = errs.join("\n");
        assert!(
            joined.contains("server.listen: must be an IP address"),
            "{joined}"
        );
        assert!(
            joined.contains("server.drain_timeout: duration"),
            "{joined}"
        );
        assert!(
            joined.contains("upstreams.a.endpoints[0]: \"127.0.0.1\" needs a port"),
            "{joined}"
        );
        assert!(
            joined.contains("upstreams.a.endpoints[1]: \"https://x:1\": only http://"),
            "{joined}"
        );
        assert!(
            joined.contains("models.simple.backend: unknown backend \"nowhere\": use \"embedded\" or an upstream name (a)"),
            "{joined}"
        );
        assert_eq!(errs.len(), 5, "{joined}");
    }

    #[test]
    fn syntax_errors_are_reported() {
        let errs = messages("[server\nlisten = 1");
        assert_eq!(errs.len(), 1);
        assert!(!errs[0].is_empty());
    }
}
