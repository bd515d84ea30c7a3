//! An immutable, versioned policy: what a request reads from start to end.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use toml::{Table, Value};

use super::Policy;

/// Where a snapshot came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Loaded at startup from this file, or from a document given directly (Keel's
    /// embedded default when it is empty) when `None`.
    Startup(Option<PathBuf>),
    /// The watched file changed.
    FileWatch(PathBuf),
    /// SIGHUP re-read the file.
    Sighup(PathBuf),
    /// `PolicyAdmin/ApplyPolicy` by this principal.
    Admin {
        /// Who applied it.
        principal: String,
    },
    /// `PolicyAdmin/RollbackPolicy` to an earlier revision.
    Rollback {
        /// Who rolled back.
        principal: String,
        /// The revision restored.
        to: u64,
    },
    /// `PolicyAdmin/SetFlag`.
    SetFlag {
        /// Who flipped it.
        principal: String,
        /// The flag.
        flag: String,
    },
    /// Keel took a misbehaving canary out of traffic.
    AutoRollback {
        /// The model.
        model: String,
        /// Its canary route.
        route: String,
    },
}

impl Source {
    /// A short, bounded name of the kind of source, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Startup(_) => "startup",
            Source::FileWatch(_) => "file",
            Source::Sighup(_) => "sighup",
            Source::Admin { .. } => "admin",
            Source::Rollback { .. } => "rollback",
            Source::SetFlag { .. } => "set_flag",
            Source::AutoRollback { .. } => "auto_rollback",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Startup(Some(p)) => write!(f, "startup:{}", p.display()),
            Source::Startup(None) => f.write_str("startup"),
            Source::FileWatch(p) => write!(f, "file:{}", p.display()),
            Source::Sighup(p) => write!(f, "sighup:{}", p.display()),
            Source::Admin { principal } => write!(f, "admin:{principal}"),
            Source::Rollback { principal, to } => write!(f, "rollback:{principal}:to={to}"),
            Source::SetFlag { principal, flag } => write!(f, "set-flag:{principal}:{flag}"),
            Source::AutoRollback { model, route } => write!(f, "auto-rollback:{model}:{route}"),
        }
    }
}

/// One version of the policy.
#[derive(Debug)]
pub struct Snapshot {
    /// Assigned by the store, increasing by one with every accepted change.
    pub revision: u64,
    /// SHA-256 (hex) of the canonical form: equal for documents that differ only in layout
    /// or comments.
    pub hash: String,
    /// The first 64 bits of `hash`: what seeds retry jitter and fault draws, so every
    /// replica, and every restart, with this policy draws the same for the same request.
    /// (The revision would not do: it counts changes per process.)
    pub seed: u64,
    /// Where it came from.
    pub source: Source,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// The document as given.
    pub text: String,
    /// The validated policy.
    pub policy: Policy,
    /// Every leaf key with its canonical value, for change summaries.
    pub(super) leaves: BTreeMap<String, String>,
}

impl Snapshot {
    pub(super) fn new(
        revision: u64,
        source: Source,
        text: String,
        table: &Table,
        policy: Policy,
    ) -> Snapshot {
        let hash = hash(table);
        Snapshot {
            revision,
            seed: seed_of(&hash),
            hash,
            source,
            loaded_at: SystemTime::now(),
            text,
            policy,
            leaves: leaves(table),
        }
    }

    /// The author's `policy_version`.
    pub fn version(&self) -> Option<&str> {
        self.policy.version.as_deref()
    }

    /// What changes from `self` to `next`.
    pub fn changes_to(&self, next: &Snapshot) -> Change {
        Change::between(&self.leaves, &next.leaves)
    }
}

/// A summary of what changed between two documents, by key path.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    /// Keys only in the new document.
    pub added: Vec<String>,
    /// Keys only in the old document.
    pub removed: Vec<String>,
    /// Keys whose value differs.
    pub changed: Vec<String>,
}

impl Change {
    pub(super) fn between(
        old: &BTreeMap<String, String>,
        new: &BTreeMap<String, String>,
    ) -> Change {
        let mut c = Change::default();
        for (k, v) in new {
            match old.get(k) {
                None => c.added.push(k.clone()),
                Some(o) if o != v => c.changed.push(k.clone()),
                Some(_) => {}
            }
        }
        c.removed = old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect();
        c
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no changes");
        }
        let mut parts = Vec::new();
        for (sign, keys) in [
            ("+", &self.added),
            ("-", &self.removed),
            ("~", &self.changed),
        ] {
            parts.extend(keys.iter().map(|k| format!("{sign}{k}")));
        }
        f.write_str(&parts.join(" "))
    }
}

/// The first 16 hex digits of a policy hash as a number.
fn seed_of(hash: &str) -> u64 {
    hash.get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_default()
}

/// SHA-256 of the canonical form of a document.
pub(super) fn hash(table: &Table) -> String {
    let mut canonical = String::new();
    write_canonical(&Value::Table(table.clone()), &mut canonical);
    let digest = Sha256::digest(canonical.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A deterministic rendering: keys sorted, one spelling per value, no layout or comments.
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => out.push_str(&format!("{s:?}")),
        Value::Integer(i) => out.push_str(&i.to_string()),
        Value::Float(x) => out.push_str(&format!("{x:?}")),
        Value::Boolean(b) => out.push_str(&b.to_string()),
        Value::Datetime(d) => out.push_str(&d.to_string()),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        Value::Table(t) => {
            let mut keys: Vec<&String> = t.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&format!("{k:?}="));
                write_canonical(&t[k], out);
            }
            out.push('}');
        }
    }
}

/// Every leaf (a non-table value) by its dotted path.
fn leaves(table: &Table) -> BTreeMap<String, String> {
    fn walk(prefix: &str, t: &Table, out: &mut BTreeMap<String, String>) {
        for (k, v) in t {
            let path = super::reader::join(prefix, k);
            match v {
                Value::Table(inner) => walk(&path, inner, out),
                other => {
                    let mut s = String::new();
                    write_canonical(other, &mut s);
                    out.insert(path, s);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", table, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Table {
        s.parse().unwrap()
    }

    #[test]
    fn layout_and_comments_do_not_change_the_hash() {
        let a =
            t("# a comment\n[server]\nlisten = \"127.0.0.1:1\"\n[defaults]\ntimeout = \"1s\"\n");
        let b = t("defaults = { timeout = \"1s\" }\nserver.listen = \"127.0.0.1:1\"\n");
        assert_eq!(hash(&a), hash(&b));
        let c = t("defaults = { timeout = \"2s\" }\nserver.listen = \"127.0.0.1:1\"\n");
        assert_ne!(hash(&a), hash(&c));
        assert_eq!(hash(&a).len(), 64);
    }

    #[test]
    fn changes_list_added_removed_and_changed_keys() {
        let old = leaves(&t("a = 1\n[m.x]\nb = 2\nc = 3\n"));
        let new = leaves(&t("a = 1\n[m.x]\nb = 5\nd = 4\n"));
        let c = Change::between(&old, &new);
        assert_eq!(c.added, ["m.x.d"]);
        assert_eq!(c.removed, ["m.x.c"]);
        assert_eq!(c.changed, ["m.x.b"]);
        assert_eq!(c.to_string(), "+m.x.d -m.x.c ~m.x.b");
    }
}
