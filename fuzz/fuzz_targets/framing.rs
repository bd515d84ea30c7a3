//! Arbitrary bytes as a gRPC request body, cut into DATA frames where the input's first
//! bytes say, read as the edge reads a unary call's body (`pb::framing::Messages`): never a
//! panic, the same message or refusal wherever the frames cut, and the message is the one
//! the first prefix frames.
#![no_main]

use bytes::Bytes;
use keel::pb::framing::{self, PREFIX};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fn read(body: &[u8], cuts: &[usize]) -> Result<Bytes, (tonic::Code, String)> {
    framing::first(framing::cut_at(body, cuts), MAX)
        .map_err(|s| (s.code(), s.message().to_string()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8).min(rest.len());
    let (cut_bytes, body) = rest.split_at(n);
    let mut cuts: Vec<usize> = cut_bytes
        .iter()
        .map(|b| usize::from(*b) * body.len() / 255)
        .collect();
    cuts.sort_unstable();
    let whole = read(body, &[]);
    assert_eq!(read(body, &cuts), whole, "cut at {cuts:?}");
    if let Ok(message) = whole {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert_eq!(body[0], 0);
        assert_eq!(&message[..], &body[PREFIX..PREFIX + len]);
    }
});
