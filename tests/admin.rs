//! The admin API, black box over real gRPC: `keel.admin.v1.PolicyAdmin` reads, checks,
//! applies, rolls back and flips flags; refusals carry the right codes and every problem;
//! traffic reports the revision it used; every change is audited with its principal; and a
//! configured bearer token is required.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use keel::pb::keel_admin as admin;
use tonic::{Code, Request, Response};
use tonic_types::StatusExt;

/// A Keel with an admin listener, its clients, and the directory of its audit log.
struct Admin {
    keel: Keel,
    client: AdminClient,
    traffic: Client,
    dir: tempfile::TempDir,
    /// Lines added to `[server]`, in every document the test writes.
    extra_server: String,
}

impl Admin {
    /// Starts Keel on [`Admin::policy`] `("v1", "30s")`, plus `extra_server` lines in
    /// `[server]`.
    async fn start(extra_server: &str) -> Admin {
        let dir = tempfile::tempdir().unwrap();
        let text = policy_in(&dir.path().join("audit.jsonl"), extra_server, "v1", "30s");
        let keel = Keel::with_admin(&text).await;
        let client = keel.admin_client().await;
        let traffic = keel.client().await;
        Admin {
            keel,
            client,
            traffic,
            dir,
            extra_server: extra_server.to_string(),
        }
    }

    /// The startup document with another `policy_version` and default timeout.
    fn policy(&self, version: &str, timeout: &str) -> String {
        policy_in(&self.audit_path(), &self.extra_server, version, timeout)
    }

    fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// Every audit line so far (they are written before the change is answered).
    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The revision a `simple` inference reports.
    async fn traffic_revision(&mut self) -> u64 {
        let resp = self.traffic.model_infer(simple_request()).await.unwrap();
        revision(&resp)
    }

    async fn current(&mut self) -> admin::PolicyInfo {
        self.client
            .get_policy(admin::GetPolicyRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    async fn apply(
        &mut self,
        toml: String,
        expected_revision: Option<u64>,
    ) -> Result<admin::ApplyPolicyResponse, tonic::Status> {
        self.client
            .apply_policy(admin::ApplyPolicyRequest {
                toml,
                expected_revision,
            })
            .await
            .map(Response::into_inner)
    }

    async fn set_flag(
        &mut self,
        name: &str,
        value: admin::set_flag_request::Value,
        expected_revision: Option<u64>,
    ) -> Result<admin::ApplyPolicyResponse, tonic::Status> {
        self.client
            .set_flag(admin::SetFlagRequest {
                name: name.into(),
                value: Some(value),
                expected_revision,
            })
            .await
            .map(Response::into_inner)
    }

    async fn stop(self) {
        self.keel.stop().await.unwrap();
    }
}

/// The test policy: `simple` on the embedded backend, two flags, the audit log at `audit`.
fn policy_in(audit: &std::path::Path, extra_server: &str, version: &str, timeout: &str) -> String {
    format!(
        "policy_version = \"{version}\"\n\
         [server]\n\
         audit_log = \"{audit}\"\n\
         {extra_server}\n\
         [defaults]\n\
         timeout = \"{timeout}\"\n\
         [flags]\n\
         # Sends a share of simple to the canary.\n\
         canary = false\n\
         tier = \"standard\"\n\
         [models.simple]\n\
         routes = [{{ backend = \"embedded\", weight = 90 }}, \
           {{ name = \"canary\", backend = \"embedded\", weight = 10, flag = \"canary\" }}]\n",
        audit = audit.display()
    )
}

/// `toml` with two problems: a misspelt key and an unknown backend.
fn with_two_problems(toml: &str) -> String {
    format!("{toml}[models.simple.retry]\nmax_atempts = 2\n[models.iris]\nbackend = \"nowhere\"\n")
}

const MISSPELT: &str = "models.simple.retry.max_atempts: unknown key, did you mean max_attempts?";
const UNKNOWN_BACKEND: &str = "models.iris.backend: unknown backend \"nowhere\"";

/// `message` sent as `principal`.
fn from<T>(principal: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-keel-principal", principal.parse().unwrap());
    request
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn info(resp: &admin::ApplyPolicyResponse) -> &admin::PolicyInfo {
    resp.policy
        .as_ref()
        .expect("the answer names the current policy")
}

fn changed(resp: &admin::ApplyPolicyResponse) -> Vec<String> {
    resp.changes.clone().unwrap_or_default().changed
}

#[tokio::test]
async fn get_policy_returns_the_startup_document_and_traffic_reports_its_revision() {
    let mut a = Admin::start("").await;
    let info = a.current().await;
    assert_eq!(info.revision, 1);
    assert_eq!(info.toml, a.policy("v1", "30s"));
    assert!(is_hash(&info.hash), "{}", info.hash);
    assert_eq!(info.policy_version.as_deref(), Some("v1"));
    assert_eq!(
        info.source, "startup",
        "a document given directly names no file"
    );
    // RFC 3339 UTC with milliseconds: 2026-11-28T12:00:00.000Z
    assert_eq!(info.loaded_at.len(), 24, "{}", info.loaded_at);
    assert!(info.loaded_at.ends_with('Z') && info.loaded_at.as_bytes()[10] == b'T');
    assert_eq!(a.traffic_revision().await, 1);
    a.stop().await;
}

#[tokio::test]
async fn apply_makes_a_new_revision_that_traffic_uses_and_the_same_document_changes_nothing() {
    let mut a = Admin::start("").await;
    let first = a.current().await;
    let v2 = a.policy("v2", "20s");
    let resp = a.apply(v2.clone(), None).await.unwrap();
    assert!(resp.changed);
    assert_eq!(info(&resp).revision, 2);
    assert_ne!(info(&resp).hash, first.hash);
    assert_eq!(info(&resp).policy_version.as_deref(), Some("v2"));
    assert!(
        info(&resp).source.starts_with("admin:admin@127.0.0.1:"),
        "{}",
        info(&resp).source
    );
    assert_eq!(changed(&resp), ["defaults.timeout", "policy_version"]);
    assert_eq!(a.traffic_revision().await, 2);

    // The same document again, and the same document reformatted: no new revision.
    for same in [v2.clone(), format!("# reformatted\n\n{v2}")] {
        let resp = a.apply(same, None).await.unwrap();
        assert!(!resp.changed);
        assert_eq!(info(&resp).revision, 2);
        assert_eq!(resp.changes.unwrap_or_default(), admin::Changes::default());
    }
    assert_eq!(a.current().await.revision, 2);
    assert_eq!(a.traffic_revision().await, 2);
    a.stop().await;
}

#[tokio::test]
async fn an_invalid_document_is_refused_with_every_problem_by_path_and_traffic_keeps_serving() {
    let mut a = Admin::start("").await;
    let bad = with_two_problems(&a.policy("v2", "20s"));
    let s = a.apply(bad, None).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let lines: Vec<&str> = s.message().lines().collect();
    assert!(lines.contains(&MISSPELT), "{}", s.message());
    assert!(
        lines.iter().any(|l| l.starts_with(UNKNOWN_BACKEND)),
        "{}",
        s.message()
    );
    let violations = s.get_details_bad_request().unwrap().field_violations;
    let misspelt = violations
        .iter()
        .find(|v| v.field == "models.simple.retry.max_atempts")
        .unwrap_or_else(|| panic!("{violations:?}"));
    assert_eq!(
        misspelt.description,
        "unknown key, did you mean max_attempts?"
    );
    assert!(
        violations.iter().any(|v| v.field == "models.iris.backend"
            && v.description.starts_with("unknown backend \"nowhere\"")),
        "{violations:?}"
    );

    assert_eq!(a.current().await.revision, 1);
    assert_eq!(
        a.traffic_revision().await,
        1,
        "the old policy keeps serving"
    );
    a.stop().await;
}

#[tokio::test]
async fn a_stale_revision_is_aborted_and_a_listener_change_needs_a_restart() {
    let mut a = Admin::start("").await;
    let resp = a.apply(a.policy("v2", "20s"), Some(1)).await.unwrap();
    assert_eq!(info(&resp).revision, 2);

    let s = a.apply(a.policy("v3", "10s"), Some(1)).await.unwrap_err();
    assert_eq!(s.code(), Code::Aborted);
    assert!(
        s.message().contains("current revision is 2"),
        "{}",
        s.message()
    );

    let moved = a
        .policy("v3", "10s")
        .replace("[server]\n", "[server]\nlisten = \"127.0.0.1:9\"\n");
    let s = a.apply(moved, None).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("restart"), "{}", s.message());
    assert!(s.message().contains("server.listen"), "{}", s.message());

    assert_eq!(a.current().await.revision, 2);
    assert_eq!(a.traffic_revision().await, 2);
    a.stop().await;
}

#[tokio::test]
async fn rollback_restores_an_earlier_document_as_a_new_revision_and_revisions_are_listed() {
    let mut a = Admin::start("").await;
    let first = a.current().await;
    a.apply(a.policy("v2", "20s"), None).await.unwrap();

    let resp = a
        .client
        .rollback_policy(admin::RollbackPolicyRequest { revision: 1 })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.changed);
    assert_eq!(info(&resp).revision, 3);
    assert_eq!(info(&resp).hash, first.hash);
    assert!(
        info(&resp).source.starts_with("rollback:admin@127.0.0.1:")
            && info(&resp).source.ends_with(":to=1"),
        "{}",
        info(&resp).source
    );
    assert_eq!(changed(&resp), ["defaults.timeout", "policy_version"]);
    assert_eq!(a.current().await.toml, first.toml);
    assert_eq!(a.traffic_revision().await, 3);

    let s = a
        .client
        .rollback_policy(admin::RollbackPolicyRequest { revision: 99 })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    assert!(s.message().contains("99"), "{}", s.message());

    let list = a
        .client
        .list_revisions(admin::ListRevisionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.current, 3);
    let revisions: Vec<u64> = list.revisions.iter().map(|r| r.revision).collect();
    assert_eq!(revisions, [1, 2, 3]);
    let versions: Vec<&str> = list
        .revisions
        .iter()
        .map(|r| r.policy_version.as_deref().unwrap())
        .collect();
    assert_eq!(versions, ["v1", "v2", "v1"]);
    assert_eq!(list.revisions[0].hash, list.revisions[2].hash);
    assert!(list.revisions.iter().all(|r| r.toml.is_empty()));
    a.stop().await;
}

#[tokio::test]
async fn set_flag_changes_one_flag_as_a_new_revision_keeping_the_rest_of_the_text() {
    use admin::set_flag_request::Value;
    let mut a = Admin::start("").await;
    let resp = a
        .set_flag("canary", Value::BoolValue(true), None)
        .await
        .unwrap();
    assert!(resp.changed);
    assert_eq!(info(&resp).revision, 2);
    assert_eq!(changed(&resp), ["flags.canary"]);
    assert!(
        info(&resp).source.ends_with(":canary"),
        "{}",
        info(&resp).source
    );
    let text = a.current().await.toml;
    assert!(text.contains("canary = true"), "{text}");
    assert!(
        text.contains("# Sends a share of simple to the canary."),
        "{text}"
    );
    assert!(text.contains("tier = \"standard\""), "{text}");

    let resp = a
        .set_flag("tier", Value::StringValue("premium".into()), Some(2))
        .await
        .unwrap();
    assert_eq!(info(&resp).revision, 3);
    assert!(a.current().await.toml.contains("tier = \"premium\""));
    assert_eq!(a.traffic_revision().await, 3);

    let s = a
        .set_flag("nope", Value::BoolValue(true), None)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    assert!(s.message().contains("nope"), "{}", s.message());

    let s = a
        .set_flag("canary", Value::BoolValue(false), Some(1))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Aborted);

    let s = a
        .client
        .set_flag(admin::SetFlagRequest {
            name: "canary".into(),
            value: None,
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(a.current().await.revision, 3);
    a.stop().await;
}

#[tokio::test]
async fn validate_is_a_dry_run_reporting_problems_or_changes() {
    let mut a = Admin::start("").await;
    let current = a.current().await;
    let validate = |toml: String| admin::ValidatePolicyRequest { toml };

    let bad = with_two_problems(&a.policy("v2", "20s"));
    let r = a
        .client
        .validate_policy(validate(bad))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.valid);
    let problems: Vec<String> = r
        .problems
        .iter()
        .map(|p| format!("{}: {}", p.path, p.message))
        .collect();
    assert!(problems.contains(&MISSPELT.to_string()), "{problems:?}");
    assert!(
        problems.iter().any(|p| p.starts_with(UNKNOWN_BACKEND)),
        "{problems:?}"
    );

    let moved = a
        .policy("v1", "30s")
        .replace("[server]\n", "[server]\nlisten = \"127.0.0.1:9\"\n");
    let r = a
        .client
        .validate_policy(validate(moved))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.valid);
    assert_eq!(r.problems[0].path, "server.listen");
    assert!(r.problems[0].message.contains("restart"));

    let r = a
        .client
        .validate_policy(validate(a.policy("v2", "20s")))
        .await
        .unwrap()
        .into_inner();
    assert!(r.valid);
    assert!(r.problems.is_empty());
    assert!(is_hash(&r.hash) && r.hash != current.hash);
    assert_eq!(
        r.changes.unwrap().changed,
        ["defaults.timeout", "policy_version"]
    );

    let r = a
        .client
        .validate_policy(validate(current.toml.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(r.valid);
    assert_eq!(r.hash, current.hash);
    assert_eq!(r.changes.unwrap(), admin::Changes::default());

    // Nothing changed: beyond startup, the audit has only the reads, each with its caller.
    assert_eq!(a.current().await.revision, 1);
    let lines = a.audit();
    let read: Vec<(&str, &str)> = lines[1..]
        .iter()
        .map(|l| {
            let source = l["source"].as_str().unwrap();
            (
                l["outcome"].as_str().unwrap(),
                &source[..source.find('@').unwrap()],
            )
        })
        .collect();
    assert_eq!(lines[0]["outcome"], "accepted");
    assert_eq!(
        read,
        [
            ("read", "get-policy:admin"),
            ("read", "validate-policy:admin"),
            ("read", "validate-policy:admin"),
            ("read", "validate-policy:admin"),
            ("read", "validate-policy:admin"),
            ("read", "get-policy:admin"),
        ]
    );
    assert!(
        lines[1..]
            .iter()
            .all(|l| l["revision"] == 1 && l["hash"] == current.hash.as_str())
    );
    a.stop().await;
}

#[tokio::test]
async fn the_audit_log_records_every_accepted_and_refused_change_with_its_principal() {
    use admin::set_flag_request::Value;
    let mut a = Admin::start("").await;
    let apply = |toml: String, expected_revision| admin::ApplyPolicyRequest {
        toml,
        expected_revision,
    };
    a.client
        .apply_policy(from("alice", apply(a.policy("v2", "20s"), None)))
        .await
        .unwrap();
    let bad = with_two_problems(&a.policy("v3", "10s"));
    a.client
        .apply_policy(from("bob", apply(bad, None)))
        .await
        .unwrap_err();
    a.client
        .apply_policy(from("carol", apply(a.policy("v3", "10s"), Some(1))))
        .await
        .unwrap_err();
    a.client
        .set_flag(from(
            "dave",
            admin::SetFlagRequest {
                name: "canary".into(),
                value: Some(Value::BoolValue(true)),
                expected_revision: None,
            },
        ))
        .await
        .unwrap();
    a.client
        .rollback_policy(from("erin", admin::RollbackPolicyRequest { revision: 1 }))
        .await
        .unwrap();

    // A principal that is too long is refused before anything is tried.
    let s = a
        .client
        .apply_policy(from(&"x".repeat(65), apply(a.policy("v4", "5s"), None)))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("x-keel-principal"), "{}", s.message());
    // Reads are audited too, with the revision they saw.
    a.client
        .list_revisions(from("frank", admin::ListRevisionsRequest {}))
        .await
        .unwrap();

    let lines = a.audit();
    let outcomes: Vec<&str> = lines
        .iter()
        .map(|l| l["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        [
            "accepted", "accepted", "rejected", "rejected", "accepted", "accepted", "read"
        ]
    );
    let sources: Vec<&str> = lines
        .iter()
        .map(|l| l["source"].as_str().unwrap())
        .collect();
    for (source, prefix) in sources[1..].iter().zip([
        "admin:alice@127.0.0.1:",
        "admin:bob@127.0.0.1:",
        "admin:carol@127.0.0.1:",
        "set-flag:dave@127.0.0.1:",
        "rollback:erin@127.0.0.1:",
        "list-revisions:frank@127.0.0.1:",
    ]) {
        assert!(
            source.starts_with(prefix),
            "{source} should start with {prefix}"
        );
    }
    let revisions: Vec<u64> = lines
        .iter()
        .map(|l| l["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revisions, [1, 2, 2, 2, 3, 4, 4]);
    let reasons: Vec<&str> = lines[2]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(reasons.contains(&MISSPELT), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.starts_with(UNKNOWN_BACKEND)),
        "{reasons:?}"
    );
    assert!(
        lines[3]["reasons"][0]
            .as_str()
            .unwrap()
            .contains("expected revision 1"),
        "{}",
        lines[3]
    );
    assert_eq!(lines[1]["changes"]["changed"][0], "defaults.timeout");
    a.stop().await;
}

/// A new environment variable name for each test, so tests never share a token.
fn unique_var() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "KEEL_ADMIN_TEST_TOKEN_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn bearer<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn with_a_token_configured_every_admin_call_needs_it() {
    // The crate forbids unsafe code, tests included, so the token cannot be set with
    // `std::env::set_var` here: it goes into the environment of a `keel serve` process.
    let var = unique_var();
    let token = "tok-3f9a1c";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    let audit = dir.path().join("audit.jsonl");
    let text = |version: &str| {
        let extra = format!("admin_token_env = \"{var}\"\nwatch = false");
        policy_in(&audit, &extra, version, "30s")
    };
    std::fs::write(&file, text("v1")).unwrap();
    let keel = KeelProcess::spawn(&["--config", file.to_str().unwrap()], &[(&var, token)]).await;
    let mut client =
        admin::policy_admin_client::PolicyAdminClient::connect(format!("http://{}", keel.admin))
            .await
            .unwrap();
    let apply = |toml: String| admin::ApplyPolicyRequest {
        toml,
        expected_revision: Some(1),
    };

    let s = client
        .get_policy(admin::GetPolicyRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    for wrong in ["tok-wrong", "tok-3f9a1", "tok-3f9a1c0"] {
        let s = client
            .get_policy(bearer(wrong, admin::GetPolicyRequest {}))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{wrong}");
        assert!(
            !s.message().contains(token) && !s.message().contains(wrong),
            "{}",
            s.message()
        );
    }
    let s = client
        .apply_policy(bearer("tok-wrong", apply(text("v2"))))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);

    let current = client
        .get_policy(bearer(token, admin::GetPolicyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(current.revision, 1, "a refused caller changed nothing");
    let resp = client
        .apply_policy(bearer(token, apply(text("v2"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info(&resp).revision, 2);
    // Traffic never needs the admin token.
    let answer = connect(keel.addr)
        .await
        .model_infer(simple_request())
        .await
        .unwrap();
    assert_eq!(revision(&answer), 2);
    assert_eq!(keel.stop().await, Some(0));
}

#[tokio::test]
async fn startup_fails_naming_the_variable_when_the_admin_token_is_unset() {
    let var = unique_var();
    let text = format!("[server]\nadmin_token_env = \"{var}\"\n");
    let keel = Keel::with_admin(&text).await;
    let e = keel.stop().await.unwrap_err();
    assert!(matches!(e, keel::ServeError::AdminToken(_)), "{e:?}");
    assert!(e.to_string().contains(&var), "{e}");
    assert!(e.to_string().contains("is not set"), "{e}");
}

#[tokio::test]
async fn the_admin_listener_serves_health_and_reflection_for_its_own_services() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let a = Admin::start("").await;
    let admin_services = list_services(a.keel.admin_channel().await).await;
    assert!(
        admin_services.contains(&"keel.admin.v1.PolicyAdmin".to_string()),
        "{admin_services:?}"
    );
    assert!(
        admin_services.contains(&"grpc.health.v1.Health".to_string()),
        "{admin_services:?}"
    );
    assert!(
        !admin_services.contains(&"inference.GRPCInferenceService".to_string()),
        "{admin_services:?}"
    );
    let traffic_services = list_services(a.keel.channel().await).await;
    assert!(
        traffic_services.contains(&"inference.GRPCInferenceService".to_string()),
        "{traffic_services:?}"
    );
    assert!(
        !traffic_services.contains(&"keel.admin.v1.PolicyAdmin".to_string()),
        "the traffic listener does not serve the admin API: {traffic_services:?}"
    );

    let mut health = HealthClient::new(a.keel.admin_channel().await);
    let r = health
        .check(HealthCheckRequest {
            service: "keel.admin.v1.PolicyAdmin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, ServingStatus::Serving as i32);
    a.stop().await;
}

#[tokio::test]
async fn shutdown_closes_the_admin_listener() {
    let mut a = Admin::start("").await;
    assert_eq!(a.current().await.revision, 1);
    let admin_url = format!("http://{}", a.keel.admin.unwrap());
    a.stop().await;
    let refused = admin::policy_admin_client::PolicyAdminClient::connect(admin_url).await;
    assert!(
        refused.is_err(),
        "the admin listener is closed after serve returns"
    );
}

/// The services a listener's reflection lists.
async fn list_services(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list, got {first:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}

/// An ApplyPolicy whose body is `message`, framed by hand, over raw HTTP/2 to `addr`, as
/// `principal`; its status (trailers-only).
async fn raw_apply(addr: std::net::SocketAddr, principal: &str, message: &[u8]) -> tonic::Status {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap();
    let req = http::Request::post("http://keel/keel.admin.v1.PolicyAdmin/ApplyPolicy")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-keel-principal", principal)
        .body(())
        .unwrap();
    let (res, mut body) = send.send_request(req, false).unwrap();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(message);
    body.send_data(framed.into(), true).unwrap();
    let res = res.await.unwrap();
    let s = tonic::Status::from_header_map(res.headers()).expect("a trailers-only refusal");
    driver.abort();
    s
}

#[tokio::test]
async fn changes_the_decoder_refuses_get_the_traffic_codes_and_are_audited() {
    let a = Admin::start("max_message_size = \"64KiB\"").await;
    let addr = a.keel.admin.unwrap();
    // A document over server.max_message_size: OUT_OF_RANGE from tonic, never audited.
    let big = a.policy("v2", "5s") + &format!("# {}\n", "x".repeat(80 << 10));
    let s = a
        .client
        .clone()
        .apply_policy(from(
            "mallory",
            admin::ApplyPolicyRequest {
                toml: big,
                expected_revision: None,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(
        s.get_details_error_info().unwrap().reason,
        "REQUEST_TOO_LARGE"
    );
    assert!(
        s.message().contains("server.max_message_size"),
        "{}",
        s.message()
    );
    // A document that is not UTF-8 (field 1, `toml`): INTERNAL from tonic, never audited.
    let s = raw_apply(addr, "oscar", &[0x0a, 0x02, 0xc3, 0x28]).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert_eq!(
        s.get_details_error_info().unwrap().reason,
        "MALFORMED_REQUEST"
    );
    assert!(
        s.message()
            .contains("ApplyPolicyRequest.toml: invalid string value: data is not UTF-8 encoded"),
        "{}",
        s.message()
    );

    let lines = a.audit();
    let refused: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["outcome"] == "rejected")
        .collect();
    assert_eq!(refused.len(), 2, "{lines:?}");
    for (line, (who, why)) in refused.iter().zip([
        ("admin:mallory@127.0.0.1:", "larger than Keel takes"),
        ("admin:oscar@127.0.0.1:", "not UTF-8 encoded"),
    ]) {
        let source = line["source"].as_str().unwrap();
        assert!(source.starts_with(who), "{source}");
        let reason = line["reasons"][0].as_str().unwrap();
        assert!(reason.contains(why), "{reason}");
    }
    // The policy did not change.
    assert_eq!(
        a.client
            .clone()
            .get_policy(admin::GetPolicyRequest {})
            .await
            .unwrap()
            .into_inner()
            .revision,
        1
    );
    a.stop().await;
}
