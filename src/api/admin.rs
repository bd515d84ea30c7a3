//! `keel.admin.v1.PolicyAdmin`: reads, checks, changes and rolls back the policy of a running
//! Keel, over the policy [`Store`].
//!
//! # Authentication
//!
//! With `server.admin_token_env` set, [`Authenticate`] refuses every call that does not carry
//! `authorization: Bearer <token>` with UNAUTHENTICATED, before any handler runs. The token
//! is kept only as its SHA-256 digest, and digests are compared in constant time.
//!
//! # Principal
//!
//! Each call, change or read, is audited with the caller's `x-keel-principal` (1 to 64 printable ASCII
//! characters; `admin` when absent), its address, and what vouches for it: its verified
//! client certificate identity, the admin token, or a loopback address
//! (`alice@127.0.0.1:53122 (mtls:ops.example.org)`, `(token)`, `(loopback)`). The name is
//! the caller's claim; the part in brackets is what Keel verified.
//!
//! # Admin identities
//!
//! When the admin listener requires client certificates (`server.admin_tls.client_ca`),
//! only the identities in `auth.admin_identities` may change the policy (ApplyPolicy,
//! RollbackPolicy, SetFlag); anyone else is refused with PERMISSION_DENIED, and the refusal
//! is audited. Reads stay open to every verified client.
//!
//! # Errors
//!
//! A refused change becomes a status in exactly one place, [`to_status`]:
//!
//! | refusal | status |
//! |---|---|
//! | invalid document | INVALID_ARGUMENT, every problem on its own line and as a `BadRequest` violation |
//! | listener settings changed | FAILED_PRECONDITION |
//! | stale `expected_revision` | ABORTED |
//! | unknown revision or flag | NOT_FOUND |
//! | caller not in `auth.admin_identities` | PERMISSION_DENIED |
//!
//! A request tonic's decoder refuses (larger than `server.max_message_size`, or not a
//! message of its type: invalid UTF-8 in the document, say) never reaches a handler; it is
//! answered as on the traffic listener (RESOURCE_EXHAUSTED `REQUEST_TOO_LARGE`,
//! INVALID_ARGUMENT `MALFORMED_REQUEST`, through [`unreadable`](super::unreadable)), and a
//! refused change is audited all the same ([`Audited`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::status::DOMAIN;
use crate::pb::keel_admin as proto;
use crate::policy::{Applied, ApplyError, Change, Flag, Snapshot, Source, Store, rfc3339};
use crate::transport::Peer;
use proto::policy_admin_server::{PolicyAdmin, PolicyAdminServer};

/// The metadata key a caller names itself with.
pub const PRINCIPAL: &str = "x-keel-principal";

/// The principal recorded when the caller names none.
const DEFAULT_PRINCIPAL: &str = "admin";

/// Longest accepted `x-keel-principal`.
const MAX_PRINCIPAL: usize = 64;

/// The admin service as served: [`AdminApi`] behind [`Authenticate`], its unreadable
/// requests answered and audited by [`Audited`].
pub type AdminService = Audited<InterceptedService<PolicyAdminServer<AdminApi>, Authenticate>>;

/// The admin service over `store`; with `token`, every call must present it. It reads
/// messages up to `server.max_message_size`, as the traffic listener does.
pub fn service(store: Arc<Store>, token: Option<AdminToken>) -> AdminService {
    let max_message_size = store.current().policy.server.max_message_size;
    let api = AdminApi {
        store: store.clone(),
        token: token.is_some(),
    };
    let server = PolicyAdminServer::new(api)
        .max_decoding_message_size(max_message_size)
        .max_encoding_message_size(max_message_size);
    Audited {
        inner: InterceptedService::new(
            server,
            Authenticate {
                token: token.clone(),
            },
        ),
        store,
        token: token.is_some(),
    }
}

/// The methods that change the policy: a refusal of theirs is audited.
const CHANGES: [&str; 3] = [
    "/keel.admin.v1.PolicyAdmin/ApplyPolicy",
    "/keel.admin.v1.PolicyAdmin/RollbackPolicy",
    "/keel.admin.v1.PolicyAdmin/SetFlag",
];

/// Answers a request tonic's decoder refused in Keel's words
/// ([`unreadable::fix_response`](super::unreadable::fix_response)) and, for a change,
/// audits the refusal: the handler that audits every other refusal never ran.
#[derive(Clone)]
pub struct Audited<S> {
    inner: S,
    store: Arc<Store>,
    token: bool,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Audited<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> tower::Service<http::Request<B>> for Audited<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Who asked, should the change be refused unread: its metadata and its peer.
        let asker = CHANGES.contains(&req.uri().path()).then(|| {
            Request::from_parts(
                tonic::metadata::MetadataMap::from_headers(req.headers().clone()),
                req.extensions().clone(),
                (),
            )
        });
        let (store, token) = (self.store.clone(), self.token);
        let answer = self.inner.call(req);
        Box::pin(async move {
            let res = answer.await?;
            let res = super::unreadable::fix_response(res, store.current().revision);
            let refused = res.extensions().get::<super::unreadable::Refused>();
            if let (Some(asker), Some(super::unreadable::Refused(e))) = (asker, refused) {
                let principal =
                    principal(&asker, token).unwrap_or_else(|_| format!("an invalid {PRINCIPAL}"));
                let source = Source::Admin { principal };
                let e = ApplyError::Unreadable(e.to_string());
                let audited = tokio::task::spawn_blocking(move || store.refuse(&source, e)).await;
                if let Err(e) = audited {
                    tracing::error!(error = %e, "an unreadable admin change could not be audited");
                }
            }
            Ok(res)
        })
    }
}

/// The service.
pub struct AdminApi {
    store: Arc<Store>,
    /// Whether every call carries the admin token (checked by [`Authenticate`]).
    token: bool,
}

/// The admin bearer token, kept as its SHA-256 digest so the token itself is not held in
/// memory and a comparison takes the same time whatever the presented token's length.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

/// Why the admin token could not be read at startup.
#[derive(Debug, thiserror::Error)]
#[error("server.admin_token_env names the environment variable {var}, but it {problem}")]
pub struct AdminTokenError {
    /// The variable.
    pub var: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl AdminToken {
    /// Reads the token from the environment variable `var`: it must be set, not empty, and
    /// fit in a header (visible ASCII, no spaces).
    pub fn from_env(var: &str) -> Result<AdminToken, AdminTokenError> {
        let problem = |problem| AdminTokenError {
            var: var.to_string(),
            problem,
        };
        let token = match std::env::var(var) {
            Ok(t) => t,
            Err(std::env::VarError::NotPresent) => return Err(problem("is not set")),
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(problem("does not hold valid UTF-8"));
            }
        };
        if token.is_empty() {
            return Err(problem("is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(problem(
                "holds characters other than visible ASCII, which a header cannot carry",
            ));
        }
        Ok(AdminToken::new(&token))
    }

    fn new(token: &str) -> AdminToken {
        AdminToken {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Whether `presented` is the token, in time independent of where they differ.
    fn matches(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        constant_time_eq(&self.digest, &presented)
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// Compares two byte strings of equal length without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// Checks the bearer token of every admin call; with no token configured, lets every call
/// through (the policy allows that only on a loopback admin listener).
#[derive(Clone, Debug)]
pub struct Authenticate {
    token: Option<AdminToken>,
}

impl Interceptor for Authenticate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| {
                Status::unauthenticated(
                    "the admin API needs `authorization: Bearer <token>` (server.admin_token_env is set)",
                )
            })?
            .to_str()
            .unwrap_or_default();
        // The scheme is case-insensitive (RFC 7235); the message never echoes the header.
        let presented = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match presented {
            Some(t) if token.matches(t) => Ok(request),
            Some(_) => Err(Status::unauthenticated("the admin token is not valid")),
            None => Err(Status::unauthenticated(
                "the authorization metadata must be `Bearer <token>`",
            )),
        }
    }
}

/// What vouches for an admin caller: its certificate identity, the token, or loopback (the
/// policy allows an admin listener without either only on a loopback address).
fn vouched<T>(request: &Request<T>, token: bool) -> String {
    match Peer::identity_of(request) {
        Some(id) => format!("mtls:{id}"),
        None if token => "token".to_string(),
        None => "loopback".to_string(),
    }
}

/// Who is changing the policy: `x-keel-principal` (or `admin`), the peer address, and
/// what vouches for the caller.
fn principal<T>(request: &Request<T>, token: bool) -> Result<String, Status> {
    let name = match request.metadata().get(PRINCIPAL) {
        None => DEFAULT_PRINCIPAL,
        Some(v) => v
            .to_str()
            .ok()
            .filter(|s| {
                (1..=MAX_PRINCIPAL).contains(&s.len())
                    && s.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
            })
            .ok_or_else(|| {
                let mut details = ErrorDetails::new();
                details.add_bad_request_violation(
                    PRINCIPAL,
                    format!("must be 1 to {MAX_PRINCIPAL} printable ASCII characters"),
                );
                Status::with_error_details(
                    Code::InvalidArgument,
                    format!("{PRINCIPAL} must be 1 to {MAX_PRINCIPAL} printable ASCII characters"),
                    details,
                )
            })?,
    };
    let vouched = vouched(request, token);
    Ok(match Peer::addr_of(request) {
        Some(addr) => format!("{name}@{addr} ({vouched})"),
        None => format!("{name} ({vouched})"),
    })
}

/// The status for a refused change, with `google.rpc.ErrorInfo` (a stable reason, domain
/// `keel`) and the violations of the refusal.
pub fn to_status(e: &ApplyError) -> Status {
    let mut details = ErrorDetails::new();
    let mut info = HashMap::new();
    let (code, reason) = match e {
        ApplyError::Invalid(errors) => {
            for err in &errors.0 {
                details.add_bad_request_violation(err.path.clone(), err.message.clone());
            }
            (Code::InvalidArgument, "INVALID_POLICY")
        }
        ApplyError::RestartNeeded(keys) => {
            for key in keys {
                details.add_precondition_failure_violation(
                    "RESTART_NEEDED",
                    key.clone(),
                    "a listener setting: restart Keel to change it",
                );
            }
            (Code::FailedPrecondition, "RESTART_NEEDED")
        }
        ApplyError::Stale { expected, current } => {
            info.insert("expected_revision".to_string(), expected.to_string());
            info.insert("current_revision".to_string(), current.to_string());
            (Code::Aborted, "STALE_REVISION")
        }
        ApplyError::UnknownRevision(r) => {
            info.insert("revision".to_string(), r.to_string());
            (Code::NotFound, "UNKNOWN_REVISION")
        }
        ApplyError::UnknownFlag(flag) => {
            info.insert("flag".to_string(), flag.clone());
            (Code::NotFound, "UNKNOWN_FLAG")
        }
        ApplyError::NotAnAdmin(_) => (Code::PermissionDenied, "NOT_AN_ADMIN"),
        // Answered by `Audited` as the traffic listener answers it; never built here.
        ApplyError::Unreadable(_) => (Code::InvalidArgument, "MALFORMED_REQUEST"),
    };
    details.set_error_info(reason, DOMAIN, info);
    Status::with_error_details(code, e.to_string(), details)
}

/// A snapshot as the API describes it; the document only when `with_text`.
fn info(s: &Snapshot, with_text: bool) -> proto::PolicyInfo {
    proto::PolicyInfo {
        revision: s.revision,
        hash: s.hash.clone(),
        policy_version: s.policy.version.clone(),
        source: s.source.to_string(),
        loaded_at: rfc3339(s.loaded_at),
        toml: if with_text {
            s.text.clone()
        } else {
            String::new()
        },
    }
}

fn changes(c: Change) -> proto::Changes {
    let Change {
        added,
        removed,
        changed,
    } = c;
    proto::Changes {
        added,
        removed,
        changed,
    }
}

impl AdminApi {
    /// Refuses a change (audited, PERMISSION_DENIED) when the admin listener verifies
    /// client certificates and the caller's identity is not in `auth.admin_identities`.
    fn may_change<T>(&self, request: &Request<T>, source: &Source) -> Result<(), Status> {
        let current = self.store.current();
        let policy = &current.policy;
        if !policy.server.admin_tls.as_ref().is_some_and(|t| t.mutual()) {
            return Ok(());
        }
        let identity = Peer::identity_of(request);
        if identity.is_some_and(|id| policy.auth.admin_identities.iter().any(|a| a == id)) {
            return Ok(());
        }
        let who = identity.map_or_else(
            || "a caller without a certificate identity".to_string(),
            |id| format!("identity {id:?}"),
        );
        Err(to_status(
            &self.store.refuse(source, ApplyError::NotAnAdmin(who)),
        ))
    }

    /// Audits a read (`what`: `get-policy`, `list-revisions`, `validate-policy`) with the
    /// caller, on the blocking pool as changes are (the audit file is flushed per line).
    async fn audit_read<T>(&self, request: &Request<T>, what: &'static str) -> Result<(), Status> {
        let principal = principal(request, self.token)?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.audit_read(what, &principal))
            .await
            .map_err(|e| Status::internal(format!("the read could not be audited: {e}")))
    }

    /// Runs one change and describes its outcome.
    ///
    /// On the blocking pool: a change waits for the store's change lock (a file reload may
    /// hold it) and appends to the audit log with a flush, and neither should stall a runtime
    /// thread that also serves traffic. Admin calls are rare, so the hop costs nothing that
    /// matters.
    async fn change(
        &self,
        f: impl FnOnce(&Store) -> Result<Applied, ApplyError> + Send + 'static,
    ) -> Result<Response<proto::ApplyPolicyResponse>, Status> {
        let store = self.store.clone();
        let applied = tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(format!("the policy change did not complete: {e}")))?
            .map_err(|e| to_status(&e))?;
        let response = match applied {
            Applied::Unchanged(current) => proto::ApplyPolicyResponse {
                changed: false,
                policy: Some(info(&current, false)),
                changes: Some(proto::Changes::default()),
            },
            Applied::Swapped(next, change) => proto::ApplyPolicyResponse {
                changed: true,
                policy: Some(info(&next, false)),
                changes: Some(changes(change)),
            },
        };
        Ok(Response::new(response))
    }
}

#[tonic::async_trait]
impl PolicyAdmin for AdminApi {
    async fn get_policy(
        &self,
        request: Request<proto::GetPolicyRequest>,
    ) -> Result<Response<proto::PolicyInfo>, Status> {
        self.audit_read(&request, "get-policy").await?;
        Ok(Response::new(info(&self.store.current(), true)))
    }

    async fn validate_policy(
        &self,
        request: Request<proto::ValidatePolicyRequest>,
    ) -> Result<Response<proto::ValidatePolicyResponse>, Status> {
        self.audit_read(&request, "validate-policy").await?;
        let proto::ValidatePolicyRequest { toml } = request.into_inner();
        let problem = |path: String, message: String| proto::Problem { path, message };
        let response = match self.store.validate(&toml) {
            Ok((candidate, change)) => proto::ValidatePolicyResponse {
                valid: true,
                problems: vec![],
                changes: Some(changes(change)),
                hash: candidate.hash,
            },
            Err(ApplyError::Invalid(errors)) => proto::ValidatePolicyResponse {
                valid: false,
                problems: errors
                    .0
                    .into_iter()
                    .map(|e| problem(e.path, e.message))
                    .collect(),
                changes: None,
                hash: String::new(),
            },
            Err(ApplyError::RestartNeeded(keys)) => proto::ValidatePolicyResponse {
                valid: false,
                problems: keys
                    .into_iter()
                    .map(|k| problem(k, "a listener setting: restart Keel to change it".into()))
                    .collect(),
                changes: None,
                hash: String::new(),
            },
            Err(other) => return Err(to_status(&other)),
        };
        Ok(Response::new(response))
    }

    async fn apply_policy(
        &self,
        request: Request<proto::ApplyPolicyRequest>,
    ) -> Result<Response<proto::ApplyPolicyResponse>, Status> {
        let source = Source::Admin {
            principal: principal(&request, self.token)?,
        };
        self.may_change(&request, &source)?;
        let proto::ApplyPolicyRequest {
            toml,
            expected_revision,
        } = request.into_inner();
        self.change(move |store| store.apply(&toml, source, expected_revision))
            .await
    }

    async fn rollback_policy(
        &self,
        request: Request<proto::RollbackPolicyRequest>,
    ) -> Result<Response<proto::ApplyPolicyResponse>, Status> {
        let principal = principal(&request, self.token)?;
        let source = Source::Rollback {
            principal: principal.clone(),
            to: request.get_ref().revision,
        };
        self.may_change(&request, &source)?;
        let proto::RollbackPolicyRequest { revision } = request.into_inner();
        self.change(move |store| store.rollback(revision, &principal))
            .await
    }

    async fn list_revisions(
        &self,
        request: Request<proto::ListRevisionsRequest>,
    ) -> Result<Response<proto::ListRevisionsResponse>, Status> {
        self.audit_read(&request, "list-revisions").await?;
        let current = self.store.current().revision;
        let revisions = self
            .store
            .history()
            .iter()
            .map(|s| info(s, false))
            .collect();
        Ok(Response::new(proto::ListRevisionsResponse {
            revisions,
            current,
        }))
    }

    async fn set_flag(
        &self,
        request: Request<proto::SetFlagRequest>,
    ) -> Result<Response<proto::ApplyPolicyResponse>, Status> {
        let principal = principal(&request, self.token)?;
        let source = Source::SetFlag {
            principal: principal.clone(),
            flag: request.get_ref().name.clone(),
        };
        self.may_change(&request, &source)?;
        let proto::SetFlagRequest {
            name,
            value,
            expected_revision,
        } = request.into_inner();
        let value = match value {
            Some(proto::set_flag_request::Value::BoolValue(b)) => Flag::Bool(b),
            Some(proto::set_flag_request::Value::StringValue(s)) => Flag::String(s),
            None => {
                let mut details = ErrorDetails::new();
                details.add_bad_request_violation("value", "is required");
                return Err(Status::with_error_details(
                    Code::InvalidArgument,
                    "SetFlag needs a value: bool_value or string_value",
                    details,
                ));
            }
        };
        self.change(move |store| store.set_flag(&name, value, &principal, expected_revision))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicyError, PolicyErrors};

    fn authenticate(token: Option<&str>, header: Option<&str>) -> Result<(), Status> {
        let mut auth = Authenticate {
            token: token.map(AdminToken::new),
        };
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        auth.call(request).map(drop)
    }

    #[test]
    fn the_bearer_token_is_required_when_configured() {
        assert!(authenticate(None, None).is_ok(), "no token configured");
        assert!(authenticate(Some("s3cret"), Some("Bearer s3cret")).is_ok());
        assert!(authenticate(Some("s3cret"), Some("bearer s3cret")).is_ok());
        for header in [
            None,
            Some("Bearer s3cre"),
            Some("Basic s3cret"),
            Some("s3cret"),
        ] {
            let s = authenticate(Some("s3cret"), header).unwrap_err();
            assert_eq!(s.code(), Code::Unauthenticated, "{header:?}");
            assert!(!s.message().contains("s3cret"), "{}", s.message());
        }
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn the_token_never_appears_in_debug_output() {
        assert_eq!(format!("{:?}", AdminToken::new("s3cret")), "AdminToken(..)");
    }

    #[test]
    fn principals_default_to_admin_and_are_validated() {
        let mut request = Request::new(());
        assert_eq!(principal(&request, false).unwrap(), "admin (loopback)");
        request
            .metadata_mut()
            .insert(PRINCIPAL, "alice".parse().unwrap());
        assert_eq!(principal(&request, true).unwrap(), "alice (token)");
        request
            .metadata_mut()
            .insert(PRINCIPAL, "x".repeat(65).parse().unwrap());
        assert_eq!(
            principal(&request, false).unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn every_policy_problem_becomes_a_field_violation() {
        let e = ApplyError::Invalid(PolicyErrors(vec![
            PolicyError {
                path: "a.b".into(),
                message: "unknown key".into(),
            },
            PolicyError {
                path: "c".into(),
                message: "must be positive".into(),
            },
        ]));
        let s = to_status(&e);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message()
                .contains("a.b: unknown key\nc: must be positive")
        );
        let bad = s.get_details_bad_request().unwrap();
        let fields: Vec<&str> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["a.b", "c"]);
        assert_eq!(s.get_details_error_info().unwrap().reason, "INVALID_POLICY");
    }

    #[test]
    fn each_refusal_has_its_code() {
        let cases = [
            (
                ApplyError::RestartNeeded(vec!["server.listen".into()]),
                Code::FailedPrecondition,
            ),
            (
                ApplyError::Stale {
                    expected: 1,
                    current: 2,
                },
                Code::Aborted,
            ),
            (ApplyError::UnknownRevision(9), Code::NotFound),
            (ApplyError::UnknownFlag("x".into()), Code::NotFound),
        ];
        for (e, code) in cases {
            assert_eq!(to_status(&e).code(), code, "{e}");
        }
    }
}
