//! Traces over OTLP: an in-process collector receives, for a call that retried once, a
//! SERVER span continuing the client's traceparent and one CLIENT span per attempt as its
//! children, with their attributes (the caller's tenant among them); each attempt's
//! traceparent reaches the upstream.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone()?.value)
}

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

#[tokio::test]
async fn a_retried_call_exports_a_server_span_with_one_client_span_per_attempt() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let (stop_collector, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move {
                    let _ = stopped.await;
                },
            ),
    );

    let up = ScriptedUpstream::new(Script::default());
    let (addr, _stop) = up.serve().await;
    let keel = Keel::start(keel::Options {
        text: Some(simple_via(
            addr,
            &format!(
                "[tenants.acme]\napi_keys = [\"{}\"]\nmodels = [\"*\"]\npriority = \"batch\"\n",
                keel::auth::hash_key("acme-key")
            ),
        )),
        otlp_endpoint: Some(format!("http://{collector_addr}")),
        ..Default::default()
    })
    .await;
    let mut client = keel.client().await;
    up.plan("tr1", vec![Step::Fail(tonic::Code::Unavailable, None)]);
    let mut req = tonic::Request::new(simple_request());
    req.metadata_mut()
        .insert("x-request-id", "tr1".parse().unwrap());
    req.metadata_mut()
        .insert("authorization", "Bearer acme-key".parse().unwrap());
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CLIENT_SPAN}-01").parse().unwrap(),
    );
    client.model_infer(req).await.unwrap();
    // Stopping drains and flushes the spans.
    keel.stop().await.unwrap();

    let mut spans = Vec::new();
    for _ in 0..200 {
        spans = collector.0.lock().unwrap().clone();
        if spans.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let server = spans.iter().find(|s| s.kind == 2).expect("a SERVER span");
    assert_eq!(server.name, "inference.GRPCInferenceService/ModelInfer");
    assert_eq!(hex(&server.trace_id), TRACE, "continues the client's trace");
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    assert_eq!(
        attr(server, "rpc.system.name"),
        Some(Value::StringValue("grpc".into()))
    );
    assert_eq!(
        attr(server, "keel.model"),
        Some(Value::StringValue("simple".into()))
    );
    assert_eq!(attr(server, "keel.attempts"), Some(Value::IntValue(2)));
    assert_eq!(
        attr(server, "keel.tenant"),
        Some(Value::StringValue("acme".into()))
    );
    assert_eq!(
        attr(server, "keel.priority"),
        Some(Value::StringValue("batch".into()))
    );
    assert_eq!(
        attr(server, "keel.class"),
        Some(Value::StringValue("ok".into()))
    );
    assert_eq!(
        attr(server, "rpc.response.status_code"),
        Some(Value::StringValue("OK".into()))
    );

    let mut attempts: Vec<&Span> = spans.iter().filter(|s| s.kind == 3).collect();
    attempts.sort_by_key(|s| match attr(s, "keel.attempt") {
        Some(Value::IntValue(n)) => n,
        _ => 0,
    });
    assert_eq!(attempts.len(), 2);
    for a in &attempts {
        assert_eq!(hex(&a.trace_id), TRACE);
        assert_eq!(
            a.parent_span_id, server.span_id,
            "a child of the SERVER span"
        );
        assert_eq!(
            attr(a, "keel.upstream"),
            Some(Value::StringValue("up".into()))
        );
    }
    assert_eq!(
        attr(attempts[0], "rpc.response.status_code"),
        Some(Value::StringValue("UNAVAILABLE".into()))
    );
    assert_eq!(
        attr(attempts[1], "keel.retry_reason"),
        Some(Value::StringValue("transient".into()))
    );
    assert!(attr(attempts[1], "keel.backoff_ms").is_some());

    // The upstream saw each attempt's own traceparent.
    let seen = up.seen_for("tr1");
    assert_eq!(seen.len(), 2);
    for (s, a) in seen.iter().zip(&attempts) {
        let tp = s
            .metadata
            .get("traceparent")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(tp, format!("00-{TRACE}-{}-01", hex(&a.span_id)));
    }
    let _ = stop_collector.send(());
}
