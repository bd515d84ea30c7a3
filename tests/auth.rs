//! Tenants over loopback: missing, malformed, wrong and right API keys; a tenant calling a
//! model outside its list (PERMISSION_DENIED, or NOT_FOUND when the policy hides models);
//! rate limits and in-flight quotas answered with RESOURCE_EXHAUSTED and RetryInfo; the v1
//! API guarded the same way; and no authentication at all without tenants.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use keel::auth::hash_key;
use keel::pb::inference as pb;
use keel::pb::keel_inference_v1 as v1;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;

const ACME: &str = "acme-secret-key";
const ACME_NEXT: &str = "acme-rotated-key";
const BETA: &str = "beta-secret-key";

/// Two tenants: `acme` (simple only, two keys as during a rotation) and `beta` (every model).
fn tenants(extra: &str, acme: &str) -> String {
    format!(
        "{extra}
[tenants.acme]
api_keys = [\"{}\", \"{}\"]
models = [\"simple\"]
{acme}
[tenants.beta]
api_keys = [\"{}\"]
models = [\"*\"]
",
        hash_key(ACME),
        hash_key(ACME_NEXT),
        hash_key(BETA)
    )
}

/// `msg` with `authorization: Bearer <key>`.
fn with_key<T>(msg: T, key: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

fn reason(s: &Status) -> String {
    s.get_details_error_info().unwrap().reason
}

fn iris_metadata() -> pb::ModelMetadataRequest {
    pb::ModelMetadataRequest {
        name: "iris".into(),
        version: String::new(),
    }
}

#[tokio::test]
async fn calls_without_a_valid_key_are_unauthenticated_and_the_key_is_never_echoed() {
    let keel = Keel::with_config(&tenants("", "")).await;
    let mut c = keel.client().await;

    let s = c.model_infer(simple_request()).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert_eq!(reason(&s), "UNAUTHENTICATED");
    assert!(s.message().contains("authorization: Bearer <key>"), "{s:?}");
    assert!(s.metadata().get("x-request-id").is_some(), "tagged");

    let mut basic = Request::new(simple_request());
    basic
        .metadata_mut()
        .insert("authorization", "Basic abc".parse().unwrap());
    let s = c.model_infer(basic).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("must be `Bearer <key>`"), "{s:?}");

    let s = c
        .model_infer(with_key(simple_request(), "guess-123"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert_eq!(s.message(), "the API key is not valid");
    assert!(!format!("{s:?}").contains("guess-123"), "the key is echoed");

    // Every method that says anything about models needs a key; liveness and readiness
    // stay open to probes.
    let s = c.model_metadata(iris_metadata()).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let s = c
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let s = c
        .server_metadata(pb::ServerMetadataRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(
        c.server_live(pb::ServerLiveRequest::default())
            .await
            .is_ok()
    );
    assert!(
        c.server_ready(pb::ServerReadyRequest::default())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn either_key_of_a_rotation_lets_its_tenant_in() {
    let keel = Keel::with_config(&tenants("", "")).await;
    let mut c = keel.client().await;
    for key in [ACME, ACME_NEXT, BETA] {
        let resp = c.model_infer(with_key(simple_request(), key)).await;
        assert!(resp.is_ok(), "{key}: {resp:?}");
    }
    let index = c
        .repository_index(with_key(pb::RepositoryIndexRequest::default(), ACME))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = index.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["simple"], "a tenant's index lists its models only");
}

#[tokio::test]
async fn a_model_outside_the_tenants_list_is_permission_denied() {
    let keel = Keel::with_config(&tenants("", "")).await;
    let mut c = keel.client().await;
    let s = c
        .model_metadata(with_key(iris_metadata(), ACME))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert_eq!(s.message(), "tenant 'acme' may not call model 'iris'");
    let info = s.get_details_error_info().unwrap();
    assert_eq!(info.reason, "PERMISSION_DENIED");
    assert_eq!(info.metadata["tenant"], "acme");
    // The tenant with every model gets it.
    assert!(
        c.model_metadata(with_key(iris_metadata(), BETA))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_hidden_model_is_indistinguishable_from_an_unknown_one() {
    let keel = Keel::with_config(&tenants("[auth]\nhide_models = true\n", "")).await;
    let mut c = keel.client().await;
    let hidden = c
        .model_metadata(with_key(iris_metadata(), ACME))
        .await
        .unwrap_err();
    assert!(
        c.model_metadata(with_key(iris_metadata(), BETA))
            .await
            .is_ok(),
        "beta may call iris"
    );
    // A model that does not exist at all, for comparison.
    let nope = c
        .model_metadata(with_key(
            pb::ModelMetadataRequest {
                name: "nope".into(),
                version: String::new(),
            },
            ACME,
        ))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound, "{hidden:?}");
    assert_eq!(nope.code(), Code::NotFound);
    assert_eq!(hidden.message(), nope.message().replace("nope", "iris"));
    let (h, n) = (
        hidden.get_details_error_info().unwrap(),
        nope.get_details_error_info().unwrap(),
    );
    assert_eq!(h.reason, n.reason);
    let mut keys_h: Vec<_> = h.metadata.keys().collect();
    let mut keys_n: Vec<_> = n.metadata.keys().collect();
    keys_h.sort();
    keys_n.sort();
    assert_eq!(keys_h, keys_n, "the same details");
    // ModelReady answers false, as it does for an unknown model.
    let ready = c
        .model_ready(with_key(
            pb::ModelReadyRequest {
                name: "iris".into(),
                version: String::new(),
            },
            ACME,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!ready.ready);
}

#[tokio::test]
async fn a_tenant_over_its_rate_limit_is_told_when_to_retry() {
    // One token per 1000 s: the third call is refused whatever the test machine's speed.
    let keel = Keel::with_admin(&tenants(
        "",
        "rate_limit = { per_second = 0.001, burst = 2 }",
    ))
    .await;
    let mut c = keel.client().await;
    for _ in 0..2 {
        c.model_infer(with_key(simple_request(), ACME))
            .await
            .unwrap();
    }
    let s = c
        .model_infer(with_key(simple_request(), ACME_NEXT))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(reason(&s), "RATE_LIMITED");
    assert!(
        s.message().contains("tenant 'acme' is over its rate limit"),
        "{s:?}"
    );
    let wait = s.get_details_retry_info().unwrap().retry_delay.unwrap();
    assert!(
        wait > Duration::from_secs(990) && wait <= Duration::from_secs(1000),
        "{wait:?}"
    );
    // Another tenant is not affected.
    c.model_infer(with_key(simple_request(), BETA))
        .await
        .unwrap();
    let scrape = get(keel.admin.unwrap(), "/metrics").await.1;
    assert_eq!(
        value(
            &scrape,
            "keel_tenant_requests_total{tenant=\"acme\",code=\"ResourceExhausted\"}"
        ),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        value(
            &scrape,
            "keel_tenant_requests_total{tenant=\"acme\",code=\"OK\"}"
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn a_tenant_at_its_in_flight_quota_is_refused_and_others_are_not() {
    let up = ScriptedUpstream::new(Script::slow(Duration::from_secs(30)));
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(addr, &tenants("", "max_in_flight = 1"))).await;
    let c = keel.client().await;
    let call = up.hold(c.clone(), with_key(simple_request(), ACME)).await;
    let s = c
        .clone()
        .model_infer(with_key(simple_request(), ACME))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(reason(&s), "TENANT_QUOTA_EXCEEDED");
    assert_eq!(
        s.get_details_retry_info().unwrap().retry_delay,
        Some(Duration::from_millis(100))
    );
    assert_eq!(
        up.seen().len(),
        1,
        "the refused call never reached the upstream"
    );
    // Another tenant still gets in (its call waits on the slow upstream too).
    let beta = up.hold(c.clone(), with_key(simple_request(), BETA)).await;
    call.abort();
    beta.abort();
}

#[tokio::test]
async fn the_key_is_not_forwarded_to_upstreams() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(addr, &tenants("", ""))).await;
    let mut c = keel.client().await;
    c.model_infer(with_key(simple_request(), ACME))
        .await
        .unwrap();
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].metadata.get("authorization").is_none());
}

#[tokio::test]
async fn the_v1_api_is_guarded_too() {
    let keel = Keel::with_config(&tenants("", "")).await;
    let mut v1c = v1::prediction_service_client::PredictionServiceClient::connect(keel.url())
        .await
        .unwrap();
    let predict = || v1::PredictRequest {
        model_name: "iris".into(),
        instances: vec![prost_types::Value {
            kind: Some(prost_types::value::Kind::ListValue(
                prost_types::ListValue {
                    values: [5.1, 3.5, 1.4, 0.2]
                        .iter()
                        .map(|x| prost_types::Value {
                            kind: Some(prost_types::value::Kind::NumberValue(*x)),
                        })
                        .collect(),
                },
            )),
        }],
        ..Default::default()
    };
    let s = v1c.predict(predict()).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let s = v1c.predict(with_key(predict(), ACME)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let resp = v1c.predict(with_key(predict(), BETA)).await.unwrap();
    assert_eq!(resp.into_inner().predictions.len(), 1);
    let status = v1::ModelStatusRequest {
        model_name: "iris".into(),
        model_version: String::new(),
    };
    let s = v1c.model_status(status.clone()).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn without_tenants_no_key_is_needed() {
    let keel = Keel::embedded().await;
    let mut c = keel.client().await;
    c.model_infer(simple_request()).await.unwrap();
    // A key sent anyway is ignored.
    c.model_infer(with_key(simple_request(), "anything"))
        .await
        .unwrap();
}

const BATCH: &str = "batch-secret-key";
const INTERACTIVE: &str = "interactive-secret-key";

/// A batch tenant and an interactive one, both for every model, after `extra`.
fn classes(extra: &str) -> String {
    format!(
        "{extra}
[tenants.nightly]
api_keys = [\"{}\"]
models = [\"*\"]
priority = \"batch\"
[tenants.app]
api_keys = [\"{}\"]
models = [\"*\"]
priority = \"interactive\"
",
        hash_key(BATCH),
        hash_key(INTERACTIVE)
    )
}

/// With two slots, one kept for interactive callers: a second batch call is shed while an
/// interactive one still gets in, and once both slots are taken everyone is refused.
async fn batch_is_shed_first(limits: &str) {
    let up = ScriptedUpstream::new(Script::slow(Duration::from_secs(30)));
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(addr, &classes(limits))).await;
    let c = keel.client().await;
    let batch = up.hold(c.clone(), with_key(simple_request(), BATCH)).await;
    let s = c
        .clone()
        .model_infer(with_key(simple_request(), BATCH))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(reason(&s), "OVERLOADED");
    assert!(
        s.message()
            .contains("for batch calls (1 slot is kept for interactive calls)"),
        "{s:?}"
    );
    assert_eq!(
        up.seen().len(),
        1,
        "the shed call never reached the upstream"
    );
    let interactive = up
        .hold(c.clone(), with_key(simple_request(), INTERACTIVE))
        .await;
    let s = c
        .clone()
        .model_infer(with_key(simple_request(), INTERACTIVE))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(!s.message().contains("batch"), "{s:?}");
    assert_eq!(up.seen().len(), 2);
    batch.abort();
    interactive.abort();
}

#[tokio::test]
async fn a_models_slots_shed_batch_callers_first() {
    batch_is_shed_first(
        "[defaults.limits]\nmax_in_flight = 2\nmax_queue = 0\ninteractive_reserve = 0.5\n",
    )
    .await;
}

#[tokio::test]
async fn keels_own_slots_shed_batch_callers_first() {
    batch_is_shed_first("[server]\nmax_in_flight = 2\ninteractive_reserve = 0.5\n").await;
}

#[tokio::test]
async fn the_log_lines_of_a_call_name_its_tenant() {
    let logs = capture_logs();
    let up = ScriptedUpstream::new(Script::failing(Code::InvalidArgument, "no"));
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(addr, &tenants("", ""))).await;
    let mut c = keel.client().await;
    let with_id = |msg: pb::ModelInferRequest, id: &str| {
        let mut r = with_key(msg, ACME);
        r.metadata_mut().insert("x-request-id", id.parse().unwrap());
        r
    };
    // Refused by the upstream: the request line.
    c.model_infer(with_id(simple_request(), "log-failed"))
        .await
        .unwrap_err();
    // Refused by Keel before routing: the rejection line.
    let mut bad = simple_request();
    bad.inputs[0].datatype = "INT33".into();
    c.model_infer(with_id(bad, "log-invalid"))
        .await
        .unwrap_err();
    for id in ["log-failed", "log-invalid"] {
        let lines = logs.lines_of(id);
        assert!(!lines.is_empty(), "no log line for {id}");
        for l in lines {
            assert_eq!(l["tenant"], "acme", "{l}");
        }
    }
}

#[tokio::test]
async fn every_inference_request_of_a_tenant_is_counted_once() {
    // `simple` has a ladder, so its requests are counted where the ladder ends.
    let keel = Keel::with_admin(&tenants(
        "[models.simple]\nbackend = \"embedded\"\n\
         fallback = [{ static = [{ name = \"OUTPUT0\", datatype = \"INT32\", shape = [1], data = [0] }] }]\n",
        "",
    ))
    .await;
    let mut c = keel.client().await;
    c.model_infer(with_key(simple_request(), ACME))
        .await
        .unwrap();
    let mut invalid = simple_request();
    invalid.raw_input_contents[0] = vec![0u8; 3].into();
    let s = c.model_infer(with_key(invalid, ACME)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let mut outside = simple_request();
    outside.model_name = "iris".into();
    let streamed = vec![simple_request(), outside, simple_request()];
    let mut answers = c
        .model_stream_infer(with_key(futures::stream::iter(streamed), ACME))
        .await
        .unwrap()
        .into_inner();
    let mut errors = Vec::new();
    while let Some(a) = answers.message().await.unwrap() {
        errors.push(a.error_message);
    }
    assert_eq!(errors[0], "");
    assert!(
        errors[1].contains("may not call model 'iris'"),
        "{errors:?}"
    );
    assert_eq!(errors[2], "");

    let scrape = get(keel.admin.unwrap(), "/metrics").await.1;
    for (code, want) in [
        ("OK", 3.0),
        ("InvalidArgument", 1.0),
        ("PermissionDenied", 1.0),
    ] {
        let series = format!("keel_tenant_requests_total{{tenant=\"acme\",code=\"{code}\"}}");
        assert_eq!(value(&scrape, &series), Some(want), "{series} in\n{scrape}");
    }
    keel.stop().await.unwrap();
}
