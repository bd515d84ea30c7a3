//! Policy reloads: what triggers them besides the admin API (the policy file's watch,
//! SIGHUP, a failing canary's rollback), and what every reload also does (counted, the
//! certificate files re-read, a `server.workers` change warned about, the health view
//! recomputed).

use std::path::Path;
use std::sync::Arc;

use super::AbortOnDrop;
use crate::observe::Metrics;
use crate::observe::metrics::{ReloadLabels, TlsReloadLabels};
use crate::policy::watch::{self, FileWatch};
use crate::policy::{Store, TlsSettings};
use crate::route::Router;
use crate::transport::Tls;

/// The policy file followed while Keel serves; dropped, the watch and SIGHUP stop.
pub(super) struct Following {
    // Dropped in this order, as they always were.
    _sighup: Option<AbortOnDrop>,
    _watch: Option<FileWatch>,
}

/// Follows the policy file `config`, if any: re-read on SIGHUP, and on change when
/// `server.watch` is on (`watch_changes`).
pub(super) fn follow(store: &Arc<Store>, config: Option<&Path>, watch_changes: bool) -> Following {
    let _watch = match (config, watch_changes) {
        (Some(path), true) => match watch::watch_file(store.clone(), path.to_path_buf()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot watch the policy file; SIGHUP still reloads it");
                None
            }
        },
        _ => None,
    };
    let _sighup = config
        .map(|path| AbortOnDrop(watch::reload_on_sighup(store.clone(), path.to_path_buf()).ok()));
    Following { _sighup, _watch }
}

/// What every reload (file, SIGHUP, admin, rollback; accepted, refused or unchanged) also
/// does, in this order; and the startup load counted as the first accepted reload.
///
/// `tls` and `admin_tls`: the listeners' certificates, when they have TLS.
pub(super) fn on_every_reload(
    store: &Arc<Store>,
    router: &Router,
    tls: Option<Arc<Tls>>,
    admin_tls: Option<Arc<Tls>>,
) {
    let metrics = router.metrics().clone();
    {
        let metrics = metrics.clone();
        store.listen(Box::new(move |source, result| {
            metrics
                .policy_reloads
                .get_or_create(&ReloadLabels { source, result })
                .inc();
        }));
    }
    {
        // Re-reads the certificate files the current policy names, so rotating them
        // needs no restart.
        let (weak, metrics) = (Arc::downgrade(store), metrics.clone());
        store.listen(Box::new(move |_, _| {
            let Some(store) = weak.upgrade() else {
                return;
            };
            let server = &store.current().policy.server;
            reload_tls("traffic", tls.as_deref(), server.tls.as_ref(), &metrics);
            reload_tls(
                "admin",
                admin_tls.as_deref(),
                server.admin_tls.as_ref(),
                &metrics,
            );
        }));
    }
    {
        // The workers start once: a swap that changes `server.workers` is accepted
        // (nothing else depends on it) and says when it applies.
        let (weak, started) = (Arc::downgrade(store), store.current().policy.server.workers);
        store.listen(Box::new(move |_, result| {
            let Some(store) = weak.upgrade().filter(|_| result == "accepted") else {
                return;
            };
            let workers = store.current().policy.server.workers;
            if workers != started {
                tracing::warn!(
                    workers,
                    started,
                    "server.workers changed; it applies at the next start"
                );
            }
        }));
    }
    metrics
        .policy_reloads
        .get_or_create(&ReloadLabels {
            source: "startup",
            result: "accepted",
        })
        .inc();
    // A new policy may change which models are required, or their routes: the health
    // view recomputes at once.
    let changed = router.health_changed().clone();
    store.listen(Box::new(move |_, _| changed.notify_one()));
}

/// Rolls back a canary whose analysis failed: a new revision with its weight 0.
pub(super) fn roll_back_failing_canaries(router: &Router, store: &Arc<Store>) {
    let store = store.clone();
    router.on_rollback(Box::new(move |verdict| {
        match store.roll_back_canary(&verdict.model, &verdict.route) {
            Ok(applied) => tracing::warn!(
                model = %verdict.model,
                route = %verdict.route,
                revision = applied.snapshot().revision,
                "canary rolled back: its weight is 0 in the new revision; apply policy to bring it back"
            ),
            Err(e) => tracing::error!(
                model = %verdict.model,
                route = %verdict.route,
                error = %e,
                "canary rollback refused"
            ),
        }
    }));
}

/// Re-reads one listener's certificate files; on a problem the current ones keep serving.
fn reload_tls(
    listener: &'static str,
    tls: Option<&Tls>,
    settings: Option<&TlsSettings>,
    metrics: &Metrics,
) {
    let (Some(tls), Some(settings)) = (tls, settings) else {
        return;
    };
    let result = match tls.reload(settings) {
        Ok(()) => {
            tracing::debug!(listener, "certificate files re-read");
            "accepted"
        }
        Err(e) => {
            tracing::warn!(listener, error = %e, "certificate reload refused; the current certificates keep serving");
            "rejected"
        }
    };
    metrics
        .tls_reloads
        .get_or_create(&TlsReloadLabels { listener, result })
        .inc();
}
