//! A listener's TLS configuration, swapped whole when its certificate files are re-read.
//!
//! Each handshake takes the configuration current when the connection was accepted, so a
//! rotation applies to new connections and never disturbs open ones.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::policy::{PolicyErrors, TlsSettings};

/// The current rustls configuration of one listener.
pub struct Tls {
    /// The protocols the listener offers in ALPN (`h2`, and `http/1.1` on the admin
    /// listener, which also serves `/metrics`).
    alpn: Vec<Vec<u8>>,
    current: ArcSwap<rustls::ServerConfig>,
}

impl Tls {
    /// Reads `settings`' files for a listener offering `alpn`.
    pub fn load(settings: &TlsSettings, alpn: &[&[u8]]) -> Result<Tls, PolicyErrors> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let config = configure(settings, &alpn)?;
        Ok(Tls {
            alpn,
            current: ArcSwap::from_pointee(config),
        })
    }

    /// Re-reads `settings`' files; on any problem the current certificates keep serving.
    pub fn reload(&self, settings: &TlsSettings) -> Result<(), PolicyErrors> {
        let config = configure(settings, &self.alpn)?;
        self.current.store(Arc::new(config));
        Ok(())
    }

    /// The configuration for a connection accepted now.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.load_full()
    }
}

fn configure(
    settings: &TlsSettings,
    alpn: &[Vec<u8>],
) -> Result<rustls::ServerConfig, PolicyErrors> {
    let mut config = settings.load()?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}
