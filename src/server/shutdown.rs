//! How Keel shuts down: readiness first, then the drain, then the cut.
//!
//! # Order
//!
//! When the shutdown future completes:
//!
//! 1. Health turns NOT_SERVING and ServerReady false ([`Health::drain`]); Keel still takes
//!    calls for `server.drain_grace`, while load balancers stop sending.
//! 2. The drain begins: both listeners stop accepting, open connections are told to send
//!    no new calls (HTTP/2 GOAWAY), health Watch streams end, and in-flight calls finish.
//! 3. Calls still running after `server.drain_timeout` are cut (UNAVAILABLE); traffic
//!    connections still open [`CUT_GRACE`] later are closed, admin ones are left behind.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::health::Health;
use crate::policy::Store;
use crate::worker;

/// How long cut calls get to deliver their UNAVAILABLE answer before `serve` returns anyway.
pub(super) const CUT_GRACE: Duration = Duration::from_secs(2);

/// Waits for `shutdown`, then steps 1 and 2: health NOT_SERVING, `drain_grace`, and
/// `began` set to the drain timeout, which both listeners and the health Watch streams
/// follow.
pub(super) async fn begin(
    shutdown: impl Future<Output = ()>,
    health: Health,
    store: Arc<Store>,
    began: watch::Sender<Option<Duration>>,
) {
    shutdown.await;
    health.drain().await;
    // Not ready, but still serving: load balancers take a moment to stop sending.
    let grace = store.current().policy.server.drain_grace;
    if !grace.is_zero() {
        tracing::info!(drain_grace = ?grace, "shutdown: readiness is NOT_SERVING; still taking calls for drain_grace");
        tokio::time::sleep(grace).await;
    }
    // Read now: drain_timeout may have changed since startup.
    let drain_timeout = store.current().policy.server.drain_timeout;
    tracing::info!(drain_timeout = ?drain_timeout, "shutdown: draining in-flight calls");
    let _ = began.send(Some(drain_timeout));
}

/// Serves traffic until it has drained: once `signal` (see [`begin`]) completes, `stop`
/// turns true and every worker stops accepting; `drained` completes when all have drained.
/// Step 3, the cut, sets `cut` when the drain timeout passes first.
pub(super) async fn drain(
    drained: impl Future<Output = ()>,
    signal: impl Future<Output = ()>,
    stop: watch::Sender<bool>,
    began: watch::Receiver<Option<Duration>>,
    cut: watch::Sender<bool>,
    exit: worker::Exit,
) {
    // The drain sequence runs here, once, whatever the number of workers; when it
    // ends, every worker stops accepting. Dropped unfinished when the workers ended on
    // their own.
    let server = async move {
        let mut drained = std::pin::pin!(drained);
        let mut signal = std::pin::pin!(signal);
        let mut signalled = false;
        loop {
            tokio::select! {
                () = &mut drained => return,
                () = &mut signal, if !signalled => {
                    signalled = true;
                    let _ = stop.send(true);
                }
            }
        }
    };
    let drain_deadline = async move {
        match shutdown_began(began).await {
            Some(drain_timeout) => tokio::time::sleep(drain_timeout).await,
            None => std::future::pending::<()>().await,
        }
    };
    // Boxed, once per serve, so it can be dropped before the workers end.
    let mut server = Box::pin(server);
    tokio::select! {
        () = &mut server => tracing::info!("shutdown: drained"),
        () = drain_deadline => {
            tracing::warn!("shutdown: drain timeout passed; cutting calls still in flight");
            // Calls still running answer UNAVAILABLE, so their connections can close.
            let _ = cut.send(true);
            if tokio::time::timeout(CUT_GRACE, &mut server).await.is_err() {
                tracing::warn!("shutdown: connections still open after the cut; closing them");
            }
        }
    }
    // One worker here: its connections still open close with `server`. Worker
    // threads: their runtimes end, closing theirs.
    drop(server);
    exit.now(CUT_GRACE).await;
}

/// Completes when shutdown begins, with its drain timeout, or with `None` when the sender
/// goes away without a shutdown (the traffic server ended on its own).
pub(super) async fn shutdown_began(
    mut began: watch::Receiver<Option<Duration>>,
) -> Option<Duration> {
    began.wait_for(Option::is_some).await.ok().and_then(|d| *d)
}
