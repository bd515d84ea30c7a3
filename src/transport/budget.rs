//! Bytes Keel holds for messages in transit, bounded per connection
//! (`server.max_buffered_per_connection`) and for Keel as a whole (`server.max_buffered`):
//! request messages still arriving (their announced length, which the decoder reserves)
//! and answers their clients have not taken yet.
//!
//! # Holding
//!
//! A [`Held`] takes its bytes from its connection's budget, then from Keel's; when either
//! would go past its limit, neither is taken and the caller hears [`BufferFull`] naming the
//! one that is full. Dropping a [`Held`] gives its bytes back to both. Two atomic adds per
//! hold and two per release, no lock.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Keel's budget, shared by every connection of the traffic listener.
#[derive(Debug)]
pub struct Buffers {
    limit: u64,
    used: AtomicU64,
}

impl Buffers {
    /// A budget of `limit` bytes (`server.max_buffered`).
    pub fn new(limit: usize) -> Arc<Buffers> {
        Arc::new(Buffers {
            limit: limit as u64,
            used: AtomicU64::new(0),
        })
    }

    /// Bytes held now, all connections together.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// One connection's budget of `limit` bytes (`server.max_buffered_per_connection`),
    /// drawing on this one too.
    pub fn connection(self: &Arc<Self>, limit: usize) -> Arc<ConnectionBuffers> {
        Arc::new(ConnectionBuffers {
            keel: self.clone(),
            limit: limit as u64,
            used: AtomicU64::new(0),
        })
    }
}

/// One connection's budget; every request of the connection carries it in its extensions.
#[derive(Debug)]
pub struct ConnectionBuffers {
    keel: Arc<Buffers>,
    limit: u64,
    used: AtomicU64,
}

impl ConnectionBuffers {
    /// Holds `n` bytes until the [`Held`] is dropped, or says which budget is full.
    pub fn hold(self: &Arc<Self>, n: usize) -> Result<Held, BufferFull> {
        let n = n as u64;
        take(&self.used, n, self.limit).map_err(|()| BufferFull {
            scope: Scope::Connection,
            limit: self.limit,
        })?;
        if take(&self.keel.used, n, self.keel.limit).is_err() {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return Err(BufferFull {
                scope: Scope::Keel,
                limit: self.keel.limit,
            });
        }
        Ok(Held {
            from: self.clone(),
            n,
        })
    }

    /// Bytes this connection holds now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Adds `n` to `used` unless that passes `limit`.
fn take(used: &AtomicU64, n: u64, limit: u64) -> Result<(), ()> {
    let before = used.fetch_add(n, Ordering::Relaxed);
    if before + n > limit {
        used.fetch_sub(n, Ordering::Relaxed);
        return Err(());
    }
    Ok(())
}

/// Bytes held from a connection's budget and Keel's, given back when dropped.
#[derive(Debug)]
pub struct Held {
    from: Arc<ConnectionBuffers>,
    n: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.from.used.fetch_sub(self.n, Ordering::Relaxed);
        self.from.keel.used.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// Which budget is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The connection's (`server.max_buffered_per_connection`).
    Connection,
    /// Keel's (`server.max_buffered`).
    Keel,
}

/// A message that would take a budget past its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub struct BufferFull {
    /// The budget that is full.
    pub scope: Scope,
    /// Its limit, in bytes.
    pub limit: u64,
}

impl fmt::Display for BufferFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, key) = match self.scope {
            Scope::Connection => ("this connection", "server.max_buffered_per_connection"),
            Scope::Keel => ("Keel", "server.max_buffered"),
        };
        write!(
            f,
            "the messages in transit on {what} (requests still arriving, answers not taken yet) are at their limit of {} bytes ({key}); retry once they have arrived",
            self.limit
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_takes_from_both_budgets_and_gives_back_on_drop() {
        let keel = Buffers::new(10);
        let (a, b) = (keel.connection(6), keel.connection(6));
        let first = a.hold(4).unwrap();
        assert_eq!(
            a.hold(3).unwrap_err(),
            BufferFull {
                scope: Scope::Connection,
                limit: 6
            }
        );
        let second = b.hold(6).unwrap();
        // Connection b has room for nothing more, a for 2, Keel for 0.
        assert_eq!(
            a.hold(1).unwrap_err(),
            BufferFull {
                scope: Scope::Keel,
                limit: 10
            }
        );
        // A refusal took nothing.
        assert_eq!((a.used(), b.used(), keel.used()), (4, 6, 10));
        drop(second);
        assert_eq!(keel.used(), 4);
        let third = a.hold(2).unwrap();
        drop((first, third));
        assert_eq!((a.used(), keel.used()), (0, 0));
    }

    #[test]
    fn the_refusal_names_the_full_budget_and_its_key() {
        let full = BufferFull {
            scope: Scope::Keel,
            limit: 1024,
        };
        assert!(
            full.to_string()
                .contains("1024 bytes (server.max_buffered)")
        );
    }
}
