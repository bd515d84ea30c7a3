//! OpenTelemetry traces over OTLP/gRPC: a SERVER span per call, continuing the client's
//! W3C `traceparent`, and a CLIENT span per upstream attempt, whose context the upstream
//! receives as a fresh `traceparent`, so the model server's own spans join the trace.
//!
//! Off unless an OTLP endpoint is given (`OTEL_EXPORTER_OTLP_ENDPOINT`); when off, no span
//! is built and nothing is allocated for tracing.
//!
//! # Semantic conventions
//!
//! Spans follow the stable OpenTelemetry RPC conventions (`rpc.system.name`, `rpc.method`
//! as the full method, `rpc.response.status_code` as the code's name). With
//! `OTEL_SEMCONV_STABILITY_OPT_IN=rpc/dup` they also carry the older names (`rpc.system`,
//! `rpc.service`, `rpc.grpc.status_code` as a number) for backends that still read those;
//! `rpc.method` keeps its stable value (the full method), since both share the key.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

/// The exporter and tracer, when tracing is on.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    /// Also emit the pre-stable attribute names.
    old_names: bool,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracing")
    }
}

struct Extract<'a>(&'a MetadataMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

struct Inject<'a>(&'a mut MetadataMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(k, v);
        }
    }
}

impl Tracing {
    /// Exports to the OTLP/gRPC collector at `endpoint` as `service_name`; must run inside a
    /// Tokio runtime. `old_names` also emits the pre-stable RPC attribute names.
    pub fn otlp(
        endpoint: &str,
        service_name: &str,
        old_names: bool,
    ) -> Result<Arc<Tracing>, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service_name.to_string())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("keel");
        Ok(Arc::new(Tracing {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            old_names,
        }))
    }

    /// Sends every finished span and stops the exporter (on drain).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!(error = %e, "flushing spans failed");
        }
        let _ = self.provider.shutdown();
    }

    fn rpc_attributes(&self, method: &str) -> Vec<KeyValue> {
        let mut attrs = vec![
            KeyValue::new("rpc.system.name", "grpc"),
            KeyValue::new("rpc.method", method.to_string()),
        ];
        if self.old_names {
            // The old `rpc.method` (the bare method) shares its key with the stable one (the
            // full method); the stable value is kept, and the service is given on its own.
            let service = method.split_once('/').map_or("", |(s, _)| s);
            attrs.push(KeyValue::new("rpc.system", "grpc"));
            attrs.push(KeyValue::new("rpc.service", service.to_string()));
        }
        attrs
    }

    /// Starts the SERVER span of a call to `method`, continuing the client's trace.
    pub fn server_span(
        self: &Arc<Self>,
        method: &str,
        incoming: &MetadataMap,
        attrs: Vec<KeyValue>,
    ) -> CallSpan {
        let parent = self.propagator.extract(&Extract(incoming));
        let mut all = self.rpc_attributes(method);
        all.extend(attrs);
        let span = self
            .tracer
            .span_builder(method.to_string())
            .with_kind(SpanKind::Server)
            .with_attributes(all)
            .start_with_context(&self.tracer, &parent);
        CallSpan {
            tracing: self.clone(),
            cx: parent.with_span(span),
        }
    }
}

/// The SERVER span of one call; clones share it.
#[derive(Clone, Debug)]
pub struct CallSpan {
    tracing: Arc<Tracing>,
    cx: Context,
}

impl CallSpan {
    /// Adds attributes.
    pub fn set(&self, attrs: Vec<KeyValue>) {
        self.cx.span().set_attributes(attrs);
    }

    /// Ends the span with the call's status code name (`OK`, `UNAVAILABLE`).
    pub fn end(&self, code: &'static str, code_number: i64) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("rpc.response.status_code", code));
        if self.tracing.old_names {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", code_number));
        }
        if code != "OK" {
            span.set_status(Status::error(Cow::Borrowed(code)));
        }
        span.end();
    }

    /// Starts the CLIENT span of one upstream attempt and writes its `traceparent` into
    /// `outgoing`, replacing the client's.
    pub fn attempt(
        &self,
        method: &str,
        attrs: Vec<KeyValue>,
        outgoing: &mut MetadataMap,
    ) -> AttemptSpan {
        let t = &self.tracing;
        let mut all = t.rpc_attributes(method);
        all.extend(attrs);
        let span = t
            .tracer
            .span_builder(method.to_string())
            .with_kind(SpanKind::Client)
            .with_attributes(all)
            .start_with_context(&t.tracer, &self.cx);
        let cx = self.cx.with_span(span);
        t.propagator.inject_context(&cx, &mut Inject(outgoing));
        AttemptSpan {
            old_names: t.old_names,
            cx,
        }
    }
}

/// The CLIENT span of one upstream attempt.
#[derive(Debug)]
pub struct AttemptSpan {
    old_names: bool,
    cx: Context,
}

impl AttemptSpan {
    /// Ends the span with the upstream's status code.
    pub fn end(&self, code: &'static str, code_number: i64) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("rpc.response.status_code", code));
        if self.old_names {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", code_number));
        }
        if code != "OK" {
            span.set_status(Status::error(Cow::Borrowed(code)));
        }
        span.end();
    }
}
