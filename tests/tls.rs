//! TLS and mutual TLS on both listeners, certificate rotation on reload, tenants and admins
//! by client certificate identity, and the limits against hostile clients (metadata size,
//! streams per connection, connections per listener). Certificates are made at test time
//! with rcgen; everything runs on loopback with OS-chosen ports.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use keel::pb::inference as pb;
use keel::pb::keel_admin as admin;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use rcgen::{CertificateParams, DnType, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A certificate authority that signs server and client certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, as PEM.
struct Leaf {
    cert: String,
    key: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS subject alternative names; the first is the identity).
    fn sign(&self, names: &[&str], cn: &str) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

/// The files a Keel reads: server certificate and key, and the client CA.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(server: &Leaf, client_ca: &Ca) -> Files {
        let f = Files {
            dir: tempfile::tempdir().unwrap(),
        };
        f.write_server(server);
        std::fs::write(f.path("ca.pem"), &client_ca.pem).unwrap();
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_server(&self, leaf: &Leaf) {
        std::fs::write(self.path("cert.pem"), &leaf.cert).unwrap();
        std::fs::write(self.path("key.pem"), &leaf.key).unwrap();
    }

    /// A `[server.<section>]` TLS table naming these files, with the client CA or not.
    fn section(&self, section: &str, mutual: bool) -> String {
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let mut s = format!(
            "[server.{section}]\ncert = {}\nkey = {}\n",
            q(&self.path("cert.pem")),
            q(&self.path("key.pem"))
        );
        if mutual {
            s.push_str(&format!("client_ca = {}\n", q(&self.path("ca.pem"))));
        }
        s
    }
}

/// A TLS channel to `addr` trusting `ca`, presenting `client` when given.
async fn tls_channel(addr: SocketAddr, ca: &Ca, client: Option<&Leaf>) -> Channel {
    try_tls_channel(addr, ca, client).await.unwrap()
}

async fn try_tls_channel(
    addr: SocketAddr,
    ca: &Ca,
    client: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert, &c.key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// The certificate the listener at `addr` serves now (a fresh TLS handshake).
async fn served_certificate(addr: SocketAddr, ca: &Ca) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

use rustls::pki_types::pem::PemObject as _;

fn iris() -> pb::ModelMetadataRequest {
    pb::ModelMetadataRequest {
        name: "iris".into(),
        version: String::new(),
    }
}

#[tokio::test]
async fn a_tls_listener_serves_calls_and_plaintext_clients_get_nothing() {
    let ca = Ca::new("keel test CA");
    let files = Files::new(&ca.sign(&["localhost"], "keel"), &ca);
    let keel = Keel::with_config(&files.section("tls", false)).await;

    let mut c = GrpcInferenceServiceClient::new(tls_channel(keel.addr, &ca, None).await);
    let resp = c.model_infer(simple_request()).await.unwrap().into_inner();
    assert_eq!(resp.model_name, "simple");

    // A plaintext HTTP/2 client does not get a gRPC answer from a TLS listener.
    let plain = Endpoint::from_shared(keel.url()).unwrap().connect().await;
    if let Ok(ch) = plain {
        let s = GrpcInferenceServiceClient::new(ch)
            .model_infer(simple_request())
            .await
            .unwrap_err();
        assert_ne!(s.code(), Code::Ok);
    }
    keel.stop().await.unwrap();
}

/// Tenant `a` is whoever presents a certificate for `svc-a` (simple only); tenant `b` has
/// an API key.
fn mutual_policy(files: &Files) -> String {
    format!(
        "{}\n[tenants.a]\nidentities = [\"svc-a\"]\nmodels = [\"simple\"]\n[tenants.b]\napi_keys = [\"{}\"]\nmodels = [\"*\"]\n",
        files.section("tls", true),
        keel::auth::hash_key("b-key")
    )
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_trusted_certificate() {
    let ca = Ca::new("keel test CA");
    let files = Files::new(&ca.sign(&["localhost"], "keel"), &ca);
    let keel = Keel::with_config(&mutual_policy(&files)).await;

    // No certificate: the handshake (or the first call on it) fails.
    let stranger = Ca::new("another CA");
    for client in [None, Some(stranger.sign(&["svc-a"], "svc-a"))] {
        let refused = match try_tls_channel(keel.addr, &ca, client.as_ref()).await {
            Err(_) => true,
            Ok(ch) => GrpcInferenceServiceClient::new(ch)
                .model_infer(simple_request())
                .await
                .is_err(),
        };
        assert!(
            refused,
            "client cert {:?} was let in",
            client.as_ref().map(|_| "from another CA")
        );
    }
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_certificate_identity_is_its_tenant() {
    let ca = Ca::new("keel test CA");
    let files = Files::new(&ca.sign(&["localhost"], "keel"), &ca);
    let keel = Keel::with_config(&mutual_policy(&files)).await;

    let a = ca.sign(&["svc-a"], "Service A");
    let mut c = GrpcInferenceServiceClient::new(tls_channel(keel.addr, &ca, Some(&a)).await);
    assert!(c.model_infer(simple_request()).await.is_ok());
    // The identity made it tenant a, which may not call iris.
    let s = c.model_metadata(iris()).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("tenant 'a'"), "{s:?}");

    // A trusted certificate no tenant claims, without a key: UNAUTHENTICATED; with b's key:
    // tenant b.
    let x = ca.sign(&["svc-x"], "Service X");
    let mut c = GrpcInferenceServiceClient::new(tls_channel(keel.addr, &ca, Some(&x)).await);
    let s = c.model_infer(simple_request()).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("identity is not a tenant's"), "{s:?}");
    let mut r = tonic::Request::new(iris());
    r.metadata_mut()
        .insert("authorization", "Bearer b-key".parse().unwrap());
    assert!(c.model_metadata(r).await.is_ok(), "tenant b may see iris");
    keel.stop().await.unwrap();
}

/// Applies `toml` over the admin channel `ch`.
async fn apply(ch: Channel, toml: &str) -> Result<admin::ApplyPolicyResponse, tonic::Status> {
    admin::policy_admin_client::PolicyAdminClient::new(ch)
        .apply_policy(admin::ApplyPolicyRequest {
            toml: toml.to_string(),
            expected_revision: None,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn rotated_certificates_are_served_after_a_reload_and_bad_ones_are_refused() {
    let ca = Ca::new("keel test CA");
    let first = ca.sign(&["localhost"], "keel-1");
    let files = Files::new(&first, &ca);
    let policy = files.section("tls", false);
    let keel = Keel::with_admin(&policy).await;
    let admin_addr = keel.admin.unwrap();
    assert_eq!(served_certificate(keel.addr, &ca).await, first.der);

    // Rotate the files, then reload (the same document: no new revision, but the files
    // are read again).
    let second = ca.sign(&["localhost"], "keel-2");
    files.write_server(&second);
    let admin = keel.admin_channel().await;
    let r = apply(admin.clone(), &policy).await.unwrap();
    assert!(!r.changed);
    assert_eq!(served_certificate(keel.addr, &ca).await, second.der);
    // Open connections are not disturbed; new ones get the new certificate.
    let mut c = GrpcInferenceServiceClient::new(tls_channel(keel.addr, &ca, None).await);
    assert!(c.model_infer(simple_request()).await.is_ok());

    // A broken file: the reload is refused, naming the key, and the second certificate
    // keeps serving.
    std::fs::write(
        files.path("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nnope\n",
    )
    .unwrap();
    let s = apply(admin.clone(), &policy).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("server.tls.cert"), "{s:?}");
    assert_eq!(served_certificate(keel.addr, &ca).await, second.der);
    let (_, scrape) = get(admin_addr, "/metrics").await;
    assert_eq!(
        value(
            &scrape,
            "keel_tls_reloads_total{listener=\"traffic\",result=\"rejected\"}"
        ),
        Some(1.0),
        "{scrape}"
    );
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn only_admin_identities_may_change_the_policy_and_the_audit_names_them() {
    let ca = Ca::new("keel admin CA");
    let files = Files::new(&ca.sign(&["localhost"], "keel"), &ca);
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let policy = format!(
        "[server]\naudit_log = {:?}\n{}\n[auth]\nadmin_identities = [\"ops\"]\n",
        audit.display().to_string(),
        files.section("admin_tls", true)
    );
    let keel = Keel::with_admin(&policy).await;
    let admin_addr = keel.admin.unwrap();
    let changed = format!("{policy}\n[flags]\nx = true\n");

    let tenant = ca.sign(&["svc-a"], "svc-a");
    let ch = tls_channel(admin_addr, &ca, Some(&tenant)).await;
    let s = apply(ch.clone(), &changed).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("\"svc-a\""), "{s:?}");
    // Reading is still allowed.
    let got = admin::policy_admin_client::PolicyAdminClient::new(ch)
        .get_policy(admin::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.revision, 1);

    let ops = ca.sign(&["ops"], "Ops");
    let r = apply(tls_channel(admin_addr, &ca, Some(&ops)).await, &changed)
        .await
        .unwrap();
    assert!(r.changed);
    let source = r.policy.unwrap().source;
    assert!(source.ends_with("(mtls:ops)"), "{source}");

    let lines = std::fs::read_to_string(&audit).unwrap();
    assert!(
        lines.contains("(mtls:svc-a)") && lines.contains("may not change the policy"),
        "the refusal is audited with its identity:\n{lines}"
    );
    let read = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["outcome"] == "read")
        .expect("the read is audited");
    let source = read["source"].as_str().unwrap();
    assert!(
        source.starts_with("get-policy:admin@127.0.0.1:") && source.ends_with("(mtls:svc-a)"),
        "{source}"
    );
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn oversized_metadata_is_refused_and_normal_calls_pass() {
    let keel = Keel::with_config("[server]\nmax_metadata_size = \"4KiB\"\n").await;
    let mut c = keel.client().await;
    assert!(c.model_infer(simple_request()).await.is_ok());
    let mut r = tonic::Request::new(simple_request());
    r.metadata_mut()
        .insert("x-padding", "a".repeat(8 << 10).parse().unwrap());
    // Keel's edge refuses the call before any handler runs, naming the limit, with a gRPC
    // status (HTTP/2 itself only refuses blocks over 1 MiB, with HTTP 431).
    let s = c.model_infer(r).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message()
            .contains("above the limit of 4096 (server.max_metadata_size)"),
        "{s:?}"
    );
    use tonic_types::StatusExt as _;
    assert_eq!(
        s.get_details_error_info().unwrap().reason,
        "METADATA_TOO_LARGE"
    );
    // The connection is still good for calls within the limit.
    assert!(c.model_infer(simple_request()).await.is_ok());
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn streams_per_connection_are_capped_and_other_clients_keep_going() {
    let keel = Keel::with_config("[server]\nmax_concurrent_streams = 2\n").await;
    let flooder = keel.channel().await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(simple_request()).await.unwrap();
        let mut c = GrpcInferenceServiceClient::new(flooder.clone());
        let mut answers = c
            .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        assert!(answers.message().await.unwrap().is_some());
        held.push((tx, answers));
    }
    // A third call on the same connection waits for a free stream...
    let mut c = GrpcInferenceServiceClient::new(flooder.clone());
    let third = tokio::spawn(async move { c.model_infer(simple_request()).await });
    // ...while another client's calls go through.
    let mut other = keel.client().await;
    for _ in 0..5 {
        assert!(other.model_infer(simple_request()).await.is_ok());
    }
    assert!(
        !third.is_finished(),
        "a third stream ran beside two open ones"
    );
    // Ending one stream lets the third call in.
    drop(held.pop());
    let done = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("the third call ran once a stream was free")
        .unwrap();
    assert!(done.is_ok(), "{done:?}");
    drop((held, flooder));
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_and_counted() {
    let keel = Keel::with_admin("[server]\nmax_connections = 2\n").await;
    let admin_addr = keel.admin.unwrap();
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut c = keel.client().await;
        assert!(c.model_infer(simple_request()).await.is_ok());
        open.push(c);
    }
    let third = Endpoint::from_shared(keel.url()).unwrap().connect().await;
    let refused = match third {
        Err(_) => true,
        Ok(ch) => GrpcInferenceServiceClient::new(ch)
            .model_infer(simple_request())
            .await
            .is_err(),
    };
    assert!(refused, "a third connection was served");
    let (_, scrape) = get(admin_addr, "/metrics").await;
    let refused = value(
        &scrape,
        "keel_connections_refused_total{listener=\"traffic\"}",
    )
    .unwrap_or(0.0);
    assert!(refused >= 1.0, "{scrape}");

    // Closing one frees its slot (bounded poll: the server notices the close).
    drop(open.pop());
    let mut served = false;
    for _ in 0..200 {
        if let Ok(ch) = Endpoint::from_shared(keel.url()).unwrap().connect().await
            && GrpcInferenceServiceClient::new(ch)
                .model_infer(simple_request())
                .await
                .is_ok()
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "the freed slot was never reused");
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn sighup_rereads_the_certificates_of_a_running_keel() {
    let ca = Ca::new("keel test CA");
    let first = ca.sign(&["localhost"], "keel-1");
    let files = Files::new(&first, &ca);
    let config = files.path("policy.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nwatch = false\ndrain_grace = \"10ms\"\n{}",
            files.section("tls", false)
        ),
    )
    .unwrap();
    let keel = KeelProcess::spawn(&["--config", config.to_str().unwrap()], &[]).await;
    assert_eq!(served_certificate(keel.addr, &ca).await, first.der);

    let second = ca.sign(&["localhost"], "keel-2");
    files.write_server(&second);
    let pid = keel.pid().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(hup.success());
    // The reload runs beside the listener: poll (bounded) for the new certificate.
    let mut served = None;
    for _ in 0..500 {
        served = Some(served_certificate(keel.addr, &ca).await);
        if served.as_ref() == Some(&second.der) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        served,
        Some(second.der),
        "the rotated certificate is served"
    );
    assert_eq!(keel.stop().await, Some(0));
}

/// A gateway config forwarding `simple` over TLS to `upstream`, trusting `ca_file`, with a
/// client certificate when given.
fn via_tls(upstream: SocketAddr, ca_file: &Path, client: Option<(&Path, &Path)>) -> String {
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let mut s = format!(
        "[upstreams.up]\nendpoints = [\"https://{upstream}\"]\n\
         [upstreams.up.tls]\nca = {}\nserver_name = \"localhost\"\n",
        q(ca_file)
    );
    if let Some((cert, key)) = client {
        s.push_str(&format!("cert = {}\nkey = {}\n", q(cert), q(key)));
    }
    s.push_str("[models.simple]\nbackend = \"up\"\n[defaults.retry]\nmax_attempts = 1\n");
    s
}

#[tokio::test]
async fn keel_reaches_a_tls_upstream_and_presents_its_client_certificate() {
    let ca = Ca::new("upstream CA");
    // The upstream requires a client certificate signed by the same CA.
    let up_files = Files::new(&ca.sign(&["localhost"], "triton"), &ca);
    let upstream = Keel::with_config(&up_files.section("tls", true)).await;

    let dir = tempfile::tempdir().unwrap();
    let gateway = ca.sign(&["keel-gateway"], "keel-gateway");
    let (cert, key) = (dir.path().join("gw.pem"), dir.path().join("gw.key"));
    std::fs::write(&cert, &gateway.cert).unwrap();
    std::fs::write(&key, &gateway.key).unwrap();
    let other = Ca::new("someone else");
    let other_ca = dir.path().join("other.pem");
    std::fs::write(&other_ca, &other.pem).unwrap();
    let ca_file = up_files.path("ca.pem");

    let good = Keel::with_config(&via_tls(upstream.addr, &ca_file, Some((&cert, &key)))).await;
    let resp = good
        .client()
        .await
        .model_infer(simple_request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.model_name, "simple");

    // Without a client certificate, or trusting another CA, nothing gets through in
    // plaintext: the call fails.
    for config in [
        via_tls(upstream.addr, &ca_file, None),
        via_tls(upstream.addr, &other_ca, Some((&cert, &key))),
    ] {
        let bad = Keel::with_config(&config).await;
        let s = bad
            .client()
            .await
            .model_infer(simple_request())
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        bad.stop().await.unwrap();
    }
    good.stop().await.unwrap();
    upstream.stop().await.unwrap();
}

#[test]
fn upstream_tls_mistakes_are_named() {
    let e = keel::policy::Policy::parse(
        "[upstreams.a]\nendpoints = [\"https://127.0.0.1:1\"]\n\
         [upstreams.b]\nendpoints = [\"127.0.0.1:1\"]\n[upstreams.b.tls]\ncert = \"/nonexistent/c.pem\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("upstreams.a.endpoints[0]: https:// needs a [tls] table"),
        "{e}"
    );
    assert!(e.contains("upstreams.b.tls.ca: is required"), "{e}");
    assert!(
        e.contains("upstreams.b.tls.cert: cannot read /nonexistent/c.pem"),
        "{e}"
    );
    assert!(e.contains("upstreams.b.tls.key: give both"), "{e}");
}
