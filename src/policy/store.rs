//! The policy store: the current snapshot behind an `ArcSwap`, the recent history for
//! rollback, and the audit trail of every change.
//!
//! # Guarantees
//!
//! - Nothing invalid is ever swapped in: a document is parsed, validated and checked whole
//!   (including the checks the wiring adds) before the swap; on any problem the current
//!   snapshot keeps serving and the rejection is audited with every reason.
//! - A request takes one snapshot with [`Store::current`] and keeps it to its end, so a swap
//!   mid-request never mixes two policies.
//! - Changes are serialised: revisions increase by one per accepted change, and an apply
//!   with a stale `expected_revision` is refused.
//! - A document whose canonical form equals the current one makes no new revision.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use super::audit::{AuditEntry, AuditLog, Outcome, rfc3339};
use super::document;
use super::{Flag, Policy, PolicyErrors, ServerSettings, Snapshot, Source};

/// Snapshots kept for rollback, the current one included.
pub const HISTORY: usize = 16;

/// Extra checks the wiring adds (say, that embedded models exist).
pub type Check = Box<dyn Fn(&Policy) -> Result<(), PolicyErrors> + Send + Sync>;

/// Adjustments applied to every document before it is checked (command-line overrides).
pub type Adjust = Box<dyn Fn(&mut Policy) + Send + Sync>;

/// The result of a change that was not refused.
#[derive(Clone, Debug)]
pub enum Applied {
    /// A new revision is current; what changed from the one it replaced.
    Swapped(Arc<Snapshot>, super::Change),
    /// The document equals the current one; the current snapshot stays.
    Unchanged(Arc<Snapshot>),
}

impl Applied {
    /// The snapshot current after the change.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        match self {
            Applied::Swapped(s, _) | Applied::Unchanged(s) => s,
        }
    }
}

/// Why a change was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ApplyError {
    /// The document is invalid.
    #[error("invalid policy:\n{0}")]
    Invalid(PolicyErrors),
    /// It changes settings that need a restart.
    #[error("{} changed: a restart is needed to change listener settings", .0.join(", "))]
    RestartNeeded(Vec<String>),
    /// `expected_revision` is not the current revision.
    #[error("expected revision {expected} but the current revision is {current}")]
    Stale {
        /// What the caller expected.
        expected: u64,
        /// What is current.
        current: u64,
    },
    /// The revision is not in the history.
    #[error("revision {0} is not in the history (the last {HISTORY} revisions are kept)")]
    UnknownRevision(u64),
    /// The flag is not defined in the current policy.
    #[error("flag {0:?} is not defined under [flags]")]
    UnknownFlag(String),
    /// The caller may read the policy but not change it: its client certificate identity
    /// is not in `auth.admin_identities`.
    #[error("{0} may not change the policy: only the identities in auth.admin_identities may")]
    NotAnAdmin(String),
    /// The request could not be read: too large, or not a message of its type. Answered
    /// as the traffic listener answers one (`REQUEST_TOO_LARGE`, `MALFORMED_REQUEST`).
    #[error("{0}")]
    Unreadable(String),
}

/// The store.
pub struct Store {
    current: ArcSwap<Snapshot>,
    history: Mutex<VecDeque<Arc<Snapshot>>>,
    /// Serialises changes so that revisions and the history stay consistent.
    changing: Mutex<()>,
    audit: AuditLog,
    check: Check,
    adjust: Adjust,
    /// Text of the policy file when it was last read, so a file event only wins over an
    /// admin change when the file's content really changed.
    last_file_text: Mutex<Option<String>>,
    /// Told of every change's source kind and result (`accepted`, `rejected`, `unchanged`).
    listeners: Mutex<Vec<Listener>>,
}

/// Told of every change: its source kind and its result.
pub type Listener = Box<dyn Fn(&'static str, &'static str) + Send + Sync>;

impl Store {
    /// A store whose first snapshot (revision 1) is `text`, or Keel's embedded default (an
    /// empty document) when `text` is `None`.
    pub fn new(
        text: Option<String>,
        source: Source,
        audit: AuditLog,
        check: Check,
        adjust: Adjust,
    ) -> Result<Store, PolicyErrors> {
        let from_file = matches!(source, Source::Startup(Some(_)));
        let text = text.unwrap_or_default();
        let snapshot = match prepare(&text, &check, &adjust) {
            Ok((policy, table)) => Snapshot::new(1, source, text.clone(), &table, policy),
            Err(errors) => {
                audit.record(&rejection(0, &source, &errors.0));
                return Err(errors);
            }
        };
        let snapshot = Arc::new(snapshot);
        audit.record(&AuditEntry {
            time: rfc3339(snapshot.loaded_at),
            outcome: Outcome::Accepted,
            revision: 1,
            hash: Some(snapshot.hash.clone()),
            policy_version: snapshot.policy.version.clone(),
            source: snapshot.source.to_string(),
            reasons: vec![],
            changes: None,
        });
        Ok(Store {
            current: ArcSwap::new(snapshot.clone()),
            history: Mutex::new(VecDeque::from([snapshot])),
            changing: Mutex::new(()),
            audit,
            check,
            adjust,
            last_file_text: Mutex::new(from_file.then_some(text)),
            listeners: Mutex::new(Vec::new()),
        })
    }

    /// A store holding `policy`'s embedded default document, with no checks (for tests and
    /// embedding).
    pub fn with_default() -> Store {
        // An empty document is always valid.
        match Store::new(
            None,
            Source::Startup(None),
            AuditLog::disabled(),
            Box::new(|_| Ok(())),
            Box::new(|_| {}),
        ) {
            Ok(s) => s,
            Err(e) => unreachable!("the empty policy is valid: {e}"),
        }
    }

    /// The current snapshot, owned: keep it for the whole request.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The snapshots kept for rollback, oldest first.
    pub fn history(&self) -> Vec<Arc<Snapshot>> {
        self.lock_history().iter().cloned().collect()
    }

    /// Adds `listener` to those told of every change from now on (metrics, the listeners'
    /// certificates), including a re-read of a policy file that had not changed.
    pub fn listen(&self, listener: Listener) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener);
    }

    fn tell(&self, source: &Source, result: &'static str) {
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        for l in listeners.iter() {
            l(source.kind(), result);
        }
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Audits a read through the admin API: `what` was read (`get-policy`) by `principal`,
    /// while the current revision served.
    pub fn audit_read(&self, what: &str, principal: &str) {
        let current = self.current();
        self.audit.record(&AuditEntry {
            time: rfc3339(SystemTime::now()),
            outcome: Outcome::Read,
            revision: current.revision,
            hash: Some(current.hash.clone()),
            policy_version: current.policy.version.clone(),
            source: format!("{what}:{principal}"),
            reasons: vec![],
            changes: None,
        });
    }

    fn lock_history(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Snapshot>>> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `text` without applying it: the changes it would make against the current
    /// snapshot, or every problem.
    pub fn validate(&self, text: &str) -> Result<(Snapshot, super::Change), ApplyError> {
        let current = self.current();
        let (policy, table) =
            prepare(text, &self.check, &self.adjust).map_err(ApplyError::Invalid)?;
        let restart = restart_needed(&current.policy, &policy);
        if !restart.is_empty() {
            return Err(ApplyError::RestartNeeded(restart));
        }
        let candidate = Snapshot::new(
            current.revision + 1,
            Source::Admin {
                principal: "dry-run".into(),
            },
            text.to_string(),
            &table,
            policy,
        );
        let change = current.changes_to(&candidate);
        Ok((candidate, change))
    }

    /// Applies `text` from `source`; with `expected_revision`, only if that is current.
    pub fn apply(
        &self,
        text: &str,
        source: Source,
        expected_revision: Option<u64>,
    ) -> Result<Applied, ApplyError> {
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current();
        let refuse = |e: ApplyError| {
            let reasons = match &e {
                ApplyError::Invalid(errors) => errors.0.iter().map(ToString::to_string).collect(),
                other => vec![other.to_string()],
            };
            self.audit.record(&AuditEntry {
                reasons,
                ..rejection(current.revision, &source, &[])
            });
            self.tell(&source, "rejected");
            Err(e)
        };
        if let Some(expected) = expected_revision
            && expected != current.revision
        {
            return refuse(ApplyError::Stale {
                expected,
                current: current.revision,
            });
        }
        let (policy, table) = match prepare(text, &self.check, &self.adjust) {
            Ok(ok) => ok,
            Err(errors) => return refuse(ApplyError::Invalid(errors)),
        };
        let restart = restart_needed(&current.policy, &policy);
        if !restart.is_empty() {
            return refuse(ApplyError::RestartNeeded(restart));
        }
        let next = Snapshot::new(
            current.revision + 1,
            source,
            text.to_string(),
            &table,
            policy,
        );
        if next.hash == current.hash {
            tracing::debug!(revision = current.revision, source = %next.source, "policy unchanged");
            self.tell(&next.source, "unchanged");
            return Ok(Applied::Unchanged(current));
        }
        let changes = current.changes_to(&next);
        let next = Arc::new(next);
        self.current.store(next.clone());
        {
            let mut history = self.lock_history();
            history.push_back(next.clone());
            while history.len() > HISTORY {
                history.pop_front();
            }
        }
        self.audit.record(&AuditEntry {
            time: rfc3339(next.loaded_at),
            outcome: Outcome::Accepted,
            revision: next.revision,
            hash: Some(next.hash.clone()),
            policy_version: next.policy.version.clone(),
            source: next.source.to_string(),
            reasons: vec![],
            changes: Some(changes.clone()),
        });
        self.tell(&next.source, "accepted");
        Ok(Applied::Swapped(next, changes))
    }

    /// Re-reads the policy file. The file wins only if its content changed since it was
    /// last read, so an unchanged file never undoes an admin change.
    pub fn reload_file(&self, path: &Path, source: Source) -> Result<Applied, ApplyError> {
        let text = match super::read_file(path) {
            Ok(t) => t,
            Err(e) => return Err(self.refused(&source, ApplyError::Invalid(e))),
        };
        {
            let mut last = self
                .last_file_text
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.as_deref() == Some(text.as_str()) {
                // Still told: a SIGHUP re-reads the certificate files even when the policy
                // file is the same.
                self.tell(&source, "unchanged");
                return Ok(Applied::Unchanged(self.current()));
            }
            *last = Some(text.clone());
        }
        self.apply(&text, source, None)
    }

    /// Makes the document of an earlier revision current again, as a new revision.
    pub fn rollback(&self, revision: u64, principal: &str) -> Result<Applied, ApplyError> {
        let source = Source::Rollback {
            principal: principal.to_string(),
            to: revision,
        };
        let target = self
            .lock_history()
            .iter()
            .find(|s| s.revision == revision)
            .cloned();
        match target {
            Some(target) => self.apply(&target.text, source, None),
            None => Err(self.refused(&source, ApplyError::UnknownRevision(revision))),
        }
    }

    /// Audits a change the caller refused before asking the store (an admin check), and
    /// returns its error.
    pub fn refuse(&self, source: &Source, e: ApplyError) -> ApplyError {
        self.refused(source, e)
    }

    /// Audits a change refused before it reached [`Store::apply`], and returns its error.
    fn refused(&self, source: &Source, e: ApplyError) -> ApplyError {
        let reasons = match &e {
            ApplyError::Invalid(errors) => errors.0.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        };
        self.audit.record(&AuditEntry {
            reasons,
            ..rejection(self.current().revision, source, &[])
        });
        self.tell(source, "rejected");
        e
    }

    /// Sets one flag of the current document, keeping the rest of the text as written.
    pub fn set_flag(
        &self,
        name: &str,
        value: Flag,
        principal: &str,
        expected_revision: Option<u64>,
    ) -> Result<Applied, ApplyError> {
        let current = self.current();
        let source = Source::SetFlag {
            principal: principal.to_string(),
            flag: name.to_string(),
        };
        if !current.policy.flags.contains_key(name) {
            return Err(self.refused(&source, ApplyError::UnknownFlag(name.to_string())));
        }
        let item = match &value {
            Flag::Bool(b) => toml_edit::value(*b),
            Flag::String(s) => toml_edit::value(s.as_str()),
        };
        let expected = Some(expected_revision.unwrap_or(current.revision));
        self.edit(&current, source, expected, |doc| {
            doc["flags"][name] = item;
            Ok(())
        })
    }

    /// Takes the canary route `route` of `model` out of traffic: a new revision of the
    /// current document with that route's weight set to 0, audited as `auto-rollback`.
    pub fn roll_back_canary(&self, model: &str, route: &str) -> Result<Applied, ApplyError> {
        let current = self.current();
        let source = Source::AutoRollback {
            model: model.to_string(),
            route: route.to_string(),
        };
        let index = current
            .policy
            .models
            .as_ref()
            .and_then(|m| m.get(model))
            .and_then(|m| m.routes.iter().position(|r| r.name == route && r.canary));
        let Some(index) = index else {
            let path = format!("models.{model}.routes");
            let e = PolicyErrors::one(path, format!("has no canary route named {route:?}"));
            return Err(self.refused(&source, ApplyError::Invalid(e)));
        };
        self.edit(&current, source, Some(current.revision), |doc| {
            let weight = doc
                .get_mut("models")
                .and_then(|m| m.get_mut(model))
                .and_then(|m| m.get_mut("routes"))
                .and_then(|r| r.get_mut(index))
                .and_then(|r| r.get_mut("weight"))
                .ok_or_else(|| {
                    format!("models.{model}.routes[{index}].weight is not in the document")
                })?;
            *weight = toml_edit::value(0);
            Ok(())
        })
    }

    /// Applies `change` to the text of `current`, keeping the rest of it, comments included.
    fn edit(
        &self,
        current: &Snapshot,
        source: Source,
        expected_revision: Option<u64>,
        change: impl FnOnce(&mut toml_edit::DocumentMut) -> Result<(), String>,
    ) -> Result<Applied, ApplyError> {
        let mut doc: toml_edit::DocumentMut = match current.text.parse() {
            Ok(doc) => doc,
            Err(e) => {
                let e = ApplyError::Invalid(PolicyErrors::one("", format!("{e}")));
                return Err(self.refused(&source, e));
            }
        };
        if let Err(message) = change(&mut doc) {
            return Err(self.refused(&source, ApplyError::Invalid(PolicyErrors::one("", message))));
        }
        self.apply(&doc.to_string(), source, expected_revision)
    }
}

/// Parses, adjusts and checks a document.
fn prepare(
    text: &str,
    check: &Check,
    adjust: &Adjust,
) -> Result<(Policy, toml::Table), PolicyErrors> {
    let (mut policy, table) = document::parse(text, super::Files::Read)?;
    adjust(&mut policy);
    check(&policy)?;
    Ok((policy, table))
}

fn rejection(revision: u64, source: &Source, reasons: &[super::PolicyError]) -> AuditEntry {
    AuditEntry {
        time: rfc3339(SystemTime::now()),
        outcome: Outcome::Rejected,
        revision,
        hash: None,
        policy_version: None,
        source: source.to_string(),
        reasons: reasons.iter().map(ToString::to_string).collect(),
        changes: None,
    }
}

/// The listener settings that differ; they cannot change without a restart.
///
/// `server` is destructured in full, so a new setting does not build until it is sorted
/// here: compared (a restart is needed), or named as hot (read again when used).
fn restart_needed(old: &Policy, new: &Policy) -> Vec<String> {
    let ServerSettings {
        // Where Keel listens and what it speaks there.
        listen,
        admin_listen,
        admin_token_env,
        audit_log,
        watch,
        tls,
        admin_tls,
        // Limits the listeners are built with.
        max_message_size,
        max_metadata_size,
        max_in_flight,
        interactive_reserve,
        max_concurrent_streams,
        max_connections,
        max_buffered_per_connection,
        max_buffered,
        // Timers of the connections.
        keepalive_interval,
        keepalive_timeout,
        max_connection_age,
        tls_handshake_timeout,
        handshake_timeout,
        // Read when shutdown begins.
        drain_grace: _,
        drain_timeout: _,
        // Read at startup only; a change is accepted and applies at the next start.
        workers: _,
    } = &old.server;
    let b = &new.server;
    let changed = [
        ("server.listen", *listen != b.listen),
        ("server.admin_listen", *admin_listen != b.admin_listen),
        (
            "server.admin_token_env",
            *admin_token_env != b.admin_token_env,
        ),
        (
            "server.max_message_size",
            *max_message_size != b.max_message_size,
        ),
        ("server.audit_log", *audit_log != b.audit_log),
        ("server.watch", *watch != b.watch),
        ("server.max_in_flight", *max_in_flight != b.max_in_flight),
        (
            "server.interactive_reserve",
            *interactive_reserve != b.interactive_reserve,
        ),
        // Turning TLS on or off changes what the listener speaks; the files inside may
        // change (they are re-read on every reload).
        ("server.tls", tls.is_some() != b.tls.is_some()),
        (
            "server.admin_tls",
            admin_tls.is_some() != b.admin_tls.is_some(),
        ),
        (
            "server.max_metadata_size",
            *max_metadata_size != b.max_metadata_size,
        ),
        (
            "server.max_concurrent_streams",
            *max_concurrent_streams != b.max_concurrent_streams,
        ),
        (
            "server.keepalive_interval",
            *keepalive_interval != b.keepalive_interval,
        ),
        (
            "server.keepalive_timeout",
            *keepalive_timeout != b.keepalive_timeout,
        ),
        (
            "server.max_connection_age",
            *max_connection_age != b.max_connection_age,
        ),
        (
            "server.max_connections",
            *max_connections != b.max_connections,
        ),
        (
            "server.tls_handshake_timeout",
            *tls_handshake_timeout != b.tls_handshake_timeout,
        ),
        (
            "server.handshake_timeout",
            *handshake_timeout != b.handshake_timeout,
        ),
        (
            "server.max_buffered_per_connection",
            *max_buffered_per_connection != b.max_buffered_per_connection,
        ),
        ("server.max_buffered", *max_buffered != b.max_buffered),
    ];
    changed
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| key.to_string())
        .collect()
}

#[cfg(test)]
mod tests;
