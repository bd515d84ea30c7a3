//! What of an upstream answer's headers and trailers reaches the client: all of it but
//! hop-by-hop and transport headers and the names Keel owns, which Keel writes itself
//! (nginx's `grpc_pass` passes an upstream's metadata on the same way).
//!
//! Keel owns every name beginning with `keel-`, `x-request-id`, and gRPC's own `grpc-*`
//! (status, message, details, encoding, timeout); an upstream's value for any of them is
//! dropped, so its labels cannot pass for Keel's.

use http::HeaderMap;
use http::header::HeaderName;
use tonic::metadata::MetadataMap;

/// Names never passed on: hop-by-hop (RFC 9110 §7.6.1) and HTTP/2 transport headers.
const NOT_PASSED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-type",
    "content-length",
    "content-encoding",
    "x-request-id",
];

/// Whether an upstream's `name` may reach the client.
pub fn passes(name: &HeaderName) -> bool {
    let n = name.as_str();
    !(NOT_PASSED.contains(&n) || n.starts_with("grpc-") || n.starts_with("keel-"))
}

/// The upstream's headers that may reach the client.
pub fn filter(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    filter_into(&mut out, upstream);
    out
}

/// Appends to `out` the upstream's headers that may reach the client.
pub fn filter_into(out: &mut HeaderMap, upstream: &HeaderMap) {
    for (name, value) in upstream {
        if passes(name) {
            out.append(name.clone(), value.clone());
        }
    }
}

/// Adds the upstream's headers to an answer's metadata, under the names Keel has not
/// written: Keel's own are written after, and win.
pub fn add_headers(md: &mut MetadataMap, upstream: &HeaderMap) {
    if upstream.is_empty() {
        return;
    }
    let mut headers = std::mem::take(md).into_headers();
    for name in upstream.keys() {
        if passes(name) && !headers.contains_key(name) {
            for value in upstream.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    *md = MetadataMap::from_headers(headers);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_transport_and_keels_names_do_not_pass() {
        let mut up = HeaderMap::new();
        for (k, v) in [
            ("x-upstream-name", "triton-0"),
            ("connection", "close"),
            ("content-type", "application/grpc"),
            ("grpc-encoding", "gzip"),
            ("keel-tier", "forged"),
            ("x-request-id", "other"),
            ("server-timing", "infer;dur=3"),
        ] {
            up.append(k, HeaderValue::from_static(v));
        }
        let out = filter(&up);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["x-upstream-name", "server-timing"]);
    }

    #[test]
    fn keels_own_values_win() {
        let mut md = MetadataMap::new();
        md.insert("keel-policy-revision", "3".parse().expect("value"));
        md.insert("x-model-version", "keel".parse().expect("value"));
        let mut up = HeaderMap::new();
        up.insert("x-model-version", HeaderValue::from_static("upstream"));
        up.insert("x-upstream-name", HeaderValue::from_static("triton-0"));
        add_headers(&mut md, &up);
        assert_eq!(
            md.get("x-model-version").map(|v| v.to_str().ok()),
            Some(Some("keel"))
        );
        assert_eq!(
            md.get("x-upstream-name").map(|v| v.to_str().ok()),
            Some(Some("triton-0"))
        );
        assert!(md.get("keel-policy-revision").is_some());
    }
}
