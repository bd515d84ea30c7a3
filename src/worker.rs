//! The traffic workers: `server.workers` OS threads, each with a `current_thread` runtime
//! and its own listening socket on `server.listen` (`SO_REUSEPORT`), each running the
//! traffic listener's connection loop ([`transport::serve`]); and which worker the current
//! thread is.
//!
//! # What is per worker
//!
//! A worker owns its listening socket, its accept loop, its connections and their streams'
//! tasks, and whatever a call spawns while it runs. Everything else is one `Arc` shared by
//! all workers: the policy store, the router (breakers, budgets, caches, pools and their
//! health), metrics, the gate's slots, the buffer budgets, the tenants' guard, and the
//! listener's connection cap ([`transport::Connections`]).
//!
//! # Shutdown
//!
//! 1. `stop` turns true: every worker stops accepting, sends GOAWAY on its connections and
//!    lets their calls finish, as one in-process server does.
//! 2. A worker whose connections have all closed reports itself drained and keeps its
//!    runtime turning: a task it spawned (an upstream connection another worker's calls
//!    use) must outlive the calls of the workers still draining.
//! 3. [`Exit::now`], once every worker drained or the cut passed, ends every runtime
//!    (closing what is still open) and waits for the threads.
//!
//! # Index and count
//!
//! - [`index`] is the worker this thread serves, set once when the worker thread starts;
//!   0 on any other thread (the main runtime, a test's runtime, an in-process server),
//!   where [`current`] is `None`.
//! - [`count`] is at least 1 and above every [`index`] any thread of this process can see,
//!   so a table of `count()` entries indexed by `index()` never overflows. It only grows:
//!   it is the most workers any server of this process started.
//!
//! The forwarding path uses them to keep one upstream connection per endpoint per worker,
//! so a call's wake-ups stay on its worker's core.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use tokio::sync::{oneshot, watch};
use tower::Service;

use crate::transport::{self, Accept, Buffers, Connections, Http2};

thread_local! {
    /// Set by [`enter`] when a worker thread starts; never changed after. `None`: this
    /// thread is no worker.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The most workers any server of this process started; 0 before any did.
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// The index of the worker running on this thread; 0 outside any worker.
pub fn index() -> usize {
    current().unwrap_or(0)
}

/// The index of the worker running on this thread, `None` outside any worker: for state
/// that must tell a worker's own use from the main runtime's (an upstream connection whose
/// task should not be spawned on the main runtime, say).
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// How many workers run, at least 1; every [`index`] is below it.
pub fn count() -> usize {
    COUNT.load(Ordering::Acquire).max(1)
}

/// How many workers `server.workers` asks for: itself, or when 0, the cores this process
/// may use (`std::thread::available_parallelism`, which honours CPU affinity and cgroup
/// quotas), 1 when that cannot be read.
pub fn resolve(configured: u32) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        n => n as usize,
    }
}

/// Announces that `workers` workers are about to start, before any of them does, so
/// [`count`] already covers their indexes when their first call runs.
pub(crate) fn starting(workers: usize) {
    COUNT.fetch_max(workers, Ordering::AcqRel);
}

/// Marks the current thread as worker `index`; called first thing on a worker thread.
pub(crate) fn enter(index: usize) {
    INDEX.with(|i| i.set(Some(index)));
}

/// Binds `workers` listening sockets on `addr`, all with `SO_REUSEPORT`, so the kernel
/// spreads new connections over them. With port 0, the first socket's port is used for the
/// others. Needs a Tokio runtime (the sockets are returned deregistered from it).
///
/// # Errors
///
/// When the address is already in use, by anything: before the group binds, a socket
/// without `SO_REUSEPORT` tries the address, so a second Keel started on the same port
/// fails as it always did instead of silently sharing the port's connections.
pub fn bind(addr: SocketAddr, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let socket = |addr: SocketAddr| -> io::Result<tokio::net::TcpSocket> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As tokio's TcpListener::bind does: a restart may bind while old connections of
        // the last process are still in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        Ok(socket)
    };
    if addr.port() != 0 {
        // Closed at once; only its bind matters.
        socket(addr)?.bind(addr)?;
    }
    let mut addr = addr;
    let mut out = Vec::with_capacity(workers);
    for _ in 0..workers.max(1) {
        let socket = socket(addr)?;
        #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        addr = listener.local_addr()?;
        out.push(listener.into_std()?);
    }
    Ok(out)
}

/// What every worker serves: the traffic service and the state its connections share.
pub(crate) struct Traffic<S> {
    /// The traffic stack; cloned into each worker (its state is behind `Arc`s).
    pub(crate) service: S,
    /// How each socket accepts.
    pub(crate) accept: Accept,
    /// The listener's connection cap, one for all its sockets.
    pub(crate) open: Connections,
    /// How connections speak HTTP/2.
    pub(crate) http2: Http2,
    /// Keel's buffer budget, one for all connections.
    pub(crate) buffers: Arc<Buffers>,
}

/// Ends the workers' runtimes: held by the server while its workers run.
pub(crate) struct Exit {
    exit: watch::Sender<bool>,
    exited: Vec<oneshot::Receiver<()>>,
}

impl Exit {
    /// Nothing to end: the one worker runs in the caller's runtime.
    pub(crate) fn none() -> Exit {
        Exit {
            exit: watch::channel(false).0,
            exited: Vec::new(),
        }
    }

    /// Ends every worker's runtime, closing connections still open, and waits (at most
    /// `bound`) for their threads to finish.
    pub(crate) async fn now(self, bound: Duration) {
        let _ = self.exit.send(true);
        let all = async {
            for exited in self.exited {
                // An error: the thread ended without saying so (it panicked); it is gone.
                let _ = exited.await;
            }
        };
        if tokio::time::timeout(bound, all).await.is_err() {
            tracing::warn!(
                ?bound,
                "shutdown: a worker thread has not ended; leaving it"
            );
        }
    }
}

/// Starts one worker thread per listener, each serving `traffic` on its own listener until
/// `stop` turns true (or its sender is dropped). Returns, once every worker is accepting, a
/// future that completes when every worker has drained, and the [`Exit`] that ends them
/// (see the module docs). Fails, ending the workers already started, when a runtime or a
/// thread cannot be made.
pub(crate) async fn spawn<S, B>(
    listeners: Vec<std::net::TcpListener>,
    traffic: &Traffic<S>,
    stop: &watch::Receiver<bool>,
) -> io::Result<(impl Future<Output = ()> + Send + 'static, Exit)>
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    let workers = listeners.len();
    starting(workers);
    let (exit, exit_rx) = watch::channel(false);
    let mut exits = Exit {
        exit,
        exited: Vec::with_capacity(workers),
    };
    let mut drained = Vec::with_capacity(workers);
    for (index, listener) in listeners.into_iter().enumerate() {
        let (started_tx, started_rx) = oneshot::channel::<io::Result<()>>();
        let (drained_tx, drained_rx) = oneshot::channel::<()>();
        let (exited_tx, exited_rx) = oneshot::channel::<()>();
        let (service, accept, open, http2, buffers) = (
            traffic.service.clone(),
            traffic.accept.clone(),
            traffic.open.clone(),
            traffic.http2.clone(),
            traffic.buffers.clone(),
        );
        let (stop, mut exit) = (stop.clone(), exit_rx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("keel-worker-{index}"))
            .spawn(move || {
                enter(index);
                // The runtime is made and dropped on this thread: a runtime may not be
                // dropped inside another one's task.
                let made = listener.set_nonblocking(true).and_then(|()| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let listener = {
                        let _in = runtime.enter();
                        tokio::net::TcpListener::from_std(listener)?
                    };
                    Ok((runtime, listener))
                });
                let (runtime, listener) = match made {
                    Ok(made) => made,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                runtime.block_on(async move {
                    let incoming = transport::incoming_counted(listener, accept, open);
                    let serve = transport::serve(incoming, service, http2, buffers, stopped(stop));
                    tokio::select! {
                        () = serve => {
                            let _ = drained_tx.send(());
                        }
                        () = stopped_ref(&mut exit) => return,
                    }
                    stopped_ref(&mut exit).await;
                });
                // Every task still on this runtime (streams of connections closed at the
                // cut) is dropped here.
                drop(runtime);
                let _ = exited_tx.send(());
            });
        let started = match thread {
            Ok(_) => started_rx
                .await
                .unwrap_or_else(|_| Err(io::Error::other("a worker thread ended as it started"))),
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            exits.now(Duration::from_secs(5)).await;
            return Err(e);
        }
        drained.push(drained_rx);
        exits.exited.push(exited_rx);
    }
    tracing::info!(workers, "traffic workers started");
    let all_drained = async move {
        for d in drained {
            // An error: the worker ended without saying so (it panicked or was ended).
            let _ = d.await;
        }
    };
    Ok((all_drained, exits))
}

/// Completes when `flag` turns true or its sender is gone.
async fn stopped(mut flag: watch::Receiver<bool>) {
    stopped_ref(&mut flag).await;
}

async fn stopped_ref(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|on| *on).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_outside_any_worker_is_worker_zero_and_every_index_is_below_the_count() {
        assert_eq!((index(), current()), (0, None));
        assert!(count() >= 1);
        starting(3);
        let seen = std::thread::spawn(|| {
            enter(2);
            (index(), current(), count())
        })
        .join()
        .unwrap_or_default();
        assert_eq!((seen.0, seen.1), (2, Some(2)));
        assert!(seen.2 >= 3);
        // The index is the thread's own: this thread is still no worker.
        assert_eq!((index(), current()), (0, None));
    }

    #[tokio::test]
    async fn the_sockets_of_the_workers_share_one_port_and_no_one_else_may_join() {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let group = bind(any, 3).unwrap();
        let port = group[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(group.iter().all(|l| l.local_addr().unwrap().port() == port));
        // A second Keel on the same address fails, as it would without SO_REUSEPORT.
        let taken = SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(bind(taken, 2).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        let plain = std::net::TcpListener::bind(any).unwrap();
        let held = plain.local_addr().unwrap();
        assert_eq!(bind(held, 2).unwrap_err().kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn zero_workers_means_the_cores_this_process_may_use() {
        assert!(resolve(0) >= 1);
        assert_eq!(resolve(3), 3);
    }
}
