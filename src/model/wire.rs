//! The message a request or answer arrived as, kept beside its domain form so that Keel can
//! send it on as received instead of encoding it again.
//!
//! A [`Wire`] holds the encoded message and a print of the domain value it decoded to
//! (hashes of the model, version, id, each parameter, and of everything else: tensors'
//! names, types, shapes, parameters and where their data lives). Whoever encodes the value
//! compares the print with the value as it is now ([`Wire::patch`]): when nothing changed
//! the bytes go as they came; when only the model, version, id or some parameters changed
//! (a routed version, Keel's own labels), those fields are appended to the bytes (protobuf
//! takes the last value of a field and merges map entries); when anything else changed (an
//! adapter renamed a tensor, a cast rewrote its data) the value is encoded whole. So no code
//! that changes a request or an answer has to remember the wire: a stale one cannot be sent.
//!
//! Equality of domain values ignores the wire: it is a cache of their encoding.

use std::sync::Arc;

use bytes::Bytes;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{ContentForm, InferRequest, InferResponse, Param, Parameters, RequestedOutput, Tensor};

/// The encoded message a value decoded from, if it still stands for it.
#[derive(Clone, Default)]
pub struct Wire(Option<Arc<Kept>>);

struct Kept {
    bytes: Bytes,
    print: Print,
    /// An answer's headers and trailers from its upstream, to pass on.
    headers: http::HeaderMap,
    trailers: http::HeaderMap,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(k) => write!(f, "Wire({} bytes)", k.bytes.len()),
            None => f.write_str("Wire(none)"),
        }
    }
}

impl PartialEq for Wire {
    fn eq(&self, _: &Wire) -> bool {
        true
    }
}

/// What changed since a value was decoded from its wire, when the wire can still carry it.
#[derive(Debug)]
pub struct Patch<'a> {
    /// The message as received.
    pub bytes: &'a Bytes,
    /// The model name changed (field 1 of both messages).
    pub model: bool,
    /// The version changed (field 2).
    pub version: bool,
    /// The id changed (field 3).
    pub id: bool,
    /// Parameters added or changed since (field 4, a map): their names.
    pub parameters: Vec<&'a str>,
}

/// Hashes of what a message carries, field by field where Keel may change it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Print {
    model: u64,
    version: u64,
    id: u64,
    /// One hash per parameter name, sorted.
    names: Vec<u64>,
    /// One hash per parameter (name and value), sorted.
    parameters: Vec<u64>,
    /// Everything else.
    rest: u64,
}

/// A hash built piece by piece, each piece hashed with the hash so far as its seed.
///
/// A print hashes a few dozen short pieces; xxh3's streaming state copied each one into its
/// buffer and started from a 192-byte secret, and was a third of the print's cost per call
/// (callgrind). One-shot xxh3 on a piece of up to 16 bytes is a few multiplies.
struct Chain(u64);

impl Chain {
    fn new() -> Self {
        Chain(0)
    }

    fn update(&mut self, piece: &[u8]) {
        self.0 = xxh3_64_with_seed(piece, self.0);
    }

    fn digest(&self) -> u64 {
        self.0
    }
}

/// What a value shows of itself to [`Print`].
trait Printable {
    fn heads(&self) -> [&str; 3];
    fn parameters(&self) -> &Parameters;
    fn rest(&self, h: &mut Chain);
}

impl Printable for InferRequest {
    fn heads(&self) -> [&str; 3] {
        [&self.model, &self.version, &self.id]
    }
    fn parameters(&self) -> &Parameters {
        &self.parameters
    }
    fn rest(&self, h: &mut Chain) {
        tensors(h, &self.inputs);
        h.update(&(self.outputs.len() as u64).to_le_bytes());
        for RequestedOutput { name, parameters } in &self.outputs {
            text(h, name);
            params(h, parameters);
        }
        form(h, self.form);
    }
}

impl Printable for InferResponse {
    fn heads(&self) -> [&str; 3] {
        [&self.model, &self.version, &self.id]
    }
    fn parameters(&self) -> &Parameters {
        &self.parameters
    }
    fn rest(&self, h: &mut Chain) {
        tensors(h, &self.outputs);
        form(h, self.form);
    }
}

fn text(h: &mut Chain, s: &str) {
    h.update(&(s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

fn one(s: &str) -> u64 {
    let mut h = Chain::new();
    text(&mut h, s);
    h.digest()
}

fn param(h: &mut Chain, name: &str, value: &Param) {
    text(h, name);
    match value {
        Param::Bool(b) => h.update(&[0, u8::from(*b)]),
        Param::Int64(i) => {
            h.update(&[1]);
            h.update(&i.to_le_bytes());
        }
        Param::String(s) => {
            h.update(&[2]);
            text(h, s);
        }
        Param::Double(d) => {
            h.update(&[3]);
            h.update(&d.to_bits().to_le_bytes());
        }
        Param::Uint64(u) => {
            h.update(&[4]);
            h.update(&u.to_le_bytes());
        }
    }
}

fn entry(name: &str, value: &Param) -> u64 {
    let mut h = Chain::new();
    param(&mut h, name, value);
    h.digest()
}

fn params(h: &mut Chain, p: &Parameters) {
    h.update(&(p.len() as u64).to_le_bytes());
    for (k, v) in p {
        param(h, k, v);
    }
}

fn tensors(h: &mut Chain, ts: &[Tensor]) {
    h.update(&(ts.len() as u64).to_le_bytes());
    for t in ts {
        text(h, t.name());
        text(h, t.dtype().as_str());
        h.update(&(t.shape().len() as u64).to_le_bytes());
        for d in t.shape() {
            h.update(&d.to_le_bytes());
        }
        // Where the data lives, not what it is: data is never changed in place, so new
        // data is new memory, and the data is not read.
        let data = t.data();
        h.update(&(data.as_ptr() as usize as u64).to_le_bytes());
        h.update(&(data.len() as u64).to_le_bytes());
        params(h, &t.parameters);
    }
}

fn form(h: &mut Chain, f: ContentForm) {
    h.update(&[match f {
        ContentForm::Raw => 0,
        ContentForm::Typed => 1,
    }]);
}

fn print(v: &impl Printable) -> Print {
    let [model, version, id] = v.heads().map(one);
    let mut parameters: Vec<u64> = v.parameters().iter().map(|(k, p)| entry(k, p)).collect();
    parameters.sort_unstable();
    let mut names: Vec<u64> = v.parameters().keys().map(|k| one(k)).collect();
    names.sort_unstable();
    let mut h = Chain::new();
    v.rest(&mut h);
    Print {
        model,
        version,
        id,
        names,
        parameters,
        rest: h.digest(),
    }
}

impl Wire {
    /// No wire: the value is encoded whole.
    pub fn none() -> Wire {
        Wire(None)
    }

    /// `bytes`, the message `request` was just decoded from.
    pub fn of_request(bytes: Bytes, request: &InferRequest) -> Wire {
        Wire::keep(bytes, request)
    }

    /// `bytes`, the message `response` was just decoded from, and the `headers` and
    /// `trailers` it came with (`grpc-status` and transport headers removed).
    pub fn of_response(
        bytes: Bytes,
        response: &InferResponse,
        headers: http::HeaderMap,
        trailers: http::HeaderMap,
    ) -> Wire {
        Wire(Some(Arc::new(Kept {
            bytes,
            print: print(response),
            headers,
            trailers,
        })))
    }

    fn keep(bytes: Bytes, v: &impl Printable) -> Wire {
        Wire(Some(Arc::new(Kept {
            bytes,
            print: print(v),
            headers: http::HeaderMap::new(),
            trailers: http::HeaderMap::new(),
        })))
    }

    /// The headers and trailers an upstream's answer came with; empty for any other value.
    pub fn metadata(&self) -> Option<(&http::HeaderMap, &http::HeaderMap)> {
        self.0.as_deref().map(|k| (&k.headers, &k.trailers))
    }

    /// Whether there is a wire at all (it may no longer stand for the value).
    pub fn is_kept(&self) -> bool {
        self.0.is_some()
    }

    /// What to append to the kept bytes for them to stand for `request` as it is now;
    /// `None` when it must be encoded whole.
    pub fn patch_request<'a>(&'a self, request: &'a InferRequest) -> Option<Patch<'a>> {
        self.patch(request)
    }

    /// As [`Wire::patch_request`], for an answer.
    pub fn patch_response<'a>(&'a self, response: &'a InferResponse) -> Option<Patch<'a>> {
        self.patch(response)
    }

    fn patch<'a, V: Printable>(&'a self, v: &'a V) -> Option<Patch<'a>> {
        let kept = self.0.as_deref()?;
        let was = &kept.print;
        let mut h = Chain::new();
        v.rest(&mut h);
        if h.digest() != was.rest {
            return None;
        }
        let [model, version, id] = v.heads().map(one);
        let mut parameters = Vec::new();
        let mut present = 0;
        for (k, p) in v.parameters() {
            if was.names.binary_search(&one(k)).is_ok() {
                present += 1;
            }
            if was.parameters.binary_search(&entry(k, p)).is_err() {
                parameters.push(k.as_str());
            }
        }
        // A parameter removed cannot be said by appending.
        if present != was.names.len() {
            return None;
        }
        Some(Patch {
            bytes: &kept.bytes,
            model: model != was.model,
            version: version != was.version,
            id: id != was.id,
            parameters,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> InferRequest {
        let t = Tensor::from_values("INPUT0", vec![1, 2], &[1i32, 2]).expect("tensor");
        InferRequest {
            model: "simple".into(),
            version: String::new(),
            id: "x".into(),
            parameters: Parameters::from([("a".to_string(), Param::Int64(1))]),
            inputs: vec![t],
            outputs: Vec::new(),
            form: ContentForm::Raw,
            wire: Wire::none(),
        }
    }

    fn kept(r: &InferRequest) -> Wire {
        Wire::of_request(Bytes::from_static(b"msg"), r)
    }

    #[test]
    fn an_unchanged_request_goes_as_it_came() {
        let r = request();
        let w = kept(&r);
        let p = w.patch_request(&r).expect("patch");
        assert!(!p.model && !p.version && !p.id && p.parameters.is_empty());
        assert_eq!(&p.bytes[..], b"msg");
    }

    #[test]
    fn a_new_version_or_parameter_is_appended() {
        let r = request();
        let w = kept(&r);
        let mut changed = r.clone();
        changed.version = "2".into();
        changed
            .parameters
            .insert("keel.x".into(), Param::Bool(true));
        changed.parameters.insert("a".into(), Param::Int64(2));
        let p = w.patch_request(&changed).expect("patch");
        assert!(p.version && !p.model && !p.id);
        let mut names = p.parameters.clone();
        names.sort_unstable();
        assert_eq!(names, vec!["a", "keel.x"]);
    }

    #[test]
    fn a_removed_parameter_or_a_changed_tensor_needs_a_whole_encoding() {
        let r = request();
        let w = kept(&r);
        let mut removed = r.clone();
        removed.parameters.clear();
        assert!(w.patch_request(&removed).is_none());
        let mut renamed = r.clone();
        renamed.inputs[0] = renamed.inputs[0].clone().with_name("OTHER");
        assert!(w.patch_request(&renamed).is_none());
        let mut recast = r.clone();
        recast.inputs[0] = Tensor::from_values("INPUT0", vec![1, 2], &[1i32, 2]).expect("tensor");
        assert!(
            w.patch_request(&recast).is_none(),
            "the same values in new memory are new data"
        );
        assert!(Wire::none().patch_request(&r).is_none());
    }
}
