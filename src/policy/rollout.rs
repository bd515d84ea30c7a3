//! How a model's traffic is split: weighted routes (canary, blue-green), the flag
//! conditions that switch routes, rungs and models on and off, and the canary analysis that
//! rolls a bad canary back.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use toml::Value;

use super::reader::{Problems, Section, join};
use super::{BackendRef, Flag};

/// One weighted route of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedRoute {
    /// Unique within the model: `name`, else the version, else the backend.
    pub name: String,
    /// Where this share of calls goes.
    pub backend: BackendRef,
    /// The model version this route sends (`model_version`); `None` passes the client's.
    pub version: Option<String>,
    /// Relative share of calls among the routes that are on (0..=100).
    pub weight: u8,
    /// The flag condition that turns the route on; `None` is always on.
    pub when: Option<When>,
    /// The route under canary analysis (at most one per model).
    pub canary: bool,
}

impl WeightedRoute {
    /// The single route of a model with `backend = "..."`.
    pub fn only(backend: BackendRef) -> WeightedRoute {
        WeightedRoute {
            name: backend.to_string(),
            backend,
            version: None,
            weight: 100,
            when: None,
            canary: false,
        }
    }

    /// Whether the route takes calls under `flags`.
    pub fn is_on(&self, flags: &BTreeMap<String, Flag>) -> bool {
        self.weight > 0 && self.when.as_ref().is_none_or(|w| w.holds(flags))
    }
}

/// A flag condition: `name` (a true flag), `!name` (a false one) or `name=value` (a
/// string flag with that value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum When {
    /// The boolean flag is true.
    On(String),
    /// The boolean flag is false.
    Off(String),
    /// The string flag has this value.
    Equals(String, String),
}

impl When {
    /// Parses a condition and checks it against the flags it names.
    pub fn parse(text: &str, flags: &BTreeMap<String, Flag>) -> Result<When, String> {
        let when = if let Some((name, value)) = text.split_once('=') {
            When::Equals(name.trim().to_string(), value.trim().to_string())
        } else if let Some(name) = text.strip_prefix('!') {
            When::Off(name.trim().to_string())
        } else {
            When::On(text.trim().to_string())
        };
        let name = when.flag();
        match (flags.get(name), &when) {
            (None, _) => Err(format!(
                "unknown flag {name:?}: define it under [flags] (conditions are \"name\", \"!name\" or \"name=value\")"
            )),
            (Some(Flag::String(_)), When::On(_) | When::Off(_)) => Err(format!(
                "flag {name:?} is a string: write \"{name}=<value>\""
            )),
            (Some(Flag::Bool(_)), When::Equals(..)) => Err(format!(
                "flag {name:?} is true or false: write \"{name}\" or \"!{name}\""
            )),
            _ => Ok(when),
        }
    }

    /// The flag it reads.
    pub fn flag(&self) -> &str {
        match self {
            When::On(f) | When::Off(f) | When::Equals(f, _) => f,
        }
    }

    /// Whether it holds under `flags` (a missing or mistyped flag never holds).
    pub fn holds(&self, flags: &BTreeMap<String, Flag>) -> bool {
        match (self, flags.get(self.flag())) {
            (When::On(_), Some(Flag::Bool(b))) => *b,
            (When::Off(_), Some(Flag::Bool(b))) => !*b,
            (When::Equals(_, v), Some(Flag::String(s))) => s == v,
            _ => false,
        }
    }
}

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            When::On(n) => f.write_str(n),
            When::Off(n) => write!(f, "!{n}"),
            When::Equals(n, v) => write!(f, "{n}={v}"),
        }
    }
}

/// When Keel takes a canary out of traffic by itself (`[models.<name>.rollback]`).
#[derive(Clone, Debug, PartialEq)]
pub struct RollbackSpec {
    /// The length of one analysis window.
    pub window: Duration,
    /// Calls each side needs in a window before it is compared.
    pub min_requests: u32,
    /// How much higher the canary's error rate may be (0.05 = five points).
    pub max_error_rate_increase: f64,
    /// How many times the baseline's p99 latency the canary's may be.
    pub max_p99_ratio: f64,
    /// Consecutive bad windows that roll the canary back.
    pub windows: u32,
}

impl Default for RollbackSpec {
    fn default() -> Self {
        RollbackSpec {
            window: Duration::from_secs(60),
            min_requests: 100,
            max_error_rate_increase: 0.05,
            max_p99_ratio: 1.5,
            windows: 3,
        }
    }
}

/// Reads a flag condition at `key`.
pub(super) fn read_when(
    s: &mut Section<'_>,
    p: &mut Problems,
    key: &'static str,
    flags: &BTreeMap<String, Flag>,
) -> Option<When> {
    let text = s.string(p, key)?;
    match When::parse(&text, flags) {
        Ok(w) => Some(w),
        Err(message) => {
            p.add(s.at(key), message);
            None
        }
    }
}

/// Reads `routes = [...]`: each route's backend, weight, version, name, flag and canary mark.
pub(super) fn read_routes(
    list: &[Value],
    path: &str,
    flags: &BTreeMap<String, Flag>,
    p: &mut Problems,
    backend_ref: &mut dyn FnMut(&str, &str, &mut Problems) -> BackendRef,
) -> Vec<WeightedRoute> {
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for (i, v) in list.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let Value::Table(t) = v else {
            p.add(
                at,
                "expected a table such as { backend = \"triton\", weight = 90 }",
            );
            continue;
        };
        let mut r = Section::new(at.clone(), t);
        let backend = r.string(p, "backend");
        let weight = r.integer(p, "weight", 0..=100);
        let version = r.string(p, "version");
        if version.as_deref().is_some_and(|v| v.trim().is_empty()) {
            p.add(join(&at, "version"), "must not be empty when given");
        }
        let name = r.string(p, "name");
        let when = read_when(&mut r, p, "flag", flags);
        let canary = r.boolean(p, "canary").unwrap_or(false);
        r.finish(p);
        let (b, w) = match (backend, weight) {
            (Some(b), Some(w)) => (b, w),
            (None, _) => {
                p.add(join(&at, "backend"), "is required");
                continue;
            }
            (_, None) => {
                p.add(join(&at, "weight"), "is required: 0..=100");
                continue;
            }
        };
        let name = name
            .or_else(|| version.clone())
            .unwrap_or_else(|| b.clone());
        if !names.insert(name.clone()) {
            p.add(
                at.clone(),
                format!(
                    "another route is also named {name:?}: give each a distinct name = \"...\""
                ),
            );
        }
        out.push(WeightedRoute {
            name,
            backend: backend_ref(&b, &join(&at, "backend"), p),
            version,
            weight: u8::try_from(w).unwrap_or(100),
            when,
            canary,
        });
    }
    if list.is_empty() {
        p.add(path, "needs at least one route");
    } else if out.len() == list.len() {
        if !out.iter().any(|r| r.is_on(flags)) {
            p.add(
                path,
                "no route is on: the weights of the routes whose flags hold sum to 0",
            );
        }
        if out.iter().filter(|r| r.canary).count() > 1 {
            p.add(path, "at most one route may be the canary");
        }
    }
    out
}

/// Reads `[models.<name>.rollback]`; it needs a canary route and a baseline.
pub(super) fn read_rollback(
    s: &mut Section<'_>,
    p: &mut Problems,
    routes: &[WeightedRoute],
) -> Option<RollbackSpec> {
    let path = s.at("rollback");
    let mut r = s.table(p, "rollback")?;
    let d = RollbackSpec::default();
    let spec = RollbackSpec {
        window: r
            .duration(p, "window", Duration::from_secs(3600))
            .unwrap_or(d.window),
        min_requests: r
            .count(p, "min_requests", 1..=1_000_000)
            .unwrap_or(d.min_requests),
        max_error_rate_increase: r
            .number(p, "max_error_rate_increase", 0.0..=1.0)
            .unwrap_or(d.max_error_rate_increase),
        max_p99_ratio: r
            .number(p, "max_p99_ratio", 1.0..=1000.0)
            .unwrap_or(d.max_p99_ratio),
        windows: r.count(p, "windows", 1..=100).unwrap_or(d.windows),
    };
    r.finish(p);
    if !routes.iter().any(|r| r.canary) || routes.iter().all(|r| r.canary) {
        p.add(
            path,
            "needs routes with one canary = true route and at least one baseline route",
        );
    }
    Some(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> BTreeMap<String, Flag> {
        BTreeMap::from([
            ("canary".to_string(), Flag::Bool(true)),
            ("color".to_string(), Flag::String("blue".into())),
        ])
    }

    #[test]
    fn conditions_read_bool_and_string_flags() {
        let f = flags();
        assert!(When::parse("canary", &f).unwrap().holds(&f));
        assert!(!When::parse("!canary", &f).unwrap().holds(&f));
        assert!(When::parse("color=blue", &f).unwrap().holds(&f));
        assert!(!When::parse("color=green", &f).unwrap().holds(&f));
        assert_eq!(
            When::parse("color = green", &f).unwrap().to_string(),
            "color=green"
        );
    }

    #[test]
    fn conditions_name_known_flags_of_the_right_kind() {
        let f = flags();
        assert!(
            When::parse("nope", &f)
                .unwrap_err()
                .contains("unknown flag \"nope\"")
        );
        assert!(
            When::parse("color", &f)
                .unwrap_err()
                .contains("write \"color=<value>\"")
        );
        assert!(
            When::parse("canary=on", &f)
                .unwrap_err()
                .contains("is true or false")
        );
    }
}
