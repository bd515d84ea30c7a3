//! Parses a policy document: TOML into a table, the table into a [`Policy`], checking
//! every key, type, range and cross reference, and collecting every problem.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use toml::{Table, Value};

use super::Files;
use super::reader::{Problems, Section, join};
use super::settings::Settings;
use super::{
    BackendRef, Flag, METHODS, ModelPolicy, Overrides, Policy, PolicyErrors, ServerSettings,
    UpstreamSpec, WeightedRoute, rollout,
};

/// Parses `text`; on success also returns the TOML table, for the canonical form.
pub(super) fn parse(text: &str, files: Files) -> Result<(Policy, Table), PolicyErrors> {
    let table: Table = text.parse().map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|s| {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        PolicyErrors::one("", format!("TOML syntax: {}{at}", e.message().trim()))
    })?;
    let policy = from_table(&table, files)?;
    Ok((policy, table))
}

/// Builds a policy from a parsed table.
pub(super) fn from_table(table: &Table, files: Files) -> Result<Policy, PolicyErrors> {
    let mut p = Problems::new(files);
    let mut root = Section::new("", table);

    let version = root.string(&mut p, "policy_version");
    if version.as_deref().is_some_and(|v| v.trim().is_empty()) {
        p.add("policy_version", "must not be empty when given");
    }
    let server = match root.table(&mut p, "server") {
        Some(s) => server(s, &mut p),
        None => ServerSettings::default(),
    };
    let defaults = match root.table(&mut p, "defaults") {
        Some(mut s) => {
            let o = Overrides::read(&mut s, &mut p);
            s.finish(&mut p);
            o
        }
        None => Overrides::default(),
    };
    let mut methods = BTreeMap::new();
    for (name, mut s) in root.named_tables(&mut p, "methods").unwrap_or_default() {
        if !METHODS.contains(&name.as_str()) {
            p.add(
                s.path.clone(),
                format!("unknown method; methods are: {}", METHODS.join(", ")),
            );
        }
        let o = Overrides::read(&mut s, &mut p);
        s.finish(&mut p);
        methods.insert(name, o);
    }
    let mut upstreams = BTreeMap::new();
    for (name, s) in root.named_tables(&mut p, "upstreams").unwrap_or_default() {
        if name == "embedded" {
            p.add(
                s.path.clone(),
                "\"embedded\" names the built-in backend; choose another name",
            );
        }
        upstreams.insert(name, super::upstreams::read_upstream(s, &mut p));
    }
    let mut flags = BTreeMap::new();
    for (name, value, path) in root.entries(&mut p, "flags").unwrap_or_default() {
        match value {
            Value::Boolean(b) => {
                flags.insert(name, Flag::Bool(*b));
            }
            Value::String(s) => {
                flags.insert(name, Flag::String(s.clone()));
            }
            _ => p.add(path, "a flag is true, false or a string"),
        }
    }
    let observability = match root.table(&mut p, "observability") {
        Some(mut s) => {
            let d = super::Observability::default();
            let o = super::Observability {
                success_log_sample: s
                    .number(&mut p, "success_log_sample", 0.0..=1.0)
                    .unwrap_or(d.success_log_sample),
            };
            s.finish(&mut p);
            o
        }
        None => super::Observability::default(),
    };
    let api = super::adapters::read_api(&mut root, &mut p);
    let models = root.named_tables(&mut p, "models").map(|models| {
        models
            .into_iter()
            .map(|(name, s)| (name, model(s, &upstreams, &flags, &mut p)))
            .collect::<BTreeMap<_, _>>()
    });
    let auth = super::tenants::read_auth(&mut root, &mut p, &server);
    let tenants = super::tenants::read_tenants(&mut root, &mut p, models.as_ref(), &server);
    root.finish(&mut p);

    if let Some(models) = &models {
        check_fallbacks(models, &mut p);
    }
    let policy = Policy {
        version,
        server,
        defaults,
        methods,
        upstreams,
        models,
        flags,
        observability,
        api,
        tenants,
        auth,
    };
    check_combinations(&policy, &mut p);
    p.into_result(policy)
}

fn address(
    s: &mut Section<'_>,
    p: &mut Problems,
    key: &'static str,
    default: SocketAddr,
) -> SocketAddr {
    match s.string(p, key).map(|a| a.parse::<SocketAddr>()) {
        None => default,
        Some(Ok(a)) => a,
        Some(Err(_)) => {
            p.add(
                s.at(key),
                "must be an IP address and port, such as \"127.0.0.1:8001\"",
            );
            default
        }
    }
}

fn server(mut s: Section<'_>, p: &mut Problems) -> ServerSettings {
    let d = ServerSettings::default();
    let listen = address(&mut s, p, "listen", d.listen);
    let admin_listen = address(&mut s, p, "admin_listen", d.admin_listen);
    let admin_token_env = s.string(p, "admin_token_env");
    if let Some(v) = &admin_token_env
        && (v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        p.add(
            s.at("admin_token_env"),
            "must be an environment variable name (letters, digits, _)",
        );
    }
    let tls = s
        .table(p, "tls")
        .map(|t| super::tls::read(t, "server.tls", p));
    let admin_tls = s
        .table(p, "admin_tls")
        .map(|t| super::tls::read(t, "server.admin_tls", p));
    let admin_mutual = admin_tls.as_ref().is_some_and(|t| t.mutual());
    if !admin_listen.ip().is_loopback() && admin_token_env.is_none() && !admin_mutual {
        p.add(
            s.at("admin_listen"),
            format!("{admin_listen} is not a loopback address: set server.admin_token_env so the admin API requires a token, or server.admin_tls.client_ca so it requires a client certificate"),
        );
    }
    if listen == admin_listen && listen.port() != 0 {
        p.add(s.at("admin_listen"), "must differ from server.listen");
    }
    let drain_grace = s
        .duration(p, "drain_grace", Duration::from_secs(3600))
        .unwrap_or(d.drain_grace);
    let drain_timeout = s
        .duration(p, "drain_timeout", super::MAX_DURATION)
        .unwrap_or(d.drain_timeout);
    let max_message_size = s.size(p, "max_message_size").unwrap_or(d.max_message_size);
    if !(1024..=(2 << 30)).contains(&max_message_size) {
        p.add(s.at("max_message_size"), "must be between 1KiB and 2GiB");
    }
    let audit_log = s.string(p, "audit_log").map(Into::into);
    let watch = s.boolean(p, "watch").unwrap_or(d.watch);
    let max_in_flight = s
        .count(p, "max_in_flight", 1..=1_000_000)
        .unwrap_or(d.max_in_flight);
    let interactive_reserve = s
        .number(p, "interactive_reserve", 0.0..=1.0)
        .unwrap_or(d.interactive_reserve);
    let max_metadata_size = s
        .size(p, "max_metadata_size")
        .unwrap_or(d.max_metadata_size as usize);
    if !(1024..=(16 << 20)).contains(&max_metadata_size) {
        p.add(s.at("max_metadata_size"), "must be between 1KiB and 16MiB");
    }
    let max_concurrent_streams = s
        .count(p, "max_concurrent_streams", 1..=1_000_000)
        .unwrap_or(d.max_concurrent_streams);
    let keepalive_interval = s
        .duration(p, "keepalive_interval", Duration::from_secs(86_400))
        .unwrap_or(d.keepalive_interval);
    let keepalive_timeout = s
        .duration(p, "keepalive_timeout", Duration::from_secs(3600))
        .unwrap_or(d.keepalive_timeout);
    let max_connection_age = s.duration(p, "max_connection_age", Duration::from_secs(30 * 86_400));
    let max_connections = s
        .count(p, "max_connections", 1..=1_000_000)
        .unwrap_or(d.max_connections);
    let tls_handshake_timeout = s
        .duration(p, "tls_handshake_timeout", Duration::from_secs(300))
        .unwrap_or(d.tls_handshake_timeout);
    let handshake_timeout = s
        .duration(p, "handshake_timeout", Duration::from_secs(300))
        .unwrap_or(d.handshake_timeout);
    // Each bound must let one message of the largest size arrive, or such a message could
    // never be received: unset, they grow with max_message_size.
    let max_buffered_per_connection = s
        .size(p, "max_buffered_per_connection")
        .unwrap_or(d.max_buffered_per_connection.max(max_message_size));
    let max_buffered = s
        .size(p, "max_buffered")
        .unwrap_or(d.max_buffered.max(max_buffered_per_connection));
    if max_buffered_per_connection < max_message_size {
        p.add(
            s.at("max_buffered_per_connection"),
            "must be at least server.max_message_size: one whole message must fit",
        );
    } else if max_buffered < max_buffered_per_connection {
        p.add(
            s.at("max_buffered"),
            "must be at least server.max_buffered_per_connection",
        );
    }
    let workers = s.count(p, "workers", 0..=1024).unwrap_or(d.workers);
    s.finish(p);
    ServerSettings {
        listen,
        admin_listen,
        admin_token_env,
        drain_grace,
        drain_timeout,
        max_message_size,
        audit_log,
        watch,
        max_in_flight,
        interactive_reserve,
        tls,
        admin_tls,
        max_metadata_size: u32::try_from(max_metadata_size).unwrap_or(d.max_metadata_size),
        max_concurrent_streams,
        keepalive_interval,
        keepalive_timeout,
        max_connection_age,
        max_connections,
        tls_handshake_timeout,
        handshake_timeout,
        max_buffered_per_connection,
        max_buffered,
        workers,
    }
}

fn backend_ref(
    name: &str,
    path: &str,
    upstreams: &BTreeMap<String, UpstreamSpec>,
    p: &mut Problems,
) -> BackendRef {
    if name == "embedded" {
        return BackendRef::Embedded;
    }
    if !upstreams.contains_key(name) {
        let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
        p.add(
            path,
            format!(
                "unknown backend {name:?}: use \"embedded\" or an upstream name ({})",
                if known.is_empty() {
                    "none defined".to_string()
                } else {
                    known.join(", ")
                }
            ),
        );
    }
    BackendRef::Upstream(name.to_string())
}

fn model(
    mut s: Section<'_>,
    upstreams: &BTreeMap<String, UpstreamSpec>,
    flags: &BTreeMap<String, Flag>,
    p: &mut Problems,
) -> ModelPolicy {
    let backend = s.string(p, "backend");
    let routes_path = s.at("routes");
    let routes = s.array(p, "routes");
    let mut resolve =
        |name: &str, path: &str, p: &mut Problems| backend_ref(name, path, upstreams, p);
    let routes = match (backend, routes) {
        (Some(b), None) => vec![WeightedRoute::only(resolve(&b, &s.at("backend"), p))],
        (None, Some(list)) => rollout::read_routes(list, &routes_path, flags, p, &mut resolve),
        (Some(_), Some(_)) => {
            p.add(s.path.clone(), "set either backend or routes, not both");
            vec![]
        }
        (None, None) => {
            p.add(
                s.at("backend"),
                "is required: \"embedded\", an upstream name, or routes = [...]",
            );
            vec![]
        }
    };
    let versions = s.strings(p, "versions").unwrap_or_default();
    let fallback = super::fallback::read_ladder(&mut s, p, upstreams, flags);
    let cache = super::fallback::read_cache(&mut s, p);
    let when = rollout::read_when(&mut s, p, "flag", flags);
    let route_key = s.string(p, "route_key").map(|k| k.to_ascii_lowercase());
    if let Some(k) = &route_key
        && http::HeaderName::from_bytes(k.as_bytes()).is_err()
    {
        p.add(
            s.at("route_key"),
            format!("{k:?} is not a valid metadata key"),
        );
    }
    let route_override = s.boolean(p, "route_override").unwrap_or(false);
    let rollback = rollout::read_rollback(&mut s, p, &routes);
    let v1 = super::adapters::read_v1(&mut s, p);
    let required = s.boolean(p, "required").unwrap_or(false);
    let adapters = super::adapters::read_adapters(&mut s, p);
    let overrides = Overrides::read(&mut s, p);
    s.finish(p);
    ModelPolicy {
        routes,
        versions,
        overrides,
        fallback,
        cache,
        when,
        route_key,
        route_override,
        rollback,
        v1,
        adapters,
        required,
    }
}

/// Fallbacks name models of this policy, not the model itself, and never lead back to it.
fn check_fallbacks(models: &BTreeMap<String, ModelPolicy>, p: &mut Problems) {
    for (name, m) in models {
        for (i, f) in m
            .fallback
            .iter()
            .enumerate()
            .filter_map(|(i, f)| match &f.tier {
                super::Tier::Model(model) => Some((i, model)),
                _ => None,
            })
        {
            let path = format!("{}[{i}].model", join(&join("models", name), "fallback"));
            if f == name {
                p.add(path, "a model cannot fall back to itself");
            } else if !models.contains_key(f) {
                p.add(
                    path,
                    format!("unknown model {f:?}: fallbacks must be models under [models]"),
                );
            }
        }
    }
    // Depth-first search, colouring models in progress and done: reaching a model still in
    // progress closes a cycle (each back edge is reported once), and every model is
    // explored once, so this is linear in the number of fallbacks.
    let mut state: BTreeMap<&str, Visit> = BTreeMap::new();
    for start in models.keys() {
        let mut path = Vec::new();
        visit(models, start, &mut path, &mut state, p);
    }
}

/// The models a model's ladder names.
fn fallback_models(m: &ModelPolicy) -> impl Iterator<Item = &String> {
    m.fallback.iter().filter_map(|f| match &f.tier {
        super::Tier::Model(name) => Some(name),
        _ => None,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Visit {
    InProgress,
    Done,
}

fn visit<'a>(
    models: &'a BTreeMap<String, ModelPolicy>,
    name: &'a str,
    path: &mut Vec<&'a str>,
    state: &mut BTreeMap<&'a str, Visit>,
    p: &mut Problems,
) {
    match state.get(name) {
        Some(Visit::Done) => return,
        Some(Visit::InProgress) => {
            let at = path.iter().position(|m| *m == name).unwrap_or(0);
            let mut shown = path[at..].join(" → ");
            shown.push_str(&format!(" → {name}"));
            p.add(
                join(&join("models", name), "fallback"),
                format!("fallbacks form a cycle: {shown}"),
            );
            return;
        }
        None => {}
    }
    let Some((key, model)) = models.get_key_value(name) else {
        return;
    };
    state.insert(key.as_str(), Visit::InProgress);
    path.push(key.as_str());
    for next in fallback_models(model) {
        // A self-reference is reported on its own above.
        if next != name {
            visit(models, next.as_str(), path, state, p);
        }
    }
    path.pop();
    state.insert(key.as_str(), Visit::Done);
}

/// Checks the rules that tie fields together on every combination of layers a call can
/// meet, reporting each broken rule at the most specific layer involved.
fn check_combinations(policy: &Policy, p: &mut Problems) {
    let check = |layers: &[&Overrides], path: String, p: &mut Problems| {
        let mut s = Settings::default();
        for l in layers {
            l.apply_to(&mut s);
        }
        let broken = s.broken_rules();
        for rule in &broken {
            p.add(path.clone(), rule.clone());
        }
        broken.is_empty()
    };
    if !check(&[&policy.defaults], "defaults".into(), p) {
        return;
    }
    let mut good_methods = Vec::new();
    for (name, m) in &policy.methods {
        if check(&[&policy.defaults, m], join("methods", name), p) {
            good_methods.push((name, m));
        }
    }
    for (name, model) in policy.models.iter().flatten() {
        let path = join("models", name);
        if !check(&[&policy.defaults, &model.overrides], path.clone(), p) {
            continue;
        }
        for (method, m) in &good_methods {
            check(
                &[&policy.defaults, m, &model.overrides],
                format!("{path} (with {})", join("methods", method)),
                p,
            );
        }
    }
}

#[cfg(test)]
mod tests;
