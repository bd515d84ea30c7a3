//! Where an upstream's endpoints come from: a fixed list, or a DNS name re-resolved on an
//! interval.
//!
//! An endpoint that leaves the pool finishes the attempts it has (they hold it) and gets no
//! more; an address that stays keeps its endpoint (connection and health).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::{Endpoint, Pool};

/// Resolves a name to addresses; the system resolver in production, a stub in tests.
pub trait Resolve: Send + Sync + 'static {
    /// Every address `host:port` stands for.
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (`getaddrinfo`, so `/etc/hosts` counts).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let target = format!("{host}:{port}");
        Box::pin(async move { Ok(tokio::net::lookup_host(target).await?.collect()) })
    }
}

impl Pool {
    /// The endpoints of a fixed list: one per URI, named by its authority (`host:port`).
    pub(super) fn listed(&self, uris: &[http::Uri]) -> Vec<Arc<Endpoint>> {
        uris.iter()
            .map(|uri| {
                let addr = uri
                    .authority()
                    .map_or_else(|| uri.to_string(), ToString::to_string);
                self.connect(&addr)
            })
            .collect()
    }

    /// Replaces the endpoints with `addrs` (a fresh resolution), keeping the endpoints
    /// (connections, health) of addresses that stay. Returns (added, removed).
    pub fn set_addresses(&self, addrs: &[SocketAddr]) -> (Vec<String>, Vec<String>) {
        let old = self.endpoints();
        let mut by_addr: BTreeMap<String, Arc<Endpoint>> = old
            .iter()
            .map(|e| (e.addr.to_string(), e.clone()))
            .collect();
        let mut wanted: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        wanted.sort();
        wanted.dedup();
        let mut added = Vec::new();
        let mut next = Vec::with_capacity(wanted.len());
        for addr in &wanted {
            match by_addr.remove(addr) {
                Some(e) => next.push(e),
                None => {
                    added.push(addr.clone());
                    next.push(self.connect(addr));
                }
            }
        }
        let removed: Vec<String> = by_addr.into_keys().collect();
        if !added.is_empty() || !removed.is_empty() {
            self.endpoints.store(Arc::new(next));
            self.on_change.tell();
        }
        (added, removed)
    }

    /// Resolves the DNS name once and applies the answer; an error keeps the endpoints
    /// there are.
    pub async fn resolve_once(&self, resolver: &dyn Resolve) {
        let crate::policy::Endpoints::Dns { host, port, .. } = &self.spec.endpoints else {
            return;
        };
        match resolver.resolve(host, *port).await {
            Ok(addrs) => {
                let (added, removed) = self.set_addresses(&addrs);
                if !added.is_empty() || !removed.is_empty() {
                    tracing::info!(upstream = %self.name, name = %host, ?added, ?removed,
                        "endpoints changed");
                }
            }
            Err(e) => {
                tracing::warn!(upstream = %self.name, name = %host, error = %e,
                    "cannot resolve; keeping the endpoints there are");
            }
        }
    }
}
