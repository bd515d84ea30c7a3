//! gRPC's message framing read from a body's DATA frames: each message is a 5-byte prefix
//! (a compressed flag and a big-endian length), then that many bytes, and DATA frames may
//! cut anywhere. [`Messages`] takes the frames as they come and gives the first message,
//! without a copy when one frame held all of it and with one copy into a buffer sized by
//! its prefix when not. Its refusals are tonic's statuses, word for word, so that the edge
//! answers them as it answers tonic's (`api::unreadable`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tonic::Status;

/// The gRPC message prefix: the compressed flag and the length.
pub const PREFIX: usize = 5;

/// The prefix of an uncompressed message of `len` bytes.
pub fn prefix(len: usize) -> [u8; PREFIX] {
    let mut p = [0u8; PREFIX];
    p[1..].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    p
}

/// `message` as one frame whose compressed flag is `flag`: the frames tests read.
#[cfg(test)]
pub(crate) fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut v = prefix(message.len()).to_vec();
    v[0] = flag;
    v.extend_from_slice(message);
    v
}

/// The compressed flag and the message length of the prefix `bytes` begin with, when they
/// hold one.
pub fn read_prefix(bytes: &[u8]) -> Option<(u8, usize)> {
    match bytes {
        [flag, a, b, c, d, ..] => Some((*flag, u32::from_be_bytes([*a, *b, *c, *d]) as usize)),
        _ => None,
    }
}

/// A request body's gRPC messages, as its DATA frames bring them.
#[derive(Debug)]
pub struct Messages {
    max: usize,
    /// A prefix, or a message, read in part.
    partial: BytesMut,
    /// The length of the message being read, once its prefix is.
    len: Option<usize>,
    first: Option<Bytes>,
}

impl Messages {
    /// Messages of at most `max` bytes.
    pub fn new(max: usize) -> Messages {
        Messages {
            max,
            partial: BytesMut::new(),
            len: None,
            first: None,
        }
    }

    /// Takes one DATA frame's bytes.
    pub fn push(&mut self, mut data: Bytes) -> Result<(), Status> {
        loop {
            let Some(len) = self.len else {
                if data.is_empty() {
                    return Ok(());
                }
                let prefix = if self.partial.is_empty() && data.len() >= PREFIX {
                    data.split_to(PREFIX)
                } else {
                    let n = (PREFIX - self.partial.len()).min(data.len());
                    self.partial.put_slice(&data[..n]);
                    data.advance(n);
                    if self.partial.len() < PREFIX {
                        return Ok(());
                    }
                    self.partial.split().freeze()
                };
                self.len = Some(self.prefix(&prefix)?);
                continue;
            };
            if self.partial.is_empty() && data.len() >= len {
                // The whole message in this frame: no copy.
                self.got(data.split_to(len));
                continue;
            }
            if data.is_empty() {
                return Ok(());
            }
            if self.partial.is_empty() {
                self.partial.reserve(len);
            }
            let n = (len - self.partial.len()).min(data.len());
            self.partial.put_slice(&data[..n]);
            data.advance(n);
            if self.partial.len() == len {
                let message = self.partial.split().freeze();
                self.got(message);
            }
        }
    }

    /// The length a prefix gives, once its flag and length are checked as tonic checks them.
    fn prefix(&self, prefix: &[u8]) -> Result<usize, Status> {
        let (flag, len) = read_prefix(prefix).unwrap_or_default();
        match flag {
            0 => {}
            1 => {
                return Err(Status::internal(
                    "protocol error: received message with compressed-flag but no grpc-encoding was specified",
                ));
            }
            f => {
                return Err(Status::internal(format!(
                    "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1), while sending request"
                )));
            }
        }
        if len > self.max {
            return Err(Status::out_of_range(format!(
                "Error, decoded message length too large: found {len} bytes, the limit is: {} bytes",
                self.max
            )));
        }
        Ok(len)
    }

    fn got(&mut self, message: Bytes) {
        self.len = None;
        if self.first.is_none() {
            self.first = Some(message);
        }
    }

    /// The first message, once the body has ended.
    pub fn finish(self) -> Result<Bytes, Status> {
        if self.len.is_some() || !self.partial.is_empty() {
            return Err(Status::internal("Unexpected EOF decoding stream."));
        }
        self.first
            .ok_or_else(|| Status::internal("Missing request message."))
    }
}

/// The first message of a body that came as `frames`, as [`Messages`] reads them.
pub fn first(frames: impl IntoIterator<Item = Bytes>, max: usize) -> Result<Bytes, Status> {
    let mut m = Messages::new(max);
    for frame in frames {
        m.push(frame)?;
    }
    m.finish()
}

/// `body` as the DATA frames of a body cut at each of `cuts` (ascending; out-of-range cuts
/// are clamped), for tests and the fuzz target that check cuts change nothing.
#[doc(hidden)]
pub fn cut_at<'a>(body: &'a [u8], cuts: &'a [usize]) -> impl Iterator<Item = Bytes> + 'a {
    let mut at = 0;
    cuts.iter()
        .copied()
        .chain(std::iter::once(body.len()))
        .map(move |cut| {
            let cut = cut.clamp(at, body.len());
            let frame = Bytes::copy_from_slice(&body[at..cut]);
            at = cut;
            frame
        })
}

#[cfg(test)]
mod tests;
