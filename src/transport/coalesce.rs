//! A connection's writes, gathered so that one `writev` carries every frame h2 had ready.
//!
//! # Why
//!
//! h2 0.4 copies a DATA payload into its write buffer only below a threshold: 256 bytes
//! when the I/O says it writes vectored, 1 KiB when it does not (`FramedWrite`,
//! `CHAIN_THRESHOLD`). A larger payload is parked in a single slot, and h2 flushes before it
//! takes the next frame, so a gRPC answer of a few hundred bytes costs two writes (its DATA,
//! then its trailers) and the answers of concurrent streams never share one
//! (hyperium/h2 #902; #903 would batch them).
//!
//! [`Coalesce`] says it does not write vectored, so h2 copies every payload under 1 KiB
//! into its buffer and writes a connection's small frames as one chunk. For the larger
//! payloads h2 still parks, it takes h2's chunks as they come: small ones are kept, and a
//! large one is written with what was kept in one `writev`, never copied. Whatever is kept
//! is written when h2 flushes, which it does each time it has written what it had, so
//! nothing waits in it.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Chunks smaller than this are kept, to go with what follows.
const KEEP_BELOW: usize = 4 * 1024;

/// Kept bytes are written once they reach this much, whatever follows.
const KEEP_AT_MOST: usize = 64 * 1024;

/// An I/O whose writes are gathered until a flush or a large write (see the module docs).
#[derive(Debug)]
pub(crate) struct Coalesce<T> {
    inner: T,
    /// Bytes taken but not yet written, from `start`.
    kept: Vec<u8>,
    start: usize,
}

impl<T> Coalesce<T> {
    /// Gathers the writes to `inner`.
    pub(crate) fn new(inner: T) -> Self {
        Coalesce {
            inner,
            kept: Vec::new(),
            start: 0,
        }
    }

    #[cfg(test)]
    fn get_ref(&self) -> &T {
        &self.inner
    }

    fn pending(&self) -> &[u8] {
        &self.kept[self.start..]
    }

    /// Marks `n` kept bytes written.
    fn wrote(&mut self, n: usize) {
        self.start += n;
        if self.start == self.kept.len() {
            self.kept.clear();
            self.start = 0;
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes everything kept.
    fn poll_write_kept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending().is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.kept[self.start..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wrote(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if buf.len() < KEEP_BELOW && this.pending().len() + buf.len() <= KEEP_AT_MOST {
            this.kept.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        loop {
            let kept = this.pending().len();
            if kept == 0 {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
            let bufs = [IoSlice::new(&this.kept[this.start..]), IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n > kept {
                this.wrote(kept);
                return Poll::Ready(Ok(n - kept));
            }
            // Only kept bytes left (all of them, maybe): write again for `buf`'s.
            this.wrote(n);
        }
    }

    /// Not vectored, so that h2 copies small DATA payloads into its buffer (module docs);
    /// `poll_write` still writes vectored underneath.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_kept(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_kept(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An I/O that records each write it is given and takes at most `limit` bytes at once.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        limit: Option<usize>,
        flushes: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.limit.map_or(buf.len(), |l| l.min(buf.len()));
            self.get_mut().writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = self.limit.map_or(all.len(), |l| l.min(all.len()));
            self.get_mut().writes.push(all[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_writes_go_out_together_at_the_flush() {
        let mut io = Coalesce::new(Recorder::default());
        io.write_all(b"frame one").await.unwrap();
        io.write_all(b"frame two").await.unwrap();
        assert!(
            io.get_ref().writes.is_empty(),
            "nothing written before the flush"
        );
        io.flush().await.unwrap();
        assert_eq!(io.get_ref().writes, vec![b"frame oneframe two".to_vec()]);
        assert_eq!(io.get_ref().flushes, 1);
        assert!(io.pending().is_empty());
    }

    #[tokio::test]
    async fn a_large_write_carries_what_was_kept_in_one_write() {
        let mut io = Coalesce::new(Recorder::default());
        let large = vec![7u8; 20_000];
        io.write_all(b"head").await.unwrap();
        io.write_all(&large).await.unwrap();
        let writes = &io.get_ref().writes;
        assert_eq!(writes.len(), 1);
        assert_eq!(&writes[0][..4], b"head");
        assert_eq!(&writes[0][4..], &large[..]);
        io.flush().await.unwrap();
        assert_eq!(
            io.get_ref().writes.len(),
            1,
            "nothing left to write at the flush"
        );
    }

    #[tokio::test]
    async fn short_writes_lose_and_repeat_nothing() {
        let mut io = Coalesce::new(Recorder {
            limit: Some(3),
            ..Recorder::default()
        });
        let large = (0..10_000u32).map(|i| i as u8).collect::<Vec<_>>();
        io.write_all(b"kept bytes").await.unwrap();
        io.write_all(&large).await.unwrap();
        io.write_all(b"tail").await.unwrap();
        io.shutdown().await.unwrap();
        let sent: Vec<u8> = io.get_ref().writes.concat();
        let mut want = b"kept bytes".to_vec();
        want.extend_from_slice(&large);
        want.extend_from_slice(b"tail");
        assert_eq!(sent, want);
    }

    #[tokio::test]
    async fn too_much_kept_is_written_without_a_flush() {
        let mut io = Coalesce::new(Recorder::default());
        let chunk = vec![1u8; KEEP_BELOW - 1];
        for _ in 0..(KEEP_AT_MOST / chunk.len() + 1) {
            io.write_all(&chunk).await.unwrap();
        }
        assert!(!io.get_ref().writes.is_empty());
        assert!(io.pending().len() <= KEEP_AT_MOST);
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = Coalesce::new(a);
        b.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert!(!io.is_write_vectored());
    }
}
