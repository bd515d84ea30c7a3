//! Opening an endpoint's connection: a lazy HTTP/2 channel with the upstream's timeouts and
//! keepalives, over TLS when the upstream has it (and never plaintext in its place).

use std::sync::Arc;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint as TonicEndpoint, Identity};

use super::{Endpoint, Pool};
use crate::upstream::forward::Forwarder;

impl Pool {
    /// A new endpoint at `addr` (`host:port`), its channel connected lazily.
    pub(super) fn connect(&self, addr: &str) -> Arc<Endpoint> {
        let c = &self.spec.connection;
        let scheme = if self.spec.tls.is_some() {
            "https"
        } else {
            "http"
        };
        // `addr` is an authority (`host:port`), checked when the policy loaded or taken
        // from a resolved socket address.
        let uri = format!("{scheme}://{addr}")
            .parse::<http::Uri>()
            .unwrap_or_else(|e| {
                tracing::error!(upstream = %self.name, endpoint = %addr, error = %e,
                    "not a usable address; calls to this endpoint will fail");
                http::Uri::from_static("http://invalid.invalid:1")
            });
        let mut endpoint = TonicEndpoint::from(uri)
            .connect_timeout(self.spec.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(c.keepalive_interval)
            .keep_alive_timeout(c.keepalive_timeout)
            .keep_alive_while_idle(true);
        if let Some(n) = c.max_concurrent_streams {
            endpoint = endpoint.concurrency_limit(n);
        }
        if let Some(tls) = &self.spec.tls {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let mut config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                .domain_name(tls.server_name.as_deref().unwrap_or(host));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            // On failure the endpoint keeps its https:// address without TLS settings, so
            // every call to it fails: never plaintext instead.
            match endpoint.clone().tls_config(config) {
                Ok(e) => endpoint = e,
                Err(e) => {
                    tracing::error!(upstream = %self.name, endpoint = %addr, error = %e,
                        "cannot set up TLS; calls to this endpoint will fail");
                }
            }
        }
        let channel = endpoint.connect_lazy();
        let tls = self.spec.tls.is_some().then(|| channel.clone());
        let forwarder = Forwarder::new(addr, &self.spec, self.max_message_size, tls);
        Arc::new(Endpoint::new(
            &self.name,
            addr,
            channel,
            forwarder,
            self.max_message_size,
        ))
    }
}
