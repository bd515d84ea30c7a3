//! The resilience receipt: what Keel did for a call, in the answer's trailing metadata.
//!
//! Handlers write the receipt into the response metadata ([`write`]); for a successful
//! unary answer tonic sends that metadata as headers, so [`move_to_trailers`] moves the
//! receipt's keys into the trailers, where gRPC clients read call outcomes (an error
//! answer is a single headers frame, which clients read as trailers already). An answer
//! that knows its trailers when it is made (ModelInfer's) carries them as [`Trailing`]
//! instead ([`write_to`]), and nothing is moved.

use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame};
use tonic::metadata::MetadataMap;

use super::POLICY_REVISION;
use crate::call::CallContext;
use crate::observe::frames::{Polled, Watch, Watched};

/// Attempts made, the first included.
pub const ATTEMPTS: &str = "keel-attempts";
/// Waits before each retry, in milliseconds, comma-separated; absent when no retry waited.
pub const RETRY_DELAYS: &str = "keel-retry-delays-ms";
/// Who answered the last attempt (`triton@10.0.0.7:8001`, `embedded`).
pub const SERVED_BY: &str = "keel-served-by";
/// Whether the answer is degraded (`true`, `false`).
pub const DEGRADED: &str = "keel-degraded";
/// Which tier answered: `primary`, `fallback_model`, `cache`, `static`.
pub const TIER: &str = "keel-tier";
/// The model and version that answered (`iris:1`).
pub const SERVED_MODEL: &str = "keel-served-model";
/// Why the answer is degraded (`breaker_open`, `deadline`, ...).
pub const DEGRADED_REASON: &str = "keel-degraded-reason";
/// The age of a cached answer, in milliseconds.
pub const STALE_MS: &str = "keel-stale-ms";
/// On a degraded answer: the attempts the primary made before the ladder answered.
pub const PRIMARY_ATTEMPTS: &str = "keel-primary-attempts";
/// On a degraded answer: the class of the primary's failure (`transient`, ...).
pub const PRIMARY_ERROR: &str = "keel-primary-error";
/// On a degraded answer: the gRPC code of the primary's failure (`UNAVAILABLE`).
pub const PRIMARY_CODE: &str = "keel-primary-code";
/// On a degraded answer: the rungs tried and failed before the one that answered.
pub const RUNGS_FAILED: &str = "keel-rungs-failed";
/// On legacy v1 answers when the policy deprecates v1: what to move to.
pub const DEPRECATION: &str = "keel-deprecation";

/// Every key a receipt may hold, moved to the trailers by [`move_to_trailers`].
const RECEIPT: [&str; 13] = [
    ATTEMPTS,
    RETRY_DELAYS,
    SERVED_BY,
    DEGRADED,
    TIER,
    SERVED_MODEL,
    DEGRADED_REASON,
    STALE_MS,
    PRIMARY_ATTEMPTS,
    PRIMARY_ERROR,
    PRIMARY_CODE,
    RUNGS_FAILED,
    DEPRECATION,
];

/// The names written on every answer, as header names built at compile time: a name
/// given as `&str` is parsed and checked on each use.
pub mod names {
    use http::HeaderName;

    /// [`super::ATTEMPTS`].
    pub const ATTEMPTS: HeaderName = HeaderName::from_static(super::ATTEMPTS);
    /// [`super::RETRY_DELAYS`].
    pub const RETRY_DELAYS: HeaderName = HeaderName::from_static(super::RETRY_DELAYS);
    /// [`super::SERVED_BY`].
    pub const SERVED_BY: HeaderName = HeaderName::from_static(super::SERVED_BY);
    /// [`super::DEGRADED`].
    pub const DEGRADED: HeaderName = HeaderName::from_static(super::DEGRADED);
    /// [`super::TIER`].
    pub const TIER: HeaderName = HeaderName::from_static(super::TIER);
    /// [`super::SERVED_MODEL`].
    pub const SERVED_MODEL: HeaderName = HeaderName::from_static(super::SERVED_MODEL);
    /// [`crate::api::POLICY_REVISION`].
    pub const POLICY_REVISION: HeaderName = HeaderName::from_static(crate::api::POLICY_REVISION);
}

/// In the extensions of an answer: its trailers as Keel wrote them when it made the answer
/// (the upstream's that pass first, then Keel's receipt and labels, which win), so that
/// [`move_to_trailers`] has nothing to look for among the headers.
#[derive(Clone, Debug, Default)]
pub struct Trailing(pub HeaderMap);

/// Writes a call's receipt into answer metadata.
pub fn write(md: &mut MetadataMap, ctx: &CallContext) {
    let mut headers = std::mem::take(md).into_headers();
    write_to(&mut headers, ctx);
    *md = MetadataMap::from_headers(headers);
}

/// Writes a call's receipt into `h`: an answer's [`Trailing`] or a status's metadata.
pub fn write_to(h: &mut HeaderMap, ctx: &CallContext) {
    let r = ctx.receipt.read();
    h.insert(names::ATTEMPTS, HeaderValue::from(r.attempts.max(1)));
    // Absent when no retry waited: an empty value cost an HPACK entry on every answer.
    if !r.delays.is_empty()
        && let Ok(v) = HeaderValue::from_str(&r.delays_ms())
    {
        h.insert(names::RETRY_DELAYS, v);
    }
    if let Some(v) = r
        .served_by
        .as_deref()
        .and_then(|s| HeaderValue::from_str(s).ok())
    {
        h.insert(names::SERVED_BY, v);
    }
}

/// Whether `name` is one of the receipt's.
fn in_receipt(name: &HeaderName) -> bool {
    let n = name.as_str();
    n.starts_with("keel-") && RECEIPT.contains(&n)
}

/// Moves the receipt keys out of a response's headers, to be sent with its trailers.
/// Answers whose headers already carry `grpc-status` (trailers-only errors) are left as
/// they are: their headers are the trailers.
pub fn move_to_trailers<B>(res: http::Response<B>) -> http::Response<WithTrailers<B>> {
    let (mut parts, body) = res.into_parts();
    let mut extra = parts.extensions.remove::<Trailing>().map(|t| t.0);
    if parts.headers.contains_key(crate::grpc_code::GRPC_STATUS) {
        extra = None;
    } else if extra.is_none() || parts.headers.keys().any(in_receipt) {
        let extra = extra.get_or_insert_with(HeaderMap::new);
        // One pass over the headers: removing each receipt key by name parsed and hashed
        // thirteen names on every answer.
        let headers = std::mem::take(&mut parts.headers);
        parts.headers.reserve(headers.len());
        let mut name: Option<HeaderName> = None;
        for (n, v) in headers {
            // A name's first value comes with it, its others with `None`.
            let first = n.is_some();
            if first {
                name = n;
            }
            let Some(n) = &name else { continue };
            if in_receipt(n) {
                if first {
                    extra.insert(n.clone(), v);
                } else {
                    extra.append(n.clone(), v);
                }
            } else {
                if *n == POLICY_REVISION {
                    // The revision stays in the headers too, for clients that read it early.
                    extra.insert(n.clone(), v.clone());
                }
                parts.headers.append(n.clone(), v);
            }
        }
    }
    let extra = extra.filter(|e| !e.is_empty());
    http::Response::from_parts(parts, Watched::new(body, Trailers(extra)))
}

/// Adds `under`'s entries to `over` under the names `over` does not have: `over`'s win.
fn merge_under(over: &mut HeaderMap, under: HeaderMap) {
    // A name's first value comes with it, its others with `None`.
    let mut taking: Option<HeaderName> = None;
    for (name, value) in under {
        if let Some(name) = name {
            taking = (!over.contains_key(&name)).then_some(name);
            if let Some(n) = &taking {
                over.insert(n.clone(), value);
            }
        } else if let Some(n) = &taking {
            over.append(n.clone(), value);
        }
    }
}

/// A body whose trailers gain some headers.
pub type WithTrailers<B> = Watched<B, Trailers>;

/// The headers a body's trailers gain, until they are sent.
pub struct Trailers(Option<HeaderMap>);

impl<B: Body> Watch<B> for Trailers {
    fn frame(&mut self, frame: Polled<B>) -> Polled<B> {
        match frame {
            Some(Ok(frame)) => match frame.into_trailers() {
                Ok(trailers) => {
                    // The body's own trailers are a status or two: they go into Keel's,
                    // which are the more, rather than Keel's into them.
                    let trailers = match self.0.take() {
                        Some(mut extra) => {
                            merge_under(&mut extra, trailers);
                            extra
                        }
                        None => trailers,
                    };
                    Some(Ok(Frame::trailers(trailers)))
                }
                Err(frame) => Some(Ok(frame)),
            },
            Some(Err(e)) => Some(Err(e)),
            None => self.0.take().map(|extra| Ok(Frame::trailers(extra))),
        }
    }

    fn adds(&self) -> bool {
        self.0.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn the_receipt_moves_from_headers_to_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = http_body_util::StreamBody::new(futures::stream::iter([
            Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from_static(b"x"))),
            Ok(Frame::trailers(trailers)),
        ]));
        let res = http::Response::builder()
            .header(ATTEMPTS, "2")
            .header(POLICY_REVISION, "7")
            .body(body)
            .unwrap();
        let res = move_to_trailers(res);
        assert!(res.headers().get(ATTEMPTS).is_none());
        assert_eq!(res.headers()[POLICY_REVISION], "7");
        let collected = res.into_body().collect().await.unwrap();
        let t = collected.trailers().unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t[ATTEMPTS], "2");
        assert_eq!(t[POLICY_REVISION], "7");
    }

    #[test]
    fn trailers_only_answers_are_left_alone() {
        let res = http::Response::builder()
            .header("grpc-status", "14")
            .header(ATTEMPTS, "3")
            .body(())
            .unwrap();
        let res = move_to_trailers(res);
        assert_eq!(res.headers()[ATTEMPTS], "3");
    }
}
