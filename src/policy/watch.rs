//! Reloads the policy file when it changes on disk or when Keel receives SIGHUP.
//!
//! The file's parent directory is watched rather than the file, because editors replace
//! files on save and Kubernetes updates a mounted ConfigMap by swapping a `..data` symlink.
//! Events are debounced, then the file is re-read; [`Store::reload_file`] ignores a file
//! whose content has not changed since it was last read.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

use super::{Applied, ApplyError, Source, Store};

/// How long the directory must be quiet before the file is re-read.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// Watches the policy file while it lives; dropping it stops the watch.
pub struct FileWatch {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
}

/// Whether an event at `changed` can concern the policy file `file`: the file itself, or a
/// Kubernetes-style `..data` / `..<timestamp>` entry beside it.
fn concerns(changed: &Path, file: &Path) -> bool {
    changed.file_name() == file.file_name()
        || changed
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".."))
}

/// Logs the outcome of a reload (the audit log has already recorded it).
pub fn log_reload(result: &Result<Applied, ApplyError>, source: &Source) {
    match result {
        Ok(Applied::Swapped(s, _)) => {
            tracing::info!(revision = s.revision, source = %source, "policy reloaded");
        }
        Ok(Applied::Unchanged(_)) => {}
        Err(e) => {
            tracing::warn!(source = %source, error = %e, "policy reload refused; the current policy keeps serving")
        }
    }
}

/// Starts watching `file` and applying its changes to `store`.
pub fn watch_file(store: Arc<Store>, file: PathBuf) -> notify::Result<FileWatch> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let watched = file.clone();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let Ok(events) = result else {
            return;
        };
        if events
            .iter()
            .any(|e| e.paths.iter().any(|p| concerns(p, &watched)))
        {
            let source = Source::FileWatch(watched.clone());
            let result = store.reload_file(&watched, source.clone());
            log_reload(&result, &source);
        }
    })?;
    debouncer.watch(&dir, RecursiveMode::NonRecursive)?;
    tracing::info!(file = %file.display(), "watching the policy file for changes");
    Ok(FileWatch {
        _debouncer: debouncer,
    })
}

/// Re-reads `file` into `store` on every SIGHUP, until the task is dropped.
#[cfg(unix)]
pub fn reload_on_sighup(
    store: Arc<Store>,
    file: PathBuf,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let source = Source::Sighup(file.clone());
            let store = store.clone();
            let file = file.clone();
            let s = source.clone();
            let result = tokio::task::spawn_blocking(move || store.reload_file(&file, s)).await;
            match result {
                Ok(result) => log_reload(&result, &source),
                Err(e) => tracing::warn!(error = %e, "SIGHUP reload task failed"),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_for_the_file_and_configmap_symlinks_concern_it() {
        let file = Path::new("/etc/keel/policy.toml");
        assert!(concerns(Path::new("/etc/keel/policy.toml"), file));
        assert!(concerns(Path::new("/etc/keel/..data"), file));
        assert!(concerns(
            Path::new("/etc/keel/..2026_11_28_12_00_00.123"),
            file
        ));
        assert!(!concerns(
            Path::new("/etc/keel/policy.toml.audit.jsonl"),
            file
        ));
        assert!(!concerns(Path::new("/etc/keel/other.toml"), file));
    }
}
