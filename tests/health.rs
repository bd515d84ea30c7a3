//! Keel's own health over loopback: a health name per model, and readiness that follows
//! the models marked `required` while liveness stays SERVING.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

type Health = HealthClient<tonic::transport::Channel>;

async fn status(health: &mut Health, service: &str) -> i32 {
    health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Polls (bounded: 15 s) until `service` reports `want`.
async fn until(health: &mut Health, service: &str, want: ServingStatus) {
    for _ in 0..300 {
        if status(health, service).await == want as i32 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{service:?} did not become {want:?} within 15s");
}

#[tokio::test]
async fn every_model_has_a_health_name() {
    let keel = Keel::embedded().await;
    let mut health = HealthClient::new(keel.channel().await);
    // Known from the first call: the view is published before Keel accepts a connection.
    for model in ["simple", "iris", "identity"] {
        assert_eq!(
            status(&mut health, &format!("keel.model.{model}")).await,
            ServingStatus::Serving as i32,
            "{model}"
        );
    }
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn readiness_follows_a_required_model_and_liveness_stays_serving() {
    // An address nothing listens on (yet).
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let keel = Keel::with_admin(&format!(
        "[defaults.retry]\nmax_attempts = 1\n\
         [upstreams.up]\nendpoints = [\"{dead}\"]\n\
         [upstreams.up.outlier]\nconsecutive_failures = 2\nbase_ejection = \"4s\"\n\
         [models.simple]\nbackend = \"up\"\nrequired = true\n\
         [models.iris]\nbackend = \"embedded\"\n"
    ))
    .await;
    let mut health = HealthClient::new(keel.channel().await);
    let mut client = keel.client().await;
    until(&mut health, "readiness", ServingStatus::Serving).await;

    // Two refused calls eject the only endpoint: the required model cannot answer.
    for _ in 0..2 {
        assert!(client.model_infer(simple_request()).await.is_err());
    }
    until(&mut health, "readiness", ServingStatus::NotServing).await;
    until(&mut health, "keel.model.simple", ServingStatus::NotServing).await;
    assert_eq!(
        status(&mut health, "liveness").await,
        ServingStatus::Serving as i32
    );
    assert_eq!(
        status(&mut health, "keel.model.iris").await,
        ServingStatus::Serving as i32
    );
    let ready = client
        .server_ready(keel::pb::inference::ServerReadyRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready;
    assert!(!ready, "ServerReady answers from the same view");
    let (code, body) = get(keel.admin.unwrap(), "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("model simple:"), "{body}");

    // The upstream comes up; once the ejection ends, Keel is ready again.
    let upstream = Keel::start_on(keel::Options::default(), dead).await;
    until(&mut health, "readiness", ServingStatus::Serving).await;
    let (code, _) = get(keel.admin.unwrap(), "/readyz").await;
    assert_eq!(code, 200);
    client.model_infer(simple_request()).await.unwrap();
    upstream.stop().await.unwrap();
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn active_checks_take_readiness_down_and_back_without_traffic() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let upstream = Keel::start_on(keel::Options::default(), port).await;
    let keel = Keel::with_admin(&format!(
        "[upstreams.up]\nendpoints = [\"{port}\"]\n\
         [upstreams.up.health_check]\nkind = \"grpc_health\"\nservice = \"readiness\"\n\
         interval = \"100ms\"\ntimeout = \"100ms\"\nunhealthy_threshold = 1\nhealthy_threshold = 2\n\
         [models.simple]\nbackend = \"up\"\nrequired = true\n"
    ))
    .await;
    let mut health = HealthClient::new(keel.channel().await);
    until(&mut health, "readiness", ServingStatus::Serving).await;

    // The upstream goes away; no call is made, the checks notice.
    upstream.stop().await.unwrap();
    until(&mut health, "readiness", ServingStatus::NotServing).await;
    let (_, metrics) = get(keel.admin.unwrap(), "/metrics").await;
    assert_eq!(
        value(
            &metrics,
            &format!("keel_endpoint_state{{upstream=\"up\",endpoint=\"{port}\"}}")
        ),
        Some(1.0),
        "failing checks: {metrics}"
    );
    assert_eq!(
        status(&mut health, "liveness").await,
        ServingStatus::Serving as i32
    );

    // Back, and ready once it passes two checks in a row.
    let upstream = Keel::start_on(keel::Options::default(), port).await;
    until(&mut health, "readiness", ServingStatus::Serving).await;
    keel.client()
        .await
        .model_infer(simple_request())
        .await
        .unwrap();
    upstream.stop().await.unwrap();
    keel.stop().await.unwrap();
}
