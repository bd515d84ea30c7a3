//! A model's response cache: recent successful answers by a stable hash of the request,
//! bounded by entries and bytes whatever the load.
//!
//! Entries remember when they were stored (`tokio::time::Instant`, so paused-time tests
//! drive expiry): younger than `fresh_ttl` they answer without calling the model; up to
//! `max_stale` old they may answer as the `cache` rung of the fallback ladder.

use std::sync::Arc;
use std::time::Duration;

use quick_cache::Weighter;
use quick_cache::sync::Cache;
use tokio::time::Instant;
use xxhash_rust::xxh3::Xxh3;

use crate::model::{InferRequest, InferResponse};
use crate::policy::CacheSpec;

#[derive(Debug)]
struct Entry {
    response: InferResponse,
    at: Instant,
    bytes: u64,
}

/// Weighs an entry by its tensor bytes, but never below `bytes / entries`, so that the
/// byte bound also bounds the number of entries.
#[derive(Clone, Debug)]
struct ByBytes {
    floor: u64,
}

impl Weighter<u64, Arc<Entry>> for ByBytes {
    fn weight(&self, _key: &u64, e: &Arc<Entry>) -> u64 {
        e.bytes.max(self.floor).max(1)
    }
}

/// The cache of one model.
pub struct ResponseCache {
    spec: CacheSpec,
    entries: Cache<u64, Arc<Entry>, ByBytes>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ResponseCache({} entries, {} bytes)",
            self.entries.len(),
            self.entries.weight()
        )
    }
}

/// A stable hash of what changes a model's answer: model, version, every input (name,
/// type, shape, bytes) and the parameters.
pub fn key(req: &InferRequest) -> u64 {
    let mut h = Xxh3::new();
    h.update(req.model.as_bytes());
    h.update(&[0]);
    h.update(req.version.as_bytes());
    for t in &req.inputs {
        h.update(&[0]);
        h.update(t.name().as_bytes());
        h.update(t.dtype().as_str().as_bytes());
        for d in t.shape() {
            h.update(&d.to_le_bytes());
        }
        h.update(&(t.data().len() as u64).to_le_bytes());
        h.update(t.data());
    }
    for o in &req.outputs {
        h.update(&[1]);
        h.update(o.name.as_bytes());
    }
    // Parameters are few; their Debug form is deterministic (a sorted map).
    h.update(format!("{:?}", req.parameters).as_bytes());
    h.digest()
}

impl ResponseCache {
    /// An empty cache.
    pub fn new(spec: CacheSpec) -> ResponseCache {
        let floor = (spec.bytes / spec.entries.max(1)) as u64;
        let entries = Cache::with_weighter(spec.entries, spec.bytes as u64, ByBytes { floor });
        ResponseCache { spec, entries }
    }

    /// The settings it was built with.
    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }

    /// Stores a successful answer.
    pub fn insert(&self, key: u64, response: &InferResponse) {
        let bytes: u64 = response.outputs.iter().map(|t| t.data().len() as u64).sum();
        // An answer larger than the whole cache is not kept.
        if bytes > self.spec.bytes as u64 {
            return;
        }
        let entry = Entry {
            response: response.clone(),
            at: Instant::now(),
            bytes,
        };
        self.entries.insert(key, Arc::new(entry));
    }

    /// An answer younger than `max_age`, with its age.
    pub fn get(&self, key: u64, max_age: Duration) -> Option<(InferResponse, Duration)> {
        let e = self.entries.get(&key)?;
        let age = e.at.elapsed();
        (age <= max_age).then(|| (e.response.clone(), age))
    }

    /// A fresh answer (younger than `fresh_ttl`), when the cache answers without calling.
    pub fn fresh(&self, key: u64) -> Option<(InferResponse, Duration)> {
        self.get(key, self.spec.fresh_ttl?)
    }

    /// Entries and bytes held.
    pub fn usage(&self) -> (usize, u64) {
        (self.entries.len(), self.entries.weight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContentForm, Parameters, Tensor};

    fn request(n: u32, size: usize) -> (InferRequest, InferResponse) {
        let t = Tensor::from_values("x", vec![size as i64], &vec![n as u8; size]).unwrap();
        let req = InferRequest {
            model: "m".into(),
            version: String::new(),
            id: String::new(),
            parameters: Parameters::new(),
            inputs: vec![t.clone()],
            outputs: vec![],
            form: ContentForm::Raw,
            wire: Default::default(),
        };
        let resp = InferResponse {
            model: "m".into(),
            version: "1".into(),
            id: String::new(),
            parameters: Parameters::new(),
            outputs: vec![t],
            form: ContentForm::Raw,
            wire: Default::default(),
        };
        (req, resp)
    }

    fn spec(entries: usize, bytes: usize) -> CacheSpec {
        CacheSpec {
            entries,
            bytes,
            fresh_ttl: Some(Duration::from_secs(10)),
            max_stale: Duration::from_secs(300),
            serve_stale_on_error: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn entries_are_fresh_then_stale_then_gone() {
        let c = ResponseCache::new(spec(10, 1 << 20));
        let (req, resp) = request(1, 8);
        let k = key(&req);
        c.insert(k, &resp);
        assert_eq!(c.fresh(k).unwrap().0, resp);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(c.fresh(k).is_none(), "older than fresh_ttl");
        let (stale, age) = c.get(k, Duration::from_secs(300)).unwrap();
        assert_eq!(stale, resp);
        assert_eq!(age, Duration::from_secs(11));
        tokio::time::advance(Duration::from_secs(300)).await;
        assert!(
            c.get(k, Duration::from_secs(300)).is_none(),
            "older than max_stale"
        );
    }

    #[test]
    fn the_key_changes_with_any_input_byte_and_not_otherwise() {
        let (a, _) = request(1, 8);
        let (b, _) = request(2, 8);
        assert_eq!(key(&a), key(&a.clone()));
        assert_ne!(key(&a), key(&b));
        let mut c = a.clone();
        c.version = "2".into();
        assert_ne!(key(&a), key(&c));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_never_grows_beyond_the_bounds_under_any_load() {
        let c = ResponseCache::new(spec(100, 64 * 1024));
        for n in 0..20_000u32 {
            let (req, resp) = request(n, (n as usize % 4000) + 1);
            c.insert(key(&req), &resp);
            let (entries, bytes) = c.usage();
            assert!(entries <= 100, "{entries} entries after {n} inserts");
            assert!(bytes <= 64 * 1024, "{bytes} bytes after {n} inserts");
        }
        let (big_req, big) = request(7, 1 << 20);
        c.insert(key(&big_req), &big);
        assert!(
            c.fresh(key(&big_req)).is_none(),
            "larger than the cache: not kept"
        );
    }
}
