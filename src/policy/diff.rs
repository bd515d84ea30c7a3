//! `keel policy diff`: what two policies decide differently, not how their text differs.
//!
//! Each policy is first turned into its *effective view*: one line per decision, keyed by
//! a dotted path. For every model × method it holds the settings the call gets after
//! model > method > defaults resolution (`models.simple.ModelInfer.retry.max_attempts`),
//! so a change to `[defaults]` shows on every model it reaches and a model override that
//! restates a default shows nothing. Routes, ladders, caches and rollbacks are keyed by
//! model; upstreams, tenants, flags and the server's settings by name. Two views are then
//! compared key by key.
//!
//! The view is read from the policy types' own `Debug` form, so a new policy key shows in
//! the diff without this file changing.

use std::collections::BTreeMap;
use std::fmt::Debug;

use super::{METHODS, ModelPolicy, Policy};

/// One decision that differs: its path, and its value in each policy (`None`: absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Dotted path of the decision (`models.simple.ModelInfer.timeout`).
    pub path: String,
    /// Its value in the first policy.
    pub old: Option<String>,
    /// Its value in the second policy.
    pub new: Option<String>,
}

/// The effective view of `policy`: every decision it makes, by path. `models` names the
/// models it serves when the policy names none (the embedded ones).
pub fn effective(policy: &Policy, embedded: &[String]) -> BTreeMap<String, String> {
    let mut view = BTreeMap::new();
    let models: Vec<String> = match &policy.models {
        Some(models) => models.keys().cloned().collect(),
        None => embedded.to_vec(),
    };
    for model in &models {
        for method in METHODS {
            let short = method.rsplit('/').next().unwrap_or(method);
            let settings = policy.resolve(method, Some(model));
            flatten(&format!("models.{model}.{short}"), &settings, &mut view);
        }
        if let Some(m) = policy.models.as_ref().and_then(|ms| ms.get(model)) {
            // In full, so a new model key cannot be left out of the diff. The settings
            // overrides show resolved, per method, above.
            let ModelPolicy {
                routes,
                versions,
                overrides: _,
                fallback,
                cache,
                when,
                route_key,
                route_override,
                rollback,
                v1,
                adapters,
                required,
            } = m;
            let what = [
                ("routes", debug(routes)),
                ("versions", debug(versions)),
                ("fallback", debug(fallback)),
                ("cache", debug(cache)),
                ("when", debug(when)),
                ("route_key", debug(route_key)),
                ("route_override", debug(route_override)),
                ("rollback", debug(rollback)),
                ("v1", debug(v1)),
                ("adapters", debug(adapters)),
                ("required", debug(required)),
            ];
            for (key, value) in what {
                flatten_text(&format!("models.{model}.{key}"), &value, &mut view);
            }
        }
    }
    flatten("server", &policy.server, &mut view);
    for (name, u) in &policy.upstreams {
        flatten(&format!("upstreams.{name}"), u, &mut view);
    }
    for (name, t) in &policy.tenants {
        flatten(&format!("tenants.{name}"), t, &mut view);
    }
    for (name, f) in &policy.flags {
        flatten(&format!("flags.{name}"), f, &mut view);
    }
    flatten("observability", &policy.observability, &mut view);
    flatten("api.v1", &policy.api, &mut view);
    flatten("auth", &policy.auth, &mut view);
    view
}

/// The decisions that differ between two effective views, in path order.
pub fn diff(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<Change> {
    let mut paths: Vec<&String> = old.keys().chain(new.keys()).collect();
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .filter(|p| old.get(*p) != new.get(*p))
        .map(|p| Change {
            path: p.clone(),
            old: old.get(p).cloned(),
            new: new.get(p).cloned(),
        })
        .collect()
}

/// The changes as people read them: `path: old -> new`, one per line.
pub fn to_text(changes: &[Change]) -> String {
    let side = |v: &Option<String>| v.clone().unwrap_or_else(|| "(absent)".into());
    changes
        .iter()
        .map(|c| format!("{}: {} -> {}\n", c.path, side(&c.old), side(&c.new)))
        .collect()
}

/// The changes as JSON for CI: `{"changes": [{"path", "old", "new"}]}`, absent as null.
pub fn to_json(changes: &[Change]) -> String {
    let list: Vec<serde_json::Value> = changes
        .iter()
        .map(|c| serde_json::json!({"path": c.path, "old": c.old, "new": c.new}))
        .collect();
    serde_json::json!({ "equal": changes.is_empty(), "changes": list }).to_string()
}

fn debug(v: &impl Debug) -> String {
    format!("{v:#?}")
}

fn flatten(prefix: &str, v: &impl Debug, out: &mut BTreeMap<String, String>) {
    flatten_text(prefix, &debug(v), out);
}

/// Turns a pretty `Debug` form into one line per field: struct fields and map entries
/// become path segments; lists and other values stay whole, written on one line.
fn flatten_text(prefix: &str, text: &str, out: &mut BTreeMap<String, String>) {
    let lines: Vec<&str> = text.lines().collect();
    let mut path: Vec<String> = vec![prefix.to_string()];
    let mut i = 0;
    // The first line opens the value itself (`Settings {`), or is the whole value.
    if let Some(first) = lines.first() {
        let t = first.trim();
        if !t.ends_with('{') {
            out.insert(prefix.to_string(), one_line(&lines));
            return;
        }
        i = 1;
    }
    while i < lines.len() {
        let t = lines[i].trim();
        if t == "}" || t == "}," {
            path.pop();
            i += 1;
            continue;
        }
        let Some((key, rest)) = split_key(t) else {
            i += 1;
            continue;
        };
        if rest.ends_with('{') {
            path.push(key);
            i += 1;
            continue;
        }
        if rest.ends_with('[') || rest.ends_with('(') {
            // A list or a tuple value: its lines up to the matching close, on one line.
            let start = i;
            let mut depth = 0i32;
            loop {
                let l = lines[i].trim();
                depth += opens(l);
                i += 1;
                if depth <= 0 || i >= lines.len() {
                    break;
                }
            }
            let mut value = one_line(&lines[start..i]);
            value = value[value.find(':').map_or(0, |c| c + 1)..]
                .trim()
                .to_string();
            out.insert(join(&path, &key), value);
            continue;
        }
        out.insert(join(&path, &key), rest.trim_end_matches(',').to_string());
        i += 1;
    }
}

/// `key: rest` of a field line, or a map entry's `"key": rest`.
fn split_key(line: &str) -> Option<(String, &str)> {
    if let Some(quoted) = line.strip_prefix('"') {
        let end = quoted.find("\": ")?;
        return Some((quoted[..end].to_string(), &quoted[end + 3..]));
    }
    let (key, rest) = line.split_once(": ")?;
    if key.contains(' ') {
        return None;
    }
    Some((key.to_string(), rest))
}

/// How many brackets `line` opens less how many it closes (outside strings).
fn opens(line: &str) -> i32 {
    let mut depth = 0;
    let mut in_str = false;
    let mut escaped = false;
    for c in line.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_str => escaped = true,
            '"' => in_str = !in_str,
            '{' | '[' | '(' if !in_str => depth += 1,
            '}' | ']' | ')' if !in_str => depth -= 1,
            _ => {}
        }
    }
    depth
}

fn one_line(lines: &[&str]) -> String {
    let joined = lines.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
    joined
        .replace("[ ", "[")
        .replace("( ", "(")
        .replace(", ]", "]")
        .replace(", )", ")")
        .replace(", }", " }")
        .trim_end_matches(',')
        .to_string()
}

fn join(path: &[String], key: &str) -> String {
    let mut p = path.join(".");
    p.push('.');
    p.push_str(key);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(toml: &str) -> BTreeMap<String, String> {
        effective(&Policy::parse(toml).expect("valid"), &["simple".into()])
    }

    #[test]
    fn equal_policies_have_no_changes_and_restating_a_default_is_no_change() {
        let a = view("[defaults]\ntimeout = \"30s\"\n");
        let b = view("");
        let c = view("[models.simple]\nbackend = \"embedded\"\n");
        let d = view("[models.simple]\nbackend = \"embedded\"\ntimeout = \"30s\"\n");
        assert_eq!(diff(&a, &b), vec![], "30s is the default");
        assert_eq!(diff(&c, &d), vec![], "a model restating the default");
        assert!(a.len() > 50, "a decision per setting: {}", a.len());
    }

    #[test]
    fn a_default_shows_on_every_method_it_reaches_with_old_and_new() {
        let a = view("[models.simple]\nbackend = \"embedded\"\n");
        let b =
            view("[models.simple]\nbackend = \"embedded\"\n[defaults.retry]\nmax_attempts = 5\n");
        let changes = diff(&a, &b);
        let paths: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
        assert!(
            paths.contains(&"models.simple.ModelInfer.retry.max_attempts"),
            "{paths:?}"
        );
        assert!(paths.contains(&"models.simple.ModelReady.retry.max_attempts"));
        let infer = changes
            .iter()
            .find(|c| c.path == "models.simple.ModelInfer.retry.max_attempts")
            .unwrap();
        assert_eq!(infer.old.as_deref(), Some("3"));
        assert_eq!(infer.new.as_deref(), Some("5"));
        assert!(
            changes
                .iter()
                .all(|c| c.path.ends_with("retry.max_attempts")),
            "only the attempts differ: {changes:?}"
        );
    }

    #[test]
    fn a_model_only_in_one_policy_is_absent_on_the_other_side() {
        let a = view("[models.simple]\nbackend = \"embedded\"\n");
        let b = view(
            "[models.simple]\nbackend = \"embedded\"\n[models.iris]\nbackend = \"embedded\"\n",
        );
        let changes = diff(&a, &b);
        assert!(!changes.is_empty());
        assert!(
            changes
                .iter()
                .all(|c| c.path.starts_with("models.iris.") && c.old.is_none()),
            "{changes:?}"
        );
        let json: serde_json::Value = serde_json::from_str(&to_json(&changes)).unwrap();
        assert_eq!(json["equal"], false);
        assert!(json["changes"][0]["old"].is_null());
        assert!(to_text(&changes).contains("(absent) -> "));
    }

    #[test]
    fn flattening_keeps_lists_whole_and_nests_structs() {
        let mut out = BTreeMap::new();
        flatten_text(
            "x",
            "S {\n    a: 1,\n    b: [\n        One,\n        Two,\n    ],\n    c: T {\n        d: \"q\",\n    },\n    e: Some(\n        4,\n    ),\n}",
            &mut out,
        );
        assert_eq!(out["x.a"], "1");
        assert_eq!(out["x.b"], "[One, Two]");
        assert_eq!(out["x.c.d"], "\"q\"");
        assert_eq!(out["x.e"], "Some(4)");
        assert_eq!(out.len(), 4, "{out:?}");
    }
}
