//! The append-only audit log of the policy: one JSON object per line, for every accepted
//! and every rejected change, and every read through the admin API.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use super::Change;

/// Whether a change was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Swapped in as a new revision.
    Accepted,
    /// Refused; the old snapshot keeps serving.
    Rejected,
    /// Not a change: an admin caller read the policy, its history, or checked a document.
    Read,
}

/// One line of the audit log.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AuditEntry {
    /// RFC 3339 UTC time.
    pub time: String,
    /// Accepted or rejected.
    pub outcome: Outcome,
    /// The new revision (accepted) or the revision that kept serving (rejected).
    pub revision: u64,
    /// Hash of the document, when it parsed.
    pub hash: Option<String>,
    /// The author's `policy_version`, when it parsed.
    pub policy_version: Option<String>,
    /// Where the change came from (`file:/etc/keel/policy.toml`, `admin:alice`), or what
    /// was read and by whom (`get-policy:alice@127.0.0.1:50312 (loopback)`).
    pub source: String,
    /// Why it was rejected, each with its path.
    pub reasons: Vec<String>,
    /// What changed, for accepted changes.
    pub changes: Option<Change>,
}

/// Where audit entries go. Writing never fails a policy change: a write error is logged.
pub struct AuditLog {
    path: Option<PathBuf>,
    file: Mutex<Option<File>>,
}

impl AuditLog {
    /// Appends to `path`; when it cannot be opened, warns and keeps no file log.
    pub fn open(path: Option<&Path>) -> AuditLog {
        let file = path.and_then(|p| {
            match OpenOptions::new().create(true).append(true).open(p) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "audit log disabled: cannot open it for appending");
                    None
                }
            }
        });
        AuditLog {
            path: file.as_ref().and(path.map(Path::to_path_buf)),
            file: Mutex::new(file),
        }
    }

    /// No file; entries go to the log only.
    pub fn disabled() -> AuditLog {
        AuditLog {
            path: None,
            file: Mutex::new(None),
        }
    }

    /// The file entries are appended to, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Records an entry in the file (if any) and as a log event.
    pub fn record(&self, entry: &AuditEntry) {
        match entry.outcome {
            Outcome::Accepted => tracing::info!(
                revision = entry.revision,
                hash = entry.hash.as_deref().unwrap_or(""),
                policy_version = entry.policy_version.as_deref().unwrap_or(""),
                source = %entry.source,
                changes = %entry.changes.as_ref().map(ToString::to_string).unwrap_or_default(),
                "policy accepted"
            ),
            Outcome::Rejected => tracing::warn!(
                revision = entry.revision,
                source = %entry.source,
                reasons = %entry.reasons.join("; "),
                "policy rejected"
            ),
            Outcome::Read => tracing::info!(
                revision = entry.revision,
                source = %entry.source,
                "policy read"
            ),
        }
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = file.as_mut() {
            let line = serde_json::to_string(entry).unwrap_or_default();
            if let Err(e) = writeln!(f, "{line}").and_then(|()| f.flush()) {
                tracing::warn!(error = %e, "cannot write the audit log");
            }
        }
    }
}

/// Formats a time as RFC 3339 UTC with milliseconds (`2026-11-28T12:00:00.000Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_869_426_531);
        assert_eq!(rfc3339(t), "2026-11-28T12:37:06.531Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn entries_are_appended_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(Some(&path));
        assert_eq!(log.path(), Some(path.as_path()));
        let entry = AuditEntry {
            time: rfc3339(SystemTime::UNIX_EPOCH),
            outcome: Outcome::Rejected,
            revision: 3,
            hash: None,
            policy_version: None,
            source: "admin:alice".into(),
            reasons: vec!["models.x.backend: is required".into()],
            changes: None,
        };
        log.record(&entry);
        log.record(&entry);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["outcome"], "rejected");
        assert_eq!(lines[0]["reasons"][0], "models.x.backend: is required");
    }

    #[test]
    fn an_unwritable_path_disables_the_file_log() {
        let log = AuditLog::open(Some(Path::new("/nonexistent-dir/audit.jsonl")));
        assert_eq!(log.path(), None);
    }
}
