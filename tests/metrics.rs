//! `/metrics`, `/livez` and `/readyz` on the admin listener: after known traffic, the
//! scrape shows exactly those counts under the gRPC and Keel names, with bounded labels.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

const INFER: &str = "grpc_type=\"unary\",grpc_service=\"inference.GRPCInferenceService\",grpc_method=\"ModelInfer\"";

/// grpc-go's `codes.Code.String()`: what go-grpc-prometheus puts in `grpc_code`, and what
/// the gRPC dashboards people already run match on.
const GO_GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// Asserts that every `grpc_code` value in `scrape` is go-grpc-prometheus's spelling, and
/// returns how many series carry one.
fn assert_go_grpc_codes(scrape: &str) -> usize {
    let values: Vec<&str> = scrape
        .split("grpc_code=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    for v in &values {
        assert!(
            GO_GRPC_CODES.contains(v),
            "grpc_code=\"{v}\" is not go-grpc-prometheus's spelling in\n{scrape}"
        );
    }
    values.len()
}

#[tokio::test]
async fn a_scrape_after_known_traffic_shows_exactly_that_traffic() {
    let keel = Keel::with_admin("[models.simple]\nbackend = \"embedded\"\n").await;
    let admin = keel.admin.unwrap();
    let mut client = keel.client().await;
    for _ in 0..3 {
        client.model_infer(simple_request()).await.unwrap();
    }
    let mut unknown = simple_request();
    unknown.model_name = "resnet-from-a-client".into();
    assert!(client.model_infer(unknown).await.is_err());
    let mut invalid = simple_request();
    invalid.raw_input_contents[0] = vec![0u8; 3].into();
    assert!(client.model_infer(invalid).await.is_err());
    let mut missing = simple_request();
    missing.inputs.pop();
    missing.raw_input_contents.pop();
    assert!(client.model_infer(missing).await.is_err());

    let (status, scrape) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let expect = [
        (format!("grpc_server_started_total{{{INFER}}}"), 6.0),
        (
            format!("grpc_server_handled_total{{{INFER},grpc_code=\"OK\"}}"),
            3.0,
        ),
        (
            format!("grpc_server_handled_total{{{INFER},grpc_code=\"NotFound\"}}"),
            1.0,
        ),
        (
            format!("grpc_server_handled_total{{{INFER},grpc_code=\"InvalidArgument\"}}"),
            2.0,
        ),
        (
            format!("grpc_server_handling_seconds_count{{{INFER}}}"),
            6.0,
        ),
        (
            "keel_requests_total{model=\"simple\",tier=\"primary\",class=\"ok\"}".to_string(),
            3.0,
        ),
        (
            "keel_requests_total{model=\"simple\",tier=\"primary\",class=\"client_error\"}"
                .to_string(),
            2.0,
        ),
        (
            "keel_requests_total{model=\"unknown\",tier=\"primary\",class=\"client_error\"}"
                .to_string(),
            1.0,
        ),
        (
            "keel_validation_rejections_total{rule=\"tensor_content\"}".to_string(),
            1.0,
        ),
        (
            "keel_validation_rejections_total{rule=\"missing_input\"}".to_string(),
            1.0,
        ),
        ("keel_api_requests_total{api=\"v2\"}".to_string(), 6.0),
        (
            "keel_attempts_total{model=\"simple\",upstream=\"embedded\"}".to_string(),
            4.0,
        ),
        ("keel_policy_revision".to_string(), 1.0),
        (
            "keel_policy_reloads_total{source=\"startup\",result=\"accepted\"}".to_string(),
            1.0,
        ),
        ("keel_ready".to_string(), 1.0),
        (
            "keel_breaker_state{model=\"simple\",upstream=\"embedded\"}".to_string(),
            0.0,
        ),
        ("keel_in_flight{model=\"simple\"}".to_string(), 0.0),
    ];
    for (series, want) in expect {
        assert_eq!(value(&scrape, &series), Some(want), "{series} in\n{scrape}");
    }
    assert!(
        !scrape.contains("resnet-from-a-client"),
        "client input never becomes a label"
    );
    assert!(
        assert_go_grpc_codes(&scrape) >= 3,
        "OK, NotFound, InvalidArgument"
    );
    assert!(scrape.contains("# TYPE keel_requests_total counter"));

    let (status, body) = get(admin, "/livez").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = get(admin, "/readyz").await;
    assert_eq!(status, 200);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn policy_reloads_and_retries_are_counted() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_admin(&simple_via(addr, "")).await;
    let admin_addr = keel.admin.unwrap();
    let mut client = keel.client().await;
    up.plan("m1", vec![Step::Fail(tonic::Code::Unavailable, None)]);
    let mut req = tonic::Request::new(simple_request());
    req.metadata_mut()
        .insert("x-request-id", "m1".parse().unwrap());
    client.model_infer(req).await.unwrap();

    let mut admin = keel.admin_client().await;
    let bad = keel::pb::keel_admin::ApplyPolicyRequest {
        toml: "[defaults]\ntimout = \"1s\"\n".into(),
        expected_revision: None,
    };
    assert!(admin.apply_policy(bad).await.is_err());

    let (_, scrape) = get(admin_addr, "/metrics").await;
    for (series, want) in [
        (
            "keel_retries_total{model=\"simple\",upstream=\"up\",reason=\"transient\"}",
            1.0,
        ),
        ("keel_attempts_total{model=\"simple\",upstream=\"up\"}", 2.0),
        (
            "keel_policy_reloads_total{source=\"admin\",result=\"rejected\"}",
            1.0,
        ),
        (
            "grpc_client_started_total{grpc_service=\"inference.GRPCInferenceService\",grpc_method=\"ModelInfer\",upstream=\"up\"}",
            2.0,
        ),
        (
            "grpc_client_handled_total{grpc_service=\"inference.GRPCInferenceService\",grpc_method=\"ModelInfer\",upstream=\"up\",grpc_code=\"Unavailable\"}",
            1.0,
        ),
        (
            "grpc_client_handled_total{grpc_service=\"inference.GRPCInferenceService\",grpc_method=\"ModelInfer\",upstream=\"up\",grpc_code=\"OK\"}",
            1.0,
        ),
    ] {
        assert_eq!(value(&scrape, series), Some(want), "{series} in\n{scrape}");
    }
    assert!(assert_go_grpc_codes(&scrape) >= 2, "{scrape}");
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_request_answered_by_the_ladder_is_counted_once_by_the_tier_that_answered() {
    let down = ScriptedUpstream::new(Script::failing(tonic::Code::Unavailable, "down"));
    let (addr, _stop) = down.serve().await;
    let keel = Keel::with_admin(&format!(
        "[defaults.retry]\nmax_attempts = 1\n[defaults.breaker]\nenabled = false\n\
         [upstreams.up]\nendpoints = [\"{addr}\"]\n[models.simple]\nbackend = \"up\"\n\
         fallback = [{{ static = [{{ name = \"OUTPUT0\", datatype = \"INT32\", shape = [1], data = [0] }}] }}]\n\
         [models.simple.cache]\nfresh_ttl = \"1m\"\n"
    ))
    .await;
    let mut client = keel.client().await;
    for _ in 0..2 {
        client.model_infer(simple_request()).await.unwrap();
    }
    down.script.lock().unwrap().fail = None;
    let mut other = simple_request();
    other.raw_input_contents[1] = i32_bytes(&[2; 16]);
    client.model_infer(other.clone()).await.unwrap();
    client.model_infer(other).await.unwrap();
    let (_, scrape) = get(keel.admin.unwrap(), "/metrics").await;
    let expect = [
        (
            "keel_requests_total{model=\"simple\",tier=\"static\",class=\"ok\"}",
            2.0,
        ),
        (
            "keel_requests_total{model=\"simple\",tier=\"primary\",class=\"ok\"}",
            1.0,
        ),
        (
            "keel_requests_total{model=\"simple\",tier=\"cache\",class=\"ok\"}",
            1.0,
        ),
        (
            "keel_degraded_total{model=\"simple\",tier=\"static\",reason=\"unavailable\"}",
            2.0,
        ),
    ];
    for (series, n) in expect {
        assert_eq!(value(&scrape, series), Some(n), "{series} in:\n{scrape}");
    }
    assert!(
        !scrape.contains("tier=\"primary\",class=\"transient\""),
        "a failure the ladder answered is not a client-visible error:\n{scrape}"
    );
    keel.stop().await.unwrap();
}
