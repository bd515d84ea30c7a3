//! The fallback ladder over loopback: when the primary cannot answer, the next rung that
//! may answer does, within the call's deadline, and every answer says what it is.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use keel::pb::inference as pb;
use pb::infer_parameter::ParameterChoice;
use tonic::Code;

fn param(resp: &pb::ModelInferResponse, key: &str) -> Option<ParameterChoice> {
    resp.parameters
        .get(key)
        .and_then(|p| p.parameter_choice.clone())
}

fn s(v: &str) -> Option<ParameterChoice> {
    Some(ParameterChoice::StringParam(v.into()))
}

fn request(id: &str, first: i32) -> tonic::Request<pb::ModelInferRequest> {
    let mut body = simple_request();
    body.raw_input_contents[0] = i32_bytes(&[first; 16]);
    let mut req = tonic::Request::new(body);
    req.metadata_mut()
        .insert("x-request-id", id.parse().unwrap());
    req
}

#[tokio::test]
async fn an_unavailable_primary_falls_back_to_another_model_then_the_breaker_keeps_it_there() {
    let down = ScriptedUpstream::new(Script::failing(Code::Unavailable, "down"));
    let (addr, _stop) = down.serve().await;
    let keel = Keel::with_config(&format!(
        "[defaults.retry]\nmax_attempts = 1\n[defaults.breaker]\nconsecutive_failures = 1\nopen_for = \"1m\"\n\
         [upstreams.up]\nendpoints = [\"{addr}\"]\n\
         [models.simple]\nbackend = \"up\"\nfallback = [{{ model = \"identity\" }}]\n\
         [models.identity]\nbackend = \"embedded\"\n"
    ))
    .await;
    let mut client = keel.client().await;
    // `identity` answers under the input names, so the call names no outputs: a fallback
    // model must serve the outputs the client asks for.
    let mut req = request("d1", 5);
    req.get_mut().outputs.clear();
    let resp = client.model_infer(req).await.unwrap();
    assert_eq!(resp.metadata().get("keel-degraded").unwrap(), "true");
    assert_eq!(resp.metadata().get("keel-tier").unwrap(), "fallback_model");
    let resp = resp.into_inner();
    assert_eq!(
        param(&resp, "keel.degraded"),
        Some(ParameterChoice::BoolParam(true))
    );
    assert_eq!(param(&resp, "keel.tier"), s("fallback_model"));
    assert_eq!(param(&resp, "keel.served_by"), s("identity:1"));
    assert_eq!(param(&resp, "keel.degraded_reason"), s("unavailable"));
    assert_eq!(
        i32s(&resp.raw_output_contents[0])[0],
        5,
        "identity echoed the inputs"
    );

    let mut req = request("d2", 6);
    req.get_mut().outputs.clear();
    let resp = client.model_infer(req).await.unwrap().into_inner();
    assert_eq!(param(&resp, "keel.degraded_reason"), s("breaker_open"));
    assert_eq!(
        down.seen().len(),
        1,
        "the open breaker kept the primary from being called"
    );
    keel.stop().await.unwrap();
}

fn trailer<'a>(resp: &'a tonic::Response<pb::ModelInferResponse>, key: &str) -> Option<&'a str> {
    resp.metadata().get(key).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn a_degraded_answers_receipt_tells_the_primarys_attempts_then_the_rung() {
    let down = ScriptedUpstream::new(Script::failing(Code::Unavailable, "down"));
    let (addr, _stop) = down.serve().await;
    let keel = Keel::with_config(&format!(
        "[defaults.retry]
max_attempts = 3
initial_backoff = \"1ms\"
         [defaults.breaker]
consecutive_failures = 3
open_for = \"1m\"
         [upstreams.up]
endpoints = [\"{addr}\"]
         [models.simple]
backend = \"up\"
fallback = [{{ model = \"iris\" }}, {{ model = \"identity\" }}]
         [models.iris]
backend = \"embedded\"
[models.identity]
backend = \"embedded\"
"
    ))
    .await;
    let mut client = keel.client().await;
    let mut req = request("story-1", 5);
    req.get_mut().outputs.clear();
    let resp = client.model_infer(req).await.unwrap();
    // The primary: three attempts, all transient failures; iris (which cannot take
    // simple's inputs) failed; identity answered in one attempt.
    assert_eq!(trailer(&resp, "keel-primary-attempts"), Some("3"));
    assert_eq!(trailer(&resp, "keel-primary-error"), Some("transient"));
    assert_eq!(trailer(&resp, "keel-primary-code"), Some("UNAVAILABLE"));
    assert_eq!(trailer(&resp, "keel-rungs-failed"), Some("fallback_model"));
    assert_eq!(trailer(&resp, "keel-tier"), Some("fallback_model"));
    assert_eq!(trailer(&resp, "keel-served-model"), Some("identity:1"));
    assert_eq!(trailer(&resp, "keel-attempts"), Some("1"), "the rung's own");
    assert_eq!(trailer(&resp, "keel-served-by"), Some("embedded"));
    assert_eq!(down.seen().len(), 3);
    let body = resp.into_inner();
    assert_eq!(
        param(&body, "keel.primary_attempts"),
        Some(ParameterChoice::Int64Param(3))
    );
    assert_eq!(param(&body, "keel.primary_error"), s("transient"));
    assert_eq!(param(&body, "keel.primary_code"), s("UNAVAILABLE"));
    assert_eq!(param(&body, "keel.rungs_failed"), s("fallback_model"));

    // Now the breaker is open: the primary's one attempt is refused by Keel itself.
    let mut req = request("story-2", 6);
    req.get_mut().outputs.clear();
    let resp = client.model_infer(req).await.unwrap();
    assert_eq!(trailer(&resp, "keel-primary-attempts"), Some("1"));
    assert_eq!(
        trailer(&resp, "keel-primary-error"),
        Some("local_rejection")
    );
    assert_eq!(trailer(&resp, "keel-degraded-reason"), Some("breaker_open"));
    assert_eq!(
        down.seen().len(),
        3,
        "the open breaker kept the primary uncalled"
    );

    // A primary answer tells no story.
    let ok = client
        .model_infer(request_for("iris-1", "iris"))
        .await
        .unwrap();
    assert_eq!(trailer(&ok, "keel-tier"), Some("primary"));
    assert_eq!(trailer(&ok, "keel-primary-attempts"), None);
    keel.stop().await.unwrap();
}

/// A valid iris request (one flower).
fn request_for(id: &str, model: &str) -> tonic::Request<pb::ModelInferRequest> {
    let features: Vec<u8> = [5.1f32, 3.5, 1.4, 0.2]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let mut req = tonic::Request::new(pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![input("features", "FP32", &[1, 4])],
        raw_input_contents: vec![features.into()],
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-request-id", id.parse().unwrap());
    req
}

#[tokio::test]
async fn the_ladder_goes_from_a_failing_model_to_a_stale_cache_entry_to_a_static_answer() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&format!(
        "[defaults.retry]\nmax_attempts = 1\n[defaults.breaker]\nenabled = false\n\
         [upstreams.up]\nendpoints = [\"{addr}\"]\n\
         [models.simple]\nbackend = \"up\"\n\
         fallback = [{{ model = \"iris\" }}, {{ cache = true }}, \
           {{ static = [{{ name = \"OUTPUT0\", datatype = \"INT32\", shape = [1, 2], data = [-1, -1] }}] }}]\n\
         [models.simple.cache]\nentries = 10\nmax_stale = \"1m\"\n\
         [models.iris]\nbackend = \"embedded\"\n"
    ))
    .await;
    let mut client = keel.client().await;
    let fresh = client
        .model_infer(request("c1", 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(param(&fresh, "keel.tier"), s("primary"));
    assert_eq!(
        param(&fresh, "keel.degraded"),
        Some(ParameterChoice::BoolParam(false))
    );

    // The upstream goes down; iris cannot take simple's inputs (it fails too), so the
    // cached answer for the same inputs is served, with its age.
    up.script.lock().unwrap().fail = Some((Code::Internal, "broken".into()));
    let stale = client.model_infer(request("c2", 3)).await.unwrap();
    assert_eq!(stale.metadata().get("keel-tier").unwrap(), "cache");
    assert!(stale.metadata().get("keel-stale-ms").is_some());
    assert_eq!(trailer(&stale, "keel-primary-attempts"), Some("1"));
    assert_eq!(trailer(&stale, "keel-primary-error"), Some("server_bug"));
    assert_eq!(trailer(&stale, "keel-rungs-failed"), Some("fallback_model"));
    assert_eq!(
        trailer(&stale, "keel-attempts"),
        None,
        "no call answered it"
    );
    let stale = stale.into_inner();
    assert_eq!(param(&stale, "keel.tier"), s("cache"));
    assert_eq!(param(&stale, "keel.degraded_reason"), s("server_bug"));
    assert!(
        matches!(param(&stale, "keel.stale_ms"), Some(ParameterChoice::Int64Param(ms)) if ms >= 0)
    );
    assert_eq!(stale.raw_output_contents, fresh.raw_output_contents);
    assert_eq!(stale.id, "req-1");

    // Inputs never seen: nothing cached, so the static answer.
    let fixed = client
        .model_infer(request("c3", 9))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(param(&fixed, "keel.tier"), s("static"));
    assert_eq!(fixed.outputs[0].name, "OUTPUT0");
    assert_eq!(i32s(&fixed.raw_output_contents[0]), vec![-1, -1]);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn client_errors_never_fall_back_and_without_a_ladder_the_error_stands() {
    let up = ScriptedUpstream::new(Script::failing(Code::InvalidArgument, "bad input"));
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&simple_via(addr, "")).await;
    let mut client = keel.client().await;
    let s = client.model_infer(request("e1", 1)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    up.script.lock().unwrap().fail = Some((Code::Unavailable, "down".into()));
    let s = client.model_infer(request("e2", 1)).await.unwrap_err();
    assert_eq!(
        s.code(),
        Code::Unavailable,
        "no ladder configured: the classified error"
    );

    let keel2 = Keel::with_config(&format!(
        "[upstreams.up]\nendpoints = [\"{addr}\"]\n[models.simple]\nbackend = \"up\"\n\
         fallback = [{{ static = [{{ name = \"OUTPUT0\", datatype = \"INT32\", shape = [1], data = [0] }}] }}]\n"
    ))
    .await;
    up.script.lock().unwrap().fail = Some((Code::InvalidArgument, "bad input".into()));
    let mut client2 = keel2.client().await;
    let s = client2.model_infer(request("e3", 1)).await.unwrap_err();
    assert_eq!(
        s.code(),
        Code::InvalidArgument,
        "a client error is never papered over"
    );
    keel.stop().await.unwrap();
    keel2.stop().await.unwrap();
}

#[tokio::test]
async fn a_fallback_answers_within_the_clients_deadline() {
    let hung = ScriptedUpstream::new(Script::slow(Duration::from_secs(60)));
    let standby = ScriptedUpstream::new(Script::slow(Duration::from_secs(60)));
    let (a, _sa) = hung.serve().await;
    let (b, _sb) = standby.serve().await;
    // Keel's own timeout is long: the client's grpc-timeout is what bounds the call.
    let keel = Keel::with_config(&format!(
        "[defaults]\ntimeout = \"30s\"\ndeadline_margin = \"100ms\"\n\
         [upstreams.up]\nendpoints = [\"{a}\"]\n[upstreams.standby]\nendpoints = [\"{b}\"]\n\
         [models.simple]\nbackend = \"up\"\n\
         fallback = [{{ upstream = \"standby\" }}, \
           {{ static = [{{ name = \"OUTPUT0\", datatype = \"INT32\", shape = [1], data = [7] }}] }}]\n"
    ))
    .await;
    let mut client = keel.client().await;
    let mut req = request("t1", 1);
    // The client gives up itself after 500ms: an answer after that would fail this call.
    req.set_timeout(Duration::from_millis(500));
    let resp = client.model_infer(req).await.unwrap().into_inner();
    assert_eq!(param(&resp, "keel.tier"), s("static"));
    assert_eq!(param(&resp, "keel.degraded_reason"), s("deadline"));
    assert_eq!(hung.seen().len(), 1);
    assert!(
        standby.seen().is_empty(),
        "no time was left for the standby upstream"
    );
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_fresh_cache_entry_answers_without_calling_the_model() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&format!(
        "[upstreams.up]\nendpoints = [\"{addr}\"]\n[models.simple]\nbackend = \"up\"\n\
         [models.simple.cache]\nfresh_ttl = \"1m\"\n"
    ))
    .await;
    let mut client = keel.client().await;
    client.model_infer(request("f1", 2)).await.unwrap();
    let cached = client
        .model_infer(request("f2", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(param(&cached, "keel.tier"), s("cache"));
    assert_eq!(
        param(&cached, "keel.degraded"),
        Some(ParameterChoice::BoolParam(false))
    );
    assert_eq!(
        up.seen().len(),
        1,
        "the second call was answered from the cache"
    );
    client.model_infer(request("f3", 3)).await.unwrap();
    assert_eq!(up.seen().len(), 2, "other inputs are not a hit");
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_model_gone_slow_opens_its_breaker_and_the_ladder_answers() {
    let slow = ScriptedUpstream::new(Script::slow(Duration::from_millis(100)));
    let (addr, _stop) = slow.serve().await;
    let keel = Keel::with_config(&format!(
        "[defaults.retry]\nmax_attempts = 1\n\
         [defaults.breaker]\nmin_requests = 2\nslow_call_duration = \"50ms\"\nslow_call_ratio = 1.0\nopen_for = \"1m\"\n\
         [upstreams.up]\nendpoints = [\"{addr}\"]\n\
         [models.simple]\nbackend = \"up\"\n\
         fallback = [{{ static = [{{ name = \"OUTPUT0\", datatype = \"INT32\", shape = [1], data = [0] }}] }}]\n"
    ))
    .await;
    let mut client = keel.client().await;
    for id in ["s1", "s2"] {
        let resp = client
            .model_infer(request(id, 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            param(&resp, "keel.tier"),
            s("primary"),
            "slow, but answered"
        );
    }
    let resp = client
        .model_infer(request("s3", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(param(&resp, "keel.tier"), s("static"));
    assert_eq!(param(&resp, "keel.degraded_reason"), s("breaker_open"));
    assert_eq!(
        slow.seen().len(),
        2,
        "the open breaker spared the slow model"
    );
    keel.stop().await.unwrap();
}
