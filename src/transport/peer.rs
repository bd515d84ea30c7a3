//! Who is on the other end of a connection: its address and, on a mutual TLS listener, the
//! identity its verified client certificate names.
//!
//! # Identity
//!
//! A certificate's identity is its first DNS or URI subject alternative name (a SPIFFE ID
//! such as `spiffe://example.org/ns/prod/sa/batch` is a URI name), else its subject common
//! name. It is read once per connection, at the handshake, not per call.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What every request of a connection Keel accepted carries in its extensions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The identity of the client's verified certificate; `None` without mutual TLS.
    pub identity: Option<Arc<str>>,
}

impl Peer {
    /// The peer of a request Keel's listeners accepted (`None` for a request built by hand).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Peer> {
        request.extensions().get::<Peer>()
    }

    /// The verified certificate identity of a request's caller, if any.
    pub fn identity_of<T>(request: &tonic::Request<T>) -> Option<&str> {
        Peer::of(request).and_then(|p| p.identity.as_deref())
    }

    /// The client address of a request.
    pub fn addr_of<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
        Peer::of(request)
            .and_then(|p| p.remote)
            .or_else(|| request.remote_addr())
    }
}

/// The identity a certificate names (see the module docs); `None` if it names none or does
/// not parse (it was verified by rustls, so that would be a certificate rustls accepts and
/// x509-parser does not).
pub fn identity(cert: &CertificateDer<'_>) -> Option<Arc<str>> {
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|ext| {
            ext.value.general_names.iter().find_map(|name| match name {
                GeneralName::DNSName(n) | GeneralName::URI(n) => Some(Arc::<str>::from(*n)),
                _ => None,
            })
        });
    san.or_else(|| {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(Arc::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(sans: &[&str], cn: Option<&str>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn the_first_dns_or_uri_name_wins_over_the_common_name() {
        assert_eq!(
            identity(&cert(&["batch.example.org"], Some("Batch"))).as_deref(),
            Some("batch.example.org")
        );
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://example.org/sa/batch".try_into().unwrap(),
        )];
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().clone();
        assert_eq!(
            identity(&der).as_deref(),
            Some("spiffe://example.org/sa/batch")
        );
    }

    #[test]
    fn without_names_the_common_name_is_the_identity() {
        assert_eq!(
            identity(&cert(&[], Some("ops-alice"))).as_deref(),
            Some("ops-alice")
        );
        assert_eq!(identity(&cert(&[], None)), None);
        assert_eq!(identity(&CertificateDer::from(vec![1, 2, 3])), None);
    }
}
