//! Forwarding to an OIP upstream: answers through a second Keel are identical to direct
//! ones, metadata and the remaining deadline reach the upstream, and upstream errors and
//! slowness come back as the right statuses.

mod common;

use std::time::Duration;

use common::*;
use keel::pb::inference as pb;
use tonic::Code;

fn forward_config(upstream: std::net::SocketAddr, models: &[&str]) -> String {
    let mut toml =
        format!("policy_version = \"test.1\"\n[upstreams.up]\nendpoints = [\"{upstream}\"]\n");
    for m in models {
        toml.push_str(&format!("[models.{m}]\nbackend = \"up\"\n"));
    }
    toml
}

/// One request per embedded model, raw and typed.
fn requests() -> Vec<pb::ModelInferRequest> {
    let mut typed_simple = simple_request();
    typed_simple.raw_input_contents.clear();
    for (i, t) in typed_simple.inputs.iter_mut().enumerate() {
        t.contents = Some(pb::InferTensorContents {
            int_contents: (0..16).map(|x| x * (i as i32 + 2)).collect(),
            ..Default::default()
        });
    }
    let features: Vec<u8> = [5.9f32, 3.0, 5.1, 1.8]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    vec![
        simple_request(),
        typed_simple,
        pb::ModelInferRequest {
            model_name: "simple_string".into(),
            inputs: vec![
                input("INPUT0", "BYTES", &[1, 16]),
                input("INPUT1", "BYTES", &[1, 16]),
            ],
            raw_input_contents: vec![bytes_elements(&["7"; 16]), bytes_elements(&["-2"; 16])],
            ..Default::default()
        },
        pb::ModelInferRequest {
            model_name: "simple_int8".into(),
            inputs: vec![
                input("INPUT0", "INT8", &[2, 16]),
                input("INPUT1", "INT8", &[2, 16]),
            ],
            raw_input_contents: vec![vec![5u8; 32].into(), vec![250u8; 32].into()],
            ..Default::default()
        },
        pb::ModelInferRequest {
            model_name: "simple_identity".into(),
            inputs: vec![input("INPUT0", "BYTES", &[1, 2])],
            raw_input_contents: vec![bytes_elements(&["a", "bc"])],
            ..Default::default()
        },
        pb::ModelInferRequest {
            model_name: "iris".into(),
            id: "iris-1".into(),
            inputs: vec![input("features", "FP32", &[1, 4])],
            raw_input_contents: vec![features.into()],
            ..Default::default()
        },
        pb::ModelInferRequest {
            model_name: "identity".into(),
            inputs: vec![input("payload", "UINT8", &[4096])],
            raw_input_contents: vec![vec![42u8; 4096].into()],
            ..Default::default()
        },
    ]
}

#[tokio::test]
async fn answers_through_a_second_keel_are_identical_to_direct_ones() {
    let upstream = Keel::embedded().await;
    let models = [
        "identity",
        "iris",
        "simple",
        "simple_identity",
        "simple_int8",
        "simple_string",
    ];
    let front = Keel::with_config(&forward_config(upstream.addr, &models)).await;
    let mut direct = upstream.client().await;
    let mut via = front.client().await;
    for req in requests() {
        let a = direct.model_infer(req.clone()).await.unwrap().into_inner();
        let b = via.model_infer(req.clone()).await.unwrap().into_inner();
        assert_eq!(a, b, "model {}", req.model_name);
    }
    for name in models {
        let q = pb::ModelMetadataRequest {
            name: name.into(),
            version: String::new(),
        };
        let a = direct.model_metadata(q.clone()).await.unwrap().into_inner();
        let b = via.model_metadata(q).await.unwrap().into_inner();
        assert_eq!(a, b);
        let q = pb::ModelConfigRequest {
            name: name.into(),
            version: String::new(),
        };
        let a = direct.model_config(q.clone()).await.unwrap().into_inner();
        let b = via.model_config(q).await.unwrap().into_inner();
        assert_eq!(a, b);
        let ready = via
            .model_ready(pb::ModelReadyRequest {
                name: name.into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(ready.ready);
    }
    // Statistics come from the upstream, which counted the forwarded calls.
    let s = via
        .model_statistics(pb::ModelStatisticsRequest {
            name: "iris".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.model_stats[0].inference_count, 2,
        "one direct call and one forwarded"
    );
    // The front Keel learned `simple`'s contract from the upstream's metadata, so it turns
    // a malformed request away itself: the upstream never sees it.
    let mut bad = simple_request();
    bad.inputs.pop();
    bad.raw_input_contents.pop();
    let s = via.model_infer(bad).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(s.message(), "input 'INPUT1' of model 'simple' is missing");
    let fail = |s: pb::ModelStatisticsResponse| {
        s.model_stats[0]
            .inference_stats
            .as_ref()
            .and_then(|i| i.fail.as_ref())
            .map_or(0, |f| f.count)
    };
    let stats = via
        .model_statistics(pb::ModelStatisticsRequest {
            name: "simple".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fail(stats), 0, "the upstream saw no failed request");
    front.stop().await.unwrap();
    upstream.stop().await.unwrap();
}

#[tokio::test]
async fn a_forwarded_answer_keeps_the_form_its_upstream_chose() {
    // Keel sends upstream in raw form; the answer comes back as the upstream gave it,
    // whatever form the client used.
    let mut typed_request = simple_request();
    let raw = std::mem::take(&mut typed_request.raw_input_contents);
    for (t, r) in typed_request.inputs.iter_mut().zip(&raw) {
        t.contents = Some(pb::InferTensorContents {
            int_contents: i32s(r),
            ..Default::default()
        });
    }
    for typed_upstream in [false, true] {
        let up = ScriptedUpstream::new(Script {
            typed: typed_upstream,
            ..Script::default()
        });
        let (addr, _stop) = up.serve().await;
        let keel = Keel::with_config(&simple_via(addr, "")).await;
        let mut client = keel.client().await;
        for req in [simple_request(), typed_request.clone()] {
            let typed_in = req.raw_input_contents.is_empty();
            let resp = client.model_infer(req).await.unwrap().into_inner();
            let what = format!("typed upstream: {typed_upstream}, typed request: {typed_in}");
            if typed_upstream {
                assert!(resp.raw_output_contents.is_empty(), "{what}");
                let echo = &resp.outputs[0].contents.as_ref().unwrap().int_contents;
                assert_eq!(*echo, (0..16).collect::<Vec<i32>>(), "{what}");
            } else {
                assert!(resp.outputs.iter().all(|o| o.contents.is_none()), "{what}");
                assert_eq!(
                    i32s(&resp.raw_output_contents[0]),
                    (0..16).collect::<Vec<_>>()
                );
            }
        }
        keel.stop().await.unwrap();
    }
}

#[tokio::test]
async fn only_configured_models_are_served_and_may_mix_backends() {
    let upstream = Keel::embedded().await;
    let mut toml = forward_config(upstream.addr, &["simple"]);
    toml.push_str("[models.iris]\nbackend = \"embedded\"\n");
    let front = Keel::with_config(&toml).await;
    let mut via = front.client().await;
    via.model_infer(simple_request()).await.unwrap();
    let index = via
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = index.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["iris", "simple"]);
    let mut req = simple_request();
    req.model_name = "simple_int8".into();
    assert_eq!(
        via.model_infer(req).await.unwrap_err().code(),
        Code::NotFound
    );
    front.stop().await.unwrap();
    upstream.stop().await.unwrap();
}

#[tokio::test]
async fn metadata_request_id_and_remaining_deadline_reach_the_upstream() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let front = Keel::with_config(&forward_config(addr, &["simple"])).await;
    let mut client = front.client().await;

    let mut req = tonic::Request::new(simple_request());
    req.set_timeout(Duration::from_secs(5));
    let md = req.metadata_mut();
    md.insert("x-request-id", "trace-me".parse().unwrap());
    md.insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .parse()
            .unwrap(),
    );
    md.insert("x-tenant", "blue".parse().unwrap());
    let resp = client.model_infer(req).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "trace-me");
    assert_eq!(
        resp.into_inner().model_version,
        "7",
        "answered by the upstream"
    );

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let md = &seen[0].metadata;
    assert_eq!(md.get("x-request-id").unwrap(), "trace-me");
    assert_eq!(
        md.get("traceparent").unwrap(),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(md.get("x-tenant").unwrap(), "blue");
    let timeout = md.get("grpc-timeout").unwrap().to_str().unwrap();
    let timeout = keel::api::context::parse_grpc_timeout(timeout).unwrap();
    assert!(
        timeout <= Duration::from_secs(5),
        "never more than the client gave: {timeout:?}"
    );
    assert!(
        timeout > Duration::from_secs(4),
        "what remains, not a fixed default: {timeout:?}"
    );

    // Without a client deadline the policy default applies (30s).
    client.model_infer(simple_request()).await.unwrap();
    let seen = up.seen();
    let md = &seen[1].metadata;
    let timeout =
        keel::api::context::parse_grpc_timeout(md.get("grpc-timeout").unwrap().to_str().unwrap())
            .unwrap();
    assert!(
        timeout <= Duration::from_secs(30) && timeout > Duration::from_secs(29),
        "{timeout:?}"
    );
    assert_eq!(
        md.get("x-request-id").unwrap().len(),
        36,
        "a generated id is forwarded"
    );
    front.stop().await.unwrap();
}

#[tokio::test]
async fn keels_own_contract_fetch_carries_only_keels_metadata() {
    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let front = Keel::with_config(&forward_config(addr, &["simple"])).await;
    let mut client = front.client().await;
    let mut req = tonic::Request::new(simple_request());
    let md = req.metadata_mut();
    md.insert("x-request-id", "client-call-1".parse().unwrap());
    md.insert("x-tenant", "blue".parse().unwrap());
    // A fault header meant for the inference call (an Envoy in front of the model server).
    md.insert("x-envoy-fault-abort-request", "503".parse().unwrap());
    md.insert_bin(
        "blob-bin",
        tonic::metadata::MetadataValue::from_bytes(b"\x00\x01"),
    );
    client.model_infer(req).await.unwrap();

    let fetches: Vec<Seen> = up
        .seen_all()
        .into_iter()
        .filter(|s| s.method == "ModelMetadata")
        .collect();
    assert_eq!(fetches.len(), 1, "the first call fetched the contract");
    let md = &fetches[0].metadata;
    assert_eq!(md.get("x-request-id").unwrap(), "keel-contract-simple-1");
    for client_header in ["x-tenant", "x-envoy-fault-abort-request", "traceparent"] {
        assert!(md.get(client_header).is_none(), "{client_header} leaked");
    }
    assert!(md.get_bin("blob-bin").is_none(), "blob-bin leaked");
    // The inference call itself still carries the client's metadata.
    let infer = &up.seen()[0].metadata;
    assert_eq!(infer.get("x-request-id").unwrap(), "client-call-1");
    assert_eq!(infer.get("x-envoy-fault-abort-request").unwrap(), "503");
    front.stop().await.unwrap();
}

#[tokio::test]
async fn a_slow_upstream_gives_deadline_exceeded_not_cancelled() {
    let up = ScriptedUpstream::new(Script::slow(Duration::from_secs(30)));
    let (addr, _stop) = up.serve().await;
    // The client sends no deadline, so Keel's default (200ms here) is the one that runs out,
    // and what the client hears is Keel's answer rather than its own local timeout.
    let mut toml = forward_config(addr, &["simple"]);
    toml.push_str("[defaults]\ntimeout = \"200ms\"\n");
    let front = Keel::with_config(&toml).await;
    let mut client = front.client().await;
    let s = client.model_infer(simple_request()).await.unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert_eq!(s.message(), "deadline of 200ms exceeded after 1 attempt(s)");
    assert_eq!(up.seen().len(), 1, "the upstream was called once");
    front.stop().await.unwrap();
}

#[tokio::test]
async fn upstream_statuses_pass_through_with_the_upstream_named() {
    let up = ScriptedUpstream::new(Script::failing(Code::ResourceExhausted, "queue full"));
    let (addr, _stop) = up.serve().await;
    // One attempt and no breaker: this test is about what passes through.
    let mut toml = forward_config(addr, &["simple"]);
    toml.push_str("[defaults.retry]\nmax_attempts = 1\n[defaults.breaker]\nenabled = false\n");
    let front = Keel::with_config(&toml).await;
    let mut client = front.client().await;
    let s = client.model_infer(simple_request()).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert_eq!(s.message(), "upstream 'up': queue full");
    up.script.lock().unwrap().fail = Some((Code::Unavailable, "warming up".into()));
    let s = client.model_infer(simple_request()).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert!(
        s.message().contains("'up'") && s.message().contains("warming up"),
        "{}",
        s.message()
    );
    front.stop().await.unwrap();
}

#[tokio::test]
async fn calls_are_spread_over_every_endpoint_in_turn() {
    let a = ScriptedUpstream::new(Script::default());
    let b = ScriptedUpstream::new(Script::default());
    let (addr_a, _sa) = a.serve().await;
    let (addr_b, _sb) = b.serve().await;
    let front = Keel::with_config(&format!(
        "[upstreams.pool]\nendpoints = [\"{addr_a}\", \"{addr_b}\"]\n[models.simple]\nbackend = \"pool\"\n"
    ))
    .await;
    let mut client = front.client().await;
    for _ in 0..4 {
        client.model_infer(simple_request()).await.unwrap();
    }
    assert_eq!(a.seen().len(), 2);
    assert_eq!(b.seen().len(), 2);
    front.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_calls_go_to_the_fast_endpoint_when_one_is_slow() {
    let slow = Keel::with_config(
        "[models.simple]\nbackend = \"embedded\"\n[models.simple.fault.delay]\npercent = 100\nduration = \"100ms\"\n",
    )
    .await;
    let fast = Keel::embedded().await;
    let gateway = Keel::with_config(&format!(
        "[upstreams.pool]\nendpoints = [\"{}\", \"{}\"]\n[models.simple]\nbackend = \"pool\"\n",
        slow.addr, fast.addr
    ))
    .await;
    let plan = keel::load::Plan {
        target: gateway.addr.to_string(),
        model: "simple".into(),
        concurrency: 8,
        connections: 2,
        stop: keel::load::Stop::Requests(400),
        rate: None,
        payload: keel::load::Payload::Simple,
        deadline: Some(Duration::from_secs(5)),
        api: keel::load::Api::V2,
    };
    let report = keel::load::run(plan, |_| {}).await.unwrap();
    assert_eq!(report.ok, 400);
    let served = |keel: &Keel| {
        let addr = keel.addr;
        async move {
            connect(addr)
                .await
                .model_statistics(pb::ModelStatisticsRequest {
                    name: "simple".into(),
                    version: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .model_stats[0]
                .inference_count
        }
    };
    let (s, f) = (served(&slow).await, served(&fast).await);
    let share = f as f64 / (s + f) as f64;
    assert!(
        share > 0.8,
        "fast endpoint share {share:.2} (slow {s}, fast {f})"
    );
    for k in [gateway, slow, fast] {
        k.stop().await.unwrap();
    }
}
