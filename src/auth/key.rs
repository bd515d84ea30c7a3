//! API keys: hashing, the `authorization: Bearer <key>` header, and constant-time lookup.
//!
//! The policy holds SHA-256 digests only. A presented key is hashed, and its digest is
//! compared with every digest of every tenant with a comparison that does not stop at the
//! first differing byte, and the scan does not stop at the first match, so the time taken
//! says nothing about how close a guess was.

use sha2::{Digest, Sha256};

/// The SHA-256 digest of `key`.
pub fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// `sha256:<hex>` of `key`, as `keel hash-key` prints it and the policy stores it.
pub fn hash_key(key: &str) -> String {
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest(key.as_bytes()) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Whether two digests are equal, looking at every byte whatever the earlier ones were.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// Why the `authorization` header gave no key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadHeader {
    /// There is none.
    Missing,
    /// It is not `Bearer <key>`.
    NotBearer,
}

/// The key of an `authorization: Bearer <key>` value (the scheme in any case, RFC 6750).
pub fn bearer(value: Option<&[u8]>) -> Result<&[u8], BadHeader> {
    let v = value.ok_or(BadHeader::Missing)?;
    let (scheme, rest) = v.split_at_checked(7).ok_or(BadHeader::NotBearer)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return Err(BadHeader::NotBearer);
    }
    let key = rest.trim_ascii();
    if key.is_empty() {
        return Err(BadHeader::NotBearer);
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_the_sha256_of_the_key_in_hex() {
        assert_eq!(
            hash_key("foo"),
            "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
        );
    }

    #[test]
    fn digests_compare_equal_only_when_every_byte_is() {
        let a = digest(b"k1");
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
        b = a;
        b[0] ^= 0x80;
        assert!(!constant_time_eq(&a, &b));
    }

    #[test]
    fn only_a_bearer_value_gives_a_key() {
        assert_eq!(bearer(Some(b"Bearer abc")), Ok(&b"abc"[..]));
        assert_eq!(bearer(Some(b"bearer  abc ")), Ok(&b"abc"[..]));
        assert_eq!(bearer(None), Err(BadHeader::Missing));
        assert_eq!(bearer(Some(b"Basic abc")), Err(BadHeader::NotBearer));
        assert_eq!(bearer(Some(b"Bearer ")), Err(BadHeader::NotBearer));
        assert_eq!(bearer(Some(b"Bear")), Err(BadHeader::NotBearer));
    }
}
