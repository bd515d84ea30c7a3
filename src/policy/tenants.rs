//! Who may call Keel: `[tenants.<name>]` (API key hashes, the models each may call, its
//! priority and fair-use limits) and `[auth]` (how refusals look).
//!
//! Keys are stored as `sha256:<64 hex digits>`, never in plain text, so a leaked policy file
//! (or a `GetPolicy` answer) does not leak a credential. No tenants means authentication is
//! off: the embedded demo needs no key.
//!
//! # Errors
//!
//! Every problem is reported at its path (`tenants.acme.api_keys[1]: ...`), and a key hash
//! given to two tenants is an error: the key would not say who is calling.

use std::collections::BTreeMap;

use super::reader::{Problems, Section};

/// The longest tenant name: it becomes a metrics label and a log field.
pub const MAX_TENANT_NAME: usize = 64;

/// One tenant.
#[derive(Clone, Debug, PartialEq)]
pub struct Tenant {
    /// SHA-256 digests of the tenant's API keys; several during a key rotation.
    pub key_hashes: Vec<[u8; 32]>,
    /// The file more of them were read from (`api_keys_file`, a Secret mounted in the pod),
    /// for tools that check the mount.
    pub key_file: Option<std::path::PathBuf>,
    /// Client certificate identities (subject CN, or the first DNS or URI SAN) that are
    /// this tenant, verified by mutual TLS on the traffic listener.
    pub identities: Vec<String>,
    /// The models the tenant may call.
    pub models: ModelAccess,
    /// Which calls are refused first when Keel sheds load.
    pub priority: Priority,
    /// Requests per second over all of the tenant's calls, so one tenant cannot take the
    /// whole gateway.
    pub rate_limit: Option<RateLimit>,
    /// Per-model rates, for a model that is expensive even within the tenant's total.
    pub model_rate_limits: BTreeMap<String, RateLimit>,
    /// Calls of the tenant in flight at once, so one tenant cannot take every slot.
    pub max_in_flight: Option<u32>,
}

/// The models a tenant may call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelAccess {
    /// Every model (`models = ["*"]`).
    All,
    /// Only these.
    Only(Vec<String>),
}

impl ModelAccess {
    /// Whether `model` may be called.
    pub fn allows(&self, model: &str) -> bool {
        match self {
            ModelAccess::All => true,
            ModelAccess::Only(list) => list.iter().any(|m| m == model),
        }
    }
}

/// A tenant's priority class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// Offline work that can wait: refused first under load.
    Batch,
    /// A person or a service is waiting for the answer.
    #[default]
    Interactive,
}

impl Priority {
    /// The policy's spelling, also a log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Batch => "batch",
            Priority::Interactive => "interactive",
        }
    }
}

/// A token bucket: `per_second` tokens a second, at most `burst` saved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests allowed at once after a quiet spell.
    pub burst: u32,
}

/// `[auth]`: how authentication refusals look.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthSettings {
    /// A model outside the caller's list answers NOT_FOUND, exactly as an unknown model
    /// does, so a tenant cannot learn which other models exist.
    pub hide_models: bool,
    /// Client certificate identities that may change the policy over the admin API
    /// (ApplyPolicy, RollbackPolicy, SetFlag) when the admin listener requires client
    /// certificates; every other caller is refused those with PERMISSION_DENIED.
    pub admin_identities: Vec<String>,
}

/// Reads `[auth]`.
pub(super) fn read_auth(
    root: &mut Section<'_>,
    p: &mut Problems,
    server: &super::ServerSettings,
) -> AuthSettings {
    let Some(mut s) = root.table(p, "auth") else {
        return AuthSettings::default();
    };
    let hide_models = s.boolean(p, "hide_models").unwrap_or(false);
    let admin_identities = s.strings(p, "admin_identities").unwrap_or_default();
    check_identities(&admin_identities, &s.at("admin_identities"), p);
    if !admin_identities.is_empty() && !server.admin_tls.as_ref().is_some_and(|t| t.mutual()) {
        p.add(
            s.at("admin_identities"),
            "needs server.admin_tls.client_ca: identities come from verified client certificates",
        );
    }
    s.finish(p);
    AuthSettings {
        hide_models,
        admin_identities,
    }
}

/// The longest identity: a certificate name (DNS names are at most 253 characters).
const MAX_IDENTITY: usize = 1024;

/// Identities are non-empty printable text, each listed once.
fn check_identities(list: &[String], path: &str, p: &mut Problems) {
    for (i, id) in list.iter().enumerate() {
        if id.is_empty()
            || id.len() > MAX_IDENTITY
            || id.chars().any(char::is_control)
            || id.trim() != id
        {
            p.add(
                format!("{path}[{i}]"),
                format!("an identity is 1 to {MAX_IDENTITY} printable characters, without surrounding spaces"),
            );
        }
        if list[..i].contains(id) {
            p.add(format!("{path}[{i}]"), format!("{id:?} is listed twice"));
        }
    }
}

/// Reads `[tenants.<name>]`; `models` are the policy's models, when it names them, so a
/// tenant's list can be checked for typos.
pub(super) fn read_tenants(
    root: &mut Section<'_>,
    p: &mut Problems,
    models: Option<&BTreeMap<String, super::ModelPolicy>>,
    server: &super::ServerSettings,
) -> BTreeMap<String, Tenant> {
    let mut tenants = BTreeMap::new();
    // Which tenant owns each key hash, to refuse a hash given twice.
    let mut owners: BTreeMap<[u8; 32], String> = BTreeMap::new();
    // Which tenant owns each identity, likewise.
    let mut identity_owners: BTreeMap<String, String> = BTreeMap::new();
    for (name, mut s) in root.named_tables(p, "tenants").unwrap_or_default() {
        if name.is_empty()
            || name.len() > MAX_TENANT_NAME
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            p.add(
                s.path.clone(),
                format!("a tenant name is 1 to {MAX_TENANT_NAME} letters, digits, _ or - (it becomes a metrics label)"),
            );
        }
        let mut key_hashes = Vec::new();
        let identities = s.strings(p, "identities");
        if let Some(list) = &identities {
            let at = s.at("identities");
            check_identities(list, &at, p);
            if !server.tls.as_ref().is_some_and(|t| t.mutual()) {
                p.add(
                    at.clone(),
                    "needs server.tls.client_ca: identities come from verified client certificates",
                );
            }
            for (i, id) in list.iter().enumerate() {
                match identity_owners.get(id) {
                    Some(other) if other != &name => p.add(
                        format!("{at}[{i}]"),
                        format!("{id:?} is also an identity of tenant {other:?}: an identity must say who is calling"),
                    ),
                    _ => {
                        identity_owners.insert(id.clone(), name.clone());
                    }
                }
            }
        }
        let identities = identities.unwrap_or_default();
        // Hashes from the policy, then from `api_keys_file` (a Secret mounted in the pod),
        // each with the path a problem is reported at.
        let listed = s.strings(p, "api_keys");
        let file = s.string(p, "api_keys_file");
        let from_file = file.as_deref().and_then(|f| {
            let at = s.at("api_keys_file");
            if !p.reads_files() {
                return Some(Vec::new());
            }
            match read_key_file(std::path::Path::new(f)) {
                Ok(lines) => Some(
                    lines
                        .into_iter()
                        .map(|(line, hash)| (format!("{at} (line {line})"), hash))
                        .collect(),
                ),
                Err(e) => {
                    p.add(at, e);
                    None
                }
            }
        });
        if listed.is_none() && file.is_none() && identities.is_empty() {
            p.add(
                s.at("api_keys"),
                "is required: a list of \"sha256:<hex>\" (keel hash-key prints one), or api_keys_file, unless the tenant has identities",
            );
        }
        if listed.as_ref().is_some_and(Vec::is_empty) && file.is_none() && identities.is_empty() {
            p.add(s.at("api_keys"), "needs at least one key");
        }
        if from_file.as_ref().is_some_and(Vec::is_empty)
            && p.reads_files()
            && listed.as_ref().is_none_or(Vec::is_empty)
            && identities.is_empty()
        {
            p.add(
                s.at("api_keys_file"),
                "holds no key hash: no one could call as this tenant",
            );
        }
        let listed = listed.unwrap_or_default().into_iter().enumerate();
        let listed = listed.map(|(i, k)| (format!("{}[{i}]", s.at("api_keys")), k));
        for (at, k) in listed.chain(from_file.unwrap_or_default()) {
            match parse_key_hash(&k) {
                Ok(h) => {
                    if let Some(other) = owners.get(&h) {
                        p.add(at, format!("this key hash is also a key of tenant {other:?}: a key must say who is calling"));
                    } else {
                        owners.insert(h, name.clone());
                        key_hashes.push(h);
                    }
                }
                Err(m) => p.add(at, m),
            }
        }
        let access = read_models(&mut s, p, models);
        let priority = match s.string(p, "priority").as_deref() {
            None | Some("interactive") => Priority::Interactive,
            Some("batch") => Priority::Batch,
            Some(other) => {
                p.add(
                    s.at("priority"),
                    format!("{other:?} is not a priority: use \"interactive\" or \"batch\""),
                );
                Priority::Interactive
            }
        };
        let rate_limit = s.table(p, "rate_limit").and_then(|t| rate(t, p));
        let mut model_rate_limits = BTreeMap::new();
        for (model, t) in s.named_tables(p, "model_rate_limits").unwrap_or_default() {
            let path = t.path.clone();
            if !access.allows(&model) {
                p.add(
                    path.clone(),
                    "the tenant may not call this model (it is not in models)",
                );
            }
            if let Some(r) = rate(t, p) {
                model_rate_limits.insert(model, r);
            }
        }
        let max_in_flight = s.count(p, "max_in_flight", 1..=1_000_000);
        s.finish(p);
        tenants.insert(
            name,
            Tenant {
                key_hashes,
                key_file: file.map(std::path::PathBuf::from),
                identities,
                models: access,
                priority,
                rate_limit,
                model_rate_limits,
                max_in_flight,
            },
        );
    }
    tenants
}

fn read_models(
    s: &mut Section<'_>,
    p: &mut Problems,
    known: Option<&BTreeMap<String, super::ModelPolicy>>,
) -> ModelAccess {
    let Some(list) = s.strings(p, "models") else {
        p.add(
            s.at("models"),
            "is required: the models the tenant may call, or [\"*\"] for all",
        );
        return ModelAccess::Only(Vec::new());
    };
    if list.iter().any(|m| m == "*") {
        if list.len() > 1 {
            p.add(
                s.at("models"),
                "\"*\" allows every model: list nothing else",
            );
        }
        return ModelAccess::All;
    }
    if let Some(known) = known {
        for (i, m) in list.iter().enumerate() {
            if !known.contains_key(m) {
                let names: Vec<&str> = known.keys().map(String::as_str).collect();
                p.add(
                    format!("{}[{i}]", s.at("models")),
                    format!(
                        "unknown model {m:?}: models are {}",
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                );
            }
        }
    }
    ModelAccess::Only(list)
}

fn rate(mut t: Section<'_>, p: &mut Problems) -> Option<RateLimit> {
    let per_second = t.number(p, "per_second", 0.001..=1_000_000.0);
    let burst = t.count(p, "burst", 1..=1_000_000);
    if per_second.is_none() && !t.has("per_second") {
        p.add(t.at("per_second"), "is required: requests per second");
    }
    if burst.is_none() && !t.has("burst") {
        p.add(t.at("burst"), "is required: requests allowed at once");
    }
    t.finish(p);
    Some(RateLimit {
        per_second: per_second?,
        burst: burst?,
    })
}

/// Parses `sha256:<64 hex digits>` (either case).
pub fn parse_key_hash(s: &str) -> Result<[u8; 32], String> {
    let Some(hex) = s.strip_prefix("sha256:") else {
        return Err(
            "must be \"sha256:<64 hex digits>\", the hash of the key (keel hash-key prints it), never the key itself"
                .to_string(),
        );
    };
    if hex.len() != 64 {
        return Err(format!(
            "a SHA-256 hash has 64 hex digits, this one has {}",
            hex.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => out[i] = (hi * 16 + lo) as u8,
            _ => return Err("must contain only hex digits after \"sha256:\"".to_string()),
        }
    }
    Ok(out)
}

/// Largest `api_keys_file` read: a few thousand hashes.
const MAX_KEY_FILE: u64 = 1 << 20;

/// The key hashes of an `api_keys_file`, with their line numbers: one `sha256:<hex>` per
/// line; blank lines and `#` comments are skipped.
fn read_key_file(path: &std::path::Path) -> Result<Vec<(usize, String)>, String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_KEY_FILE + 1).read_to_string(&mut text))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_KEY_FILE {
        return Err(format!(
            "{} is larger than {MAX_KEY_FILE} bytes",
            path.display()
        ));
    }
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| (i, l.to_string()))
        .collect())
}

#[cfg(test)]
mod tests {
    use crate::policy::Policy;

    const KEY: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn errors(toml: &str) -> Vec<String> {
        match Policy::parse(toml) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_tenant_is_read_with_its_limits() {
        let p = Policy::parse(&format!(
            "[auth]\nhide_models = true\n[tenants.acme]\napi_keys = [\"{KEY}\"]\nmodels = [\"simple\"]\npriority = \"batch\"\nmax_in_flight = 4\nrate_limit = {{ per_second = 10, burst = 5 }}\n[tenants.acme.model_rate_limits.simple]\nper_second = 0.5\nburst = 1\n"
        ))
        .unwrap();
        let t = &p.tenants["acme"];
        assert!(p.auth.hide_models);
        assert_eq!(t.key_hashes.len(), 1);
        assert_eq!(t.key_hashes[0][0], 0x2c);
        assert!(t.models.allows("simple") && !t.models.allows("iris"));
        assert_eq!(t.priority, super::Priority::Batch);
        assert_eq!(t.max_in_flight, Some(4));
        assert_eq!(
            t.rate_limit,
            Some(super::RateLimit {
                per_second: 10.0,
                burst: 5
            })
        );
        assert_eq!(t.model_rate_limits["simple"].burst, 1);
    }

    #[test]
    fn every_problem_of_a_tenant_is_named_at_its_path() {
        let e = errors(&format!(
            "[models.simple]\nbackend = \"embedded\"\n[tenants.\"a b\"]\napi_keys = [\"plaintext\", \"sha256:12\", \"{KEY}\"]\nmodels = [\"simpel\"]\npriority = \"urgent\"\nrate_limit = {{ per_second = 0 }}\n[tenants.other]\napi_keys = [\"{KEY}\"]\nmodels = [\"*\", \"simple\"]\n"
        ));
        let joined = e.join("\n");
        for want in [
            "tenants.\"a b\": a tenant name is",
            "tenants.\"a b\".api_keys[0]: must be \"sha256:<64 hex digits>\"",
            "tenants.\"a b\".api_keys[1]: a SHA-256 hash has 64 hex digits, this one has 2",
            "tenants.\"a b\".models[0]: unknown model \"simpel\": models are simple",
            "tenants.\"a b\".priority: \"urgent\" is not a priority",
            "tenants.\"a b\".rate_limit.per_second: 0 is out of range",
            "tenants.\"a b\".rate_limit.burst: is required",
            "tenants.other.api_keys[0]: this key hash is also a key of tenant \"a b\"",
            "tenants.other.models: \"*\" allows every model",
        ] {
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
        }
    }

    #[test]
    fn key_hashes_may_come_from_a_file_checked_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("frontend");
        let other = KEY.replace("2c26", "2c27");
        std::fs::write(
            &good,
            format!("# rotated 2026-12-01\n{KEY}\n\n  {other}  \n"),
        )
        .unwrap();
        let policy = |file: &std::path::Path| {
            format!(
                "[tenants.frontend]\napi_keys_file = {:?}\nmodels = [\"*\"]\n",
                file.display().to_string()
            )
        };
        let p = Policy::parse(&policy(&good)).unwrap();
        assert_eq!(p.tenants["frontend"].key_hashes.len(), 2);

        let bad = dir.path().join("bad");
        std::fs::write(&bad, format!("{KEY}\nplaintext-key\n")).unwrap();
        let e = errors(&policy(&bad)).join("\n");
        assert!(
            e.contains(
                "tenants.frontend.api_keys_file (line 2): must be \"sha256:<64 hex digits>\""
            ),
            "{e}"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "# nothing yet\n").unwrap();
        assert!(
            errors(&policy(&empty))
                .join("\n")
                .contains("holds no key hash")
        );
        let missing = dir.path().join("missing");
        let e = errors(&policy(&missing)).join("\n");
        assert!(
            e.contains("tenants.frontend.api_keys_file: cannot read"),
            "{e}"
        );
        // A hash in the file and in another tenant's list is refused as any duplicate is.
        let both = format!(
            "{}[tenants.other]\napi_keys = [\"{KEY}\"]\nmodels = [\"*\"]\n",
            policy(&good)
        );
        assert!(errors(&both).join("\n").contains("is also a key of tenant"));
        // `keel validate --skip-files` does not read it.
        let skipped = crate::policy::document::parse(&policy(&missing), crate::policy::Files::Skip);
        assert!(skipped.is_ok());
    }

    #[test]
    fn identities_need_mutual_tls_and_each_names_one_tenant() {
        let e = errors(
            "[auth]\nadmin_identities = [\"ops\"]\n[tenants.a]\nidentities = [\"svc-a\", \" x\"]\nmodels = [\"*\"]\n[tenants.b]\nidentities = [\"svc-a\"]\nmodels = [\"*\"]\n",
        );
        let joined = e.join("\n");
        for want in [
            "auth.admin_identities: needs server.admin_tls.client_ca",
            "tenants.a.identities[1]: an identity is 1 to",
            "tenants.a.identities: needs server.tls.client_ca",
            "tenants.b.identities[0]: \"svc-a\" is also an identity of tenant \"a\"",
        ] {
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
        }
        assert!(
            !joined.contains("api_keys"),
            "identities stand in for keys:\n{joined}"
        );
    }

    #[test]
    fn a_tenant_needs_keys_and_models() {
        let e = errors("[tenants.acme]\napi_keys = []\n");
        assert_eq!(
            e,
            [
                "tenants.acme.api_keys: needs at least one key",
                "tenants.acme.models: is required: the models the tenant may call, or [\"*\"] for all",
            ]
        );
    }
}
