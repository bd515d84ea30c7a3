//! Safe rollout over loopback: canary routes that send their own version, stickiness by a
//! metadata key, pinned versions, the `keel-route` override, a blue-green switch by
//! `SetFlag`, and the automatic rollback of a failing canary.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use keel::pb::inference as pb;
use keel::pb::keel_admin as admin;
use pb::infer_parameter::ParameterChoice;
use tonic::Code;

fn request(id: &str, user: Option<&str>, version: &str) -> tonic::Request<pb::ModelInferRequest> {
    let mut body = simple_request();
    body.model_version = version.into();
    let mut req = tonic::Request::new(body);
    req.metadata_mut()
        .insert("x-request-id", id.parse().unwrap());
    if let Some(u) = user {
        req.metadata_mut().insert("x-user-id", u.parse().unwrap());
    }
    req
}

fn served_by(resp: &pb::ModelInferResponse) -> String {
    match resp
        .parameters
        .get("keel.served_by")
        .and_then(|p| p.parameter_choice.clone())
    {
        Some(ParameterChoice::StringParam(s)) => s,
        other => panic!("keel.served_by is {other:?}"),
    }
}

#[tokio::test]
async fn canary_routes_send_their_version_and_a_user_stays_on_one() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let keel = Keel::with_config(&format!(
        "[upstreams.u]\nendpoints = [\"{addr}\"]\n[models.simple]\n\
         routes = [{{ backend = \"u\", version = \"1\", weight = 50 }}, {{ backend = \"u\", version = \"2\", weight = 50 }}]\n\
         route_key = \"x-user-id\"\nroute_override = true\n"
    ))
    .await;
    let mut client = keel.client().await;
    let mut versions = std::collections::BTreeSet::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..5 {
            let resp = client
                .model_infer(request(&format!("{user}-{i}"), Some(user), ""))
                .await
                .unwrap()
                .into_inner();
            seen.insert(served_by(&resp));
        }
        assert_eq!(seen.len(), 1, "{user} stayed on one version: {seen:?}");
        versions.extend(seen);
    }
    assert_eq!(
        versions.len(),
        2,
        "six users reached both versions: {versions:?}"
    );
    let sent: std::collections::BTreeSet<String> =
        up.seen().into_iter().map(|s| s.version).collect();
    assert_eq!(
        sent,
        ["1".to_string(), "2".to_string()].into(),
        "the routes' versions were sent"
    );

    // A pinned version takes the route that sends it, whoever asks.
    for user in ["alice", "bob", "carol"] {
        let resp = client
            .model_infer(request("p", Some(user), "2"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(served_by(&resp), "simple:2");
    }
    let s = client
        .model_infer(request("p", None, "3"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    // The override picks a route by name, since this policy allows it.
    let mut req = request("o", Some("alice"), "");
    req.metadata_mut()
        .insert("keel-route", "1".parse().unwrap());
    assert_eq!(
        served_by(&client.model_infer(req).await.unwrap().into_inner()),
        "simple:1"
    );
    let mut req = request("o", Some("alice"), "");
    req.metadata_mut()
        .insert("keel-route", "9".parse().unwrap());
    let s = client.model_infer(req).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("keel-route \"9\" is not a route"),
        "{}",
        s.message()
    );
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn set_flag_moves_new_calls_from_blue_to_green_while_calls_in_flight_finish_on_blue() {
    let blue = ScriptedUpstream::new(Script::slow(Duration::from_millis(300)));
    let green = ScriptedUpstream::new(Script::default());
    let (b, _sb) = blue.serve().await;
    let (g, _sg) = green.serve().await;
    let keel = Keel::with_admin(&format!(
        "[flags]\ncolor = \"blue\"\n\
         [upstreams.blue]\nendpoints = [\"{b}\"]\n[upstreams.green]\nendpoints = [\"{g}\"]\n\
         [models.simple]\nroutes = [\
           {{ name = \"blue\", backend = \"blue\", weight = 100, flag = \"color=blue\" }}, \
           {{ name = \"green\", backend = \"green\", weight = 100, flag = \"color=green\" }}]\n"
    ))
    .await;
    let mut admin = keel.admin_client().await;
    let in_flight = blue.call_in_flight(keel.client().await).await;
    let flipped = admin
        .set_flag(admin::SetFlagRequest {
            name: "color".into(),
            value: Some(admin::set_flag_request::Value::StringValue("green".into())),
            expected_revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(flipped.policy.unwrap().revision, 2);
    let mut client = keel.client().await;
    for i in 0..10 {
        let resp = client
            .model_infer(request(&format!("g{i}"), None, ""))
            .await
            .unwrap();
        assert_eq!(revision(&resp), 2);
    }
    assert_eq!(green.seen().len(), 10, "every new call went to green");
    let old = in_flight.await.unwrap().unwrap();
    assert_eq!(
        revision(&old),
        1,
        "the call in flight finished on its snapshot"
    );
    assert_eq!(blue.seen().len(), 1);
    keel.stop().await.unwrap();
}

/// Moves Keel's clock to the next analysis window (Keel runs in this test's runtime).
async fn next_window() {
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(3600)).await;
    tokio::time::resume();
}

#[tokio::test]
async fn a_failing_canary_is_rolled_back_by_keel_in_a_new_audited_revision() {
    let stable = ScriptedUpstream::new(Script::default());
    let next = ScriptedUpstream::new(Script::failing(Code::Unavailable, "canary down"));
    let (s, _ss) = stable.serve().await;
    let (n, _sn) = next.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let keel = Keel::with_admin(&format!(
        "[server]\naudit_log = \"{audit}\"\n\
         [defaults.retry]\nmax_attempts = 1\n[defaults.breaker]\nenabled = false\n\
         [upstreams.stable]\nendpoints = [\"{s}\"]\n[upstreams.next]\nendpoints = [\"{n}\"]\n\
         [models.simple]\n# v2 under test\nroutes = [{{ backend = \"stable\", weight = 50 }}, \
           {{ name = \"v2\", backend = \"next\", version = \"2\", weight = 50, canary = true }}]\n\
         [models.simple.rollback]\nwindow = \"1h\"\nmin_requests = 10\nwindows = 2\n",
        audit = audit.display()
    ))
    .await;
    let mut admin = keel.admin_client().await;
    let mut client = keel.client().await;
    // Two windows in which the canary fails every call and the baseline none: about 30
    // calls a side each, above min_requests.
    for w in 0..2 {
        for i in 0..60 {
            let _ = client
                .model_infer(request(&format!("w{w}-{i}"), None, ""))
                .await;
        }
        next_window().await;
    }
    let policy = |admin: &mut AdminClient| {
        let mut admin = admin.clone();
        async move {
            admin
                .get_policy(admin::GetPolicyRequest {})
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert_eq!(
        policy(&mut admin).await.revision,
        1,
        "no verdict before a call closes the window"
    );
    // The next call closes the second bad window: Keel rolls the canary back.
    let _ = client.model_infer(request("closer", None, "")).await;
    let now = policy(&mut admin).await;
    assert_eq!(now.revision, 2);
    assert_eq!(now.source, "auto-rollback:simple:v2");
    assert!(
        now.toml.contains("# v2 under test"),
        "the document is kept: {}",
        now.toml
    );
    let before = next.seen().len();
    for i in 0..40 {
        let resp = client
            .model_infer(request(&format!("after-{i}"), None, ""))
            .await
            .unwrap();
        assert_eq!(revision(&resp), 2);
    }
    assert_eq!(next.seen().len(), before, "the canary takes no more calls");
    // The last change in the audit is Keel's (reads of the policy come after it).
    let lines = std::fs::read_to_string(&audit).unwrap();
    let last: serde_json::Value = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|l| l["outcome"] != "read")
        .unwrap();
    assert_eq!(last["source"], "auto-rollback:simple:v2", "{last}");
    assert_eq!(last["outcome"], "accepted", "{last}");
    keel.stop().await.unwrap();
}
