//! Health, reflection and shutdown: SERVING while up, NOT_SERVING as soon as shutdown
//! begins, in-flight calls finish, and the drain is bounded.

mod common;

use std::time::Duration;

use common::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_inference_service() {
    let keel = Keel::embedded().await;
    let _ = keel.client().await; // waits until it accepts connections
    let mut health = HealthClient::new(keel.channel().await);
    for service in [
        "",
        "inference.GRPCInferenceService",
        "liveness",
        "readiness",
    ] {
        let r = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let s = health.check(check("no.such.Service")).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::NotFound);
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_inference_and_health_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let keel = Keel::embedded().await;
    let _ = keel.client().await;
    let mut client = ServerReflectionClient::new(keel.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list, got {first:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"inference.GRPCInferenceService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn an_in_flight_call_finishes_after_shutdown_begins_and_health_goes_not_serving() {
    let up = ScriptedUpstream::new(Script::slow(Duration::from_millis(300)));
    let (addr, _stop) = up.serve().await;
    // A drain timeout far past `stop`'s own bound: the drain must not wait for it.
    let mut keel = Keel::with_config(&simple_via(addr, "[server]\ndrain_timeout = \"60s\"")).await;
    let client = keel.client().await;
    let mut health = HealthClient::new(keel.channel().await);
    let mut watch = health.watch(check("readiness")).await.unwrap().into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    let call = up.call_in_flight(client).await;
    keel.begin_shutdown();
    let status = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a health update within 10s")
        .unwrap()
        .unwrap()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    // The Watch stream ends as the drain begins (after one last status), so it cannot hold
    // the drain open until the drain timeout.
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        let mut rest = Vec::new();
        while let Some(m) = watch.message().await.unwrap() {
            rest.push(m.status);
        }
        rest
    })
    .await
    .expect("the Watch stream ended within 10s");
    assert!(
        rest.iter().all(|s| *s == ServingStatus::NotServing as i32),
        "{rest:?}"
    );

    let answer = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the in-flight call finished")
        .unwrap();
    let answer = answer
        .expect("the call started before shutdown succeeds")
        .into_inner();
    assert_eq!(answer.model_version, "7");

    keel.stop().await.unwrap();
}

#[tokio::test]
async fn new_connections_are_refused_once_keel_has_stopped() {
    let keel = Keel::embedded().await;
    let _ = keel.client().await;
    let url = keel.url();
    keel.stop().await.unwrap();
    let r =
        keel::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
            url,
        )
        .await;
    assert!(r.is_err(), "the listener is closed");
}

#[tokio::test]
async fn the_drain_is_bounded_by_drain_timeout() {
    let up = ScriptedUpstream::new(Script::slow(Duration::from_secs(600)));
    let (addr, _stop) = up.serve().await;
    let mut keel =
        Keel::with_config(&simple_via(addr, "[server]\ndrain_timeout = \"200ms\"")).await;
    let call = up.call_in_flight(keel.client().await).await;
    keel.begin_shutdown();
    // `stop` itself bounds the wait at 20s; the drain timeout ends it far sooner.
    keel.stop().await.unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap()
        .unwrap();
    let s = cut.expect_err("a call still running after the drain timeout is cut");
    assert_eq!(s.code(), tonic::Code::Unavailable);
    assert!(s.message().contains("drain timeout"), "{}", s.message());
    let info = s.get_details_error_info().unwrap();
    assert_eq!(info.reason, "DRAIN_TIMEOUT");
    assert!(
        s.metadata().get("x-request-id").is_some(),
        "tagged as every answer is"
    );
}

#[tokio::test]
async fn readiness_flips_first_then_keel_serves_for_the_grace_then_refuses() {
    let mut keel = Keel::start(keel::Options {
        drain_grace: Some(Duration::from_secs(2)),
        ..keel::Options::default()
    })
    .await;
    let mut client = keel.client().await;
    let mut health = HealthClient::new(keel.channel().await);
    let mut watch = health.watch(check("readiness")).await.unwrap().into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    keel.begin_shutdown();
    let status = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("readiness changes within 10s")
        .unwrap()
        .unwrap()
        .status;
    assert_eq!(
        status,
        ServingStatus::NotServing as i32,
        "readiness flips first"
    );
    drop(watch);
    // During the grace: not ready, still alive, still serving.
    for (service, want) in [
        ("readiness", ServingStatus::NotServing),
        ("liveness", ServingStatus::Serving),
    ] {
        let r = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(r.status, want as i32, "{service:?} during the grace");
    }
    client
        .model_infer(simple_request())
        .await
        .expect("a call during the grace is served");
    // After the grace the listener closes: calls are refused (polled, bounded). A call the
    // client opens as Keel's GOAWAY crosses it is never served, and tonic reports it as
    // its own transport error (INTERNAL or UNKNOWN, with no status Keel sent); the next
    // call finds the listener closed.
    let mut refused = None;
    for _ in 0..200 {
        match client.model_infer(simple_request()).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(s) if s.code() == tonic::Code::Unavailable => {
                refused = Some(s);
                break;
            }
            Err(s) => assert!(
                s.metadata().get("grpc-status-details-bin").is_none()
                    && matches!(s.code(), tonic::Code::Internal | tonic::Code::Unknown),
                "only the client's own transport error may come before the refusal: {s:?}"
            ),
        }
    }
    assert!(
        refused.is_some(),
        "calls are refused UNAVAILABLE once the grace is over"
    );
    keel.stop().await.unwrap();
}
