//! Recognizes the end of a client's HTTP/2 connection preface in the bytes it sends: the
//! 24-byte magic, then its first frame (SETTINGS, RFC 9113 §3.4) whole.
//!
//! hyper does not say when a connection's preface is complete, and a connection that never
//! completes it costs a connection slot and a task for nothing; [`Conn`](super::Conn)
//! feeds what it reads here until [`Progress::Done`], then stops looking.

/// What every HTTP/2 client sends first.
const MAGIC: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A frame header: 3 bytes of length, type, flags, 4 bytes of stream id.
const FRAME_HEADER: usize = 9;

/// How far a connection is through its preface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Progress {
    /// More bytes are needed.
    Partial,
    /// The magic and the whole first frame arrived.
    Done,
    /// The first bytes are not HTTP/2's magic: HTTP/1.1 on the admin listener, or garbage
    /// the server refuses at once.
    NotHttp2,
}

/// The bytes of the preface read so far.
#[derive(Debug, Default)]
pub(super) struct Preface {
    /// Bytes fed so far (only counted until the end of the first frame).
    seen: usize,
    /// The first frame's header, as it arrives.
    header: [u8; FRAME_HEADER],
}

impl Preface {
    /// Takes the next bytes read from the connection. Linear in `bytes`, and looks at no
    /// more than the preface's own length.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Progress {
        let mut bytes = bytes;
        if self.seen < MAGIC.len() {
            let n = bytes.len().min(MAGIC.len() - self.seen);
            if bytes[..n] != MAGIC[self.seen..self.seen + n] {
                return Progress::NotHttp2;
            }
            self.seen += n;
            bytes = &bytes[n..];
            if self.seen < MAGIC.len() {
                return Progress::Partial;
            }
        }
        let header_end = MAGIC.len() + FRAME_HEADER;
        if self.seen < header_end {
            let at = self.seen - MAGIC.len();
            let n = bytes.len().min(FRAME_HEADER - at);
            self.header[at..at + n].copy_from_slice(&bytes[..n]);
            self.seen += n;
            bytes = &bytes[n..];
            if self.seen < header_end {
                return Progress::Partial;
            }
        }
        let [a, b, c, ..] = self.header;
        let payload = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        let end = header_end + payload;
        self.seen = end.min(self.seen + bytes.len());
        if self.seen == end {
            Progress::Done
        } else {
            Progress::Partial
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The magic and a SETTINGS frame with one setting (6 bytes of payload).
    fn preface() -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        b
    }

    #[test]
    fn the_preface_is_done_once_its_first_frame_is_whole_however_it_is_split() {
        let whole = preface();
        for split in 0..=whole.len() {
            let mut p = Preface::default();
            let first = p.feed(&whole[..split]);
            let expected_first = if split == whole.len() {
                Progress::Done
            } else {
                Progress::Partial
            };
            assert_eq!(first, expected_first, "split at {split}");
            if split < whole.len() {
                assert_eq!(p.feed(&whole[split..]), Progress::Done, "split at {split}");
            }
        }
        // Byte by byte, and with the first request's bytes right behind it.
        let mut p = Preface::default();
        let progress: Vec<_> = whole.iter().map(|b| p.feed(&[*b])).collect();
        assert_eq!(progress.last(), Some(&Progress::Done));
        assert!(
            progress[..whole.len() - 1]
                .iter()
                .all(|p| *p == Progress::Partial)
        );
        let mut more = whole.clone();
        more.extend_from_slice(&[0, 0, 4, 1, 4, 0, 0, 0, 1]);
        assert_eq!(Preface::default().feed(&more), Progress::Done);
    }

    #[test]
    fn an_empty_settings_frame_ends_the_preface_at_its_header() {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(Preface::default().feed(&b), Progress::Done);
        // Ten bytes of the magic, as the half-open sockets of issue 22 sent.
        assert_eq!(Preface::default().feed(&b[..10]), Progress::Partial);
    }

    #[test]
    fn other_protocols_are_told_apart_at_their_first_different_byte() {
        assert_eq!(
            Preface::default().feed(b"GET /metrics HTTP/1.1\r\n"),
            Progress::NotHttp2
        );
        let mut p = Preface::default();
        assert_eq!(p.feed(b"PRI * HT"), Progress::Partial);
        assert_eq!(p.feed(b"TP/1.1"), Progress::NotHttp2);
    }
}
