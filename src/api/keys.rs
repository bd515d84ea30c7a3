//! The metadata keys the edge reads or writes on every call, parsed once.
//!
//! tonic's `MetadataMap` takes a `&'static str` key by parsing it into a header name on
//! each use (about 300 instructions for a name that is not one of HTTP's standard ones);
//! a key built once is only cloned, which for a static name copies a pointer. The names
//! themselves are defined where they are documented ([`REQUEST_ID`](crate::upstream::grpc::REQUEST_ID),
//! [`POLICY_REVISION`](super::POLICY_REVISION)). The receipt's names, written into a `HeaderMap`, are
//! `HeaderName` constants ([`super::receipt::names`]).

use std::sync::LazyLock;

use tonic::metadata::{Ascii, MetadataKey};

/// A metadata key parsed on first use.
pub type Key = LazyLock<MetadataKey<Ascii>>;

macro_rules! keys {
    ($($(#[$doc:meta])* $key:ident = $name:expr;)*) => {
        $($(#[$doc])* pub static $key: Key = LazyLock::new(|| MetadataKey::from_static($name));)*
    };
}

/// `x-request-id` (kept by the upstream, which sets it too).
pub use crate::upstream::grpc::REQUEST_ID_KEY as REQUEST_ID;

keys! {
    /// `keel-policy-revision`.
    POLICY_REVISION = super::POLICY_REVISION;
    /// `grpc-timeout`.
    GRPC_TIMEOUT = crate::headers::GRPC_TIMEOUT;
    /// `traceparent`.
    TRACEPARENT = "traceparent";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_is_its_name() {
        for (key, name) in [
            (&REQUEST_ID, "x-request-id"),
            (&POLICY_REVISION, "keel-policy-revision"),
            (&GRPC_TIMEOUT, "grpc-timeout"),
            (&TRACEPARENT, "traceparent"),
        ] {
            assert_eq!(key.as_str(), name);
        }
    }
}
