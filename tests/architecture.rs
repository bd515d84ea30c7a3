//! The dependency rules of docs/architecture.md ("Dependency direction"), checked: every
//! `src/**/*.rs` is read as text, and each path into the crate it names (`crate::x`,
//! `keel::x`, or `super::` climbing out to the crate root) is held against the rules of the
//! top-level module the file belongs to.
//!
//! Rules are per top-level module, so a file that moves inside its module (or a module that
//! gains a folder) keeps its rules. Test code (`tests.rs`, `*_tests.rs`, `test_support.rs`
//! and everything after a `#[cfg(test)] mod … {`) is not checked: the rules are about what
//! the shipped code depends on, and a test may build its input the way the edge does.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// A rule: `module`'s code may not use the top-level modules in `forbidden`, or may use only
/// those in `only`.
struct Rule {
    module: &'static str,
    allowed: Allowed,
    why: &'static str,
}

enum Allowed {
    Only(&'static [&'static str]),
    Not(&'static [&'static str]),
}

/// The rules, as docs/architecture.md states them.
const RULES: &[Rule] = &[
    Rule {
        module: "grpc_code",
        allowed: Allowed::Only(&[]),
        why: "the leaf every module may share",
    },
    Rule {
        module: "headers",
        allowed: Allowed::Only(&[]),
        why: "header names both sides share, a leaf",
    },
    Rule {
        module: "model",
        allowed: Allowed::Only(&["grpc_code"]),
        why: "Keel's domain vocabulary, free of protobuf and of policy",
    },
    Rule {
        module: "observe",
        allowed: Allowed::Only(&["grpc_code"]),
        why: "logs, metrics and traces are told what happened, by everyone",
    },
    Rule {
        module: "policy",
        allowed: Allowed::Only(&["grpc_code", "model"]),
        why: "plain data; it names the domain's types (a version adapter casts to a DataType)",
    },
    Rule {
        module: "resilience",
        allowed: Allowed::Not(&["pb", "model", "api", "dispatch", "route"]),
        why: "the layers know nothing of protos, models, the edge, its dispatch or the routes",
    },
    Rule {
        module: "route",
        allowed: Allowed::Not(&["api", "dispatch"]),
        why: "routes serve the dispatch, and know nothing of the edge that calls it",
    },
    Rule {
        module: "upstream",
        allowed: Allowed::Not(&["api", "call", "dispatch", "route"]),
        why: "a backend gets an Attempt, nothing of the edge, the route or the call",
    },
];

/// Only these modules touch the generated proto code (`pb`).
const PROTO: &[&str] = &["pb", "api", "upstream"];

/// Every exception to the rules, in one place: (file under `src/`, module it may use, why).
const EXCEPTIONS: &[(&str, &str, &str)] = &[
    (
        "resilience/validate.rs",
        "model",
        "ValidateLayer checks a request against its model's contract",
    ),
    (
        "server/",
        "pb",
        "the wiring registers the generated gRPC services and their reflection descriptors",
    ),
    (
        "load/",
        "pb",
        "`keel load` is a gRPC client: the messages it sends are the generated ones",
    ),
];

/// One use of a module the rules forbid.
#[derive(Debug, PartialEq)]
struct Breach {
    file: String,
    line: usize,
    module: String,
    uses: String,
}

/// The top-level module `file` (relative to `src/`) belongs to; `None` for the crate roots.
fn top(file: &str) -> Option<&str> {
    let first = file.split('/').next()?;
    match first {
        "lib.rs" | "main.rs" => None,
        f => Some(f.strip_suffix(".rs").unwrap_or(f)),
    }
}

/// How many `super::` reach the crate root from `file`'s module.
fn depth(file: &str) -> usize {
    let parts: Vec<&str> = file.split('/').collect();
    let last = parts[parts.len() - 1];
    if last == "mod.rs" {
        parts.len() - 1
    } else {
        parts.len()
    }
}

fn is_test_file(file: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file);
    name == "tests.rs"
        || name.ends_with("_tests.rs")
        || name == "test_support.rs"
        || file.contains("/tests/")
}

fn may_use(file: &str, module: &str, used: &str) -> bool {
    if used == module || used == "self" || used == "super" {
        return true;
    }
    if EXCEPTIONS
        .iter()
        .any(|(f, m, _)| *m == used && (file == *f || (f.ends_with('/') && file.starts_with(f))))
    {
        return true;
    }
    if used == "pb" && !PROTO.contains(&module) {
        return false;
    }
    RULES
        .iter()
        .filter(|r| r.module == module)
        .all(|r| match r.allowed {
            Allowed::Only(only) => only.contains(&used),
            Allowed::Not(not) => !not.contains(&used),
        })
}

/// The identifier at the start of `s`.
fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules `line` names, written in a file `depth` modules deep.
fn uses(line: &str, depth: usize) -> Vec<String> {
    let mut found = Vec::new();
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < line.len() {
        let rest = &line[i..];
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let after = if !boundary {
            None
        } else if let Some(r) = rest.strip_prefix("crate::") {
            Some(r)
        } else if let Some(r) = rest.strip_prefix("keel::") {
            Some(r)
        } else if rest.starts_with("super::") {
            let mut r = rest;
            let mut n = 0;
            while let Some(next) = r.strip_prefix("super::") {
                r = next;
                n += 1;
            }
            if n >= depth { Some(r) } else { None }
        } else {
            None
        };
        match after {
            Some(r) => {
                if let Some(group) = r.strip_prefix('{') {
                    // `crate::{a::x, b}`: the first name of each item (one line's worth).
                    let group = group.split('}').next().unwrap_or(group);
                    found.extend(
                        group
                            .split(',')
                            .map(|item| ident(item.trim()).to_string())
                            .filter(|m| !m.is_empty()),
                    );
                } else if !ident(r).is_empty() {
                    found.push(ident(r).to_string());
                }
                i = line.len() - r.len();
            }
            None => i += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    found
}

/// What `text`, the content of `file` (relative to `src/`), uses that its rules forbid.
fn check(file: &str, text: &str) -> Vec<Breach> {
    let Some(module) = top(file) else {
        return vec![];
    };
    if is_test_file(file) {
        return vec![];
    }
    let depth = depth(file);
    let mut breaches = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((n, line)) = lines.next() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]")
            && lines.peek().is_some_and(|(_, next)| {
                next.trim_start().starts_with("mod ") && next.contains('{')
            })
        {
            break;
        }
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" //").next().unwrap_or(code);
        for used in uses(code, depth) {
            if !may_use(file, module, &used) {
                breaches.push(Breach {
                    file: file.to_string(),
                    line: n + 1,
                    module: module.to_string(),
                    uses: used,
                });
            }
        }
    }
    breaches
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn why(module: &str) -> &'static str {
    RULES.iter().find(|r| r.module == module).map_or(
        "only api, upstream and pb touch generated proto code",
        |r| r.why,
    )
}

#[test]
fn every_module_keeps_to_its_dependency_rules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 50, "read the whole tree: {}", files.len());
    let mut breaches = Vec::new();
    for path in &files {
        let file = path
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        breaches.extend(check(&file, &std::fs::read_to_string(path).unwrap()));
    }
    let report: Vec<String> = breaches
        .iter()
        .map(|b| {
            format!(
                "src/{}:{}: `{}` uses `{}` ({})",
                b.file,
                b.line,
                b.module,
                b.uses,
                if b.uses == "pb" {
                    why("")
                } else {
                    why(&b.module)
                }
            )
        })
        .collect();
    assert!(
        report.is_empty(),
        "dependency rules broken (docs/architecture.md, \"Dependency direction\"):\n{}",
        report.join("\n")
    );
}

/// The check can fail: each way of naming another module is caught, and what is allowed
/// (or test code, or a comment) is not.
#[test]
fn the_check_catches_every_form_of_a_forbidden_import() {
    let caught = |file: &str, text: &str| -> Vec<String> {
        check(file, text).into_iter().map(|b| b.uses).collect()
    };
    assert_eq!(
        caught("model/tensor.rs", "use crate::pb::inference;"),
        ["pb"]
    );
    assert_eq!(
        caught("model/mod.rs", "use crate::policy::Settings;"),
        ["policy"]
    );
    assert_eq!(
        caught("observe/edge.rs", "let x = keel::route::Router::new();"),
        ["route"]
    );
    assert_eq!(
        caught("observe/edge.rs", "use super::super::call::Call;"),
        ["call"]
    );
    assert_eq!(caught("observe/mod.rs", "use super::api;"), ["api"]);
    assert_eq!(
        caught(
            "policy/mod.rs",
            "use crate::{grpc_code::name, route::check};"
        ),
        ["route"]
    );
    assert_eq!(
        caught("resilience/retry.rs", "x: crate::model::Tensor,"),
        ["model"]
    );
    assert_eq!(
        caught("upstream/grpc.rs", "use crate::call::Call;"),
        ["call"]
    );
    assert_eq!(caught("transport/serve.rs", "use crate::pb::x;"), ["pb"]);
    assert_eq!(
        caught("load/payload.rs", "use crate::pb::x;"),
        Vec::<String>::new()
    );

    let allowed = [
        ("observe/edge.rs", "use crate::grpc_code;"),
        ("observe/edge.rs", "use super::metrics::Metrics;"),
        ("policy/adapters.rs", "use crate::model::DataType;"),
        ("resilience/validate.rs", "use crate::model::check;"),
        ("api/status.rs", "use crate::pb::inference;"),
        ("model/wire.rs", "/// See [`crate::pb::wire`]."),
        ("model/wire.rs", "let a = 1; // crate::pb::wire"),
        ("model/validate/cost_tests.rs", "use crate::pb::inference;"),
        (
            "model/tensor.rs",
            "#[cfg(test)]\nmod tests {\n    use crate::pb::inference;\n}",
        ),
        ("main.rs", "use keel::pb;"),
    ];
    for (file, text) in allowed {
        assert_eq!(caught(file, text), Vec::<String>::new(), "{file}: {text}");
    }
}
