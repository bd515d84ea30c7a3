//! Builds a call's context from the client's request metadata: request id, deadline and the
//! metadata to forward.
//!
//! # Deadline
//!
//! The client's deadline counts from when the call's headers arrived ([`Arrival`], stamped
//! by the edge), not from when its handler ran after the whole body was read, and is
//! computed by [`client_deadline`] alone, so the edge and the call's `DeadlineLayer` fire
//! at the same instant.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use super::deadline::Arrival;
use super::keys;
use crate::dispatch::EdgeContext;
use crate::upstream::grpc::REQUEST_ID;

/// Headers that belong to one hop or to the transport and are never forwarded. The request
/// id is set separately and `grpc-timeout` is recomputed from the remaining time.
const NOT_FORWARDED: &[&str] = &[
    GRPC_TIMEOUT,
    "grpc-encoding",
    "grpc-accept-encoding",
    "content-type",
    "content-length",
    "te",
    "user-agent",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
    "host",
    REQUEST_ID,
];

impl EdgeContext {
    /// Reads a request's metadata; its deadline counts from its [`Arrival`], or from now
    /// for a request that came another way (built by hand).
    pub fn from_request<T>(request: &tonic::Request<T>) -> Self {
        let arrival = request
            .extensions()
            .get::<Arrival>()
            .map_or_else(Instant::now, |a| a.0);
        EdgeContext::read(request.metadata(), arrival)
    }

    /// Reads the metadata of a call arriving now.
    pub fn from_metadata(md: &MetadataMap) -> Self {
        EdgeContext::read(md, Instant::now())
    }

    fn read(md: &MetadataMap, arrival: Instant) -> Self {
        let request_id: Arc<str> = md
            .get(&*keys::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|id| is_usable_request_id(id))
            .map_or_else(|| new_request_id().into(), Into::into);
        let client_deadline = client_deadline(
            arrival,
            md.get(&*keys::GRPC_TIMEOUT).and_then(|v| v.to_str().ok()),
        );
        let mut metadata = MetadataMap::with_capacity(md.len());
        for kv in md.iter() {
            match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    if !is_forwarded(k.as_str()) {
                        continue;
                    }
                    metadata.append(k.clone(), v.clone());
                }
                tonic::metadata::KeyAndValueRef::Binary(k, v) => {
                    if !is_forwarded(k.as_str()) {
                        continue;
                    }
                    metadata.append_bin(k.clone(), v.clone());
                }
            }
        }
        EdgeContext {
            request_id,
            client_deadline,
            metadata: Arc::new(metadata),
        }
    }
}

pub(crate) use crate::headers::GRPC_TIMEOUT;

/// The client's deadline for a call that arrived at `arrival` with this `grpc-timeout`, and
/// the time it gave; `None` without one, or with one that does not parse or ends past what
/// a clock can hold.
pub fn client_deadline(
    arrival: Instant,
    grpc_timeout: Option<&str>,
) -> Option<(Instant, Duration)> {
    let budget = parse_grpc_timeout(grpc_timeout?)?;
    Some((arrival.checked_add(budget)?, budget))
}

/// Whether a client's `x-request-id` is used as the call's id (else one is generated).
pub(crate) fn is_usable_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128
}

/// A generated request id.
pub(crate) fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The request id of the `index`-th request (from 0) of a ModelStreamInfer stream whose own
/// id is `stream_id`: the request's OIP `id` when it is usable as `x-request-id` (visible
/// ASCII, 1..=128 bytes), else `<stream id>-<index>`. Each streamed request is a request of
/// its own: its own jitter, fault draws and canary route, and its own id upstream.
pub(crate) fn streamed_request_id(stream_id: &str, index: usize, id: &str) -> Arc<str> {
    if is_usable_request_id(id) && id.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        id.into()
    } else {
        format!("{stream_id}-{index}").into()
    }
}

fn is_forwarded(key: &str) -> bool {
    !NOT_FORWARDED.contains(&key) && !key.starts_with(':')
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (`H M S m u n`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::CallContext;
    use crate::policy::Snapshot;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(
            parse_grpc_timeout("5010m"),
            Some(Duration::from_millis(5010))
        );
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_grpc_timeout("123456789S"), None, "at most 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn metadata_is_forwarded_without_hop_by_hop_headers() {
        let mut md = MetadataMap::new();
        md.insert("x-request-id", "abc".parse().unwrap());
        md.insert("traceparent", "00-1-2-01".parse().unwrap());
        md.insert("x-tenant", "t1".parse().unwrap());
        md.insert("grpc-timeout", "250m".parse().unwrap());
        md.insert("te", "trailers".parse().unwrap());
        md.insert("user-agent", "grpc-python".parse().unwrap());
        md.insert_bin(
            "blob-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\x00\x01"),
        );
        let edge = EdgeContext::from_metadata(&md);
        assert_eq!(&*edge.request_id, "abc");
        let ctx = call(&edge, &default_snapshot(), "simple");
        assert_eq!(ctx.budget, Duration::from_millis(250));
        assert_eq!(ctx.remaining(), Duration::from_millis(250));
        assert_eq!(ctx.metadata.get("traceparent").unwrap(), "00-1-2-01");
        assert_eq!(ctx.metadata.get("x-tenant").unwrap(), "t1");
        assert!(ctx.metadata.get_bin("blob-bin").is_some());
        for dropped in ["grpc-timeout", "te", "user-agent", "x-request-id"] {
            assert!(
                ctx.metadata.get(dropped).is_none(),
                "{dropped} must not be forwarded"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_request_id_is_generated_and_a_missing_deadline_defaults() {
        let edge = EdgeContext::from_metadata(&MetadataMap::new());
        assert_eq!(edge.request_id.len(), 36, "a UUID");
        let ctx = call(&edge, &default_snapshot(), "simple");
        assert_eq!(ctx.remaining(), Duration::from_secs(30));
        assert_eq!(ctx.snapshot.revision, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_is_the_smallest_of_the_clients_the_timeout_and_the_cap() {
        let store = crate::policy::Store::with_default();
        store
            .apply(
                "[defaults]\ntimeout = \"2s\"\nmax_timeout = \"10s\"\n[models.iris]\nbackend = \"embedded\"\ntimeout = \"1s\"\n[models.simple]\nbackend = \"embedded\"\n",
                crate::policy::Source::Admin { principal: "t".into() },
                None,
            )
            .unwrap();
        let snap = store.current();
        let none = EdgeContext::from_metadata(&MetadataMap::new());
        assert_eq!(
            call(&none, &snap, "simple").budget,
            Duration::from_secs(2),
            "the default"
        );
        assert_eq!(
            call(&none, &snap, "iris").budget,
            Duration::from_secs(1),
            "the model's"
        );
        let mut md = MetadataMap::new();
        md.insert("grpc-timeout", "60S".parse().unwrap());
        let long = EdgeContext::from_metadata(&md);
        assert_eq!(
            call(&long, &snap, "simple").budget,
            Duration::from_secs(2),
            "capped by timeout"
        );
        md.insert("grpc-timeout", "500m".parse().unwrap());
        let short = EdgeContext::from_metadata(&md);
        assert_eq!(
            call(&short, &snap, "simple").budget,
            Duration::from_millis(500),
            "the client's"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_clients_deadline_counts_from_the_calls_arrival() {
        let arrived = Instant::now();
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", "250m".parse().unwrap());
        request.extensions_mut().insert(Arrival(arrived));
        // The body took 40 ms to arrive before the handler ran.
        tokio::time::advance(Duration::from_millis(40)).await;
        let edge = EdgeContext::from_request(&request);
        assert_eq!(
            edge.client_deadline,
            Some((
                arrived + Duration::from_millis(250),
                Duration::from_millis(250)
            ))
        );
        let ctx = call(&edge, &default_snapshot(), "simple");
        assert_eq!(ctx.budget, Duration::from_millis(250));
        assert_eq!(ctx.remaining(), Duration::from_millis(210));
        // Without an arrival (a request built by hand), it counts from now.
        request.extensions_mut().clear();
        let edge = EdgeContext::from_request(&request);
        assert_eq!(
            edge.client_deadline.map(|(at, _)| at),
            Some(Instant::now() + Duration::from_millis(250))
        );
    }

    #[test]
    fn a_streamed_request_is_named_by_its_id_else_the_streams_and_its_index() {
        assert_eq!(&*streamed_request_id("s", 3, "req-7"), "req-7");
        assert_eq!(&*streamed_request_id("s", 3, ""), "s-3");
        assert_eq!(
            &*streamed_request_id("s", 0, "caf\u{e9}"),
            "s-0",
            "not ASCII"
        );
        assert_eq!(
            &*streamed_request_id("s", 1, "a\nb"),
            "s-1",
            "a control character"
        );
        assert_eq!(
            &*streamed_request_id("s", 2, &"x".repeat(129)),
            "s-2",
            "too long"
        );
    }

    #[test]
    fn only_a_grpc_timeout_that_parses_gives_a_deadline() {
        let now = Instant::now();
        assert_eq!(
            client_deadline(now, Some("10m")),
            Some((now + Duration::from_millis(10), Duration::from_millis(10)))
        );
        assert_eq!(client_deadline(now, Some("soon")), None);
        assert_eq!(client_deadline(now, None), None);
    }

    const INFER: &str = "inference.GRPCInferenceService/ModelInfer";

    fn default_snapshot() -> Arc<Snapshot> {
        crate::policy::Store::with_default().current()
    }

    fn call(edge: &EdgeContext, snapshot: &Arc<Snapshot>, model: &str) -> CallContext {
        let router = crate::route::Router::new(
            crate::upstream::embedded::Embedded::new(),
            1 << 20,
            crate::observe::Metrics::new(),
        );
        let route = router
            .routes(snapshot)
            .route(INFER, model, "", &crate::route::Pick::by_id("r"))
            .unwrap();
        edge.call(snapshot, route, None, crate::dispatch::Cap::default())
    }
}
