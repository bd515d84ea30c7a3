//! A listener's open connections: the `server.max_connections` cap, how far each
//! connection has come (handshake, ready, used), and which one makes room for a new
//! connection when the cap is reached.
//!
//! # Making room
//!
//! At the cap, a new connection is refused only when every open one has proved useful.
//! Otherwise one that never did is closed for it, in this order:
//!
//! 1. the oldest connection still in its handshake (TLS, or the HTTP/2 preface): it has
//!    cost a slot and given nothing, and it is closed at once;
//! 2. on a listener that reports calls ([`Open::new`] with `reports_use`), the oldest
//!    connection that finished its handshake but never made a call: it is sent GOAWAY, so a
//!    client that still wants it reconnects when it has a call to make.
//!
//! A connection that made a call is never closed to make room. A connection chosen to make
//! room still counts until it has closed, which takes one turn of its task; choosing never
//! picks it twice.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::task::AtomicWaker;
use tokio::sync::Notify;

/// The stage of a connection, from [`Tracked::stage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    /// Accepted; its TLS handshake or HTTP/2 preface is not complete.
    Handshake,
    /// Its handshake is complete; it has made no call yet.
    Ready,
    /// It made a call.
    Used,
}

impl Stage {
    fn from_u8(v: u8) -> Stage {
        match v {
            0 => Stage::Handshake,
            1 => Stage::Ready,
            _ => Stage::Used,
        }
    }
}

/// What the listener knows of one open connection, shared with the connection itself.
#[derive(Debug, Default)]
pub(crate) struct Tracked {
    stage: AtomicU8,
    displaced: AtomicBool,
    /// Woken when the connection is chosen to make room: its reads (during the
    /// handshake) fail then.
    reader: AtomicWaker,
    /// Notified when the connection is chosen to make room: its TLS handshake task or its
    /// HTTP/2 connection task closes it.
    closing: Notify,
}

impl Tracked {
    /// How far the connection has come.
    pub(crate) fn stage(&self) -> Stage {
        Stage::from_u8(self.stage.load(Ordering::Acquire))
    }

    /// The handshake is complete (never moves a used connection back).
    pub(crate) fn ready(&self) {
        let _ = self.stage.compare_exchange(
            Stage::Handshake as u8,
            Stage::Ready as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The connection made a call. A load first: this runs on every call, and a store
    /// would make each one write the shared line.
    pub(crate) fn used(&self) {
        if self.stage.load(Ordering::Relaxed) != Stage::Used as u8 {
            self.stage.store(Stage::Used as u8, Ordering::Release);
        }
    }

    /// Whether the connection was chosen to make room for a new one.
    pub(crate) fn displaced(&self) -> bool {
        self.displaced.load(Ordering::Acquire)
    }

    /// Registers the reading task to be woken when the connection is chosen.
    pub(crate) fn wake_reader_when_displaced(&self, waker: &std::task::Waker) {
        self.reader.register(waker);
    }

    /// Completes once the connection is chosen to make room.
    pub(crate) async fn closing(&self) {
        loop {
            let notified = self.closing.notified();
            if self.displaced() {
                return;
            }
            notified.await;
        }
    }

    fn displace(&self) {
        self.displaced.store(true, Ordering::Release);
        self.reader.wake();
        self.closing.notify_waiters();
    }
}

/// The open connections of one listener.
#[derive(Debug)]
pub(crate) struct Open {
    max: usize,
    reports_use: bool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By accept order: the first is the oldest.
    conns: BTreeMap<u64, Arc<Tracked>>,
    next: u64,
    /// Chosen to make room and not closed yet.
    displacing: usize,
}

/// How a new connection was let in.
#[derive(Debug)]
pub(crate) enum Admitted {
    /// There was room.
    Room(Slot),
    /// A connection that never became useful, at this stage, is closed to make room.
    Displacing(Slot, Stage),
}

/// A connection's place among the open ones, given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    open: Arc<Open>,
    id: u64,
    tracked: Arc<Tracked>,
}

impl Slot {
    /// What the listener knows of this connection.
    pub(crate) fn tracked(&self) -> &Arc<Tracked> {
        &self.tracked
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.open.lock();
        if inner.conns.remove(&self.id).is_some() && self.tracked.displaced() {
            inner.displacing -= 1;
        }
    }
}

impl Open {
    /// Room for `max` connections. `reports_use`: the server marks each connection that
    /// makes a call ([`Tracked::used`]), so a ready connection that never did may be
    /// closed to make room.
    pub(crate) fn new(max: u32, reports_use: bool) -> Arc<Open> {
        Arc::new(Open {
            max: max as usize,
            reports_use,
            inner: Mutex::default(),
        })
    }

    /// Lets a new connection in, making room if it must (see the module docs); `None`:
    /// every open connection is useful, and the new one is refused.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut inner = self.lock();
        let displaced = if inner.conns.len() - inner.displacing < self.max {
            None
        } else {
            let victim = self.victim(&inner)?;
            let stage = victim.stage();
            victim.displace();
            inner.displacing += 1;
            Some(stage)
        };
        let id = inner.next;
        inner.next += 1;
        let tracked = Arc::new(Tracked::default());
        inner.conns.insert(id, tracked.clone());
        let slot = Slot {
            open: self.clone(),
            id,
            tracked,
        };
        Some(match displaced {
            None => Admitted::Room(slot),
            Some(stage) => Admitted::Displacing(slot, stage),
        })
    }

    /// The connection to close for a new one: linear in the open connections, which only
    /// happens at the cap.
    fn victim<'a>(&self, inner: &'a Inner) -> Option<&'a Arc<Tracked>> {
        let candidates = || inner.conns.values().filter(|t| !t.displaced());
        candidates()
            .find(|t| t.stage() == Stage::Handshake)
            .or_else(|| {
                self.reports_use
                    .then(|| candidates().find(|t| t.stage() == Stage::Ready))
                    .flatten()
            })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The sections under this lock cannot panic half-way; a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections open now, those closing to make room included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(a: Option<Admitted>) -> Slot {
        match a {
            Some(Admitted::Room(s)) => s,
            other => panic!("expected room, got {other:?}"),
        }
    }

    #[test]
    fn at_the_cap_the_oldest_connection_still_in_its_handshake_makes_room() {
        let open = Open::new(3, true);
        let used = room(open.admit());
        used.tracked().ready();
        used.tracked().used();
        let ready = room(open.admit());
        ready.tracked().ready();
        let handshaking = room(open.admit());

        let Some(Admitted::Displacing(new, stage)) = open.admit() else {
            panic!("a connection should have made room");
        };
        assert_eq!(stage, Stage::Handshake);
        assert!(handshaking.tracked().displaced());
        assert!(!ready.tracked().displaced() && !used.tracked().displaced());
        // It counts until it has closed, and is not chosen twice: the next one displaces
        // the connection that never made a call.
        assert_eq!(open.len(), 4);
        new.tracked().ready();
        new.tracked().used();
        let Some(Admitted::Displacing(newer, stage)) = open.admit() else {
            panic!("the unused connection should have made room");
        };
        assert_eq!(stage, Stage::Ready);
        assert!(ready.tracked().displaced());
        newer.tracked().used();
        drop((handshaking, ready));
        assert_eq!(open.len(), 3);
        // Every open connection made a call: the next one is refused.
        assert!(open.admit().is_none());
        drop(used);
        assert!(matches!(open.admit(), Some(Admitted::Room(_))));
    }

    #[test]
    fn without_reports_of_use_a_ready_connection_is_never_displaced() {
        let open = Open::new(1, false);
        let ready = room(open.admit());
        ready.tracked().ready();
        assert!(open.admit().is_none());
        assert!(!ready.tracked().displaced());
    }

    #[tokio::test]
    async fn a_displaced_connection_hears_it() {
        let open = Open::new(1, true);
        let first = room(open.admit());
        let tracked = first.tracked().clone();
        let closing = tokio::spawn(async move { tracked.closing().await });
        let _second = open.admit().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), closing)
            .await
            .expect("told within the bound")
            .unwrap();
        // Already chosen: completes at once.
        first.tracked().closing().await;
    }
}
