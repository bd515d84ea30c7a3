//! `[server.tls]` and `[server.admin_tls]`: a listener's certificate, private key and,
//! for mutual TLS, the CA its clients' certificates must chain to.
//!
//! The policy holds the file paths only. [`TlsSettings::load`] reads the files and builds
//! the rustls server configuration; the policy check calls it, so a document naming a
//! missing file, a file without a PEM certificate, or a key that is not the certificate's
//! is refused like any other invalid policy, and the listener calls it again on every
//! reload, so rotated files are served without a restart.
//!
//! # Errors
//!
//! Every problem is reported at its key (`server.tls.key: the private key does not match
//! the certificate in server.tls.cert`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::reader::{Problems, Section};
use super::{PolicyError, PolicyErrors};

/// One listener's TLS files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// The policy section these came from (`server.tls`), to name a key in an error.
    pub section: &'static str,
    /// PEM file with the listener's certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM file of the CA certificates client certificates must chain to. Set: every
    /// client must present a certificate (mutual TLS), and its identity names the caller.
    pub client_ca: Option<PathBuf>,
}

impl TlsSettings {
    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    /// Reads the files and builds the server configuration (no ALPN set: the listener
    /// chooses its protocols).
    pub fn load(&self) -> Result<rustls::ServerConfig, PolicyErrors> {
        let at = |key: &str| format!("{}.{key}", self.section);
        let fail = |key: &str, message: String| PolicyErrors::one(at(key), message);
        let certs = read_certs(&self.cert).map_err(|m| fail("cert", m));
        let key = read_key(&self.key).map_err(|m| fail("key", m));
        let roots = self
            .client_ca
            .as_deref()
            .map(|path| {
                let certs = read_certs(path).map_err(|m| fail("client_ca", m))?;
                let mut roots = rustls::RootCertStore::empty();
                for (i, c) in certs.into_iter().enumerate() {
                    roots.add(c).map_err(|e| {
                        fail(
                            "client_ca",
                            format!(
                                "certificate {} of {} is not a usable CA certificate: {e}",
                                i + 1,
                                path.display()
                            ),
                        )
                    })?;
                }
                Ok::<_, PolicyErrors>(roots)
            })
            .transpose();
        let mut errors = Vec::new();
        let certs = certs.map_err(|e| errors.extend(e.0)).ok();
        let key = key.map_err(|e| errors.extend(e.0)).ok();
        let roots = roots.map_err(|e| errors.extend(e.0)).ok();
        let (Some(certs), Some(key), Some(roots)) = (certs, key, roots) else {
            return Err(PolicyErrors(errors));
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| fail("cert", format!("no TLS version is usable: {e}")))?;
        let builder = match roots {
            None => builder.with_no_client_auth(),
            Some(roots) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| fail("client_ca", format!("cannot verify clients with it: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        builder.with_single_cert(certs, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => fail(
                "key",
                format!(
                    "the private key in {} does not match the certificate in {} ({})",
                    self.key.display(),
                    self.cert.display(),
                    at("cert")
                ),
            ),
            other => fail(
                "key",
                format!(
                    "{} is not a usable private key: {other}",
                    self.key.display()
                ),
            ),
        })
    }
}

/// Every certificate of a PEM file; at least one.
pub(super) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM file.
pub(super) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "{} holds no PEM private key (-----BEGIN PRIVATE KEY-----)",
            path.display()
        ),
        e => format!("{} is not a valid PEM private key: {e}", path.display()),
    })
}

pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Reads a `[server.tls]`-like section, and checks its files.
pub(super) fn read(mut s: Section<'_>, section: &'static str, p: &mut Problems) -> TlsSettings {
    let path = |s: &mut Section<'_>, p: &mut Problems, key: &'static str, required: bool| {
        let v = s.string(p, key);
        match &v {
            None if required && !s.has(key) => {
                p.add(s.at(key), "is required: the path of a PEM file");
            }
            Some(v) if v.is_empty() => p.add(s.at(key), "must not be empty"),
            _ => {}
        }
        v.filter(|v| !v.is_empty()).map(PathBuf::from)
    };
    let cert = path(&mut s, p, "cert", true);
    let key = path(&mut s, p, "key", true);
    let client_ca = path(&mut s, p, "client_ca", false);
    s.finish(p);
    let settings = TlsSettings {
        section,
        cert: cert.clone().unwrap_or_default(),
        key: key.clone().unwrap_or_default(),
        client_ca,
    };
    if cert.is_some()
        && key.is_some()
        && p.reads_files()
        && let Err(errors) = settings.load()
    {
        for PolicyError { path, message } in errors.0 {
            p.add(path, message);
        }
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::super::Policy;

    fn errors(toml: &str) -> Vec<String> {
        match Policy::parse(toml) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Files {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let ca = rcgen::CertificateParams::new(Vec::<String>::new())
                .unwrap()
                .self_signed(&ca_key)
                .unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let other = rcgen::KeyPair::generate().unwrap();
            let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text);
            write("cert.pem", cert.pem()).unwrap();
            write("key.pem", key.serialize_pem()).unwrap();
            write("other.pem", other.serialize_pem()).unwrap();
            write("ca.pem", ca.pem()).unwrap();
            write("junk.pem", "not pem at all\n".into()).unwrap();
            Files { dir }
        }

        fn at(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }
    }

    #[test]
    fn a_listener_with_its_files_is_read() {
        let f = Files::new();
        let p = Policy::parse(&format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            f.at("cert.pem"),
            f.at("key.pem"),
            f.at("ca.pem")
        ))
        .unwrap();
        let tls = p.server.tls.unwrap();
        assert!(tls.mutual());
        assert!(tls.load().is_ok());
        assert!(p.server.admin_tls.is_none());
    }

    #[test]
    fn each_bad_file_is_named_at_its_key() {
        let f = Files::new();
        let e = errors(&format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n[server.admin_tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            f.at("missing.pem"),
            f.at("junk.pem"),
            f.at("cert.pem"),
            f.at("other.pem"),
            f.at("junk.pem"),
        ));
        let joined = e.join("\n");
        for want in [
            "server.tls.cert: cannot read ",
            "server.tls.key: ",
            "holds no PEM private key",
            "server.admin_tls.client_ca: ",
            "holds no PEM certificate",
        ] {
            assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
        }
        let e = errors(&format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            f.at("cert.pem"),
            f.at("other.pem"),
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("server.tls.key: the private key in ")
                && e[0].contains("does not match the certificate"),
            "{e:?}"
        );
    }

    #[test]
    fn cert_and_key_are_required() {
        assert_eq!(
            errors("[server.tls]\nclient_ca = \"\"\n"),
            [
                "server.tls.cert: is required: the path of a PEM file",
                "server.tls.key: is required: the path of a PEM file",
                "server.tls.client_ca: must not be empty",
            ]
        );
    }
}
